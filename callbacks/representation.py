"""Measurements of the network's own representations (Kornblith et al. 2021, section 3 and appendix E).

Passes of the evaluated network over un-augmented images gather every layer's activations with forward
hooks that reduce them at once into torchmetrics Metrics (no stored activations), so DDP ranks combine
exactly. Each pass reads its images class by class, every class whole on one process (``class_shard``),
which lets R² keep O(P) numbers per layer (``measurements.ClassSeparation``):

- ``class_separation/train/penultimate``: R² (Eq. 11) of the pooled penultimate features on the whole
  training set by default (Table 3; a subset of n per class biases it by about (1 − R²)/n);
- ``class_separation/{train,val}/<block>``: R² of every block's output, flattened over channels and
  space, on a fixed training subset and on validation (Figure 4);
- ``relu_nonzero/<layer>``: fraction of non-zero activations on validation (Figure 3);
- ``neural_collapse/<statistic>``: Table E.2 on the training images of the penultimate pass;
- ``calibration/<fit>/{nll,ece}[_tempscaled]``: Table C.3 on validation, the temperature fitted on the
  data module's hold-out images (``<fit>`` = ``holdout``, every validation image reported) or, without
  one, on one half of validation and every number reported on the other (``val_split``).

Plus two TensorBoard figures: R² and the non-zero fraction by layer, as the paper's Figures 4 and 3.
"""

from __future__ import annotations

from typing import Literal, Optional

import lightning as L
import numpy as np
import torch
from torchmetrics import Metric

from lightning_modules.classifier import PENULTIMATE
from measurements import ClassSeparation, NeuralCollapseStats, NonzeroFraction, calibration_statistics, neural_collapse_statistics

from .measurement import MeasurementCallback, forward_pass, gather_rows, require_finite

__all__ = ["RepresentationMeasurements", "balanced_subset", "class_shard"]


def balanced_subset(labels: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """About ``size`` indices, the same number from every class (at least one), drawn with ``seed``;
    sorted, so the subset is the same for every epoch, run and number of processes."""
    classes = np.unique(labels)
    per_class = max(1, size // len(classes))
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in classes]
    return np.sort(np.concatenate(chosen))


def class_shard(labels: np.ndarray, indices: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This process's share of ``indices`` for a class-by-class pass: classes r, r + W, ... (in order), each
    whole, its images in index order."""
    classes = np.unique(labels[indices])
    if len(classes) < world_size:
        raise ValueError(f"A class-by-class pass needs at least one class per process: {len(classes)} classes "
                         f"for {world_size} processes.")
    mine = classes[rank::world_size]
    by_class = indices[np.argsort(labels[indices], kind="stable")]
    return by_class[np.isin(labels[by_class], mine)]


class RepresentationMeasurements(MeasurementCallback):
    """Class separation, ReLU sparsity, neural collapse and calibration of the evaluated weights.

    Args:
        every_n_epochs: measure after every this many training epochs (and at the end of fit).
        train_images: size of the fixed training subset for per-block R² (balanced over classes).
        penultimate_train_images: training images for the penultimate R² and neural collapse: None for
            all of them (the default, without subset bias), or a balanced subset of this size.
        layers: "blocks" for every block's output plus the penultimate features, or "penultimate" only.
        class_separation: R² on the training images and on validation.
        relu_sparsity: non-zero fractions on validation.
        neural_collapse: Table E.2 statistics on the training images of the penultimate pass.
        calibration: NLL and ECE on validation, before and after temperature scaling.
        calibration_fit: where the temperature is fitted: "holdout" (the data module's ``holdout_path``,
            as Table C.3), "val_split" (half of validation), or "auto": the hold-out when there is one.
        seed: draws the training subsets and the calibration split.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        train_images: int = 10_000,
        penultimate_train_images: Optional[int] = None,
        layers: Literal["blocks", "penultimate"] = "blocks",
        class_separation: bool = True,
        relu_sparsity: bool = True,
        neural_collapse: bool = True,
        calibration: bool = True,
        calibration_fit: Literal["auto", "holdout", "val_split"] = "auto",
        seed: int = 0,
        at_start: bool = False,
    ):
        super().__init__(every_n_epochs, at_start)
        if train_images < 1 or (penultimate_train_images is not None and penultimate_train_images < 1):
            raise ValueError(f"train_images and penultimate_train_images must be >= 1, got {train_images} and "
                             f"{penultimate_train_images}.")
        if calibration_fit not in ("auto", "holdout", "val_split"):
            raise ValueError(f"calibration_fit must be 'auto', 'holdout' or 'val_split', got {calibration_fit!r}.")
        self.train_images = train_images
        self.penultimate_train_images = penultimate_train_images
        self.layers = layers
        self.class_separation = class_separation
        self.relu_sparsity = relu_sparsity
        self.neural_collapse = neural_collapse
        self.calibration = calibration
        self.calibration_fit = calibration_fit
        self.seed = seed

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        super().on_fit_start(trainer, module)
        if self.calibration and self._calibration_source(trainer.datamodule) == "holdout":
            trainer.datamodule.labels(trainer.datamodule.holdout_path)  # a missing file stops the run now

    def _calibration_source(self, data) -> str:
        holdout = getattr(data, "holdout_path", None)
        if self.calibration_fit == "holdout" and holdout is None:
            raise ValueError("calibration_fit='holdout' needs the data module's holdout_path (python -m datamodules.convert "
                             "imagenet --holdout true writes holdout.beton); or use calibration_fit: val_split.")
        return "holdout" if self.calibration_fit == "holdout" or (self.calibration_fit == "auto" and holdout) else "val_split"

    def measure(self, trainer: L.Trainer, module: L.LightningModule):
        data, num_classes = trainer.datamodule, module.hparams.num_classes
        blocks = list(module.eval_network.blocks()) if self.layers == "blocks" else []
        train_labels = data.labels("train")
        scalars: dict[str, float] = {}
        separation: dict[str, dict[str, float]] = {}

        if self.class_separation or self.neural_collapse:
            size = self.penultimate_train_images
            images = np.arange(len(train_labels)) if size is None else balanced_subset(train_labels, size, self.seed)
            r2 = PerLayer(lambda a: ClassSeparation(a[0].numel()))
            collapse = PerLayer(lambda a: NeuralCollapseStats(num_classes, a.shape[1]))
            self._pass(trainer, module, "train", images, [], [r2] if self.class_separation else [],
                       [collapse] if self.neural_collapse else [])
            if self.class_separation:
                separation["train"] = r2.compute()
            if self.neural_collapse:
                sums = [require_finite(t, "The training images' penultimate features")
                        for t in collapse.metrics[PENULTIMATE].sufficient_statistics()]
                stats = neural_collapse_statistics(*sums, module.objective.class_weights(module.eval_network.head))
                scalars.update({f"neural_collapse/{k}": v for k, v in stats.items()})
        if self.class_separation and blocks:
            r2 = PerLayer(lambda a: ClassSeparation(a[0].numel()))
            self._pass(trainer, module, "train", balanced_subset(train_labels, self.train_images, self.seed), blocks, [r2], [])
            separation["train"] = {**r2.compute(), **separation["train"]}

        nonzero: dict[str, float] = {}
        if self.class_separation or self.relu_sparsity or self.calibration:
            r2 = PerLayer(lambda a: ClassSeparation(a[0].numel()))
            sparsity = PerLayer(lambda a: NonzeroFraction(), labelled=False)
            per_layer = [m for m, on in ((r2, self.class_separation), (sparsity, self.relu_sparsity)) if on]
            val_logits = self._pass(trainer, module, "val", None, blocks, per_layer, [], logits=self.calibration)
            if self.class_separation:
                separation["val"] = r2.compute()
            if self.relu_sparsity:
                nonzero = sparsity.compute()
                scalars.update({f"relu_nonzero/{name}": v for name, v in nonzero.items()})
            if self.calibration:
                scalars.update(self._calibration(trainer, module, val_logits))

        for split, values in separation.items():
            scalars.update({f"class_separation/{split}/{name}": v for name, v in values.items()})
        figures = {}
        if separation:
            figures["class_separation/by_layer"] = _by_layer_figure(separation, "class separation R²")
        if nonzero:
            figures["relu_nonzero/by_layer"] = _by_layer_figure({"val": nonzero}, "fraction of non-zero activations")
        return scalars, figures

    def _pass(self, trainer, module, source: str, images: Optional[np.ndarray], blocks: list[str],
              per_layer: list[PerLayer], penultimate: list[PerLayer], logits: bool = False):
        """One class-by-class pass over ``images`` of ``source`` (all when None): ``per_layer`` statistics see
        every block in ``blocks`` and the penultimate features, ``penultimate`` ones only the latter; with
        ``logits``, returns (logits, labels) of every image, gathered in index order."""
        labels = trainer.datamodule.labels(source)
        mine = class_shard(labels, np.arange(len(labels)) if images is None else images, trainer.global_rank, trainer.world_size)
        loader = self.loader(trainer, source, mine, local=True)
        rows = run_pass(module, trainer.datamodule, loader, blocks, per_layer, penultimate, logits)
        return gather_rows(module, mine, *rows) if logits else None

    def _calibration(self, trainer, module, val: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
        kind, fit = module.objective.probability_kind, self._calibration_source(trainer.datamodule)
        logits, labels = (t.cpu() for t in val)
        if fit == "holdout":  # Table C.3: the temperature from the hold-out, every validation image reported
            holdout = trainer.datamodule.holdout_path
            fit_logits, fit_labels = (t.cpu() for t in self._pass(trainer, module, holdout, None, [], [], [], logits=True))
            result = calibration_statistics(fit_logits, fit_labels, logits, labels, kind=kind)
        else:  # fitted on one half of validation, every number reported on the other half
            order = torch.from_numpy(np.random.default_rng(self.seed).permutation(len(labels)))
            fit_half, report = order[: len(order) // 2], order[len(order) // 2:]
            result = calibration_statistics(logits[fit_half], labels[fit_half], logits[report], labels[report], kind=kind)
        return {f"calibration/{fit}/{k}": v for k, v in result.items()}


class PerLayer:
    """One Metric per layer, made from the layer's first activations by ``make`` (sized by them); updated
    with (activations, labels), or activations alone when not ``labelled``."""

    def __init__(self, make, labelled: bool = True):
        self.make, self.labelled, self.metrics = make, labelled, {}

    def update(self, layer: str, activations: torch.Tensor, labels: torch.Tensor) -> None:
        if layer not in self.metrics:
            self.metrics[layer] = self.make(activations).to(activations.device)
        metric: Metric = self.metrics[layer]
        metric.update(activations, labels) if self.labelled else metric.update(activations)

    def compute(self) -> dict[str, float]:
        return {layer: float(metric.compute()) for layer, metric in self.metrics.items()}


def run_pass(module, data, loader, blocks: list[str], per_layer: list[PerLayer], penultimate: list[PerLayer],
             logits: bool) -> tuple[torch.Tensor, ...]:
    """Feeds every batch's block outputs (hooked, after each block's final ReLU) and penultimate features to
    the statistics; returns (logits, labels) of every batch when ``logits``, else ()."""
    network = module.eval_network
    batch_labels, kept_logits, kept_labels = torch.empty(0), [], []

    def reduce(name: str, activations: torch.Tensor) -> None:
        with torch.autocast(activations.device.type, enabled=False):  # the statistics in their own precision
            for statistic in per_layer:
                statistic.update(name, activations, batch_labels)

    with network.hooked(blocks, reduce):
        for batch in loader:
            batch = module.transfer_batch_to_device(batch, module.device, 0)
            images, batch_labels = data.on_after_batch_transfer(batch, 0)
            features = forward_pass(module.trainer, network, images)
            for statistic in per_layer + penultimate:
                statistic.update(PENULTIMATE, features.float(), batch_labels)
            if logits:
                kept_logits.append(module.logits(features, network).float())
                kept_labels.append(batch_labels)
    return (torch.cat(kept_logits), torch.cat(kept_labels)) if logits else ()


def _by_layer_figure(series: dict[str, dict[str, float]], ylabel: str):
    """One line per split over the layers in forward order (the paper's Figures 4 and 3)."""
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
