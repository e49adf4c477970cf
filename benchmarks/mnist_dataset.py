"""MNIST as a user's map-style Dataset (one normalized 1x28x28 image and its label per __getitem__), for the
streamed-against-in-memory section of benchmarks/perf.py: data.name=mnist_dataset:make_dataset, data.path=benchmarks."""

import torch
from torch.utils.data import Dataset


class MNISTSamples(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.images[i].unsqueeze(0).float().div(255).sub(0.1307).div(0.3081)
        return image, int(self.labels[i])


def make_dataset(root: str):
    from torchvision.datasets import MNIST

    train, test = MNIST(root, train=True), MNIST(root, train=False)
    return MNISTSamples(train.data, train.targets), MNISTSamples(test.data, test.targets)
