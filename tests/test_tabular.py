"""The tabular reader: every format, the kind inferred and overridden, shapes, standardization by the training split
only, and one line naming the file and the problem for every kind of bad data."""

from __future__ import annotations

import importlib.util
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from optcli.errors import UserError
from optcli.tasks.tabular import Table, read_table, standardize

EXAMPLES = Path(__file__).resolve().parent.parent / "configs" / "examples"
HAS_PYARROW = importlib.util.find_spec("pyarrow") is not None


def read(path: Path, *, target_column: str | None = None, x_key: str = "x", y_key: str = "y", task=None) -> Table:
    return read_table(path, target_column=target_column, x_key=x_key, y_key=y_key, task=task)


def bad(path: Path, *fragments: str, **options) -> str:
    """The error is one line that starts with the file and holds every fragment."""
    with pytest.raises(UserError) as info:
        read(path, **options)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# Formats and kinds


def test_csv_integer_target_is_classification_with_sorted_classes(tmp_path):
    t = read(write(tmp_path / "d.csv", "a,b,label\n1,2,5\n3,4,2\n5,6,5\n7,8,9\n"))
    assert t.kind == "classification" and t.classes == [2, 5, 9]
    assert t.y.dtype == torch.int64 and t.y.tolist() == [1, 0, 1, 2]
    assert t.x.dtype == torch.float32 and t.x.tolist() == [[1, 2], [3, 4], [5, 6], [7, 8]]
    assert t.feature_names == ["a", "b"] and t.target_name == "label"


def test_csv_string_target_and_named_target_column(tmp_path):
    path = write(tmp_path / "d.csv", "species,x\nb,0.5\na,1.5\n\nb,2.5\n")  # a blank line is skipped
    t = read(path, target_column="species")
    assert t.kind == "classification" and t.classes == ["a", "b"] and t.y.tolist() == [1, 0, 1]
    assert t.x.shape == (3, 1) and t.feature_names == ["x"] and t.target_name == "species"


def test_csv_float_target_is_regression_n_by_1(tmp_path):
    t = read(write(tmp_path / "d.csv", "a,y\n1,0.5\n2,1.5\n3,-2\n"))
    assert t.kind == "regression" and t.classes is None
    assert t.y.dtype == torch.float32 and t.y.shape == (3, 1) and t.y[:, 0].tolist() == [0.5, 1.5, -2.0]


def test_task_overrides_inference(tmp_path):
    path = write(tmp_path / "d.csv", "a,y\n1,1.0\n2,0.0\n3,1.0\n")
    assert read(path).kind == "regression"
    t = read(path, task="classification")  # a float target of whole numbers may be classes
    assert t.kind == "classification" and t.classes == [0, 1] and t.y.tolist() == [1, 0, 1]
    ints = write(tmp_path / "i.csv", "a,y\n1,3\n2,4\n")
    t = read(ints, task="regression")
    assert t.kind == "regression" and t.y.tolist() == [[3.0], [4.0]]


def test_npy_last_column_is_the_target(tmp_path):
    np.save(tmp_path / "d.npy", np.array([[1.0, 2.0, 0.25], [3.0, 4.0, 0.5]]))
    t = read(tmp_path / "d.npy")
    assert t.kind == "regression" and t.x.tolist() == [[1, 2], [3, 4]] and t.y.tolist() == [[0.25], [0.5]]
    assert t.feature_names == ["column 0", "column 1"] and t.target_name == "column 2"
    np.save(tmp_path / "i.npy", np.array([[1, 2, 0], [3, 4, 1]]))
    assert read(tmp_path / "i.npy").kind == "classification"


def test_npz_keys_and_multi_output_regression(tmp_path):
    x = np.arange(12, dtype=np.float64).reshape(4, 3)
    y = np.arange(8, dtype=np.float32).reshape(4, 2)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    t = read(tmp_path / "d.npz")
    assert t.kind == "regression" and t.x.shape == (4, 3) and t.y.shape == (4, 2) and t.target_name == "y"
    np.savez_compressed(tmp_path / "k.npz", features=x, labels=np.array([3, 1, 3, 1]))
    t = read(tmp_path / "k.npz", x_key="features", y_key="labels")
    assert t.kind == "classification" and t.classes == [1, 3] and t.y.tolist() == [1, 0, 1, 0]
    assert t.feature_names == ["features[:, 0]", "features[:, 1]", "features[:, 2]"]


@pytest.mark.skipif(not HAS_PYARROW, reason="pyarrow is not installed (pip install 'optcli[parquet]')")
def test_parquet_columns_kinds_and_categorical_target(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    species = pa.array(["b", "a", "b"]).dictionary_encode()  # what pandas writes for a Categorical
    table = pa.table({"species": species, "w": [1.5, 2.5, 3.5], "n": pa.array([1, 2, 3], pa.int32())})
    pq.write_table(table, tmp_path / "d.parquet")
    t = read(tmp_path / "d.parquet", target_column="species")
    assert t.kind == "classification" and t.classes == ["a", "b"] and t.y.tolist() == [1, 0, 1]
    assert t.feature_names == ["w", "n"] and t.x.tolist() == [[1.5, 1], [2.5, 2], [3.5, 3]]
    pq.write_table(table.drop_columns("species"), tmp_path / "r.parquet")
    t = read(tmp_path / "r.parquet", target_column="w")
    assert t.kind == "regression" and t.y.tolist() == [[1.5], [2.5], [3.5]] and t.x.tolist() == [[1], [2], [3]]


def test_example_wine_file():
    t = read(EXAMPLES / "wine.csv")
    assert t.x.shape == (178, 13) and t.target_name == "cultivar" and t.classes == [0, 1, 2]
    assert torch.bincount(t.y).tolist() == [59, 71, 48]  # scikit-learn's documented class distribution


# Standardization


def test_standardize_uses_the_training_split_only():
    train = torch.tensor([[1.0, 5.0], [3.0, 5.0]])  # mean (2, 5), population std (1, 0 -> 1)
    val = torch.tensor([[4.0, 7.0]])
    s_train, s_val = standardize(train, val)
    assert s_train.tolist() == [[-1.0, 0.0], [1.0, 0.0]]
    assert s_val.tolist() == [[2.0, 2.0]]  # by the training statistics, not its own (a single row would give 0)
    (alone,) = standardize(train)
    assert torch.equal(alone, s_train)


# Bad data: one line naming the file and what is wrong


def test_missing_file_and_unknown_suffix(tmp_path):
    bad(tmp_path / "nope.csv", "no such data file")
    bad(write(tmp_path / "d.txt", "a,b\n1,2\n"), "data.path must end in .csv, .npy, .npz, .parquet")


def test_missing_target_column_lists_the_columns(tmp_path):
    path = write(tmp_path / "d.csv", "a,b,c\n1,2,3\n4,5,6\n")
    bad(path, "data.target_column 'label' is not a column", "'a', 'b', 'c'", target_column="label")


def test_nan_and_inf_features_name_row_and_column(tmp_path):
    bad(write(tmp_path / "d.csv", "a,b,y\n1,2,0\n3,nan,1\n"), "line 3", "feature 'b'", "nan")
    np.save(tmp_path / "d.npy", np.array([[1.0, 0.0], [np.inf, 1.0]]))
    bad(tmp_path / "d.npy", "row 1", "feature 'column 0'", "inf")
    np.savez(tmp_path / "d.npz", x=np.array([[1.0], [1e39]]), y=np.array([0, 1]))
    bad(tmp_path / "d.npz", "row 1", "too large for float32")


def test_non_finite_regression_target(tmp_path):
    bad(write(tmp_path / "d.csv", "a,y\n1,0.5\n2,inf\n"), "line 3", "the target 'y' is inf")


def test_labels_that_are_not_classes(tmp_path):
    path = write(tmp_path / "d.csv", "a,y\n1,1.0\n2,2.5\n")
    bad(path, "line 3", "label 2.5 of 'y' is not a class", task="classification")
    bad(write(tmp_path / "one.csv", "a,y\n1,7\n2,7\n"), "a single class (7)")


def test_string_target_cannot_be_regression(tmp_path):
    path = write(tmp_path / "d.csv", "a,y\n1,cat\n2,dog\n")
    bad(path, "data.task: regression needs a numeric target", "'cat'", task="regression")


def test_non_numeric_feature_names_the_column_and_line(tmp_path):
    bad(write(tmp_path / "d.csv", "a,color,y\n1,2,0\n3,red,1\n"), "line 3", "column 'color' holds 'red', not a number")
    bad(write(tmp_path / "e.csv", "a,b,y\n1,,0\n"), "line 2", "column 'b' is empty")
    bad(write(tmp_path / "t.csv", "a,y\n1,\n"), "line 2", "the target 'y' is empty")
    np.save(tmp_path / "s.npy", np.array([["a", "b"], ["c", "d"]]))
    bad(tmp_path / "s.npy", "not numbers")


def test_ragged_csv_row_names_the_line(tmp_path):
    bad(write(tmp_path / "d.csv", "a,b,y\n1,2,0\n3,4\n"), "line 3 has 2 fields, the header has 3")


def test_empty_files_and_no_rows(tmp_path):
    bad(write(tmp_path / "d.csv", ""), "is empty")
    bad(write(tmp_path / "blank.csv", "\n\n"), "is empty (no header row)")
    bad(write(tmp_path / "h.csv", "a,y\n"), "has a header but no data rows")
    bad(write(tmp_path / "n.csv", "1,2\n3,4\n"), "line 1 holds numbers, not column names")
    bad(write(tmp_path / "only.csv", "y\n1\n2\n"), "has no feature columns besides the target 'y'")
    bad(write(tmp_path / "dup.csv", "a,a,y\n1,2,3\n"), "the column 'a' appears twice")
    np.save(tmp_path / "e.npy", np.zeros((0, 3)))
    bad(tmp_path / "e.npy", "has no rows")
    np.savez(tmp_path / "e.npz", x=np.zeros((0, 2)), y=np.zeros(0))
    bad(tmp_path / "e.npz", "has no samples")
    (tmp_path / "z.npy").write_bytes(b"")
    bad(tmp_path / "z.npy", "is empty")


def test_pickled_arrays_are_refused(tmp_path):
    np.save(tmp_path / "d.npy", np.array([[1, "a"], [2, "b"]], dtype=object), allow_pickle=True)
    bad(tmp_path / "d.npy", "pickled", "allow_pickle=False")
    np.savez(tmp_path / "d.npz", x=np.ones((2, 1)), y=np.array(["a", None], dtype=object))
    bad(tmp_path / "d.npz", "array 'y' holds Python objects (a pickled array)")
    (tmp_path / "p.npy").write_bytes(pickle.dumps([[1.0, 2.0]]))
    bad(tmp_path / "p.npy", "is not a valid NPY array")


def test_npz_missing_key_lists_the_arrays(tmp_path):
    np.savez(tmp_path / "d.npz", features=np.ones((2, 1)), y=np.zeros(2))
    bad(tmp_path / "d.npz", "has no array 'x' (data.x_key)", "its arrays are 'features', 'y'")
    (tmp_path / "n.npz").write_bytes(b"not a zip archive")
    bad(tmp_path / "n.npz", "is not a valid NPZ file")


def test_npz_member_that_claims_more_than_the_limit(tmp_path, monkeypatch):
    monkeypatch.setattr("optcli.tasks.tabular.MAX_DATA_BYTES", 1000)
    np.savez_compressed(tmp_path / "d.npz", x=np.zeros((200, 2)), y=np.zeros(200))  # 4.8 kB expanded, small zipped
    assert (tmp_path / "d.npz").stat().st_size < 1000
    bad(tmp_path / "d.npz", "expand to more than the 1000-byte limit")


def test_wrong_dimensions(tmp_path):
    np.save(tmp_path / "one.npy", np.zeros(4))
    bad(tmp_path / "one.npy", "shape (4,)", "the last column the target")
    np.save(tmp_path / "col.npy", np.zeros((4, 1)))
    bad(tmp_path / "col.npy", "shape (4, 1)")
    np.savez(tmp_path / "x3.npz", x=np.zeros((2, 2, 2)), y=np.zeros(2))
    bad(tmp_path / "x3.npz", "array 'x' has shape (2, 2, 2)")
    np.savez(tmp_path / "n.npz", x=np.zeros((3, 2)), y=np.zeros(2))
    bad(tmp_path / "n.npz", "array 'y' has shape (2,)", "N = 3 samples")
    np.savez(tmp_path / "y2.npz", x=np.zeros((3, 2)), y=np.array([[0, 1], [1, 0], [0, 0]]))
    bad(tmp_path / "y2.npz", "a classification target is one label per sample")


def test_data_file_size_is_capped(tmp_path, monkeypatch):
    monkeypatch.setattr("optcli.tasks.tabular.MAX_CSV_BYTES", 10)
    bad(write(tmp_path / "d.csv", "a,y\n1,2\n3,4\n"), "too large", "10-byte limit")


def test_not_utf8_csv(tmp_path):
    (tmp_path / "d.csv").write_bytes(b"a,y\n\xff,1\n")
    bad(tmp_path / "d.csv", "is not UTF-8 text")


@pytest.mark.skipif(not HAS_PYARROW, reason="pyarrow is not installed (pip install 'optcli[parquet]')")
def test_bad_parquet_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"s": ["x", "y"], "y": [0, 1]}), tmp_path / "s.parquet")
    bad(tmp_path / "s.parquet", "column 's' is string, not a number")
    pq.write_table(pa.table({"a": [1.0, None, 3.0], "y": [0, 1, 0]}), tmp_path / "n.parquet")
    bad(tmp_path / "n.parquet", "row 1: column 'a' is missing (null)")
    pq.write_table(pa.table({"a": [1.0], "y": [0]}), tmp_path / "t.parquet")
    bad(tmp_path / "t.parquet", "'label' is not a column", "'a', 'y'", target_column="label")
    (tmp_path / "g.parquet").write_bytes(b"garbage, not parquet")
    bad(tmp_path / "g.parquet", "is not a readable Parquet file")


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # None in sys.modules makes the import fail
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(UserError, match=r"^data.path: reading Parquet needs pyarrow: pip install 'optcli\[parquet\]'$"):
        read(tmp_path / "d.parquet")
