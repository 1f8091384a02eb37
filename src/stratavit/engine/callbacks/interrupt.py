"""SIGINT (Ctrl-C) and SIGTERM (SLURM pre-emption, ``kill``): stop at a step boundary with a checkpoint.

:class:`StopSignals` catches the two signals for the duration of ``trainer.fit`` (as a context
manager) and only *records* the first one (this module imports no Lightning: the CLI reads
:class:`TrainingInterrupted` cheaply); :class:`~stratavit.engine.callbacks.checkpoint.LastCheckpoint`
reads it at every step boundary, the processes agree on it (one may be signalled alone), and all
of them write the checkpoint and raise :class:`TrainingInterrupted`, which ends ``trainer.fit``
like any exception (Lightning runs its ``on_exception`` hooks and tears down) and which
:func:`stratavit.engine.train.pretrain` and the CLI turn into one line and exit code 128 + signal.

A second signal while the run is on its way to the step boundary stops it at once (no new
checkpoint; the last one stays, whole); while the stop checkpoint is being written it is only
noted, and a third one stops even that (``last.ckpt`` is replaced atomically: old or new, never
half).

How this sits with Lightning's own signal handling (``lightning.pytorch.trainer.connectors.
signal_connector._SignalConnector``, Lightning 2.6):

* Lightning installs a SIGTERM handler inside ``trainer.fit`` (after ``on_fit_start``, before
  ``on_train_start``) that sets ``trainer.received_sigterm``, forwards the signal to the processes
  it launched, and broadcasts from inside the handler; its loops then raise ``SIGTERMException``
  after the current batch, i.e. *before* the step is complete (the EMA update and the step
  checkpoint come at the next batch start) and on the signalled process only. So in
  ``on_train_start`` we put our handler back for SIGTERM, replacing Lightning's (its composed
  handler would also call ours, but the exception would still come):
  :class:`~stratavit.engine.callbacks.checkpoint.ReclaimSigterm`. Lightning restores the handlers
  it found (ours) when ``fit`` ends, and we restore the ones before ``fit``.
* SIGINT: Lightning installs no handler; Python's default raises ``KeyboardInterrupt`` wherever
  the main thread is, which Lightning catches as "Detected KeyboardInterrupt" and ``sys.exit(1)``
  without a checkpoint. Ours replaces it for the whole of ``fit``.
* SLURM auto-requeue (``SLURMEnvironment(auto_requeue=True)``) acts on the requeue signal
  (SIGUSR1): left to Lightning as it is. For pre-emption send SIGTERM (``#SBATCH
  --signal=TERM@120`` or SLURM's own SIGTERM before the kill): the run stops with a checkpoint and
  a requeued job that runs the same command continues it.
* DataLoader workers: a Ctrl-C in a terminal and SLURM's SIGTERM reach every process of the job,
  workers included, which then die and take the step boundary with them;
  :func:`stratavit.engine.data.ignore_stop_signals` makes workers ignore both (they end with the
  training process), and a forked child that inherits our handler ignores the signal too.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def signal_name(signum: int) -> str:
    """``"SIGINT"`` for 2, ...; ``"signal N"`` for numbers this platform does not name."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class TrainingInterrupted(BaseException):
    """Training stopped on a signal. A ``BaseException`` (like ``KeyboardInterrupt``): raised
    from a signal handler it must not be swallowed by an ``except Exception`` on its way out.

    Attributes:
        signum: the signal (agreed by all processes).
        step: optimiser steps done when it stopped.
        checkpoint: the checkpoint a continued run starts from (None: there is none yet).
        checkpoint_step: the step ``checkpoint`` holds (== ``step`` when it was saved at the stop).
        run_dir: the run folder, filled in by :func:`stratavit.engine.train.pretrain`.
    """

    def __init__(self, signum: int, step: int, checkpoint: Path | None, checkpoint_step: int | None) -> None:
        super().__init__(signal_name(signum))
        self.signum = int(signum)
        self.step = int(step)
        self.checkpoint = checkpoint
        self.checkpoint_step = checkpoint_step
        self.run_dir: Path | None = None

    @property
    def exit_code(self) -> int:
        """128 + the signal number, what a shell reports for a process the signal ended (130, 143)."""
        return 128 + self.signum

    def message(self, continue_with: str | None = None) -> str:
        """One line: where the run stopped, what is kept and the command that continues it
        (``continue_with``, by default ``stratavit pretrain --out RUN_DIR``)."""
        name = signal_name(self.signum)
        run = str(self.run_dir) if self.run_dir is not None else "RUN_DIR"
        command = continue_with or f"stratavit pretrain --out {run}"
        if self.checkpoint is None or self.checkpoint_step is None:
            return (f"stopped by {name} at step {self.step}, before any checkpoint: nothing to continue from; "
                    "run the same command again to start over")
        if self.checkpoint_step == self.step:
            kept = f"checkpoint saved at step {self.step}"
        else:
            kept = f"without a new checkpoint; the one at step {self.checkpoint_step} is kept"
        return f"stopped by {name} at step {self.step}, {kept} ({self.checkpoint}); continue with: {command}"


def launched_as_rank_zero() -> bool:
    """Whether the launcher's environment makes this process the first (or only) one."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        value = os.environ.get(key)
        if value is not None and value.strip().isdigit():
            return int(value) == 0
    return True


def _write_stderr(text: str) -> None:
    """Write to file descriptor 2 directly: safe inside a signal handler, even while the main
    thread is in the middle of writing to ``sys.stderr`` (the progress bar)."""
    try:
        os.write(2, text.encode())
    except OSError:
        pass


class StopSignals:
    """Records SIGINT / SIGTERM while installed (``with StopSignals(): trainer.fit(...)``).

    ``received`` is the first signal's number (0: none). The handler only records, prints one
    notice, and raises :class:`TrainingInterrupted` on the second signal (the third while
    :attr:`saving`). Processes other than the one that installed it (forked loader workers) ignore
    the signals.
    """

    def __init__(self, verbose_notice: bool | None = None) -> None:
        """``verbose_notice``: print a notice on the first signal; None: on the first process of
        a multi-process run only (by the launcher's ``RANK`` / ``LOCAL_RANK`` / ``SLURM_PROCID``)."""
        self.received = 0
        self.count = 0
        self.saving = False
        """Set by the checkpoint while it writes the stop checkpoint: a second signal then waits."""
        self.step = 0
        """Steps done, kept current by the checkpoint callback (for the forced stop's message)."""
        self.checkpoint: Path | None = None
        self.checkpoint_step: int | None = None
        self.notice = launched_as_rank_zero() if verbose_notice is None else verbose_notice
        self._pid = os.getpid()
        self._previous: dict[int, Any] = {}

    # ------------------------------------------------------------------ handlers

    def handle(self, signum: int, frame: FrameType | None = None) -> None:
        """The signal handler."""
        if os.getpid() != self._pid:  # a forked child (loader worker): the training process decides
            return
        self.count += 1
        if self.count == 1:
            self.received = signum
            if self.notice:
                again = " (Ctrl-C again stops at once, without it)" if signum == signal.SIGINT else ""
                _write_stderr(f"\n{signal_name(signum)}: stopping after the current step to save a checkpoint{again}\n")
            return
        if self.saving and self.count == 2:
            _write_stderr(f"\n{signal_name(signum)}: still writing the checkpoint; again to abandon it "
                          "(the previous checkpoint stays whole either way)\n")
            return
        raise TrainingInterrupted(self.received or signum, self.step, self.checkpoint, self.checkpoint_step)

    def install(self) -> None:
        """Handle SIGINT and SIGTERM with :meth:`handle` (main thread only; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in STOP_SIGNALS:
            previous = signal.signal(signum, self.handle)
            self._previous.setdefault(signum, previous)

    def restore(self) -> None:
        """Put back the handlers :meth:`install` replaced first."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def __enter__(self) -> StopSignals:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


__all__ = ["STOP_SIGNALS", "StopSignals", "TrainingInterrupted", "launched_as_rank_zero", "signal_name"]
