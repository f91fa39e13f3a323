"""The checkpoints a run keeps: ``last.ckpt`` to resume from, and the epochs later analyses start from.

``last.ckpt`` is rewritten at the end of every epoch (and by ``Preemption``): weights, EMA, optimiser,
schedule and data position, for ``--ckpt_path=last``. The kept checkpoints are ``epoch<NNN>.ckpt`` after
NNN completed epochs (``epoch000.ckpt``: the initial weights, the random initialisation that RI-T
fine-tuning and loss barriers compare against), each weights-only: the trained network and its EMA, the
weights validation and the measurements evaluated (``ObjectiveClassifier.eval_network``), with the
hyper-parameters, loadable by ``cli.py validate --ckpt_path`` and by fine-tuning. Figure D.2 probes every
6 epochs; the ImageNet configs keep those (``checkpoints.every_n_epochs``).

A fit that reaches its end (not one stopped by preemption or an error) writes ``finished.json`` beside them,
with the epochs and steps done and the bounds it ran to, after every other callback's end of fit (Lightning calls checkpoint
callbacks last), so the end-of-fit measurements are in: the study's sweep skips such a run.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

__all__ = ["FINISHED_FILE", "RunCheckpoints", "finished"]

FINISHED_FILE = "finished.json"


def finished(run: Path) -> dict | None:
    """What a run folder's ``finished.json`` records (epochs, global_step, max_epochs, max_steps), None when the
    run has not ended."""
    path = Path(run) / "checkpoints" / FINISHED_FILE
    return json.loads(path.read_text()) if path.is_file() else None


class RunCheckpoints(ModelCheckpoint):
    """``last.ckpt`` every epoch, plus weights-only ``epoch<NNN>.ckpt`` at chosen numbers of completed epochs.

    Args:
        epochs: completed epochs to keep (0: the initial weights), e.g. ``[0, 1, 2, 5, 10]``.
        every_n_epochs: also keep every this many completed epochs (0: none but ``epochs``).
    """

    def __init__(self, epochs: tuple[int, ...] = (), every_n_epochs: int = 0):
        if every_n_epochs < 0 or any(e < 0 for e in epochs):
            raise ValueError(f"checkpoints: epochs and every_n_epochs must be >= 0, got {list(epochs)} and {every_n_epochs}.")
        super().__init__(save_last=True, save_top_k=0)  # (last.ckpt: see on_train_epoch_end)
        self.epochs, self.keep_every = sorted(set(epochs)), every_n_epochs

    def keeps(self, completed: int) -> bool:
        return completed in self.epochs or (self.keep_every > 0 and completed > 0 and completed % self.keep_every == 0)

    def kept_path(self, completed: int) -> Path:
        return Path(self.dirpath) / f"epoch{completed:03d}{self.FILE_EXTENSION}"

    def last_path(self) -> Path:
        return Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if trainer.global_step == 0 and self.keeps(0):
            self._write(trainer, self.kept_path(0), weights_only=True)

    # ModelCheckpoint writes last.ckpt only with a top-k checkpoint; here it is written at the end of every
    # epoch (after validation and the measurement callbacks), and ModelCheckpoint's own saving is off.
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run:
            return
        completed = trainer.current_epoch + 1
        if self.keeps(completed):
            self._write(trainer, self.kept_path(completed), weights_only=True)
        self._write(trainer, self.last_path(), weights_only=False)
        self.last_model_path = str(self.last_path())

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and not trainer.fast_dev_run and trainer.state.fn == "fit":
            done = {"epochs": trainer.current_epoch, "global_step": trainer.global_step,
                    "max_epochs": trainer.max_epochs, "max_steps": trainer.max_steps}  # how far it was asked to go
            path = Path(self.dirpath) / FINISHED_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(done))

    @staticmethod
    def _write(trainer: L.Trainer, path: Path, weights_only: bool) -> None:
        trainer.save_checkpoint(path, weights_only=weights_only)  # every rank; rank 0 writes
