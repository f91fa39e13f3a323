"""Shared by the tests: tiny data sets written with the project's own writer, and probes of a run."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ffcv.pipeline.operation import Operation

from datamodules import EmbeddedShapesDataModule, FFCVImageDataModule
from datamodules.beton import WriterSettings, write_split
from datamodules.shapes import render_shapes
from datamodules.sources import Split


def write_indexed_beton(path: Path, n: int, num_classes: int | None = None, seed: int = 0) -> Path:
    """Shapes images whose label is the sample index modulo ``num_classes`` (default: n, so unique)."""
    images, _ = render_shapes(n, np.random.default_rng(seed), 32)
    labels = np.arange(n) % (num_classes or n)
    split = Split(images, labels.astype(np.int64), tuple(str(c) for c in range(num_classes or n)))
    return write_split(split, path, WriterSettings(max_resolution=None, write_mode="raw", num_workers=1))


class StubTrainer:
    """The trainer attributes a data module reads, for driving one outside a fit: rank, world, epoch."""

    def __init__(self, world_size: int = 1, global_rank: int = 0, current_epoch: int = 0):
        self.world_size, self.num_devices, self.global_rank = world_size, world_size, global_rank
        self.current_epoch = current_epoch
        self.strategy = SimpleNamespace(root_device=torch.device("cpu"))


def ffcv_datamodule(train, val=None, world_size=1, rank=0, **kwargs) -> FFCVImageDataModule:
    """An FFCV data module (by default at batch 8 and 32 px), as process ``rank`` of ``world_size`` would see it."""
    kwargs = {"global_batch_size": 8, "image_size": 32, "val_resize": 32, "num_workers": 1, **kwargs}
    data = FFCVImageDataModule(str(train), str(val or train), **kwargs)
    data.trainer = StubTrainer(world_size, rank)
    return data


def scalars(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under ``log_dir``: tag -> [(step, value)]."""
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def parameter_digest(module: torch.nn.Module) -> str:
    """Hash of the trainable weights (BN running statistics are per-rank under DDP, so left out)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.named_parameters()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class RecordBatches(L.Callback):
    """Writes, per rank, the labels of every training and validation batch it saw, the validation images it
    classified correctly and their summed loss (computed here, independently of the module's metrics),
    and a digest of its final weights."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.labels: list[int] = []
        self.val_labels: list[int] = []
        self.val_correct = 0
        self.val_loss_sum = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.labels.extend(int(v) for v in batch[1].tolist())

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        images, target = batch
        logits = pl_module(images)
        self.val_labels.extend(int(v) for v in target.tolist())
        self.val_correct += int((logits.argmax(1) == target).sum())
        for i in range(len(target)):  # one image at a time: a sum that cannot share the module's batching
            terms = pl_module.objective.loss_terms(logits[i:i + 1], target[i:i + 1], pl_module.eval_network.head)
            self.val_loss_sum += float(sum(terms.values()))

    def on_train_end(self, trainer, pl_module):
        os.makedirs(self.out_dir, exist_ok=True)
        record = {"labels": self.labels, "network": parameter_digest(pl_module.network), "global_step": trainer.global_step,
                  "val_labels": self.val_labels, "val_correct": self.val_correct, "val_loss_sum": self.val_loss_sum}
        Path(self.out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


class SignalAt(L.Callback):
    """Sends ``signum`` to this process once, when training reaches ``step`` (a preemption warning); with
    ``step="fit_start"``, while a requeued job restores its checkpoint and builds loaders; with
    ``"train_start"``, once Lightning's own signal handlers are installed (put this callback first to send it
    before the other callbacks' ``on_train_start``)."""

    def __init__(self, step: int | str, signum: int):
        self.step, self.signum, self.sent = step, signum, False

    def on_fit_start(self, trainer, pl_module):
        if self.step == "fit_start":
            self._send()

    def on_train_start(self, trainer, pl_module):
        if self.step == "train_start":
            self._send()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if isinstance(self.step, int) and trainer.global_step >= self.step:
            self._send()

    def _send(self):
        if not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)


class NanOnRank(L.Callback):
    """Makes the training loss non-finite on one rank only, at one step: that rank's images become NaN."""

    def __init__(self, rank: int, step: int):
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            batch[0].fill_(float("nan"))


class FailAt(Operation):
    """An FFCV stage that passes images through until the ``batch``-th batch it handles (counted from 0 over every
    pass of its loader), where it raises (``hang_s`` 0) or sleeps ``hang_s`` seconds (a stage that hangs). With
    ``typing_error``, a compiled stage that numba cannot type, from its first batch on (how the seeded crop failed)."""

    def __init__(self, batch: int = 0, hang_s: float = 0.0, typing_error: bool = False):
        super().__init__()
        self.batch, self.hang_s, self.typing_error = batch, hang_s, typing_error
        self.handled = 0

    def generate_code(self):
        if self.typing_error:
            def untypable(images, dst):
                return images.no_such_attribute

            return untypable

        def fail_at(images, dst):
            self.handled += 1
            if self.handled - 1 == self.batch:
                if not self.hang_s:
                    raise RuntimeError(f"FailAt: batch {self.batch}")
                time.sleep(self.hang_s)
            return images

        return fail_at

    def declare_state_and_memory(self, previous_state):
        return replace(previous_state, jit_mode=self.typing_error), None


class FailingShapes(EmbeddedShapesDataModule):
    """The shapes data whose training pipeline, on rank ``rank`` only, has a ``FailAt(batch, hang_s)`` stage."""

    def __init__(self, batch: int, hang_s: float = 0.0, rank: int = 0, root: str = "data/shapes", num_train: int = 8000,
                 num_val: int = 2000, num_transfer_train: int = 2000, num_transfer_test: int = 2000,
                 global_batch_size: int = 256, batch_timeout: float = 600.0):
        super().__init__(root=root, num_train=num_train, num_val=num_val, num_transfer_train=num_transfer_train,
                         num_transfer_test=num_transfer_test, global_batch_size=global_batch_size, batch_timeout=batch_timeout)
        self.fail = {"batch": batch, "hang_s": hang_s}
        self.failing_rank = rank

    def pipelines(self, train, crop_ratio=None):
        pipelines = super().pipelines(train, crop_ratio)
        if train and self.rank == self.failing_rank:
            pipelines["image"].insert(-1, FailAt(**self.fail))  # before ToTorchImage: a Python stage
        return pipelines
