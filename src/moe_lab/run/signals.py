"""SIGTERM and SIGINT: a signal stops the run it lands in, and a sweep starts no job after it.

During a job (:func:`signals_interrupt_the_run`) the first signal raises :class:`RunInterrupted`
where the job is; repeats during its clean-up are only noted. Between the jobs of a sweep the
signal is noted, and the next job does not start. In the process that launches a sweep,
:class:`SweepSignals` (a Hydra callback) passes the signal on to the launcher's worker processes
and, when the launcher returns, exits with ``128 + signal``; a second signal there stops
everything at once.

The noted signal is this module's state, so every job of a process sees it (Hydra's
``conf/hydra/default.yaml`` lists ``moe_lab.run.signals.SweepSignals``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig

from moe_lab.run.context import is_multirun

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: The first SIGTERM/SIGINT this process received (None: none). It outlives the job it stopped:
#: a process that runs several jobs of a sweep starts none after it.
_received_signal: int | None = None
#: Set in the sweep's launching process (see :class:`SweepSignals`): jobs running in that same
#: process (the basic launcher) stop the sweep by exiting; jobs in worker processes (joblib)
#: return, so their workers finish writing before the launcher exits.
SWEEP_PID_ENV = "MOE_LAB_SWEEP_PID"


class RunInterrupted(BaseException):
    """A SIGTERM or SIGINT stopped the run. A BaseException, like KeyboardInterrupt, so that no
    ``except Exception`` on the way up swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"received {signal.Signals(signum).name}")
        self.signum = signum


def received_signal() -> int | None:
    """The first SIGTERM/SIGINT this process received, or None."""
    return _received_signal


def in_sweep_launcher() -> bool:
    """True in the process that launched the sweep (or outside any sweep)."""
    return os.environ.get(SWEEP_PID_ENV, str(os.getpid())) == str(os.getpid())


def _note_signal(signum: int, frame: Any) -> None:
    """Between jobs: remember the signal; the next job will not start."""
    global _received_signal
    _received_signal = _received_signal or signum


def _raise_on_signal(signum: int, frame: Any) -> None:
    """During a job: stop it where it is (once; repeats during the clean-up are only noted)."""
    global _received_signal
    first = _received_signal is None
    _received_signal = _received_signal or signum
    if first:
        raise RunInterrupted(signum)


@contextlib.contextmanager
def signals_interrupt_the_run() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = {s: signal.signal(s, _raise_on_signal) for s in _SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            # a worker of a sweep keeps noting signals between its jobs
            default = handler in (signal.SIG_DFL, signal.default_int_handler, None)
            keep = _note_signal if is_multirun() and default else handler
            signal.signal(s, keep)


class SweepSignals(HydraCallback):
    """Hydra callback: a SIGTERM or SIGINT to a multirun stops it cleanly.

    In the launching process it notes the signal and passes it on to the launcher's worker
    processes (joblib's), whose running jobs then record ``interrupted`` and which start no
    further jobs; when the launcher returns, the multirun exits with ``128 + signal`` (after the
    sweep report is written, as this callback is listed first).
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        os.environ[SWEEP_PID_ENV] = str(os.getpid())
        if threading.current_thread() is threading.main_thread():
            for s in _SIGNALS:
                signal.signal(s, self._forward)

    @staticmethod
    def _forward(signum: int, frame: Any) -> None:
        """The first signal goes on to the workers, whose jobs stop and record ``interrupted``;
        a second one stops everything at once: the workers are killed and the process exits
        with ``128 + signal`` (killed runs are resumable from their last checkpoint)."""
        first = _received_signal is None
        _note_signal(signum, frame)
        workers = _launcher_workers()
        for pid in workers:
            with contextlib.suppress(OSError):
                os.kill(pid, signum if first else signal.SIGKILL)
        if first:
            return
        name = signal.Signals(signum).name
        print(f"[moe_lab] a second {name}: stopped at once", file=sys.stderr, flush=True)
        os._exit(128 + signum)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if _received_signal is not None:
            name = signal.Signals(_received_signal).name
            print(
                f"[moe_lab] sweep stopped by {name}; finish it with: "
                f"python -m moe_lab.finish {config.hydra.sweep.dir}",
                file=sys.stderr,
            )
            raise SystemExit(128 + _received_signal)


def _launcher_workers() -> list[int]:
    """The pids of joblib's (loky's) worker processes under this process; never W&B's service
    nor loky's resource tracker, which must outlive the jobs they serve."""
    try:
        import psutil
    except ImportError:
        return []
    pids = []
    for child in psutil.Process().children(recursive=False):
        try:
            cmdline = " ".join(child.cmdline())
        except (psutil.Error, OSError):
            continue
        if "loky" in cmdline and "resource_tracker" not in cmdline:
            pids.append(child.pid)
    return pids


__all__ = [
    "SWEEP_PID_ENV",
    "RunInterrupted",
    "SweepSignals",
    "in_sweep_launcher",
    "received_signal",
    "signals_interrupt_the_run",
]
