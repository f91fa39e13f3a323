"""Loss and error barriers along the straight path between two networks (Neyshabur et al. 2020, Section 3.3), as a
pass on Lightning's Trainer, and the report's table, findings and figure on them.

theta(lam) = (1 - lam) theta_0 + lam theta_1 for every lam of the grid, each network built when the pass starts, its
batch-norm moments recomputed on the same fixed training images (``torch.optim.swa_utils.update_bn``; never
interpolated, which overstates the barrier) and, beside it to show by how much, interpolated; then train and test
loss and error of every lam and both kinds of moments in one pass over the images (``passes.FixedImages``); a 95 %
interval of each barrier from a bootstrap over the images. The loss is the softmax cross-entropy of the logits as
each network's objective forms them, so that paths between networks of different objectives are measured in one
unit; the error is 1 - the target's accuracy measure. The formulas are in ``measurements/weight_space.py``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.swa_utils import update_bn
from torchmetrics import Metric

from measurements.accuracy import score_from_counts
from measurements.weight_space import bootstrap_barriers, interpolate, loss_barrier, negative_variance

from .passes import (SPLITS, FixedImages, Loaded, Logits, check_comparable, data_module_of, load_network,
                     network_distance, pass_trainer, run_folder_of)
from .plotting import pyplot, save_figure

__all__ = ["BASIN", "MOMENTS", "InterpolationPath", "PerImage", "barrier", "barrier_findings", "barrier_lines",
           "figure_barriers", "one_basin"]

MOMENTS = ("recomputed", "interpolated")  # batch-norm moments along the path: the protocol's, and what two public codes do
BASIN = 0.01  # one basin: a test error barrier below 1 %, decided on its bootstrap interval


class PerImage(Metric):
    """Every image's cross-entropy and whether it was classified correctly at each of ``points`` networks, with its
    split and label: what a bootstrap over images resamples. Gathered from every process (``cat``) and put in a
    canonical order (``compute``), so the same images give the same rows on any number of processes."""

    full_state_update = False

    def __init__(self, points: int):
        super().__init__()
        self.points = points
        for name in ("loss", "hit", "label", "split"):
            self.add_state(name, [], dist_reduce_fx="cat")

    def update(self, split: int, logits: list[Tensor], labels: Tensor) -> None:
        self.loss.append(torch.stack([F.cross_entropy(x.float(), labels, reduction="none") for x in logits], 1).double())
        self.hit.append(torch.stack([x.argmax(1) == labels for x in logits], 1).double())
        self.label.append(labels.double()[:, None])
        self.split.append(torch.full_like(labels, split).double()[:, None])

    def compute(self) -> np.ndarray:
        """images x (split, label, hit at each point, loss at each point), rows sorted."""
        def rows(state, width):  # a list before any update or sync, one tensor after a sync
            state = torch.cat(state) if isinstance(state, list) and state else state
            return state.reshape(-1, width) if isinstance(state, Tensor) else torch.zeros(0, width, dtype=torch.float64)

        table = torch.cat([rows(self.split, 1), rows(self.label, 1), rows(self.hit, self.points),
                           rows(self.loss, self.points)], 1).cpu().numpy()
        return table[np.lexsort(table.T[::-1])]


class InterpolationPath(L.LightningModule):
    """Loss and error along theta(lam) between two networks, on train and test (module docstring), with batch-norm
    moments recomputed at every lam and interpolated, each with a bootstrap interval of each barrier over the images
    (``measurements.weight_space.bootstrap_barriers``).

    Args:
        a, b: the two networks (theta_0 and theta_1).
        lambdas: the grid; must hold 0 and 1 for the barrier, may extend beyond [0, 1].
        bn_images: training images the recomputed moments are computed on.
        resamples: bootstrap resamples of the images for the barriers' 95 % intervals.
        seed: seed of the resamples.
    """

    def __init__(self, a: Loaded, b: Loaded, lambdas: Sequence[float], bn_images: int = 2000, resamples: int = 1000,
                 seed: int = 0):
        super().__init__()
        self.a, self.b = a, b
        self.lambdas = [float(x) for x in lambdas]
        self.bn_images, self.resamples, self.seed = bn_images, resamples, seed
        self.measure = a.module.hparams.get("measure") or "top1"
        # One metric per kind of moments: each kind's rows sorted alone, so its bootstrap draws the same images as a
        # pass of that kind alone would.
        self.per_image = nn.ModuleDict({kind: PerImage(len(self.lambdas)) for kind in MOMENTS})
        self.paths = nn.ModuleDict()
        self.results: dict = {}

    def on_validation_start(self) -> None:
        start, end = (x.module.eval_network.state_dict() for x in (self.a, self.b))
        batches = list(self.trainer.datamodule.training_images(self.bn_images))
        self.paths = nn.ModuleDict({kind: nn.ModuleList() for kind in MOMENTS})
        self.undefined = {kind: [] for kind in MOMENTS}  # points whose network has a negative batch-norm variance
        for kind in MOMENTS:
            for p, lam in enumerate(self.lambdas):
                network, state = copy.deepcopy(self.a.module.eval_network), interpolate(start, end, lam)
                network.load_state_dict(state)
                if kind == "interpolated" and negative_variance(state):
                    self.undefined[kind].append(p)
                network.to(self.device)
                if kind == "recomputed":  # the same images on every process, so every process gets the same moments
                    update_bn(batches, network)
                self.paths[kind].append(Logits(self.a, network.eval()))

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        images, labels = batch
        for kind in MOMENTS:
            self.per_image[kind].update(dataloader_idx, [path(images) for path in self.paths[kind]], labels)

    def on_validation_epoch_end(self) -> None:
        points = len(self.lambdas)
        self.results = {"a": self.a.name, "b": self.b.name, "lambdas": self.lambdas, "measure": self.measure,
                        "resamples": self.resamples}
        for kind in MOMENTS:
            rows, self.results[kind] = self.per_image[kind].compute(), {}
            for s, split in enumerate(SPLITS):
                mine = rows[rows[:, 0] == s]
                labels, hits, losses = mine[:, 1].astype(np.int64), mine[:, 2:2 + points], mine[:, 2 + points:]
                loss, error = losses.mean(0), 1 - np.array([score_from_counts(*class_sums(hits[:, p], labels), self.measure)
                                                            for p in range(points)])
                loss[self.undefined[kind]] = error[self.undefined[kind]] = np.nan  # not the argmax of NaN logits (class 0)
                self.results[kind][split] = {
                    "images": len(mine), "loss": loss.tolist(), "error": error.tolist(),
                    "undefined_lambdas": [self.lambdas[p] for p in self.undefined[kind]],
                    "loss_barrier": loss_barrier(self.lambdas, loss), "error_barrier": loss_barrier(self.lambdas, error),
                    **bootstrap_barriers(self.lambdas, losses, hits, labels, self.measure, self.resamples, self.seed)}


def class_sums(hits: np.ndarray, labels: np.ndarray) -> tuple[Tensor, Tensor]:
    """(correct, count) per class of one network's hits on images of ``labels``: ``score_from_counts``'s input."""
    return torch.from_numpy(np.bincount(labels, weights=hits)), torch.from_numpy(np.bincount(labels).astype(float))


def barrier(a: str, b: str, lambdas: Sequence[float], data=None, images: int = 1000, batch_size: int = 250,
            bn_images: int = 2000, seed: int = 0, resamples: int = 1000, trainer: Optional[L.Trainer] = None) -> dict:
    """Loss and error along the straight path between the checkpoints ``a`` and ``b`` (run folders or .ckpt), with
    batch-norm moments recomputed (``recomputed``) and interpolated (``interpolated``), on ``images`` training and
    test images of ``data`` (a's run's data module by default) drawn class-balanced from ``seed``
    (``passes.pass_images``), each checkpoint loaded once and the images read once; the barriers with bootstrap
    intervals over the images, and the pair's parameter distance (``passes.network_distance``)."""
    loaded = [load_network("a", a), load_network("b", b)]
    check_comparable(loaded)
    data = data if data is not None else data_module_of(run_folder_of(loaded[0].source))
    module = InterpolationPath(*loaded, lambdas, bn_images, resamples, seed)
    images_module = FixedImages(data, batch_size, images, ("train", "val"), seed=seed)
    (trainer or pass_trainer()).validate(module, datamodule=images_module, verbose=False)
    return {**module.results, "a": a, "b": b, "distance": network_distance(*loaded)["distance"],
            "images": images_module.record()}


# --- the report's table, findings and figure ---


def barrier_lines(barriers: list[dict]) -> list[str]:
    if not barriers:
        return []
    first = barriers[0]["recomputed"]["test"]
    lines = ["### Loss and error barriers along θ(λ) = (1−λ)θ₀ + λθ₁", "",
             "B = max over λ in [0, 1] of L(θ_λ) − ((1−λ)L(θ₀) + λL(θ₁)), on "
             f"{first.get('images', '?')} test images drawn class-balanced, the error in the target's measure "
             f"({barriers[0].get('measure', 'top1')}); in square brackets the 95 % bootstrap interval over the images. "
             "Batch-norm moments recomputed at every λ on the same training images (the protocol); in round brackets, "
             "with the moments interpolated instead (what two public codes do).", "",
             "| pair | test loss barrier | test error barrier (%) | train loss barrier | ‖θ₀ − θ₁‖₂ |", "|---|---|---|---|---|"]
    for b in barriers:
        r, i = b["recomputed"], b["interpolated"]
        lines.append(f"| {b['a']} – {b['b']} | {r['test']['loss_barrier']:.3f} {_interval(r['test'], 'loss')} "
                     f"({i['test']['loss_barrier']:.3f}) | {100 * r['test']['error_barrier']:.1f} "
                     f"{_interval(r['test'], 'error', 100, 1)} ({100 * i['test']['error_barrier']:.1f}) | "
                     f"{r['train']['loss_barrier']:.3f} ({i['train']['loss_barrier']:.3f}) | {b['distance']['all']:.2f} |")
    undefined = [f"{b['a']} – {b['b']} at λ = {', '.join(f'{x:g}' for x in b['interpolated']['test']['undefined_lambdas'])}"
                 for b in barriers if b["interpolated"]["test"].get("undefined_lambdas")]
    if undefined:
        lines += ["", f"With interpolated moments the path has no network at {'; '.join(undefined)}: an extrapolated "
                      "batch-norm variance is negative there. Those points are left out of the figure (barriers are "
                      "taken over λ in [0, 1], where no variance is negative)."]
    return lines + [""]


def _interval(split: dict, name: str, scale: float = 1.0, digits: int = 3) -> str:
    found = split.get(f"{name}_barrier_interval")
    return "" if not found else f"[{scale * found[0]:.{digits}f}, {scale * found[1]:.{digits}f}]"


def one_basin(split: dict) -> Optional[bool]:
    """One basin when the 95 % interval of the test error barrier lies below 1 % (True), separated by a barrier when
    it lies above (False); None when the interval holds 1 % (these images cannot tell)."""
    low, high = split.get("error_barrier_interval") or (split["error_barrier"],) * 2
    slack = 1e-9  # errors are 1 - accuracy: 5 of 500 images come out as 0.010000000000000009
    return True if high <= BASIN + slack else (False if low > BASIN + slack else None)


def barrier_findings(barriers: list[dict]) -> list[str]:
    """Each pair in one basin or not, said as its bootstrap interval decides (``one_basin``)."""
    lines = []
    basin = {True: f"one basin (the 95 % interval of the test error barrier lies below {BASIN:.0%})",
             False: f"separated by a barrier (the 95 % interval of the test error barrier lies above {BASIN:.0%})",
             None: f"undecided (the 95 % interval of the test error barrier holds {BASIN:.0%}: more images would tell)"}
    for b in barriers:
        r, i = b["recomputed"]["test"], b["interpolated"]["test"]
        lines.append(f"- {b['a']} and {b['b']}: {basin[one_basin(r)]}; test loss barrier {r['loss_barrier']:.3f}, error "
                     f"barrier {100 * r['error_barrier']:.1f} % {_interval(r, 'error', 100, 1)} (with interpolated batch-norm "
                     f"moments {i['loss_barrier']:.3f} and {100 * i['error_barrier']:.1f} %).")
    return lines


def figure_barriers(barriers: list[dict], path: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for k, b in enumerate(barriers):
        for row, metric in enumerate(("loss", "error")):
            for col, split in enumerate(("test", "train")):
                ax = axes[row, col]
                ax.plot(b["lambdas"], b["recomputed"][split][metric], "-", color=f"C{k}", label=f"{b['a']} – {b['b']}")
                ax.plot(b["lambdas"], b["interpolated"][split][metric], ":", color=f"C{k}")
                ax.set(title=f"{split} {metric}", xlabel="λ" if row else None)
                ax.axvline(0, color="grey", lw=0.5)
                ax.axvline(1, color="grey", lw=0.5)
    axes[0, 0].legend(fontsize=7)
    gaps = any(b["interpolated"]["test"].get("undefined_lambdas") for b in barriers)
    fig.suptitle("Along θ(λ): BN moments recomputed (solid) or interpolated (dotted)"
                 + ("\ngaps in the dotted curves: no network there, an extrapolated BN variance is negative" if gaps else ""))
    return save_figure(fig, path)


