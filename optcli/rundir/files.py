"""Run directories and the files in them. Every file is written atomically (temp file, fsync, rename),
so a run directory never holds a half-written file, even after SIGKILL. A process that writes a run directory
holds its lock (RunLock) for as long as it writes. JSON is strict: no NaN or Infinity. When the operating system
refuses a write (disk full, read-only, not a directory, name too long), the error names the path and the reason."""

from __future__ import annotations

import csv
import errno
import fcntl
import io
import json
import math
import os
import pickle
import re
import tempfile
import threading
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from optcli.config import RUN_NAME_PATTERN, RUN_NAME_RULE, shown_name
from optcli.errors import SystemRefused, UserError
from optcli.limits import MAX_CHECKPOINT_BYTES, read_bounded
from optcli.rundir.schema import FORMAT_VERSION, check_checkpoint

LOCK_FILE = ".lock"
_umask_lock = threading.Lock()


def refused(path: str | Path, exc: OSError, doing: str = "cannot write") -> SystemRefused:
    """One line for what the operating system said no to: the path and its reason."""
    reason = exc.strerror or os.strerror(exc.errno or 0) or type(exc).__name__
    return SystemRefused(f"{path}: {doing} ({reason})")


def _file_mode() -> int:
    """The mode the umask gives a new file (mkstemp's own is 0600)."""
    with _umask_lock:  # reading the umask means setting it; other threads must not see the 0 meanwhile
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write_files({Path(path): data})


def atomic_write_files(files: dict[Path, bytes]) -> None:
    """Replace several files together: every new content is written and synced under a temporary name first,
    then all are renamed in one burst, so that a process killed at any moment leaves files that describe the
    same epoch (the checkpoint and the metrics), short of the microseconds between two renames."""
    temps: list[tuple[Path, Path]] = []
    path = next(iter(files), Path("."))
    try:
        for path, data in files.items():
            fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            temps.append((Path(name), path))
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), _file_mode())
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for tmp, path in temps:
            os.replace(tmp, path)
        for folder in dict.fromkeys(p.parent for p in files):  # make the renames themselves durable
            dir_fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except OSError as exc:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
        raise refused(path, exc) from None
    except BaseException:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
        raise


def remove_stale_temp_files(run_dir: Path) -> None:
    """Temporary files left by a process killed mid-write; the files under their final names are whole."""
    for tmp in Path(run_dir).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def finite(obj: Any) -> Any:
    """obj with every NaN and infinity replaced by None: strict JSON has no spelling for them. Where a value was
    not finite the status says why (diverged); readers of optcli's files take null losses as non-finite."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def strict_json(obj: Any, *, indent: int | None = None) -> str:
    """JSON that every reader accepts (JavaScript, jq): non-finite numbers become null."""
    return json.dumps(finite(obj), indent=indent, default=_jsonable, allow_nan=False)


def json_text(obj: Any) -> str:
    return strict_json(obj, indent=2) + "\n"


def jsonl_text(rows: Iterable[dict]) -> str:
    return "".join(strict_json(r) + "\n" for r in rows)


def csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json_text(obj))


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, jsonl_text(rows))


def write_csv(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, csv_text(rows))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, set):
        return finite(sorted(obj, key=str))
    return str(obj)


def check_run_name(name: str, where: str = "name") -> str:
    """The one rule for a run directory's name (train's `name`, compare's, merge --name)."""
    if not re.fullmatch(RUN_NAME_PATTERN, name):
        raise UserError(f"{where}: {RUN_NAME_RULE} (got {shown_name(name)})")
    return name


def create_run_dir(out_dir: str | Path, name: str | None, prefix: str = "") -> Path:
    """A new, empty run directory under out_dir. mkdir is atomic, so two runs started at the same moment
    never share one: the second gets a -2 suffix."""
    out = Path(out_dir)
    base = check_run_name(name) if name else f"{prefix}{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise SystemRefused(f"out_dir {out}: exists and is not a directory") from None
    except OSError as exc:
        raise refused(out, exc, "cannot create the output directory") from None
    for attempt in range(1, 1000):
        candidate = out / (base if attempt == 1 else f"{base}-{attempt}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            raise refused(candidate, exc, "cannot create the run directory") from None
        if candidate.resolve().parent != out.resolve():
            candidate.rmdir()
            raise UserError(f"name: '{base}' would escape the output directory {out}")
        return candidate
    raise UserError(f"name: too many runs named '{base}' in {out}")


class RunLock:
    """An exclusive lock on a run directory for as long as a process writes it: flock on `<run_dir>/.lock`, which
    holds the holder's pid. The kernel releases a flock when its process dies, however it dies, so a lock left by a
    killed process is stale by construction and simply taken over."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        path = self.run_dir / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, _file_mode())
        except OSError as exc:
            raise refused(path, exc, "cannot create the lock file") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise SystemRefused(
                    f"{self.run_dir}: in use by another optcli process (pid {holder}); wait for it to end"
                ) from None
            raise refused(path, exc, "cannot lock") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock; the file stays (unlinking would race)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def checkpoint_bytes(obj: dict) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save({"format": FORMAT_VERSION, **obj}, buf)
    return buf.getvalue()


def save_checkpoint(path: Path, obj: dict) -> None:
    atomic_write_bytes(path, checkpoint_bytes(obj))


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint, loaded with weights_only=True: tensors and plain containers only, never code."""
    import torch

    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.exists():
        raise UserError(f"{path}: no such checkpoint")
    data = read_bounded(path, limit=MAX_CHECKPOINT_BYTES, what="checkpoint")
    if not data.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip archive, or a legacy pickle
        raise UserError(f"{path}: not a readable checkpoint (not a file written by torch.save)")
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unpickling failed"
        raise UserError(f"{path}: refused: not a plain checkpoint of tensors ({first[:200]})") from None
    except Exception as exc:  # torch.load of arbitrary bytes fails in many ways (IndexError on a text file)
        raise UserError(
            f"{path}: not a readable checkpoint ({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})"
        ) from None
    return check_checkpoint(obj, str(path))
