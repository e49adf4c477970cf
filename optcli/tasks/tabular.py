"""A user's tabular data file read into tensors: features x (N x F, float32) and a target y.

Formats, by suffix: .csv (a header row with the column names; the target is `target_column`, default the last
column), .npy (one 2-D numeric array whose LAST column is the target), .npz (arrays `x_key` and `y_key`) and
.parquet (through pyarrow, the optional extra `optcli[parquet]`). NumPy files are read with allow_pickle=False.

Integer and string targets are classification (the classes are the sorted distinct values, mapped to 0..K-1);
float targets are regression, read as N x T. `task` overrides the inference: a float target holding whole
numbers may be classification; a string target cannot be regression. Anything wrong with the file is a UserError
of one line that names the file and the problem. The reader never prints.
"""

from __future__ import annotations

import csv
import importlib
import io
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from optcli.errors import UserError
from optcli.limits import read_bounded

MAX_DATA_BYTES = 1 << 30  # a binary data file (NPY, NPZ, Parquet, also expanded) is read whole into memory
MAX_CSV_BYTES = 256 << 20  # CSV text becomes Python strings first, about ten times its size in memory
KINDS = ("classification", "regression")


@dataclass(frozen=True)
class Table:
    x: torch.Tensor  # float32, N x F
    y: torch.Tensor  # int64 class indices (N,) for classification, float32 N x T for regression
    kind: str  # "classification" or "regression"
    classes: list[Any] | None  # the original label of each class index (ints or strings); None for regression
    feature_names: list[str]
    target_name: str


class _Keys(NamedTuple):
    target_column: str | None
    x_key: str
    y_key: str


@dataclass
class _Raw:
    """A file's columns before the target is interpreted: x is (N, F) numeric, y is (N,) or (N, T)."""

    x: np.ndarray
    y: np.ndarray
    feature_names: list[str]
    target_name: str
    where: Callable[[int], str]  # a sample's position as the user finds it: "line 7" in a CSV, "row 6" in an array


def read_table(path: Path, *, target_column: str | None, x_key: str, y_key: str, task: str | None) -> Table:
    """The features and target of a CSV, NPY, NPZ or Parquet file; `task` None infers the kind from the target."""
    path = Path(path)
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise UserError(f"{path}: data.path must end in {', '.join(_READERS)} (the suffix says the format)")
    if task is not None and task not in KINDS:
        raise UserError(f"data.task: {task!r} is not one of {', '.join(KINDS)}")
    limit = MAX_CSV_BYTES if reader is _read_csv else MAX_DATA_BYTES
    data = read_bounded(path, limit=limit, what="data")
    if not data:
        raise UserError(f"{path}: is empty")
    return _table(path, reader(path, data, _Keys(target_column, x_key, y_key)), task)


def standardize(train_x: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(train_x, *others) with each feature shifted and scaled by the mean and standard deviation of train_x
    alone, so no statistic of the validation or test samples leaks into training. A constant feature is only
    shifted (its std 0 is replaced by 1)."""
    mean = train_x.mean(dim=0)
    std = train_x.std(dim=0, correction=0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return tuple((t - mean) / std for t in (train_x, *others))


def _table(path: Path, raw: _Raw, task: str | None) -> Table:
    if raw.x.shape[1] == 0:
        raise UserError(f"{path}: has no feature columns besides the target {raw.target_name!r}")
    x = _features(path, raw)
    kind = task or _infer(path, raw)
    classes = None
    if kind == "classification":
        y, classes = _labels(path, raw)
    else:
        y = _regression_targets(path, raw)
    return Table(torch.from_numpy(x), torch.from_numpy(y), kind, classes, raw.feature_names, raw.target_name)


def _first_bad(ok: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(~ok)[0])


def _features(path: Path, raw: _Raw) -> np.ndarray:
    if raw.x.dtype.kind not in "biuf":
        raise UserError(f"{path}: the features are {raw.x.dtype}, not numbers (encode string features as numbers)")
    with np.errstate(over="ignore"):  # a value beyond float32 becomes inf, reported below
        x = raw.x.astype(np.float32)
    ok = np.isfinite(x)
    if not ok.all():
        row, col = _first_bad(ok)
        value = raw.x[row, col]
        why = "too large for float32" if np.isfinite(value) else "not a finite number"
        raise UserError(f"{path}: {raw.where(row)}: feature {raw.feature_names[col]!r} is {value} ({why})")
    return x


def _infer(path: Path, raw: _Raw) -> str:
    kind = raw.y.dtype.kind
    if kind in "biuUSO":
        return "classification"
    if kind == "f":
        return "regression"
    raise UserError(f"{path}: the target {raw.target_name!r} is {raw.y.dtype}, neither numbers nor labels")


def _labels(path: Path, raw: _Raw) -> tuple[np.ndarray, list[Any]]:
    y = raw.y[:, 0] if raw.y.ndim == 2 and raw.y.shape[1] == 1 else raw.y
    if y.ndim != 1:
        raise UserError(
            f"{path}: a classification target is one label per sample; {raw.target_name!r} has shape {raw.y.shape}"
        )
    if y.dtype.kind == "f":
        ok = np.isfinite(y) & (y == np.floor(y))
        if not ok.all():
            (row,) = _first_bad(ok)
            raise UserError(
                f"{path}: {raw.where(row)}: label {y[row]} of {raw.target_name!r} is not a class "
                "(classification needs integer or string labels)"
            )
        y = y.astype(np.int64)
    classes, index = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise UserError(
            f"{path}: the target {raw.target_name!r} has a single class ({classes[0]}); classification needs two"
        )
    return index.reshape(-1).astype(np.int64), classes.tolist()


def _regression_targets(path: Path, raw: _Raw) -> np.ndarray:
    if raw.y.dtype.kind not in "biuf":
        raise UserError(
            f"{path}: data.task: regression needs a numeric target; {raw.target_name!r} holds labels such as "
            f"{str(raw.y.flat[0])!r}"
        )
    with np.errstate(over="ignore"):
        y = raw.y.astype(np.float32)
    y = y.reshape(-1, 1) if y.ndim == 1 else y
    if y.ndim != 2:
        raise UserError(f"{path}: a regression target is N or N x T; {raw.target_name!r} has shape {raw.y.shape}")
    ok = np.isfinite(y)
    if not ok.all():
        row, col = _first_bad(ok)
        value = raw.y.reshape(y.shape)[row, col]
        raise UserError(f"{path}: {raw.where(row)}: the target {raw.target_name!r} is {value} (not a finite float32)")
    return y


# CSV


def _csv_rows(path: Path, data: bytes) -> tuple[list[str], list[list[str]], list[int]]:
    """The header, the data rows and each row's line number; blank lines are skipped."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: is not UTF-8 text (byte {exc.start} cannot be decoded)") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    rows: list[list[str]] = []
    lines: list[int] = []
    try:
        for row in reader:
            if not row:
                continue
            if header is None:
                header = [name.strip() for name in row]
            elif len(row) != len(header):
                fields = f"{len(row)} field" + ("s" if len(row) != 1 else "")
                raise UserError(f"{path}: line {reader.line_num} has {fields}, the header has {len(header)}")
            else:
                rows.append(row)
                lines.append(reader.line_num)
    except csv.Error as exc:
        raise UserError(f"{path}: line {reader.line_num}: {exc}") from None
    if header is None:
        raise UserError(f"{path}: is empty (no header row)")
    _check_header(path, header)
    if not rows:
        raise UserError(f"{path}: has a header but no data rows")
    return header, rows, lines


def _check_header(path: Path, header: list[str]) -> None:
    try:
        [float(name) for name in header]
    except ValueError:
        pass
    else:
        raise UserError(f"{path}: line 1 holds numbers, not column names; a CSV file needs a header row")
    _check_unique(path, header)


def _check_unique(path: Path, header: list[str]) -> None:
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise UserError(f"{path}: the column {name!r} appears twice in the header")
        seen.add(name)


def _csv_numbers(path: Path, column: tuple[str, ...], name: str, lines: list[int]) -> np.ndarray:
    try:
        return np.array(column, dtype=np.float64)
    except ValueError:
        pass
    values = []
    for i, text in enumerate(column):
        try:
            values.append(float(text))
        except ValueError:
            if not text.strip():
                raise UserError(f"{path}: line {lines[i]}: column {name!r} is empty (missing values)") from None
            raise UserError(
                f"{path}: line {lines[i]}: column {name!r} holds {text!r}, not a number "
                "(string features are not supported; encode them as numbers)"
            ) from None
    return np.array(values, dtype=np.float64)


def _csv_target(path: Path, column: tuple[str, ...], name: str, lines: list[int]) -> np.ndarray:
    """Integers if every value is one, else floats if every value is one, else string labels."""
    values = [text.strip() for text in column]
    if "" in values:
        raise UserError(f"{path}: line {lines[values.index('')]}: the target {name!r} is empty")
    try:
        return np.array([int(v) for v in values], dtype=np.int64)
    except (ValueError, OverflowError):
        pass
    try:
        return np.array([float(v) for v in values], dtype=np.float64)
    except ValueError:
        return np.array(values, dtype=str)


def _read_csv(path: Path, data: bytes, keys: _Keys) -> _Raw:
    header, rows, lines = _csv_rows(path, data)
    target = header[-1] if keys.target_column is None else keys.target_column
    if target not in header:
        raise UserError(
            f"{path}: data.target_column {target!r} is not a column; the columns are {', '.join(map(repr, header))}"
        )
    columns = list(zip(*rows, strict=True))
    t = header.index(target)
    features = [j for j in range(len(header)) if j != t]
    x = np.empty((len(rows), len(features)), dtype=np.float64)
    for k, j in enumerate(features):
        x[:, k] = _csv_numbers(path, columns[j], header[j], lines)
    y = _csv_target(path, columns[t], target, lines)
    return _Raw(x, y, [header[j] for j in features], target, lambda i: f"line {lines[i]}")


# NumPy


def _parse_npy(path: Path, blob: bytes, what: str) -> np.ndarray:
    """One NPY array from its bytes, never unpickling; `what` names it in messages ("" or "array 'x': ")."""
    stream = io.BytesIO(blob)
    try:
        np.lib.format.read_magic(stream)
        stream.seek(0)
        return np.lib.format.read_array(stream, allow_pickle=False)
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise UserError(
                f"{path}: {what}holds Python objects (a pickled array), which optcli does not load "
                "(allow_pickle=False); save a numeric array"
            ) from None
        raise UserError(f"{path}: {what}is not a valid NPY array ({exc})") from None
    except (MemoryError, EOFError, OSError) as exc:
        raise UserError(f"{path}: {what}is not a valid NPY array ({type(exc).__name__}: {exc})") from None


def _read_npy(path: Path, data: bytes, keys: _Keys) -> _Raw:
    array = _parse_npy(path, data, "")
    if array.dtype.names is not None:
        raise UserError(f"{path}: holds a structured array; save a plain 2-D numeric array")
    if array.ndim != 2 or array.shape[1] < 2:
        raise UserError(
            f"{path}: holds an array of shape {array.shape}; an NPY data file is 2-D, samples x (features + target), "
            "the last column the target"
        )
    if array.shape[0] == 0:
        raise UserError(f"{path}: has no rows")
    f = array.shape[1] - 1
    return _Raw(array[:, :f], array[:, f], [f"column {j}" for j in range(f)], f"column {f}", lambda i: f"row {i}")


def _npz_arrays(path: Path, data: bytes, keys: _Keys) -> tuple[np.ndarray, np.ndarray]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = {info.filename.removesuffix(".npy"): info for info in archive.infolist()}
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise UserError(f"{path}: is not a valid NPZ file ({exc})") from None
    for key, option in ((keys.x_key, "data.x_key"), (keys.y_key, "data.y_key")):
        if key not in members:
            raise UserError(f"{path}: has no array {key!r} ({option}); its arrays are {', '.join(map(repr, members))}")
    if sum(members[k].file_size for k in (keys.x_key, keys.y_key)) > MAX_DATA_BYTES:
        raise UserError(f"{path}: its arrays expand to more than the {MAX_DATA_BYTES}-byte limit for a data file")
    arrays = []
    for key in (keys.x_key, keys.y_key):
        try:
            blob = archive.read(members[key])
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise UserError(f"{path}: array {key!r} cannot be read ({exc})") from None
        arrays.append(_parse_npy(path, blob, f"array {key!r} "))
    return arrays[0], arrays[1]


def _read_npz(path: Path, data: bytes, keys: _Keys) -> _Raw:
    x, y = _npz_arrays(path, data, keys)
    if x.ndim != 2:
        raise UserError(f"{path}: array {keys.x_key!r} has shape {x.shape}; the features are 2-D, samples x features")
    if y.ndim not in (1, 2) or y.shape[0] != x.shape[0]:
        raise UserError(
            f"{path}: array {keys.y_key!r} has shape {y.shape}; the target is N or N x T with N = {x.shape[0]} "
            f"samples as in {keys.x_key!r}"
        )
    if x.shape[0] == 0:
        raise UserError(f"{path}: has no samples")
    names = [f"{keys.x_key}[:, {j}]" for j in range(x.shape[1])]
    return _Raw(x, y, names, keys.y_key, lambda i: f"row {i}")


# Parquet


def _parquet_column(path: Path, table: Any, name: str, *, feature: bool) -> np.ndarray:
    pa, pc = importlib.import_module("pyarrow"), importlib.import_module("pyarrow.compute")
    column = table.column(name)
    if pa.types.is_dictionary(column.type):  # a pandas Categorical
        column = column.cast(column.type.value_type)
    kind = column.type
    numeric = pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)
    if feature and not numeric:
        raise UserError(
            f"{path}: column {name!r} is {kind}, not a number (string features are not supported; encode them as "
            "numbers)"
        )
    if not feature and not (numeric or pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise UserError(f"{path}: the target {name!r} is {kind}, neither numbers nor labels")
    if column.null_count:
        row = pc.index(pc.is_null(column), True).as_py()
        raise UserError(f"{path}: row {row}: column {name!r} is missing (null)")
    values = column.to_numpy()
    return values.astype(str) if values.dtype.kind == "O" else values


def _read_parquet(path: Path, data: bytes, keys: _Keys) -> _Raw:
    try:  # imported by name: pyarrow is optional and ships no type information
        pa, pq = importlib.import_module("pyarrow"), importlib.import_module("pyarrow.parquet")
    except ImportError:
        raise UserError("data.path: reading Parquet needs pyarrow: pip install 'optcli[parquet]'") from None
    try:
        source = pa.BufferReader(data)
        metadata = pq.read_metadata(source)
        expanded = sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups))
        if expanded > MAX_DATA_BYTES:
            raise UserError(f"{path}: its columns expand to more than the {MAX_DATA_BYTES}-byte limit for a data file")
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{path}: is not a readable Parquet file ({exc})") from None
    names = table.column_names
    _check_unique(path, names)
    target = names[-1] if keys.target_column is None else keys.target_column
    if target not in names:
        raise UserError(
            f"{path}: data.target_column {target!r} is not a column; the columns are {', '.join(map(repr, names))}"
        )
    if table.num_rows == 0:
        raise UserError(f"{path}: has no rows")
    features = [n for n in names if n != target]
    x = np.empty((table.num_rows, len(features)), dtype=np.float64)
    for k, name in enumerate(features):
        x[:, k] = _parquet_column(path, table, name, feature=True)
    y = _parquet_column(path, table, target, feature=False)
    return _Raw(x, y, features, target, lambda i: f"row {i}")


_READERS: dict[str, Callable[[Path, bytes, _Keys], _Raw]] = {
    ".csv": _read_csv,
    ".npy": _read_npy,
    ".npz": _read_npz,
    ".parquet": _read_parquet,
}
