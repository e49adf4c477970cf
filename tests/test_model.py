import pytest
import torch
from torch import nn

from optcli.engine.model import MLP, Dropout


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5, 0.9])
def test_cpu_dropout_drops_p_and_keeps_the_expectation(p):
    torch.manual_seed(0)
    y = Dropout(p)(torch.ones(2000, 1000))
    assert (y == 0).float().mean().item() == pytest.approx(p, abs=0.003)
    assert y.mean().item() == pytest.approx(1.0, abs=0.01)
    values = torch.unique(y).tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / (1 - p), rel=1e-3)


def test_cpu_dropout_is_seeded_masks_gradients_and_is_identity_in_eval():
    d = Dropout(0.3)
    x = torch.randn(64, 32, requires_grad=True)
    torch.manual_seed(1)
    a = d(x)
    torch.manual_seed(1)
    b = d(x)
    assert torch.equal(a, b)
    a.sum().backward()
    assert torch.equal(x.grad == 0, a == 0)
    d.eval()
    assert torch.equal(d(x), x)
    assert isinstance(d, nn.Dropout)


def test_mlp_names_its_layers():
    model = MLP(784, [512, 256], 10, "relu", 0.2, batch_norm=True)
    assert [n for n, _ in model.named_parameters()] == [
        "fc1.weight",
        "fc1.bias",
        "bn1.weight",
        "bn1.bias",
        "fc2.weight",
        "fc2.bias",
        "bn2.weight",
        "bn2.bias",
        "out.weight",
        "out.bias",
    ]
    assert model(torch.randn(4, 784)).shape == (4, 10)
