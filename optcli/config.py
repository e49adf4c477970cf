"""The run configuration: schema, YAML loading and --set overrides. Imports no torch.

Defaults are the built-in task: a synthetic regression with signal (a fixed random teacher plus Gaussian
noise of known variance, with a validation split; tasks/regression.py), so `optcli train` and `optcli compare`
run anywhere, offline, in seconds, and their answers mean something. PyTorch's "learning with examples"
tutorial (random targets) is `data.target: random`, spelled out in configs/tutorial.yaml.
"""

from __future__ import annotations

import difflib
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from optcli.errors import UserError
from optcli.limits import MAX_CONFIG_BYTES, read_bounded
from optcli.safe_yaml import parse_yaml

RUN_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"  # a run directory's name: train, compare and merge
RUN_NAME_RULE = (
    "must be a plain directory name of letters, digits, '.', '_' or '-', starting with a letter or digit, "
    "at most 100 characters"
)


SEED_MAX = 2**32 - 1  # numpy's seeds are in [0, 2**32 - 1]; torch's wider range would overflow other consumers
SEED_RULE = f"must be an integer in [0, 2**32 - 1 = {SEED_MAX}] (numpy's seed range)"


def _seed_in_range(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= SEED_MAX:
        raise ValueError(SEED_RULE)
    return value


Seed = Annotated[int, BeforeValidator(_seed_in_range)]


def check_seed(value: object, where: str) -> int:
    """A seed made outside the config (e.g. compare's seed + k - 1) held to the config's rule; `where` names it."""
    try:
        return int(_seed_in_range(value))
    except ValueError:
        raise UserError(f"{where}: {SEED_RULE} (got {shown_name(value)})") from None


def shown_name(name: object) -> str:
    """A rejected name as an error line shows it: whole when short, else its start and its length."""
    text = repr(name)
    return text if len(text) <= 60 else f"{text[:50]}... ({len(str(name))} characters)"


ACTIVATIONS = ("relu", "gelu", "tanh", "sigmoid", "leaky_relu", "elu", "silu")


MLP = "mlp"  # model.name of the built-in MLP
MLP_ONLY = ("hidden", "activation", "dropout", "batch_norm")  # model keys a user's model does not take
IMPORT_PATH = r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*"  # pkg.module:factory


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _default_task() -> str:
    from optcli.tasks.registry import DEFAULT_TASK

    return DEFAULT_TASK


class DataConfig(Section):
    name: str = Field(default_factory=lambda: _default_task())  # a task registered in optcli/tasks/ (tasks.registry)
    seed: Seed = 0  # the synthetic data and the train/validation split; kept apart from the run's seed
    root: str = "data"  # torchvision root: MNIST lives in <root>/MNIST/raw
    download: bool = True  # fetch MNIST when it is missing
    batch_size: int = Field(64, gt=0)
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)  # held out of the training split for validation
    val_split: Literal["random", "last"] = "random"  # a split seeded by data.seed, or the last samples in file order
    normalize: Literal["standardize", "unit", "none"] = "standardize"  # MNIST pixels: (x/255-mean)/std, x/255, x
    target: Literal["teacher", "random"] = "teacher"  # regression: teacher + noise, or the tutorial's N(0,1)
    noise: float = Field(0.5, ge=0.0)  # regression teacher: std of the target noise; the val MSE floor is noise**2
    samples: int = Field(1000, gt=0)  # regression only: N (train + validation)
    inputs: int = Field(20, gt=0)  # regression only: D_in
    outputs: int = Field(1, gt=0)  # regression only: D_out

    function: Literal["rosenbrock", "rastrigin", "beale", "quadratic"] = "rosenbrock"  # data.name=function only
    start: list[float] | None = Field(None, min_length=2, max_length=2)  # function: start point; None: its default
    start_jitter: float = Field(0.1, ge=0.0)  # function: each seed moves the start by this times N(0, I)
    condition: float = Field(10.0, ge=1.0)  # function=quadratic: the condition number (curvature ratio)

    path: str | None = None  # data.name=file: a CSV, NPY, NPZ or Parquet file (relative to the config's folder)
    target_column: str | None = None  # file, CSV/Parquet: the target's column; None: the last one
    x_key: str = "x"  # file, NPZ: the features' array
    y_key: str = "y"  # file, NPZ: the targets' array
    task: str | None = None  # file: classification or regression; None: inferred from the targets' type

    split: str | None = None  # torchvision:EMNIST: byclass, bymerge, balanced, letters, digits or mnist
    trust_pickle: bool = (
        False  # torchvision:CIFAR10/100 are pickles, which run code when read: only set for trusted files
    )
    kwargs: dict[str, Any] = Field(default_factory=dict)  # a user's Dataset factory (pkg.module:factory): its arguments
    stream: bool | None = None  # a user's Dataset: None streams it when it needs over half the free memory
    num_workers: int = Field(0, ge=0)  # a streamed Dataset: DataLoader worker processes
    num_classes: int | None = Field(None, gt=0)  # a user's Dataset with integer targets: None is max(target) + 1

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        from optcli.tasks.registry import is_task, task_hint

        if not is_task(name):
            raise ValueError(f"no such task ({task_hint(name)})")
        return name


class ModelConfig(Section):
    name: str = "mlp"  # the built-in MLP, or a user's factory by import path pkg.module:factory (runs their code)
    kwargs: dict[str, Any] = Field(default_factory=dict)  # a user's factory: its keyword arguments
    path: str | None = None  # a folder put on the import path first (relative to the config's folder)
    hidden: list[int] = Field(default_factory=lambda: [64], min_length=1)
    activation: Literal[ACTIVATIONS] = "relu"  # type: ignore[valid-type]
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    init: str = "default"  # "default" keeps PyTorch's own; otherwise a torch.nn.init scheme by name
    batch_norm: bool = False  # BatchNorm1d after each hidden Linear
    freeze: list[str] = Field(default_factory=list)  # globs of parameter names to set requires_grad=False

    @field_validator("hidden")
    @classmethod
    def _positive_widths(cls, widths: list[int]) -> list[int]:
        if any(w <= 0 for w in widths):
            raise ValueError(f"every hidden width must be > 0 (got {widths})")
        return widths

    @field_validator("name")
    @classmethod
    def _mlp_or_import_path(cls, name: str) -> str:
        if name != MLP and not re.fullmatch(IMPORT_PATH, name):
            raise ValueError("must be mlp or an import path pkg.module:factory")
        return name

    @model_validator(mode="after")
    def _keys_fit_the_model(self) -> ModelConfig:
        if self.name == MLP:
            if self.kwargs:
                raise ValueError(
                    "model.kwargs: are a user's factory's keywords; model.name is mlp (use model.hidden, ...)"
                )
            return self
        for key in MLP_ONLY:  # compared with the defaults: a saved config.yaml spells every key out
            if getattr(self, key) != ModelConfig.model_fields[key].get_default(call_default_factory=True):
                raise ValueError(
                    f"model.{key}: applies to the built-in MLP only; model.name is {self.name} "
                    f"(give its factory's own keywords in model.kwargs)"
                )
        return self

    @property
    def is_user_model(self) -> bool:
        return self.name != MLP


class ParamGroupConfig(BaseModel):
    """Overrides for the parameters whose names match one of the globs, e.g. no weight decay on *.bias."""

    model_config = ConfigDict(extra="allow")
    params: list[str] = Field(min_length=1)


class OptimizerConfig(BaseModel):
    """A torch.optim class by name; every other key is a keyword argument of its constructor."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    name: str = "adam"
    groups: list[ParamGroupConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _lr_positive(self) -> OptimizerConfig:
        for where, kwargs in [("optimizer.lr", self.kwargs)] + [
            (f"optimizer.groups.{i}.lr", g.model_extra or {}) for i, g in enumerate(self.groups)
        ]:
            lr = kwargs.get("lr")
            if isinstance(lr, (int, float)) and not isinstance(lr, bool) and not (math.isfinite(lr) and lr > 0):
                raise ValueError(f"{where}: must be > 0 and finite (got {lr})")
        return self

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class SchedulerConfig(BaseModel):
    """A torch.optim.lr_scheduler class by name; every other key is a keyword argument."""

    model_config = ConfigDict(extra="allow")
    name: str
    interval: Literal["step", "epoch"] | None = None  # when scheduler.step() runs; None: the class's own (optim.py)

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


Logger = Literal["csv", "tensorboard"]


class EarlyStoppingConfig(Section):
    """Stop when `metric` has not improved by more than min_delta for `patience` epochs (Keras' EarlyStopping)."""

    metric: Literal["val_loss", "val_accuracy", "val_r2", "train_loss"] = "val_loss"
    patience: int = Field(5, ge=1)
    min_delta: float = Field(0.0, ge=0.0)
    mode: Literal["auto", "min", "max"] = "auto"  # auto: max for accuracy and R², min for losses

    @property
    def maximize(self) -> bool:
        from optcli.tasks.base import higher_is_better

        return self.mode == "max" or (self.mode == "auto" and higher_is_better(self.metric))


class TrainConfig(Section):
    epochs: int = Field(20, gt=0)
    loss: str | None = None  # None: the task's own; mse, cross_entropy, value or a torch.nn.functional loss by name
    loss_kwargs: dict[str, Any] = Field(default_factory=dict)  # the loss function's keywords (huber_loss: delta)
    reduction: Literal["mean", "sum"] = "mean"
    grad_clip: float | None = Field(None, gt=0)  # max global gradient norm
    accumulate: int = Field(1, gt=0)  # optimizer step every k batches
    fused: bool = True  # use the optimizer's fused kernel when it has one and the user did not choose
    flush_denormal: bool = True  # flush subnormal floats to zero on CPU (Adam's exp_avg decays into them; slow on x86)
    compile: bool = False  # torch.compile the model (measured slower on these CPUs; see README)
    log_every: int = Field(0, ge=0)  # table row every k epochs; 0 picks about 20 rows
    loggers: list[Logger] = Field(default_factory=lambda: list[Logger](["csv"]))  # see loggers.py
    log_steps: bool = False  # tensorboard: also the loss of every step
    dynamics: bool = True  # per layer and epoch: gradient norm, update-to-weight ratio, step size (dynamics.py)
    early_stopping: EarlyStoppingConfig | None = None
    precision: Literal["32", "bf16", "16"] = "32"  # autocast dtype: float32, bfloat16, float16 (with a GradScaler)

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value  # YAML reads 32 as int


class TuningConfig(Section):
    # optimizer label or name -> {hyperparameter: [low, high] (log-uniform), or null to leave it out}; see tuning.py
    spaces: dict[str, dict[str, list[float] | None]] = Field(default_factory=dict)


class Config(Section):
    seed: Seed = 0
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    name: str | None = Field(None, pattern=RUN_NAME_PATTERN)  # run directory name
    out_dir: str = "runs"  # relative to the working directory; may not climb out of it
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)  # Adam at torch's defaults (lr 1e-3)
    scheduler: SchedulerConfig | None = None
    train: TrainConfig = Field(default_factory=TrainConfig)
    tuning: TuningConfig = Field(default_factory=TuningConfig)  # compare --tune's search spaces

    @field_validator("out_dir")
    @classmethod
    def _out_dir_inside(cls, value: str) -> str:
        path = Path(value)
        if path.is_absolute() or ".." in path.parts or not value.strip():
            raise ValueError("must be a relative path inside the working directory, without '..'")  # + (got value)
        return value

    @model_validator(mode="after")
    def _task_accepts(self) -> Config:
        from optcli.tasks.registry import task_class

        task_class(self.data.name).validate(self)  # the loss, early stopping and model against the task
        return self


def optimizer_config(name: str, kwargs: dict[str, Any], source: str) -> OptimizerConfig:
    try:
        return OptimizerConfig(name=name, **kwargs)
    except ValidationError as exc:
        raise UserError(_error_line(exc.errors()[0], source)) from None


def _error_line(err: Any, source: str) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        key = str(err["loc"][-1])
        model = _section_at(err["loc"][:-1])
        elsewhere = [
            f"{name}.{key}"
            for name, f in Config.model_fields.items()
            if isinstance(f.annotation, type) and issubclass(f.annotation, Section) and key in f.annotation.model_fields
        ]
        hint = difflib.get_close_matches(key, list(model.model_fields), n=1) if model else []
        if elsewhere and len(err["loc"]) == 1:
            valid = f"it belongs under {elsewhere[0].split('.')[0]}: ({elsewhere[0]})"
        else:
            valid = (
                f"did you mean '{hint[0]}'?"
                if hint
                else f"valid keys: {', '.join(model.model_fields) if model else '?'}"
            )
        return f"{source}: {loc}: unknown key ({valid})"
    if err["type"] == "string_pattern_mismatch" and loc == "device":
        return f"{source}: device: must be auto, cpu, cuda, cuda:N or mps (got {err.get('input')!r})"
    if err["type"] == "string_pattern_mismatch" and loc == "name":
        return f"{source}: name: {RUN_NAME_RULE} (got {shown_name(err.get('input'))})"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "value_error" and isinstance(err.get("input"), dict):
        return f"{source}: {msg}"  # a cross-field check on a section: its message names the key itself
    got = err.get("input")
    got = "" if isinstance(got, (dict, list)) or err["type"] == "missing" else f" (got {got!r})"
    return f"{source}: {loc or 'config'}: {msg}{got}"


def _section_at(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(str(part)) if isinstance(part, str) else None
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        found = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if found is None:
            return None
        model = found
    return model


def validate(raw: Any, source: str = "config") -> Config:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{source}: the top level must be a mapping of keys, got a {type(raw).__name__}")
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise UserError(_error_line(errors[0], source) + more) from None


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    try:
        text = read_bounded(path, limit=MAX_CONFIG_BYTES, what="config").decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (bad byte at offset {exc.start})") from None
    try:
        data = parse_yaml(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise UserError(f"{where}: invalid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: invalid YAML: {exc}") from None
    if data is None:
        raise UserError(f"{path}: the file is empty")
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """'model.hidden=[256,128]' -> (['model', 'hidden'], [256, 128]); the value is parsed as YAML."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {item}: expected key.path=value")
    path = key.strip().split(".")
    if any(not p for p in path):
        raise UserError(f"--set {item}: empty part in the key path '{key}'")
    try:
        value = parse_yaml(text) if text.strip() else None
    except yaml.MarkedYAMLError as exc:
        raise UserError(f"--set {item}: cannot parse the value '{text}' ({exc.problem})") from None
    except yaml.YAMLError:
        raise UserError(f"--set {item}: cannot parse the value '{text}'") from None
    _check_key_path(path, item)
    return path, value


def _check_key_path(path: list[str], item: str) -> None:
    model: type[BaseModel] | None = Config
    for depth, part in enumerate(path):
        if model is None:
            return
        if part not in model.model_fields:
            if model.model_config.get("extra") == "allow":
                return  # an optimizer or scheduler keyword: checked against its signature later
            hint = difflib.get_close_matches(part, list(model.model_fields), n=1)
            where = ".".join(path[: depth + 1])
            suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise UserError(f"--set {item}: unknown key '{where}'{suggestion}")
        model = _section_at(tuple(path[: depth + 1]))


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """The resolved config: the built-in default or a YAML file, then --set overrides, validated in full."""
    raw = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "config"
    if not isinstance(raw, dict):
        raise UserError(f"{source}: the top level must be a mapping of keys, got a {type(raw).__name__}")
    raw = apply_overrides(raw, list(overrides or []))
    base = Path(path).parent if path is not None else None
    for section in ("model", "data"):  # before validation, which may read the data file
        node = raw.get(section)
        if isinstance(node, dict) and isinstance(node.get("path"), str):
            node["path"] = resolve_path(node["path"], base)
    return validate(raw, source)


def resolve_path(value: str, base: Path | None) -> str:
    """A path of a config, absolute: relative to the config file's folder when it is there, else to the working
    directory. Absolute, so that the run's config.yaml, resumes and worker processes find the same file."""
    path = Path(value).expanduser()
    if not path.is_absolute() and base is not None and (base / path).exists():
        path = base / path
    return str(path.resolve())


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
