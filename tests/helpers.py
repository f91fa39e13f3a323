"""Shared by the tests: tiny data sets written with the project's own writer, and probes of a run."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import lightning as L
import numpy as np
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from datamodules.beton import write_beton
from datamodules.shapes import _ArrayDataset, render_shapes


def write_indexed_beton(path: Path, n: int, num_classes: int | None = None, seed: int = 0) -> Path:
    """Shapes images whose label is the sample index modulo ``num_classes`` (default: n, so unique)."""
    images, _ = render_shapes(n, np.random.default_rng(seed), 32)
    labels = np.arange(n) % (num_classes or n)
    return write_beton(_ArrayDataset(images, labels), path, write_mode="raw", max_resolution=None, num_workers=1)


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
    """Writes, per rank, the labels of every training batch it saw and a digest of its final weights."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.labels: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.labels.extend(int(v) for v in batch[1].tolist())

    def on_train_end(self, trainer, pl_module):
        os.makedirs(self.out_dir, exist_ok=True)
        record = {"labels": self.labels, "network": parameter_digest(pl_module.network), "global_step": trainer.global_step}
        Path(self.out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
