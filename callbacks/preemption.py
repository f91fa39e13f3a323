"""Preemption that loses nothing: checkpoint between two steps, requeue, stop.

SLURM announces the end of a job's time (``#SBATCH --signal=SIGUSR1@90``) or a preemption with a signal
to every process of the job step: SIGUSR1 where the job asked for it, SIGTERM where the cluster preempts
with ``PreemptMode=REQUEUE`` and a ``GraceTime`` (then SIGKILL). Both are handled alike. Lightning's own
SIGTERM handler would stop the run at the next step without a checkpoint (and broadcast from inside the
handler); it is replaced once training starts, and a SIGTERM it caught before that is taken over.
Lightning's own SLURM handler (for SIGUSR1) saves ``hpc_ckpt_N.ckpt`` from inside the signal handler, wherever each rank happens to be: possibly between the forward pass and the optimiser
step, and with a barrier that can meet another rank's gradient all-reduce; training then goes on logging
steps that the resumed run logs again. Here the handler only raises a flag. At the start of a training
step, every ``check_every_n_steps`` steps, the ranks agree whether any of them was signalled (one
all-reduce), and if so all of them, at the same step:

1. flush the loggers, so the TensorBoard run holds every step up to this one;
2. write ``last.ckpt`` (atomically) in the checkpoint folder: weights, optimiser, lr schedule, EMA, and
   how many batches of this epoch were trained on, which the data modules skip when resuming, so the
   resumed run sees the rest of the same epoch's order;
3. on SLURM, rank 0 runs ``scontrol requeue`` for this job (or array task);
4. stop: exit status 0 when requeued, else 75 (EX_TEMPFAIL: resume with ``--ckpt_path=last``).

The requeued job runs the same command, whose ``--ckpt_path=last`` (``slurm/train.sbatch``) resumes at the
same global step, into the same TensorBoard run.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Optional

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from compat import clear_lightning_sigterm, uncount_last_step

__all__ = ["Preemption", "Preempted", "REQUEUED_EXIT_CODE", "NOT_REQUEUED_EXIT_CODE"]

REQUEUED_EXIT_CODE = 0
NOT_REQUEUED_EXIT_CODE = 75  # EX_TEMPFAIL: try again later


class Preempted(SystemExit):
    """Ends the process after the preemption checkpoint is written (its ``code`` is the exit status)."""


class Preemption(Callback):
    """Checkpoint, requeue and stop when one of ``signals`` arrives (see the module docstring).

    Args:
        signals: the signals that announce the end of the job (``--signal=SIGUSR1@90``; SIGTERM for
            preemption by requeue).
        check_every_n_steps: how often the ranks compare notes (one all-reduce of one number, and a
            device sync). SLURM's warning (or GraceTime) must cover this many steps plus writing the checkpoint.
        requeue: on SLURM, requeue the job after the checkpoint is written.
    """

    def __init__(self, signals: tuple[str, ...] = ("SIGUSR1", "SIGTERM"), check_every_n_steps: int = 10,
                 requeue: bool = True):
        if check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be >= 1, got {check_every_n_steps}.")
        try:
            self.signals = [signal.Signals[name] for name in signals]
        except KeyError as err:
            raise ValueError(f"Unknown signal {err.args[0]!r}; use names such as SIGUSR1 or SIGTERM.") from None
        self.check_every_n_steps = check_every_n_steps
        self.requeue = requeue
        self.signalled = False
        self._stopping = False
        self._previous_handlers: dict[signal.Signals, object] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not any(isinstance(cb, ModelCheckpoint) and cb.save_last for cb in trainer.checkpoint_callbacks):
            raise ValueError("Preemption writes last.ckpt of a ModelCheckpoint with save_last=True; the trainer has none.")
        # Lightning's own SLURM handler off (see the module docstring); its signal connector then only
        # watches SIGTERM.
        environment = getattr(trainer.strategy, "cluster_environment", None)  # single-device strategies have none
        if isinstance(environment, SLURMEnvironment):
            environment.auto_requeue = False
        self.signalled = self._stopping = False
        # From here on, not only once training starts: a requeued job spends its first minute restoring the
        # checkpoint and compiling loaders, and a signal then would otherwise kill it unrequeued. A signal
        # that comes before training is acted on at its first step.
        self._previous_handlers = {s: signal.signal(s, self._on_signal) for s in self.signals}

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._take_over_sigterm(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._take_over_sigterm(trainer)

    def _take_over_sigterm(self, trainer: L.Trainer) -> None:
        """Lightning installs its SIGTERM handler just before the sanity check and training (calling ours
        too): this one alone from here on, and a SIGTERM Lightning recorded becomes ours."""
        if signal.SIGTERM in self.signals:
            signal.signal(signal.SIGTERM, self._on_signal)
            if clear_lightning_sigterm(trainer):
                self.signalled = True

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # The process's own handlers back once fit has ended. Not after an exception (Preempted included):
        # Lightning then re-installs the handlers it found when training started, these among them,
        # which only raise a flag that nothing reads any more.
        if stage == "fit":
            for signum, handler in self._previous_handlers.items():
                signal.signal(signum, handler)
            self._previous_handlers = {}

    def _on_signal(self, signum, frame) -> None:
        self.signalled = True  # acted on at the next step boundary, by every rank at once

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        # Step boundary: the previous step's optimiser update, lr step, EMA update and logging are done.
        if trainer.global_step % self.check_every_n_steps:
            return
        if trainer.strategy.reduce_boolean_decision(self.signalled, all=False):
            self._checkpoint_and_stop(trainer)

    def _checkpoint_and_stop(self, trainer: L.Trainer) -> None:
        for logger in trainer.loggers:
            logger.finalize("preempted")
        path = self.checkpoint_path(trainer)
        self._stopping = True
        trainer.save_checkpoint(path)  # every rank calls it; rank 0 writes, then all meet at a barrier
        # Rank 0's answer for every rank: srun reports the highest exit status of the job step's tasks.
        requeued = trainer.strategy.broadcast(self.requeue and _requeue(trainer), src=0)
        rank_zero_info(
            f"Preempted at step {trainer.global_step}: saved {path}. "
            + ("Requeued; the next run resumes from it." if requeued else "Resume with `--ckpt_path=last`.")
        )
        raise Preempted(REQUEUED_EXIT_CODE if requeued else NOT_REQUEUED_EXIT_CODE)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self._stopping:
            uncount_last_step(checkpoint)  # written at the start of a step, not at the end of one

    @staticmethod
    def checkpoint_path(trainer: L.Trainer) -> str:
        """The ``last.ckpt`` that ``--ckpt_path=last`` resumes from."""
        callback = next(cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.save_last)
        return str(Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}")


def _slurm_job() -> Optional[str]:
    """This job's id as ``scontrol requeue`` wants it (``<array job>_<task>`` for an array task)."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array_job}_{task}" if array_job and task else os.environ.get("SLURM_JOB_ID")


def _requeue(trainer: L.Trainer) -> bool:
    """Whether rank 0 requeued this job (``scontrol requeue``); the other ranks do nothing."""
    job = _slurm_job()
    if job is None or not trainer.is_global_zero:
        return False
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    except OSError as err:  # no scontrol here, e.g. inside a container
        rank_zero_warn(f"Could not requeue SLURM job {job}: {err}")
        return False
    if result.returncode:
        rank_zero_warn(f"`scontrol requeue {job}` failed ({result.returncode}): {result.stderr.strip()}")
    return result.returncode == 0
