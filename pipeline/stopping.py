"""Stop requests: how a batch job asks a long computation to checkpoint and exit with REQUEUE_EXIT_CODE.

Standard library only: slurm/submit.py imports it on a login node, without the project's environment, to pass
REQUEUE_EXIT_CODE to the jobs.

Two channels, both read at step boundaries:
- SIGUSR1/SIGTERM delivered to this process (enough when nothing sits between the sender and Python);
- the stop file named by $PIPELINE_STOP_FILE. slurm/stage.sbatch creates it when SLURM signals the batch
  shell (`--signal=B:USR1@lead`). A file crosses any number of process layers (apptainer exec, dvc repro,
  accelerate launch, torchrun), none of which must forward a signal: Apptainer forwards signals only to
  its direct child (dvc), which dies of SIGUSR1. Each poll costs one stat(). The batch script removes the
  file at the start of every attempt, so a requeued job does not stop at once; in a multi-process run
  every rank polls the same file (on a shared file system) and the trainer agrees on the step.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

REQUEUE_EXIT_CODE = 75   # "stopped early with resumable state": the SLURM wrapper requeues on it
STOP_FILE_ENV = "PIPELINE_STOP_FILE"
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def stop_file() -> Path | None:
    """The stop file this process polls ($PIPELINE_STOP_FILE), or None outside a batch job."""
    value = os.environ.get(STOP_FILE_ENV)
    return Path(value) if value else None


def stop_requested() -> str | None:
    """Why the batch job asks this process to stop ("stop file PATH"), or None: one stat."""
    path = stop_file()
    return f"stop file {path}" if path is not None and path.exists() else None


def announce(who: str, event: str) -> None:
    print(f"\n{who}: {event}; checkpointing at the next step boundary", file=sys.stderr, flush=True)


class StopRequests:
    """Context manager: `received` is the reason a stop was requested ("signal SIGUSR1", "stop file PATH")
    or None. While enabled, SIGUSR1/SIGTERM are caught (main thread only; handlers restored on exit) and
    each read of `received` polls the stop file until a request is seen. `who` names the stage in messages."""

    def __init__(self, enabled: bool, who: str):
        self.enabled, self.who = enabled, who
        self._catch_signals = enabled and threading.current_thread() is threading.main_thread()
        self._received: str | None = None
        self._previous: dict = {}

    @property
    def received(self) -> str | None:
        if self._received is None and self.enabled:
            self._received = stop_requested()
            if self._received:
                announce(self.who, f"found {self._received}")
        return self._received

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        self._received = f"signal {name}"
        announce(self.who, f"received {name}")

    def __enter__(self):
        if self._catch_signals:
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
