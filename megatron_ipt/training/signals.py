"""Stop training cleanly on request: SIGTERM / SIGUSR1 (Slurm preemption, ``scancel``, a time limit
signalled with ``#SBATCH --signal=B:USR1@120``) or a wall-clock budget (``train.exit_duration_minutes``).

A signal only sets a flag; the trainer asks :meth:`StopRequest.should_stop` once per iteration, which
agrees across all ranks (an all-reduce of each rank's flag, so every rank saves the same iteration), then
saves a checkpoint and exits with :data:`EXIT_STOPPED`. The trainer keeps the handlers installed until its
last save finished, so a second signal (a repeated ``scancel``, Slurm signalling every step) only sets the flag
again instead of killing a half-written checkpoint. Mirrors Megatron-LM's ``--exit-signal-handler`` and
``--exit-duration-in-mins``.
"""

from __future__ import annotations

import signal
import threading
import time

import torch

EXIT_STOPPED = 3  # `ipt train` exit status when it saved and stopped early on request (rerun resumes)
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Collects stop requests while training runs; use as a context manager (installs and restores the
    signal handlers; handlers can only be installed from the main thread, elsewhere signals are not caught)."""

    def __init__(self, exit_duration_minutes: float | None = None, device: torch.device | None = None) -> None:
        self.deadline = time.monotonic() + 60 * exit_duration_minutes if exit_duration_minutes else None
        self.device = device or torch.device("cpu")
        self.received: str | None = None
        self.reason: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def should_stop(self) -> bool:
        """True on every rank when any rank received a signal or passed the time budget (collective call)."""
        local = 0
        if self.received:
            local = 2
        elif self.deadline is not None and time.monotonic() >= self.deadline:
            local = 1
        flag = torch.tensor([local], dtype=torch.int32, device=self.device)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        value = int(flag.item())
        if value and self.reason is None:
            self.reason = (self.received or "a signal on another rank") if value == 2 else "exit_duration_minutes"
        return bool(value)
