"""Interruption and resumption: SIGINT / SIGTERM stop a run cleanly, checkpoints let it resume.

A signal never lands in the middle of an optimisation step: while the trainer runs a step it is deferred
to the step's end (a second signal stops at once), where the trainer saves a checkpoint (when the run
checkpoints) and raises ``Interrupted``. The run's record then says ``interrupted`` (never ``ok``), so
the next invocation of the same command runs it again, from its latest checkpoint if it has one.
SIGTERM is what SLURM sends at a job's time limit (and ``scancel``), SIGINT is Ctrl-C; under submitit,
SIGUSR2 (its warning before the time limit) stops the run the same way and then goes on to submitit's
own handler, which requeues the job: the requeued job resumes from the checkpoint.

A checkpoint is one file, ``runs/<run_id>.ckpt`` (written atomically, deleted once the record is
written): the trainable weights and buffers, the optimizer and scheduler state, the variant's own
state between steps (AdaLoRA's importance averages and rank pattern), the random generators (dropout,
data order) and the loop's bookkeeping (history, step times, the best validation state). The frozen
base is not in it: it is rebuilt from the same config, exactly as the first time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from experiments.files import atomic_write

FORMAT = 1  # bump when the checkpoint layout changes (an older checkpoint is then ignored, with a note)


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal. A KeyboardInterrupt, so ``except Exception`` never records it as a
    failure; ``step`` is the last completed step (None: before training started)."""

    def __init__(self, signum: int, step: int | None = None):
        super().__init__(f"interrupted by {signal.Signals(signum).name}" + (f" after step {step}" if step else ""))
        self.signum, self.step = signum, step


class _Signals:
    """Installed handlers and the signal waiting for the end of a step."""

    def __init__(self):
        self.pending: int | None = None
        self.deferring = False
        self.previous: dict[int, object] = {}

    def hand_on(self, e: Interrupted) -> None:
        """After the run stopped cleanly, let a launcher's own handler for an extra signal act on it:
        submitit's on SIGUSR2 (its time-limit warning) requeues the job, which then resumes from the
        checkpoint. SIGINT and SIGTERM stop here."""
        handler = self.previous.get(e.signum)
        if e.signum not in (signal.SIGINT, signal.SIGTERM) and callable(handler):
            handler(e.signum, None)

    def handle(self, signum, frame) -> None:
        if self.deferring and self.pending is None:
            self.pending = signum  # the trainer stops at the end of this step
            return
        raise Interrupted(signum)


SIGNALS = _Signals()


@contextlib.contextmanager
def interruptible() -> Iterator[_Signals]:
    """SIGINT and SIGTERM raise ``Interrupted`` (deferred to the end of a training step) inside the block;
    so does SIGUSR2 where a launcher handles it (submitit: the time limit is near), whose handler then
    gets it (``hand_on``). Only the main thread can install handlers; elsewhere (a launcher running jobs
    in threads) signals keep their default behaviour."""
    if threading.current_thread() is not threading.main_thread():
        yield SIGNALS
        return
    usr2 = getattr(signal, "SIGUSR2", None)
    handled = [signal.SIGINT, signal.SIGTERM, *([usr2] if usr2 and callable(signal.getsignal(usr2)) else [])]
    previous = {s: signal.signal(s, SIGNALS.handle) for s in handled}
    SIGNALS.pending, SIGNALS.deferring, SIGNALS.previous = None, False, previous
    try:
        yield SIGNALS
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        SIGNALS.pending, SIGNALS.deferring, SIGNALS.previous = None, False, {}


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A signal arriving inside the block waits for its end (one training step)."""
    SIGNALS.deferring = True
    try:
        yield
    finally:
        SIGNALS.deferring = False


def watch_parent(parent: int, interval: float = 1.0) -> None:
    """Send this process SIGTERM once ``parent`` is gone (a sweep's worker whose sweep was killed: without
    this it would train on for nobody). A daemon thread; POSIX only."""
    def watch():
        while os.getppid() == parent:
            time.sleep(interval)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True, name="lorabench-parent-watch").start()


class Checkpoint:
    """Save every ``every`` steps (and when interrupted) to ``path``; ``every`` 0: never."""

    def __init__(self, path: str | os.PathLike, every: int):
        self.path, self.every = Path(path), every

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, state: dict) -> None:
        atomic_write(self.path, lambda tmp: torch.save({"format": FORMAT, **state}, tmp))

    def load(self) -> dict | None:
        """The saved state, or None (no checkpoint, an unreadable one, or one of another format: each said)."""
        if self.every <= 0 or not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a corrupt checkpoint is ignored, never trusted
            print(f"[lorabench] note: checkpoint {self.path} is unreadable ({type(e).__name__}): starting over")
            return None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            print(f"[lorabench] note: checkpoint {self.path} has another format: starting over")
            return None
        return state

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
