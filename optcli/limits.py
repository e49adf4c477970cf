"""Input limits: no file optcli reads (a config, a run's config.yaml, summary.json, last.pt) can hang it or make it
use unbounded memory. Files must be regular files (a FIFO would block, /dev/zero reports size 0 and never ends), and
the bytes read are capped, not the size the file reports. YAML is also capped in nesting depth and in the number
of nodes after aliases are expanded (an alias bomb is small on disk and exponential in memory)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from optcli.errors import UserError

MAX_CONFIG_BYTES = 1_000_000  # a config is a few hundred bytes; anything this large is a mistake
MAX_SUMMARY_BYTES = 256_000_000  # summary.json holds every trial's per-epoch history
MAX_CHECKPOINT_BYTES = 16_000_000_000  # last.pt holds the model and optimizer state (checked again for memory)
MAX_YAML_DEPTH = 64  # nesting levels of mappings and lists
MAX_YAML_NODES = 100_000  # scalars, mappings and lists, counted with every alias expanded
# trials of one comparison (optimizers x (seeds + tuning budget)): each is a record in summary.json, so that a
# comparison's files stay far below MAX_SUMMARY_BYTES and its bookkeeping (and a stop) stays quick
MAX_TRIALS = 10_000

_KINDS = {
    stat.S_ISDIR: "a directory",
    stat.S_ISFIFO: "a FIFO (named pipe)",
    stat.S_ISCHR: "a character device",
    stat.S_ISBLK: "a block device",
    stat.S_ISSOCK: "a socket",
}


def _kind(mode: int) -> str | None:
    """What a non-regular file is, or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _KINDS.items() if test(mode)), "not a regular file")


def read_bounded(path: str | Path, *, limit: int, what: str) -> bytes:
    """The bytes of a regular file, at most `limit` of them; anything else is one line naming the file."""
    path = Path(path)
    try:
        kind = _kind(os.stat(path).st_mode)  # before opening: opening a FIFO for reading blocks
        if kind is not None:
            raise UserError(f"{path}: is {kind}, not a {what} file")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise UserError(f"{path}: no such {what} file") from None
    except PermissionError:
        raise UserError(f"{path}: cannot read the file (permission denied)") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read the file ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        kind = _kind(os.fstat(f.fileno()).st_mode)  # the file may have been swapped since the stat
        if kind is not None:
            raise UserError(f"{path}: is {kind}, not a {what} file")
        try:
            data = f.read(limit + 1)
        except OSError as exc:
            raise UserError(f"{path}: cannot read the file ({exc.strerror})") from None
    if len(data) > limit:
        raise UserError(f"{path}: is too large for a {what} file (more than the {limit}-byte limit)")
    return data
