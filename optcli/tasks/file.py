"""data.name=file: a user's CSV, NPY, NPZ or Parquet file (data.path) as a task, read by tasks/tabular.py.

The kind follows the target (integers or strings: classification, floats: regression) unless data.task says it;
the features are standardized by the statistics of the training split alone, after the validation hold-out.
"""

from __future__ import annotations

import functools
from pathlib import Path

from optcli.config import Config
from optcli.tasks import Split
from optcli.tasks.base import Kind, Task
from optcli.tasks.registry import register
from optcli.tasks.tabular import KINDS, Table, read_table, standardize


@functools.lru_cache(maxsize=4)
def _read(path: str, stamp: tuple[int, int], target_column: str | None, x_key: str, y_key: str, task: str | None):
    """The table, read once per process for the same file (`stamp`: its size and mtime) and keys."""
    return read_table(Path(path), target_column=target_column, x_key=x_key, y_key=y_key, task=task)


@register
class File(Task):
    """data.name=file: data.path, with data.target_column (CSV/Parquet), data.x_key/y_key (NPZ), data.task."""

    name = "file"

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        if cfg.data.path is None:
            raise ValueError("data.path: data.name=file needs the file to read (CSV, NPY, NPZ or Parquet)")
        if cfg.data.task is not None and cfg.data.task not in KINDS:
            raise ValueError(f"data.task: must be {' or '.join(KINDS)} (got {cfg.data.task!r})")

    def table(self) -> Table:
        path = Path(str(self.cfg.path))
        try:
            st = path.stat()
        except OSError:
            from optcli.errors import UserError

            raise UserError(
                f"data.path: {path} does not exist (read relative to the config's folder, then the working directory)"
            ) from None
        c = self.cfg
        return _read(str(path), (st.st_size, st.st_mtime_ns), c.target_column, c.x_key, c.y_key, c.task)

    @property
    def kind(self) -> Kind:
        return Kind(self.table().kind)

    def load(self) -> tuple[Split, Split | None]:
        t = self.table()
        return Split(t.x, t.y), None

    def shapes(self) -> tuple[int, int]:
        t = self.table()
        n_out = len(t.classes) if t.classes is not None else t.y.shape[1]
        return t.x.shape[1], n_out

    def prepare(self, train: Split, val: Split | None, test: Split | None) -> tuple[Split, Split | None, Split | None]:
        others = [s.x for s in (val, test) if s is not None]
        x_train, *x_others = standardize(train.x, *others)
        moved = iter(x_others)
        return (
            Split(x_train, train.y),
            Split(next(moved), val.y) if val is not None else None,
            Split(next(moved), test.y) if test is not None else None,
        )

    def description(self) -> str:
        t = self.table()
        what = f"{len(t.classes)} classes" if t.classes is not None else f"{t.y.shape[1]} target(s)"
        return (
            f"{Path(str(self.cfg.path)).name}: {len(t.x)} samples, {t.x.shape[1]} features -> {what} ({t.target_name})"
        )
