"""Transfer probes at checkpoints (Kornblith et al. 2021, Tables 1 and 4; appendix A.2).

For each downstream data set: penultimate features of the frozen, evaluated network (the EMA when on)
on its train and test images, read as validation reads images (resize, centre crop, no augmentation),
then a linear probe (L2-regularised logistic regression, strength chosen on a split held out from
train, refit on all of train) and a kNN probe (cosine similarity, k by leave-one-out on train), each
scored in the data set's own measure (top-1, or mean per-class accuracy for Pets and Flowers) as
recorded in the sidecar the converter wrote. Logged as ``probe/<dataset>/{linear_acc,knn_acc,
linear_l2,knn_k}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import lightning as L
import torch

from measurements import knn_probe, linear_probe

from .measurement import MeasurementCallback, forward_pass, gather_rows

__all__ = ["TransferProbes", "TransferData"]


@dataclass
class TransferData:
    """A downstream data set in the training data module's format (.beton files for FFCV, folder roots
    for the torchvision fallback).

    Args:
        train: training images of the probe.
        test: test images of the probe.
        measure: "top1" or "mean_per_class"; by default the one recorded in ``<train>.json``, else top-1.
    """

    train: str
    test: str
    measure: Optional[str] = None

    def score_measure(self) -> str:
        if self.measure is not None:
            return self.measure
        sidecar = Path(f"{self.train}.json")
        return json.loads(sidecar.read_text()).get("measure", "top1") if sidecar.is_file() else "top1"


class TransferProbes(MeasurementCallback):
    """Linear and kNN probes of the penultimate features on downstream data sets.

    Args:
        datasets: name -> its train and test data, e.g. ``{cifar10: {train: .../cifar10_train.beton,
            test: .../cifar10_test.beton}}``; by default the tasks that come with the data module
            (the embedded data set's ``texture``).
        every_n_epochs: probe after every this many training epochs (and at the end of fit).
        linear: run the linear probe (45 strengths, appendix A.2).
        knn: run the kNN probe.
    """

    def __init__(
        self,
        datasets: Optional[dict[str, TransferData]] = None,
        every_n_epochs: int = 1,
        linear: bool = True,
        knn: bool = True,
    ):
        super().__init__(every_n_epochs)
        self.datasets = {name: d if isinstance(d, TransferData) else TransferData(**d) for name, d in (datasets or {}).items()}
        self.linear = linear
        self.knn = knn

    def _datasets(self, trainer: L.Trainer) -> dict[str, TransferData]:
        datasets = self.datasets or {n: TransferData(*paths) for n, paths in trainer.datamodule.transfer_paths().items()}
        if not datasets:
            raise ValueError(
                f"TransferProbes has no data set: {type(trainer.datamodule).__name__} comes with none, so name them: "
                "datasets: {cifar10: {train: /data/ffcv/cifar10_train.beton, test: /data/ffcv/cifar10_test.beton}}."
            )
        return datasets

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        super().on_fit_start(trainer, module)
        # A missing or unreadable file stops the run now, with how to make it, not after the last epoch.
        for spec in self._datasets(trainer).values():
            trainer.datamodule.labels(spec.train), trainer.datamodule.labels(spec.test)

    def measure(self, trainer: L.Trainer, module: L.LightningModule):
        scalars: dict[str, float] = {}
        for name, spec in self._datasets(trainer).items():
            train_x, train_y = penultimate_features(trainer, module, self.loader(trainer, spec.train), spec.train)
            test_x, test_y = penultimate_features(trainer, module, self.loader(trainer, spec.test), spec.test)
            if not trainer.is_global_zero:  # every process extracted its shard; one fits the probes
                continue
            measure = spec.score_measure()
            if self.linear:
                result = linear_probe(train_x, train_y, test_x, test_y, measure=measure)
                scalars[f"probe/{name}/linear_acc"] = result.accuracy
                scalars[f"probe/{name}/linear_l2"] = result.l2
            if self.knn:
                result = knn_probe(train_x, train_y, test_x, test_y, measure=measure)
                scalars[f"probe/{name}/knn_acc"] = result.accuracy
                scalars[f"probe/{name}/knn_k"] = float(result.k)
        return scalars, {}


def penultimate_features(trainer: L.Trainer, module: L.LightningModule, loader, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features (float32) and labels of every image of ``source`` that ``loader`` gives, gathered
    from every process, in sample order."""
    data, network = trainer.datamodule, module.eval_network
    features, labels = [], []
    for batch in loader:
        images, y = data.on_after_batch_transfer(module.transfer_batch_to_device(batch, module.device, 0), 0)
        features.append(forward_pass(trainer, network, images).float())
        labels.append(y)
    return gather_rows(module, len(data.labels(source)), torch.cat(features), torch.cat(labels))
