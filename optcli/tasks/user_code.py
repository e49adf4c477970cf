"""A user's code by import path, pkg.module:attr (a model factory in model.name, a Dataset factory in data.name):
imported after putting the config's folder key (model.path, data.path) first on sys.path. Importing runs it."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from optcli.errors import UserError


def first_line(exc: BaseException) -> str:
    """'Type: the first line of its message', as a one-line error quotes what the user's code raised."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def import_callable(name: str, path: str | None, *, key: str, path_key: str) -> Callable[..., Any]:
    """The callable `name` names, or one line naming `key` (or `path_key`, the folder put on sys.path first)."""
    if path is not None:
        if not Path(path).is_dir():
            raise UserError(f"{path_key}: {path} is not a folder")
        if path not in sys.path:
            sys.path.insert(0, path)
    module_name, _, attr = name.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # the user's module may raise anything while it is imported
        raise UserError(f"{key}: cannot import {module_name} ({first_line(exc)})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"{key}: {module_name} has no {attr}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"{key}: {name} is a {type(obj).__name__}, not a class or function")
    return obj
