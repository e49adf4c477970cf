"""Run directories and the files in them. Every file is written atomically (temp file, fsync, rename),
so a run directory never holds a half-written file, even after SIGKILL."""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import signal
import tempfile
import threading
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from optcli.errors import UserError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_stale_temp_files(run_dir: Path) -> None:
    """Temporary files left by a process killed mid-write; the files under their final names are whole."""
    for tmp in Path(run_dir).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, default=_jsonable) + "\n" for r in rows))


def write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


def create_run_dir(out_dir: str | Path, name: str | None, prefix: str = "") -> Path:
    """A new, empty run directory under out_dir. mkdir is atomic, so two runs started at the same moment
    never share one: the second gets a -2 suffix."""
    out = Path(out_dir)
    base = name or f"{prefix}{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    if Path(base).name != base or base in (".", ".."):
        raise UserError(f"name: '{base}' must be a plain directory name, not a path")
    out.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 1000):
        candidate = out / (base if attempt == 1 else f"{base}-{attempt}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        if candidate.resolve().parent != out.resolve():
            candidate.rmdir()
            raise UserError(f"name: '{base}' would escape the output directory {out}")
        return candidate
    raise UserError(f"name: too many runs named '{base}' in {out}")


def save_checkpoint(path: Path, obj: dict) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint, loaded with weights_only=True: tensors and plain containers only, never code."""
    import torch

    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unpickling failed"
        raise UserError(f"{path}: refused: not a plain checkpoint of tensors ({first[:200]})") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as exc:
        raise UserError(
            f"{path}: not a readable checkpoint ({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})"
        ) from None
    if not isinstance(obj, dict) or "model" not in obj or "config" not in obj:
        raise UserError(f"{path}: not an optcli checkpoint (expected a dict with 'model' and 'config')")
    return obj


class deferred_sigint:
    """Hold Ctrl-C back while a run directory is being written, then raise it: an interrupt never
    lands between the checkpoint and the metrics that describe it."""

    def __enter__(self):
        self.pending = False
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._hold)
        return self

    def _hold(self, signum, frame):
        self.pending = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        if self.pending and exc[0] is None:
            raise KeyboardInterrupt
        return False
