"""Stopping a run cleanly: on SIGINT (Ctrl-C) or SIGTERM the loop finishes its step, saves a checkpoint and
raises `TrainingInterrupted`, which the commands turn into one line and exit status 130.

While `StopSignals` is active the two signals only set a flag, so no KeyboardInterrupt can strike in the
middle of a step or of a checkpoint write. A second signal changes nothing (the stop is already coming);
a third one outside a checkpoint write quits at once, without saving: the way out of a step that hangs.
Checkpoints are written to a temporary file and renamed, so even that never leaves a broken one.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
FORCE_AFTER = 3  # signals: the third quits without saving


class TrainingInterrupted(KeyboardInterrupt):
    """Raised by `train()` after a stop signal, once the checkpoint of the last finished step is written
    (`checkpoint` is None on ranks other than 0). A KeyboardInterrupt, so `except Exception` lets it pass."""

    def __init__(self, step: int, checkpoint: Path | None) -> None:
        where = f"; checkpoint {checkpoint}" if checkpoint is not None else ""
        super().__init__(f"training interrupted after step {step}{where}")
        self.step, self.checkpoint = step, checkpoint


class StopSignals:
    """Context manager: while active (in the main thread), SIGINT and SIGTERM ask the run to stop."""

    def __init__(self) -> None:
        self.received = 0
        self.saving = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # Python handles signals there only
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        self.received += 1
        if self.received >= FORCE_AFTER and not self.saving:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def saving_checkpoint(self) -> Iterator[None]:
        """A region that no signal interrupts (a checkpoint write)."""
        self.saving = True
        try:
            yield
        finally:
            self.saving = False

    def requested(self, ddp: bool, device: torch.device) -> bool:
        """Whether to stop after this step; under DDP every rank answers alike (any rank signalled), so
        all stop at the same step instead of some waiting forever for the others' gradients."""
        wanted = self.received > 0
        if not ddp:
            return wanted
        flag = torch.tensor([int(wanted)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
