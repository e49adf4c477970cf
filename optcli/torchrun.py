"""torchrun that ends like optcli on a stop signal: `python -m optcli.torchrun [torchrun options] -m optcli train ...`.

torchrun's agent passes SIGTERM, SIGINT, SIGHUP and SIGQUIT on to its workers, which save and end like a single
run (exit 128 + signal), and then raises in itself: a traceback and exit code 1. SIGUSR1 (SLURM's warning before
its time limit) it does not handle at all: the agent dies and its workers are orphaned. This launcher has the
agent pass SIGUSR1 on as well, and ends with one line and exit code 128 + signal once the workers have ended.
"""

from __future__ import annotations

import os
import signal
import sys

from optcli.rundir.signals import STOP_SIGNALS


def main() -> None:
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = ",".join(signal.Signals(s).name for s in STOP_SIGNALS)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun_main

    def stop(signum: int, frame: object) -> None:  # what the agent does for SIGTERM, also before its workers start
        raise SignalException(f"got signal {signum}", sigval=signal.Signals(signum))

    for s in STOP_SIGNALS:
        signal.signal(s, stop)

    try:
        torchrun_main()
    except SignalException as exc:
        sig = signal.Signals(exc.sigval)
        print(f"torchrun: stopped by {sig.name}; every worker has saved and ended", file=sys.stderr)
        sys.exit(128 + sig)


if __name__ == "__main__":
    main()
