"""Every signal that ends a run ends it like Ctrl-C: SIGINT, SIGTERM (kill, schedulers, containers, CI), SIGHUP (a
closed terminal or ssh session), SIGQUIT and SIGUSR1 (SLURM's warning before its time limit, --signal=USR1@60).

While `stop_on_signals()` is active, the first of them raises `Stopped` in the main thread, as SIGINT raises
KeyboardInterrupt (Stopped is one): the epoch under way is abandoned and the caller saves the last completed one.
Inside `held()` (while a run directory is being written) a signal is only recorded, and raised when the section
ends, so an interrupt never lands between a checkpoint and the metrics that describe it. Later signals are recorded
and not raised again: the saving that the first one started is allowed to finish.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1)


class Stopped(KeyboardInterrupt):
    """A stop signal, raised where the main thread was when it arrived."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _State:
    received: int | None = None  # the first stop signal since stop_on_signals() began
    raised = False
    held = 0


_state = _State()


def received() -> int | None:
    """The first stop signal received while stop_on_signals() was active, or None."""
    return _state.received


def signum_of(exc: BaseException) -> int:
    """The signal behind an interrupt: Stopped carries it; a plain KeyboardInterrupt is SIGINT."""
    return getattr(exc, "signum", None) or _state.received or signal.SIGINT


def _handler(signum: int, frame: FrameType | None) -> None:
    if _state.received is None:
        _state.received = signum
    if not _state.held and not _state.raised:
        _state.raised = True
        raise Stopped(signum)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn the stop signals into Stopped for the duration; the previous handlers are put back after it.
    Signal handlers can only be set from the main thread: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in STOP_SIGNALS}
    _state.received, _state.raised, _state.held = None, False, 0
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def raise_if_lost() -> None:
    """Raise Stopped again where a stop signal was received and raised but the run goes on: Python drops an
    exception raised inside a finalizer or a fork callback (printed as "Exception ignored"), and the run would
    train on after the signal. Training loops call this between steps, a point no stop should pass."""
    if _state.received is not None and _state.raised and not _state.held:
        raise Stopped(_state.received)


@contextmanager
def held() -> Iterator[None]:
    """Record stop signals without raising while the body runs; raise the first one after it, if none was yet."""
    _state.held += 1
    try:
        yield
    finally:
        _state.held -= 1
    if not _state.held and _state.received is not None and not _state.raised:
        _state.raised = True
        raise Stopped(_state.received)


@contextmanager
def blocked_in_children() -> Iterator[None]:
    """Processes started inside the body begin with the stop signals but SIGTERM blocked (the mask is inherited
    through fork and exec), until ignore_in_worker() ignores them: a Ctrl-C reaching the process group while a
    worker still imports torch would otherwise print the worker's KeyboardInterrupt traceback. SIGTERM stays
    open, as the parent's way to end a worker. A signal reaching this thread meanwhile is delivered at the end."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, [s for s in STOP_SIGNALS if s != signal.SIGTERM])
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def ignore_in_worker() -> None:
    """A worker process of a pool leaves stopping to its parent: the terminal's Ctrl-C, SIGHUP, ... reach the whole
    process group, and the parent ends its workers with SIGTERM (left at its default, which ends the process).
    On Linux a worker also gets SIGTERM when its parent dies, even by SIGKILL, so no worker outlives its parent."""
    for s in STOP_SIGNALS:
        if s != signal.SIGTERM:
            signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked since the worker started: see above
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: a worker ends when it next finds its parent's pipe closed
