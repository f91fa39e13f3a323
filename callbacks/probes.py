"""Transfer probes at checkpoints (Kornblith et al. 2021, Tables 1 and 4; appendix A.2).

For each downstream data set: penultimate features of the frozen, evaluated network (the EMA when on)
on its train and test images as appendix A.2 reads them: the shorter side resized to the training
resolution and centre-cropped to it (the whole image; validation's crop keeps the central 87.5 %),
then a linear probe (L2-regularised logistic regression, strength chosen on a split held out from
train, refit on all of train) and a kNN probe (cosine similarity, k by leave-one-out on train), each
scored in the data set's own measure (top-1, or mean per-class accuracy for Pets and Flowers) as
recorded in the sidecar the converter wrote. Logged as ``probe/<dataset>/{linear_acc,knn_acc,
linear_l2,knn_k}``, with ``linear_unconverged``: how many of the linear probe's L-BFGS fits (one per λ of
the sweep, and the refit) stopped at the iteration cap unconverged, 0 when every one converged (the
probe warns when the chosen λ's did not).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import lightning as L
import torch

from datamodules.beton import recorded_measure
from measurements import knn_probe, linear_probe
from measurements.accuracy import check_measure

from .measurement import MeasurementCallback, forward_pass, gather_rows

__all__ = ["TransferProbes", "TransferData"]

@dataclass
class TransferData:
    """A downstream data set in the training data module's format (.beton files for FFCV, folder roots
    for the torchvision fallback).

    Args:
        train: training images of the probe.
        test: test images of the probe.
        measure: "top1" or "mean_per_class" (Table A.2: mean per class for Pets, Flowers, Caltech-101,
            Aircraft); by default the one recorded in ``<train>.json``, the sidecar ``datamodules.convert``
            writes. A data set with neither is refused rather than scored top-1 by default.
    """

    train: str
    test: str
    measure: Optional[str] = None

    def score_measure(self) -> str:
        measure = self.measure or recorded_measure(self.train)
        if measure is None:
            raise ValueError(
                f"No accuracy measure is known for the transfer data {self.train}: it has no sidecar {Path(self.train).name}.json "
                f"naming one (python -m datamodules.convert writes it). Name it: measure: top1 (CIFAR, Food-101, "
                f"Cars, DTD, SUN397, Birdsnap) or measure: mean_per_class (Pets, Flowers, Caltech-101, Aircraft)."
            )
        return check_measure(measure)


class TransferProbes(MeasurementCallback):
    """Linear and kNN probes of the penultimate features on downstream data sets.

    Args:
        datasets: name -> its train and test data, e.g. ``{cifar10: {train: .../cifar10_train.beton,
            test: .../cifar10_test.beton}}``; by default the tasks that come with the data module
            (the embedded data set's transfer tasks).
        tasks: of the data module's tasks, only these (e.g. ``[sketch, texture]``: the fine-tuning targets).
        every_n_epochs: probe after every this many training epochs (and at the end of fit).
        at_start: also probe the initial weights (step 0), e.g. for "which checkpoint transfers best".
        linear: run the linear probe (45 strengths, appendix A.2).
        knn: run the kNN probe.
        crop_ratio: fraction of each image's shorter side in its centre crop. Appendix A.2: 1.0, the whole
            shorter side resized to the training resolution.
        linear_max_iter: L-BFGS iterations per fit of the linear probe; ``probe/<dataset>/linear_unconverged``
            counts the fits that reached it (raise it when the chosen fit is among them: the probe warns).
    """

    def __init__(
        self,
        datasets: Optional[dict[str, TransferData]] = None,
        tasks: Optional[list[str]] = None,
        every_n_epochs: int = 1,
        linear: bool = True,
        knn: bool = True,
        crop_ratio: float = 1.0,
        at_start: bool = False,
        linear_max_iter: int = 100,
    ):
        super().__init__(every_n_epochs, at_start)
        if not 0.0 < crop_ratio <= 1.0:
            raise ValueError(f"crop_ratio must be in (0, 1], got {crop_ratio} (appendix A.2: 1.0).")
        self.crop_ratio = crop_ratio
        self.datasets = {name: d if isinstance(d, TransferData) else TransferData(**d) for name, d in (datasets or {}).items()}
        if tasks is not None and (datasets or not tasks):
            raise ValueError(f"tasks {tasks} chooses among the data module's tasks: give it without datasets, and at least one.")
        self.tasks = tasks
        self.linear = linear
        self.knn = knn
        if linear_max_iter < 1:
            raise ValueError(f"linear_max_iter must be >= 1, got {linear_max_iter}.")
        self.linear_max_iter = linear_max_iter

    def _datasets(self, trainer: L.Trainer) -> dict[str, TransferData]:
        if self.datasets:
            return self.datasets
        offered = trainer.datamodule.transfer_paths()
        unknown = sorted(set(self.tasks or ()) - set(offered))
        if unknown:
            raise ValueError(f"TransferProbes: no task {unknown} in {type(trainer.datamodule).__name__}, whose tasks are "
                             f"{sorted(offered)}.")
        datasets = {n: TransferData(*paths) for n, paths in offered.items() if self.tasks is None or n in self.tasks}
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
            trainer.datamodule.labels(spec.train), trainer.datamodule.labels(spec.test), spec.score_measure()

    def measure(self, trainer: L.Trainer, module: L.LightningModule):
        scalars: dict[str, float] = {}
        for name, spec in self._datasets(trainer).items():
            train_x, train_y = self.features(trainer, module, spec.train)
            test_x, test_y = self.features(trainer, module, spec.test)
            if not trainer.is_global_zero:  # every process extracted its shard; one fits the probes
                continue
            measure = spec.score_measure()
            if self.linear:
                result = linear_probe(train_x, train_y, test_x, test_y, measure=measure, max_iter=self.linear_max_iter)
                scalars[f"probe/{name}/linear_acc"] = result.accuracy
                scalars[f"probe/{name}/linear_l2"] = result.l2
                unconverged = len(result.unconverged) + (not result.refit.converged)
                scalars[f"probe/{name}/linear_unconverged"] = float(unconverged)
            if self.knn:
                result = knn_probe(train_x, train_y, test_x, test_y, measure=measure)
                scalars[f"probe/{name}/knn_acc"] = result.accuracy
                scalars[f"probe/{name}/knn_k"] = float(result.k)
        return scalars, {}


    def features(self, trainer: L.Trainer, module: L.LightningModule, source: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Penultimate features (float32) and labels of every image of ``source``, gathered from every
        process, in sample order."""
        data, network = trainer.datamodule, module.eval_network
        features, labels = [], []
        for batch in self.loader(trainer, source, crop_ratio=self.crop_ratio):
            images, y = data.on_after_batch_transfer(module.transfer_batch_to_device(batch, module.device, 0), 0)
            features.append(forward_pass(trainer, network, images).float())
            labels.append(y)
        positions = data.shard(len(data.labels(source)), train=False)
        return gather_rows(module, positions, torch.cat(features), torch.cat(labels))
