"""optcli: train small PyTorch networks and compare torch.optim optimizers fairly."""

__version__ = "0.1.0"
