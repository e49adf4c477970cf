"""Bad input: one clear line naming what is wrong and where, exit code 2, no traceback, no files left behind."""

import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optcli.config import Config, apply_overrides, parse_yaml, to_yaml, validate
from optcli.errors import UserError
from tests.conftest import cli, write_tiny_mnist


def _write(name, content):
    def make(tmp_path):
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return ["--config", path]

    return make


def _tiny_mnist(mutate=None, download="false"):
    def make(tmp_path):
        root = write_tiny_mnist(tmp_path / "m")
        if mutate:
            mutate(root / "MNIST" / "raw")
        return [
            "--set",
            "data.name=mnist",
            "--set",
            f"data.root={root}",
            "--set",
            f"data.download={download}",
            "--set",
            "train.loss=cross_entropy",
            "--set",
            "train.epochs=1",
        ]

    return make


def _truncate(raw):
    p = raw / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:5000])


def _garbage(raw):
    (raw / "t10k-labels-idx1-ubyte").write_bytes(b"this is not an IDX file")


def _delete(raw):
    (raw / "train-labels-idx1-ubyte").unlink()


def _bad_labels(raw):
    p = raw / "train-labels-idx1-ubyte"
    data = bytearray(p.read_bytes())
    data[8] = 42
    p.write_bytes(bytes(data))


def _sets(*items):
    return lambda tmp_path: [x for item in items for x in ("--set", item)]


# (case id, command, argument maker, expected exit code, fragment of the message)
CASES = [
    ("yaml-syntax", "train", _write("c.yaml", "data:\n  batch_size: [1, 2\n"), 2, "c.yaml:3:1: invalid YAML"),
    ("yaml-tab", "train", _write("c.yaml", "data:\n\tname: mnist\n"), 2, "c.yaml:2:1: invalid YAML"),
    ("empty-file", "train", _write("c.yaml", ""), 2, "the file is empty"),
    ("list-not-mapping", "train", _write("c.yaml", "- 1\n- 2\n"), 2, "top level must be a mapping"),
    ("section-not-mapping", "train", _write("c.yaml", "data: [1, 2]\n"), 2, "data: Input should be a valid dictionary"),
    ("scalar-file", "train", _write("c.yaml", "42\n"), 2, "top level must be a mapping"),
    ("wrong-level", "train", _write("c.yaml", "batch_size: 32\n"), 2, "it belongs under data: (data.batch_size)"),
    (
        "unknown-key",
        "train",
        _write("c.yaml", "model:\n  dropuot: 0.1\n"),
        2,
        "model.dropuot: unknown key (did you mean 'dropout'?)",
    ),
    (
        "wrong-type",
        "train",
        _write("c.yaml", "train:\n  epochs: many\n"),
        2,
        "train.epochs: Input should be a valid integer",
    ),
    ("batch-zero", "train", _sets("data.batch_size=0"), 2, "data.batch_size: Input should be greater than 0"),
    ("batch-negative", "train", _sets("data.batch_size=-8"), 2, "data.batch_size"),
    ("lr-zero", "train", _sets("optimizer.lr=0"), 2, "optimizer.lr: must be > 0"),
    (
        "lr-negative-group",
        "train",
        _sets("optimizer.groups=[{params: ['*.bias'], lr: -1}]"),
        2,
        "optimizer.groups.0.lr: must be > 0",
    ),
    ("dropout-one", "train", _sets("model.dropout=1"), 2, "model.dropout: Input should be less than 1"),
    ("dropout-negative", "train", _sets("model.dropout=-0.1"), 2, "model.dropout"),
    ("hidden-empty", "train", _sets("model.hidden=[]"), 2, "model.hidden: List should have at least 1 item"),
    ("hidden-zero", "train", _sets("model.hidden=[10,0]"), 2, "every hidden width must be > 0"),
    ("activation", "train", _sets("model.activation=swish"), 2, "model.activation: Input should be"),
    ("init", "train", _sets("model.init=glorot"), 2, "model.init: unknown scheme 'glorot'"),
    ("loss", "train", _sets("train.loss=huber"), 2, "train.loss: unknown loss 'huber' (did you mean 'huber_loss'?)"),
    ("device-name", "train", _sets("device=tpu"), 2, "device: must be auto, cpu, cuda, cuda:N or mps"),
    (
        "optimizer-name",
        "train",
        _sets("optimizer.name=adamm"),
        2,
        "optimizer.name: unknown name 'adamm' (did you mean 'adam'?) (valid: Adafactor",
    ),
    (
        "optimizer-kwarg",
        "train",
        _sets("optimizer.momentum=0.9"),
        2,
        "Adam takes no argument 'momentum' (valid: lr, betas",
    ),
    ("optimizer-value", "train", _sets("optimizer.betas=[2,0.9]"), 2, "Invalid beta parameter"),
    ("optimizer-value-type", "train", _sets("optimizer.lr=fast"), 2, "optimizer.lr: Adam expects a number"),
    ("scheduler-name", "train", _sets("scheduler={name: warmup}"), 2, "scheduler.name: unknown name 'warmup'"),
    (
        "scheduler-kwarg",
        "train",
        _sets("scheduler={name: steplr, step_size: 2, gama: 0.5}"),
        2,
        "StepLR takes no argument 'gama'",
    ),
    ("ce-on-regression", "train", _sets("train.loss=cross_entropy"), 2, "cross_entropy needs class labels"),
    ("mse-on-mnist", "train", _sets("data.name=mnist", "train.loss=mse"), 2, "mse needs real-valued targets"),
    ("sparseadam-dense", "train", _sets("optimizer.name=SparseAdam"), 2, "SparseAdam does not support dense gradients"),
    ("val-fraction", "train", _sets("data.val_fraction=1.5"), 2, "data.val_fraction: Input should be less than 1"),
    ("freeze-everything", "train", _sets("model.freeze=['*']"), 2, "every parameter is frozen"),
    ("missing-file", "train", lambda p: ["--config", p / "nope.yaml"], 2, "nope.yaml: no such config file"),
    ("directory", "train", lambda p: ["--config", p], 2, "is a directory, not a config file"),
    ("not-utf8", "train", _write("c.yaml", b"seed: 1\nname: \xff\xfe\n"), 2, "not UTF-8 text (bad byte at offset 14)"),
    ("huge-file", "train", _write("c.yaml", "#" * 2_000_000), 2, "is too large for a config"),
    ("set-no-equals", "train", _sets("optimizer.lr"), 2, "--set optimizer.lr: expected key.path=value"),
    ("set-unknown-path", "train", _sets("model.widths=[3]"), 2, "--set model.widths=[3]: unknown key 'model.widths'"),
    ("set-unknown-top", "train", _sets("bogus.x=1"), 2, "unknown key 'bogus'"),
    ("set-bad-value", "train", _sets("model.hidden=[1,"), 2, "--set model.hidden=[1,: cannot parse the value"),
    ("set-empty-part", "train", _sets("model..hidden=3"), 2, "empty part in the key path"),
    ("mnist-missing", "train", _tiny_mnist(_delete), 2, "MNIST not found in"),
    ("mnist-missing-names-file", "train", _tiny_mnist(_delete), 2, "missing train-labels-idx1-ubyte"),
    ("mnist-truncated", "train", _tiny_mnist(_truncate), 2, "corrupt or truncated"),
    ("mnist-garbage", "train", _tiny_mnist(_garbage), 2, "corrupt or truncated"),
    ("mnist-bad-labels", "train", _tiny_mnist(_bad_labels), 2, "does not hold one digit 0-9 per image"),
    ("cuda-absent", "train", _sets("device=cuda"), 2, "CUDA is not available on this machine"),
    ("cuda-index", "train", _sets("device=cuda:3"), 2, "device: 'cuda:3'"),
    ("scheduler-missing-kwarg", "train", _sets("scheduler={name: steplr}"), 2, "StepLR needs step_size"),
    ("freeze-no-match", "train", _sets("model.freeze=['fc9.*']"), 2, "'fc9.*' matches no parameter"),
    ("set-unknown-key", "train", _sets("nosuch=1"), 2, "unknown key 'nosuch'"),
    ("set-did-you-mean", "train", _sets("data.bach_size=3"), 2, "did you mean 'batch_size'"),
    ("mps-absent", "train", _sets("device=mps"), 2, "MPS is not available on this machine"),
    ("name-escape", "train", _sets("name=../../etc"), 2, "name: must be a plain directory name"),
    ("out-dir-escape", "train", _sets("out_dir=../../etc"), 2, "out_dir"),
    ("out-dir-absolute", "train", _sets("out_dir=/etc"), 2, "must be a relative path"),
    (
        "yaml-python-tag",
        "train",
        _write("c.yaml", "seed: !!python/object/apply:os.system ['true']\n"),
        2,
        "could not determine a constructor for the tag",
    ),
    ("resume-missing", "train", lambda p: ["--resume", p / "runs" / "nothing"], 2, "no such run directory"),
    ("resume-not-run", "train", lambda p: ["--resume", p], 2, "no config.yaml in it"),
    ("compare-no-specs", "compare", lambda p: [], 2, "Missing argument"),
    ("compare-bad-seeds", "compare", lambda p: ["sgd", "--seeds", "0"], 2, "--seeds: must be at least 1"),
    ("compare-bad-jobs", "compare", lambda p: ["sgd", "--jobs", "0"], 2, "--jobs: must be at least 1"),
    ("inspect-bad-optimizer", "inspect-params", lambda p: ["--optimizer", "sgd:lr=x,y"], 2, "expected key=value"),
    ("resume-with-config", "train", lambda p: ["--resume", p, "--config", p / "c.yaml"], 2, "drop --config"),
    (
        "checkpoint-with-set",
        "inspect-params",
        lambda p: ["--checkpoint", p / "x.pt", "--set", "seed=1"],
        2,
        "--checkpoint carries its own config",
    ),
]


@pytest.mark.parametrize("case, command, make_args, code, fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(case, command, make_args, code, fragment, tmp_path):
    if case == "mps-absent":
        import torch

        if torch.backends.mps.is_available():
            pytest.skip("this machine has MPS")
    if case == "cuda-absent":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    result = cli(command, *make_args(tmp_path))
    assert result.exit_code == code, result.output
    assert fragment in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output and result.output.count("(got ") <= 1  # the value shown once
    if command != "compare" or case != "compare-no-specs":
        assert len([line for line in result.output.splitlines() if line.strip()]) == 1, result.output
    assert not (tmp_path / "runs").exists() or case.startswith("resume")


def test_unreadable_config_is_a_user_error(tmp_path, monkeypatch):
    import os

    path = tmp_path / "c.yaml"
    path.write_text("seed: 1\n")
    real_open = os.open

    def denied(file, *args, **kwargs):
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)  # root reads every file, so chmod 000 proves nothing here
    result = cli("train", "--config", path)
    assert result.exit_code == 2 and "cannot read the file (permission denied)" in result.output


# --- fuzzing the config loader -------------------------------------------------------------------------------

KEYS = sorted(
    {
        *Config.model_fields,
        *[
            k
            for f in Config.model_fields.values()
            if isinstance(f.annotation, type) and hasattr(f.annotation, "model_fields")
            for k in f.annotation.model_fields
        ],
        "lr",
        "momentum",
        "betas",
        "params",
        "groups",
        "step_size",
    }
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True),
    st.text(string.printable, max_size=12),
    st.sampled_from(["mnist", "regression", "adam", "sgd", "relu", "cpu", "auto", "mse", "sum"]),
)
keys = st.one_of(st.sampled_from(KEYS), st.text(string.ascii_lowercase + "_.", min_size=1, max_size=10))
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=5)),
    max_leaves=20,
)
configs = st.dictionaries(keys, values, max_size=8)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.one_of(configs, values))
def test_fuzzed_configs_either_validate_or_raise_a_user_error(raw):
    try:
        cfg = validate(raw, "fuzz")
    except UserError as exc:
        message = str(exc)
        assert message.startswith("fuzz") and "\n" not in message.strip()
    else:  # what was accepted is written out and read back as the same config (a run's config.yaml);
        # compared as text, where a NaN keyword equals itself
        assert to_yaml(validate(parse_yaml(to_yaml(cfg)), "round trip")) == to_yaml(cfg)


@settings(max_examples=200, deadline=None)
@given(items=st.lists(st.text(string.printable, max_size=30), max_size=4))
def test_fuzzed_overrides_either_apply_or_raise_a_user_error(items):
    try:
        validate(apply_overrides({}, items), "fuzz")
    except UserError as exc:
        assert str(exc) and "\n" not in str(exc).strip()
