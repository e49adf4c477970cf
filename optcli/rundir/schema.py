"""Run files read back as untrusted: a checkpoint (last.pt) and a comparison's summary.json are validated the way
configs are, and a file from another format version is refused with one line, never read with a different meaning.

FORMAT_VERSION 2 is the first to carry a version: files without one were written by an optcli from before the
reliability changes (default task, names, strict JSON) and are refused rather than guessed at."""

from __future__ import annotations

import json
import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, ValidationError

from optcli.errors import UserError

FORMAT_VERSION = 2

Number = StrictInt | StrictFloat


class _Lenient(BaseModel):
    """Known keys are checked; keys added by later features pass through."""

    model_config = ConfigDict(extra="allow", arbitrary_types_allowed=True)


class EpochEntry(_Lenient):
    epoch: StrictInt = Field(gt=0)
    train_loss: Number | None  # null in JSON: the loss was not finite (the run's status says diverged)
    val_loss: Number | None
    val_accuracy: Number | None
    lr: Number | None
    seconds: Number


class HistoryEntry(_Lenient):
    epochs: list[EpochEntry]
    status: StrictStr
    diverged_at: dict[str, Any] | None = None
    test_loss: Number | None = None
    test_accuracy: Number | None = None


class ParamGroupState(_Lenient):
    lr: Number | Any  # a tensor lr is torch's own option; anything else is checked below
    params: list[StrictInt]


class OptimizerState(_Lenient):
    state: dict[Any, Any]
    param_groups: list[ParamGroupState] = Field(min_length=1)


class RngState(_Lenient):
    torch: Any
    cuda: list[Any]


class CheckpointFile(_Lenient):
    format: StrictInt
    model: dict[StrictStr, Any]
    optimizer: OptimizerState
    scheduler: dict[str, Any] | None
    rng: RngState
    history: HistoryEntry
    config: dict[str, Any]


class SpecEntry(_Lenient):
    label: StrictStr
    name: StrictStr  # and `kwargs`, a mapping: checked by hand, since a field of that name breaks mypy's plugin


class TrialEntry(HistoryEntry):
    label: StrictStr
    seed: StrictInt
    lr: Number | None = None


class ComparisonSummaryFile(_Lenient):
    format: StrictInt
    specs: list[SpecEntry] = Field(min_length=1)
    seeds: list[StrictInt] = Field(min_length=1)
    epochs: StrictInt = Field(gt=0)
    task: StrictStr
    trials: list[TrialEntry]
    warnings: list[StrictStr] = []  # a figure that could not be drawn, a tuning trial run again, ...


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "top level"
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{loc}: {err['msg']}{more}"


def _check_format(found: Any, path: str, what: str) -> None:
    if found is None:
        raise UserError(
            f"{path}: written by an optcli older than run-file format {FORMAT_VERSION} (no format version); "
            f"its meaning may differ: use that optcli to read it, or run it again"
        )
    if found != FORMAT_VERSION:
        raise UserError(f"{path}: {what} format {found!r} is not the format {FORMAT_VERSION} this optcli reads")


def check_checkpoint(obj: Any, path: str) -> dict:
    """A loaded last.pt, checked in full: structure, types, tensors where tensors belong, usable learning rates."""
    import torch

    if not isinstance(obj, dict) or "model" not in obj or "config" not in obj:
        raise UserError(f"{path}: not an optcli checkpoint (expected a dict with 'model' and 'config')")
    _check_format(obj.get("format"), path, "checkpoint")
    try:
        ckpt = CheckpointFile.model_validate(obj)
    except ValidationError as exc:
        raise UserError(f"{path}: not a valid checkpoint: {_first_error(exc)}") from None
    bad = [k for k, v in ckpt.model.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise UserError(f"{path}: not a valid checkpoint: model.{bad[0]}: not a tensor")
    if not isinstance(ckpt.rng.torch, torch.Tensor) or ckpt.rng.torch.dtype != torch.uint8:
        raise UserError(f"{path}: not a valid checkpoint: rng.torch: not a generator state (a uint8 tensor)")
    for i, group in enumerate(ckpt.optimizer.param_groups):
        lr = group.lr
        if isinstance(lr, torch.Tensor) and lr.numel() == 1:
            lr = float(lr)
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
            raise UserError(
                f"{path}: not a valid checkpoint: optimizer.param_groups.{i}.lr: not a finite number >= 0 (got {lr!r})"
            )
    return obj


def parse_comparison_summary(data: bytes, path: str) -> dict:
    """A comparison's summary.json, checked in full, with null losses read back as NaN (how they were written)."""
    raw = _json_object(data, path)
    missing = [k for k in ("specs", "seeds", "epochs", "task", "trials") if k not in raw]
    if missing:
        raise UserError(f"{path}: not a comparison summary (missing {', '.join(missing)})")
    _check_format(raw.get("format"), path, "summary")
    try:
        summary = ComparisonSummaryFile.model_validate(raw)
    except ValidationError as exc:
        raise UserError(f"{path}: not a valid comparison summary: {_first_error(exc)}") from None
    for i, spec in enumerate(raw["specs"]):
        if not isinstance(spec.get("kwargs"), dict):
            raise UserError(f"{path}: not a valid comparison summary: specs.{i}.kwargs: not a mapping")
    _check_trials(summary, path)
    for trial in raw["trials"]:
        for e in trial["epochs"]:
            for key in ("train_loss", "lr"):
                if e[key] is None:
                    e[key] = math.nan
    return raw


def _json_object(data: bytes, path: str) -> dict:
    try:
        raw = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise UserError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: not a comparison summary (the top level is a {type(raw).__name__})")
    return raw


def _check_trials(summary: ComparisonSummaryFile, path: str) -> None:
    """Every trial belongs to one of the comparison's optimizers (each label once) and seeds, within its epochs."""
    labels = [s.label for s in summary.specs]
    if len(set(labels)) != len(labels):
        raise UserError(f"{path}: not a valid comparison summary: specs: a label appears twice")
    for i, t in enumerate(summary.trials):
        if t.label not in labels:
            raise UserError(f"{path}: trials.{i}: optimizer '{t.label}' is not one of the comparison's {labels}")
        if t.seed not in summary.seeds:
            raise UserError(f"{path}: trials.{i}: seed {t.seed} is not one of the comparison's {summary.seeds}")
        if len(t.epochs) > summary.epochs:
            raise UserError(f"{path}: trials.{i}: {len(t.epochs)} epochs, more than the comparison's {summary.epochs}")
