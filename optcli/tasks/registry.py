"""The tasks by name, as torch.optim's optimizers are: every module of optcli/tasks/ is imported once and the Task
classes it registers with @register become valid values of data.name. A new task is one file in tasks/."""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from optcli.config import DataConfig
    from optcli.tasks.base import Task

T = TypeVar("T", bound="type[Task]")

DEFAULT_TASK = "regression"  # the built-in default: runs anywhere, offline, in seconds, and its answers mean something
_TASKS: dict[str, type[Task]] = {}
_CLAIMED: dict[str, type[Task]] = {}  # names a task claims by pattern (torchvision:<set>, pkg.module:factory)
_discovered = False


def register(cls: T) -> T:
    """Class decorator: the task becomes selectable as data.name=<cls.name>."""
    if cls.name in _TASKS and _TASKS[cls.name] is not cls:
        raise RuntimeError(f"task name '{cls.name}' registered twice ({_TASKS[cls.name].__module__}, {cls.__module__})")
    _TASKS[cls.name] = cls
    return cls


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    import optcli.tasks as package

    for module in pkgutil.iter_modules(package.__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{module.name}")
    _discovered = True


def task_names() -> list[str]:
    _discover()
    return sorted(_TASKS)


def task_hint(name: str) -> str:
    """For a data.name that no task has: a did-you-mean, or the valid names."""
    names = task_names()
    hint = difflib.get_close_matches(name, names, n=1)
    return f"did you mean {hint[0]!r}?" if hint else f"tasks: {', '.join(names)}"


def _claimed(name: str) -> type[Task] | None:
    """The task class for a name one registered task claims (Task.claims), as its subclass of that name."""
    if name not in _CLAIMED:
        owner = next((cls for cls in _TASKS.values() if cls.claims(name)), None)
        if owner is None:
            return None
        _CLAIMED[name] = type(owner.__name__, (owner,), {"name": name, "__module__": owner.__module__})
    return _CLAIMED[name]


def is_task(name: str) -> bool:
    _discover()
    return name in _TASKS or _claimed(name) is not None


def task_class(name: str) -> type[Task]:
    _discover()
    if name in _TASKS:
        return _TASKS[name]
    claimed = _claimed(name)
    if claimed is None:
        from optcli.errors import UserError

        raise UserError(f"data.name: unknown task '{name}' ({task_hint(name)})")
    return claimed


def get_task(cfg: DataConfig) -> Task:
    """The task the data section names, made from that section."""
    return task_class(cfg.name)(cfg)


def describe_task(cfg: DataConfig) -> dict:
    """The task as run files record it: its name, kind and description."""
    task = get_task(cfg)
    return {"name": task.name, "kind": task.kind.value, "description": task.description()}
