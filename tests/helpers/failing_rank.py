"""optcli's CLI with one rank that fails in its second epoch: for the torchrun failure test."""

import os

import optcli.engine.loop as train
from optcli.cli import app

real_train_one_epoch = train.train_one_epoch
calls = {"n": 0}


def failing_train_one_epoch(*args, **kwargs):
    calls["n"] += 1
    if os.environ.get("RANK") == "1" and calls["n"] == 2:
        raise RuntimeError("rank 1 failed on purpose in epoch 2")
    return real_train_one_epoch(*args, **kwargs)


train.train_one_epoch = failing_train_one_epoch
app(prog_name="optcli")
