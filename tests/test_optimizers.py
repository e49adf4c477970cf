"""Every torch.optim optimizer, listed by introspection (timm's style): built on the MLP, stepped as training steps
it, and checkpointed through torch.save / torch.load(weights_only=True) into a fresh optimizer."""

import io

import pytest
import torch

from optcli.config import ModelConfig, OptimizerConfig, load_config
from optcli.engine import stepping
from optcli.engine.model import build_model
from optcli.engine.optimizers import check_optimizer, optimizer_classes
from optcli.errors import UserError

TORCH_OPTIMIZERS = sorted(optimizer_classes().values(), key=lambda cls: cls.__name__)
DENSE_REFUSED = {torch.optim.SparseAdam}  # steps sparse gradients only: optcli refuses it before training
# Muon orthogonalises matrices and takes 2-D parameters only: the MLP's biases make optcli refuse it, and it is
# stepped here on the weight matrices alone, as it is meant to be used
MATRICES_ONLY = {cls for cls in TORCH_OPTIMIZERS if cls.__name__ == "Muon"}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(hidden=[8]), 4, 3)


def _params(model: torch.nn.Module, cls: type) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if cls not in MATRICES_ONLY or p.ndim == 2]


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    x, y = torch.randn(16, 4, generator=torch.Generator().manual_seed(1)), torch.arange(16) % 3

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    if stepping.needs_closure(optimizer):
        stepping.step_with_closure(optimizer, closure)
    else:
        closure()
        optimizer.step()


def _assert_same(a: object, b: object, where: str = "state_dict") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, type(a)) and len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            _assert_same(u, v, f"{where}[{i}]")
    else:
        assert a == b, where


def test_the_list_is_torch_optims_own():
    names = {cls.__name__ for cls in TORCH_OPTIMIZERS}
    assert {"SGD", "Adam", "AdamW", "LBFGS", "RMSprop", "SparseAdam"} <= names
    assert all(issubclass(cls, torch.optim.Optimizer) for cls in TORCH_OPTIMIZERS)


@pytest.mark.parametrize("cls", TORCH_OPTIMIZERS, ids=lambda cls: cls.__name__)
def test_every_torch_optimizer_steps_the_mlp_and_checkpoints(cls):
    if cls in DENSE_REFUSED | MATRICES_ONLY:
        with pytest.raises(UserError, match="cannot train this model"):
            check_optimizer(OptimizerConfig(name=cls.__name__))
        if cls in DENSE_REFUSED:
            return
    else:
        check_optimizer(OptimizerConfig(name=cls.__name__))  # the trial step accepts its defaults
    model = _model()
    optimizer = cls(_params(model, cls))
    before = [p.detach().clone() for p in model.parameters()]
    _step(model, optimizer)
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True)), "nothing moved"

    saved = optimizer.state_dict()
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    fresh = cls(_params(_model(), cls))
    fresh.load_state_dict(loaded)
    _assert_same(saved, fresh.state_dict())


def test_needs_closure_is_a_function_of_the_class_alone():
    """The answer must not depend on whether the optimizer was checked (trial-stepped) in this process before."""
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    cases = {torch.optim.LBFGS: True, torch.optim.Adam: False, pytorch_optimizer.SAM: True}
    stepping.refuses_plain_step.cache_clear()
    before = {cls: stepping.needs_closure(cls) for cls in cases}
    check_optimizer(load_config(None, ["optimizer.name=lbfgs"]).optimizer)
    check_optimizer(load_config(None, ["optimizer.name=adam"]).optimizer)
    sam = ["optimizer.name=pytorch_optimizer.SAM", "optimizer.base_optimizer=adam", "optimizer.lr=1e-3"]
    check_optimizer(load_config(None, sam).optimizer)
    after = {cls: stepping.needs_closure(cls) for cls in cases}
    assert before == after == cases
    assert stepping.gradient_before_closure(pytorch_optimizer.SAM)
    assert not stepping.gradient_before_closure(torch.optim.LBFGS)
