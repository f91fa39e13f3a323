"""Measurements of the network's own representations (Kornblith et al. 2021, section 3 and appendix E).

One pass over a fixed, un-augmented subset of the training images and one over validation gather
every layer's activations with forward hooks that reduce them at once (counts and per-class sums, no
stored activations) into torchmetrics Metrics, so DDP ranks combine exactly:

- ``class_separation/{train,val}/<layer>``: R² (Eq. 11) of the pooled penultimate features and of every
  block's output, flattened over channels and space (Table 3, Figure 4);
- ``relu_nonzero/<layer>``: fraction of non-zero activations on validation (Figure 3);
- ``neural_collapse/<statistic>``: Table E.2 on the training subset's penultimate features;
- ``calibration/{nll,ece}[_tempscaled]``: Table C.3 on validation, the temperature fitted on one half
  of it and every number reported on the other half.

Plus two TensorBoard figures: R² and the non-zero fraction by layer, as the paper's Figures 4 and 3.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Literal, Union

import lightning as L
import numpy as np
import torch

from measurements import ClassSeparation, NeuralCollapseStats, NonzeroFraction, calibration_statistics, neural_collapse_statistics

from .measurement import MeasurementCallback, forward_pass, gather_rows, require_finite

__all__ = ["RepresentationMeasurements", "balanced_subset"]

PENULTIMATE = "penultimate"


def balanced_subset(labels: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """About ``size`` indices, the same number from every class (at least one), drawn with ``seed``;
    sorted, so the subset is the same for every epoch, run and number of processes."""
    classes = np.unique(labels)
    per_class = max(1, size // len(classes))
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in classes]
    return np.sort(np.concatenate(chosen))


class RepresentationMeasurements(MeasurementCallback):
    """Class separation, ReLU sparsity, neural collapse and calibration of the evaluated weights.

    Args:
        every_n_epochs: measure after every this many training epochs (and at the end of fit).
        train_images: size of the fixed training subset (balanced over classes, no augmentation).
        layers: "blocks" for every block's output plus the penultimate features, or "penultimate" only.
            Per-block R² keeps a (classes x flattened block size) sum per block: reduce to "penultimate"
            when that does not fit in device memory.
        class_separation: R² on the training subset and on validation.
        relu_sparsity: non-zero fractions on validation.
        neural_collapse: Table E.2 statistics on the training subset.
        calibration: NLL and ECE on validation, before and after temperature scaling.
        seed: draws the training subset and the calibration split.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        train_images: int = 10_000,
        layers: Literal["blocks", "penultimate"] = "blocks",
        class_separation: bool = True,
        relu_sparsity: bool = True,
        neural_collapse: bool = True,
        calibration: bool = True,
        seed: int = 0,
    ):
        super().__init__(every_n_epochs)
        if train_images < 1:
            raise ValueError(f"train_images must be >= 1, got {train_images}.")
        self.train_images = train_images
        self.layers = layers
        self.class_separation = class_separation
        self.relu_sparsity = relu_sparsity
        self.neural_collapse = neural_collapse
        self.calibration = calibration
        self.seed = seed

    def measure(self, trainer: L.Trainer, module: L.LightningModule):
        data = trainer.datamodule
        scalars: dict[str, float] = {}
        separation: dict[str, dict[str, float]] = {}

        if self.class_separation or self.neural_collapse:
            subset = balanced_subset(data.labels("train"), self.train_images, self.seed)
            train = _Pass(module, self.layers, separation=self.class_separation, neural_collapse=self.neural_collapse)
            train.run(data, self.loader(trainer, "train", subset))
            if self.class_separation:
                separation["train"] = train.class_separation()
            if self.neural_collapse:
                weights = module.objective.class_weights(module.eval_network.head)
                sums = [require_finite(t, "The training subset's penultimate features") for t in train.collapse.sufficient_statistics()]
                stats = neural_collapse_statistics(*sums, weights)
                scalars.update({f"neural_collapse/{k}": v for k, v in stats.items()})

        nonzero: dict[str, float] = {}
        if self.class_separation or self.relu_sparsity or self.calibration:
            val = _Pass(module, self.layers, separation=self.class_separation, nonzero=self.relu_sparsity,
                        logits=self.calibration)
            val.run(data, self.loader(trainer, "val"))
            if self.class_separation:
                separation["val"] = val.class_separation()
            if self.relu_sparsity:
                nonzero = {name: float(m.compute()) for name, m in val.nonzero.items()}
                scalars.update({f"relu_nonzero/{name}": v for name, v in nonzero.items()})
            if self.calibration:
                scalars.update(self._calibration(module, *val.gathered_logits()))

        for split, values in separation.items():
            scalars.update({f"class_separation/{split}/{name}": v for name, v in values.items()})
        figures = {}
        if separation:
            figures["class_separation/by_layer"] = _by_layer_figure(separation, "class separation R²")
        if nonzero:
            figures["relu_nonzero/by_layer"] = _by_layer_figure({"val": nonzero}, "fraction of non-zero activations")
        return scalars, figures

    def _calibration(self, module, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        # Temperature fitted on one half of validation, every number reported on the other half.
        order = torch.from_numpy(np.random.default_rng(self.seed).permutation(len(labels)))
        fit, report = order[: len(order) // 2], order[len(order) // 2:]
        result = calibration_statistics(logits[fit], labels[fit], logits[report], labels[report],
                             kind=module.objective.probability_kind)
        return {f"calibration/{k}": v for k, v in result.items()}


class _Pass:
    """One pass over a loader with the evaluated network, reducing activations as they appear."""

    def __init__(self, module, layers: str, separation=False, nonzero=False, neural_collapse=False, logits=False):
        self.module, self.network = module, module.eval_network
        self.names = ([*self.network.blocks()] if layers == "blocks" else []) + [PENULTIMATE]
        self.num_classes = module.hparams.num_classes
        self.want_separation, self.want_nonzero, self.want_collapse, self.want_logits = separation, nonzero, neural_collapse, logits
        self.separation: dict[str, ClassSeparation] = {}
        self.nonzero: dict[str, NonzeroFraction] = {}
        self.collapse: Union[NeuralCollapseStats, None] = None
        self._logits: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._batch_labels: torch.Tensor = torch.empty(0)

    def reduce(self, name: str, activations: torch.Tensor) -> None:
        if self.want_separation:
            if name not in self.separation:  # sized by the first batch; every process has one
                dim = activations[0].numel()
                self.separation[name] = ClassSeparation(self.num_classes, dim).to(activations.device)
            self.separation[name].update(activations, self._batch_labels)
        if self.want_nonzero:
            self.nonzero.setdefault(name, NonzeroFraction().to(activations.device)).update(activations)

    def run(self, data, loader) -> None:
        with self._hooks():
            for batch in loader:
                batch = self.module.transfer_batch_to_device(batch, self.module.device, 0)
                images, self._batch_labels = data.on_after_batch_transfer(batch, 0)
                features = forward_pass(self.module.trainer, self.network, images)
                self.reduce(PENULTIMATE, features)
                if self.want_collapse:
                    if self.collapse is None:
                        self.collapse = NeuralCollapseStats(self.num_classes, features.shape[1]).to(features.device)
                    self.collapse.update(features.float(), self._batch_labels)
                if self.want_logits:
                    self._logits.append(self.module.logits(features, self.network).float())
                    self._labels.append(self._batch_labels)

    @contextmanager
    def _hooks(self):
        blocks = {n: m for n, m in self.network.blocks().items() if n in self.names}
        handles = [block.register_forward_hook(self._reducer(name)) for name, block in blocks.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _reducer(self, name: str):
        def hook(_module, _inputs, activations: torch.Tensor) -> None:
            with torch.autocast(activations.device.type, enabled=False):  # the statistics in their own precision
                self.reduce(name, activations)
        return hook

    def class_separation(self) -> dict[str, float]:
        return {name: float(self.separation[name].compute()) for name in self.names}

    def gathered_logits(self) -> tuple[torch.Tensor, torch.Tensor]:
        logits, labels = torch.cat(self._logits), torch.cat(self._labels)
        num_samples = len(self.module.trainer.datamodule.labels("val"))
        return tuple(rows.cpu() for rows in gather_rows(self.module, num_samples, logits, labels))


def _by_layer_figure(series: dict[str, dict[str, float]], ylabel: str):
    """One line per split over the layers in forward order (the paper's Figures 3 and 4)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(max(4.0, 0.35 * max(len(v) for v in series.values())), 3.0))
    for split, values in series.items():
        ax.plot(range(len(values)), list(values.values()), marker="o", label=split)
    names = list(next(iter(series.values())))
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    figure.tight_layout()
    return figure
