"""What is being transferred (Neyshabur et al. 2020): loss barriers along the straight path between two networks,
parameter distance, and module criticality (Chatterji et al. 2020), as passes on Lightning's Trainer.

Every pass evaluates fixed, un-augmented images (``FixedImages``: ``images`` of the training set and of the test
set drawn class-balanced from a seed, in fixed batches, each batch whole on one process) and keeps per-class sums
(or per-image values) in torchmetrics states, so the numbers are the same on any number of processes. Errors are
1 - the target's accuracy measure (top-1, or mean per class for Pets and Flowers). The formulas are in
``measurements/weight_space.py``.

- Barrier: theta(lam) = (1 - lam) theta_0 + lam theta_1 for every lam of the grid, each network built when the
  pass starts, its batch-norm moments recomputed on the same fixed training images (``recompute_batch_norm``;
  never interpolated, which overstates the barrier), then train and test loss and error of every lam in
  one pass over the images; a 95 % interval of each barrier from a bootstrap over the images.
- Criticality (Chatterji et al. 2020, Definition 1): for every module i (a layer: a convolution or linear layer
  with its batch norm; or a block), point (alpha, sigma) and noise draw, module i at (1 - alpha) theta_i^0 +
  alpha theta_i^F plus Gaussian noise, each tensor t's of std sigma s_t with s_t its RMS (noise proportional to
  each weight matrix's norm), the other modules final; admissible when the mean train 0-1 error over the draws
  is within epsilon of the final network's (or, as an option, the mean loss within (1 + epsilon) of its loss);
  mu_i = min (alpha / sigma)^2 sum_t ||theta_t^F - theta_t^0||^2 / s_t^2, the distance over the std actually added.
  Batch-norm moments stay the final network's (the definition perturbs weights; the moments are not). Also every
  module rewound to theta_i^0 alone, on train and test.

- Representations (the talk's tables, ``representations``): for pairs of runs, linear CKA of each stage (the stem's
  output, every block, the penultimate features; ``compare`` with ``stem``, the same layer of both networks), the
  parameter distance whole and per module over the parameters both share, and where the pair errs (prediction
  agreement, and who alone is right), on the test images of the first pair's first run's target, drawn by
  ``pass_images``. A pre-trained network has its task's head: it joins CKA and distance, not the errors.

The loss is the softmax cross-entropy of the logits as each network's objective forms them, whatever it was
trained with, so that paths between networks of different objectives are measured in one unit.
"""

from __future__ import annotations

import copy
import hashlib
import math
from pathlib import Path
from typing import Literal, Optional, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from lightning_modules.classifier import accuracy_tag
from measurements.accuracy import score_from_counts
from measurements.weight_space import (bootstrap_barriers, interpolate, loss_barrier, module_criticality, noise_scales, parameter_distance, perturb,
                                       scaled_distance_sq, shared_parts)

from .compare import (ComparisonError, FixedImages, Loaded, check_comparable, compare, data_module_of, load_network, pass_trainer,
                      recompute_batch_norm, run_folder_of)

__all__ = ["InterpolationPath", "Criticality", "LossSums", "barrier", "criticality", "distance", "representations",
           "shared_distance"]

SPLITS = ("train", "test")
Admissible = Literal["error", "loss"]
Modules = Literal["layers", "blocks"]


class LossSums(Metric):
    """Summed cross-entropy and per-class correct and examples of ``points`` networks on each split: exact under
    DDP (sums). The error is 1 - the target's accuracy measure (``measurements.accuracy``: top-1, or the mean
    per-class accuracy of Pets and Flowers), from the same per-class sums as validation's."""

    full_state_update = False

    def __init__(self, points: int, num_classes: int, measure: str = "top1", splits: int = len(SPLITS)):
        super().__init__()
        self.measure, self.num_classes = measure, num_classes
        self.add_state("loss", torch.zeros(splits, points, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("correct", torch.zeros(splits, points, num_classes, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(splits, points, num_classes, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, split: int, point: int, logits: Tensor, labels: Tensor) -> None:
        logits = logits.float()
        self.loss[split, point] += F.cross_entropy(logits, labels, reduction="sum").double()
        hit = (logits.argmax(1) == labels).double()
        self.correct[split, point] += torch.bincount(labels, weights=hit, minlength=self.num_classes)
        self.count[split, point] += torch.bincount(labels, minlength=self.num_classes).double()

    def compute(self) -> tuple[Tensor, Tensor]:
        """(mean loss, error in the measure), each splits x points (nan where a split read no images)."""
        examples = self.count.sum(-1)
        error = torch.full_like(examples, math.nan)
        for index in zip(*torch.nonzero(examples, as_tuple=True)):
            error[index] = 1 - score_from_counts(self.correct[index], self.count[index], self.measure)
        return self.loss / examples, error


class Logits(nn.Module):
    """A classifier's logits from images, as its objective forms them: one module to call ``functional_call`` on.

    ``forward(x, start=k)`` runs from block k on, ``x`` being what enters it (``entering``); ``start=len(blocks)``
    only the pooling and the head. That holds for backbones whose blocks form a chain, each block's input the
    previous block's output and the features ``forward_head`` of the last one's (ResNets in timm); ``chained`` tells."""

    def __init__(self, loaded: Loaded, network: Optional[nn.Module] = None):
        super().__init__()
        self.classifier = [loaded.module]  # a list: the objective's hyper-parameters, not a submodule to copy
        self.net = network if network is not None else loaded.module.eval_network
        self.blocks = [[block] for block in self.net.blocks().values()]  # lists: the same modules, not copies

    def forward(self, x: Tensor, start: Optional[int] = None) -> Tensor:
        if start is None:
            features = self.net(x)
        else:
            for (block,) in self.blocks[start:]:
                x = block(x)
            features = self.net.backbone.forward_head(x, pre_logits=True)
        return self.classifier[0].logits(features, self.net)

    def entering(self, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The logits of ``images`` and what enters each block, then what leaves the last one."""
        inputs: list[Tensor] = []
        hooks = [block.register_forward_pre_hook(lambda _, args: inputs.append(args[0])) for (block,) in self.blocks]
        hooks.append(self.blocks[-1][0].register_forward_hook(lambda _, args, output: inputs.append(output)))
        try:
            logits = self(images)
        finally:
            for hook in hooks:
                hook.remove()
        return logits, inputs

    def chained(self, images: Tensor) -> bool:
        """Whether running from the blocks' inputs gives the whole network's logits bit for bit, on ``images``."""
        if not hasattr(self.net.backbone, "forward_head"):
            return False
        logits, inputs = self.entering(images)
        return len(inputs) == len(self.blocks) + 1 and all(
            torch.equal(self(x, start=k), logits) for k, x in enumerate(inputs))


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
    """Loss and error along theta(lam) between two networks, on train and test (module docstring), with a bootstrap
    interval of each barrier over the images (``measurements.weight_space.bootstrap_barriers``).

    Args:
        a, b: the two networks (theta_0 and theta_1).
        lambdas: the grid; must hold 0 and 1 for the barrier, may extend beyond [0, 1].
        recompute_bn: recompute batch-norm moments at every lam (the protocol); False interpolates them, as
            two public barrier codes do, to show how much that overstates the barrier.
        bn_images: training images the moments are computed on.
        resamples: bootstrap resamples of the images for the barriers' 95 % intervals.
        seed: seed of the resamples.
    """

    def __init__(self, a: Loaded, b: Loaded, lambdas: Sequence[float], recompute_bn: bool = True, bn_images: int = 2000,
                 resamples: int = 1000, seed: int = 0):
        super().__init__()
        check_lambdas(lambdas)
        self.a, self.b = a, b
        self.lambdas = [float(x) for x in lambdas]
        self.recompute_bn, self.bn_images, self.resamples, self.seed = recompute_bn, bn_images, resamples, seed
        self.measure = a.module.hparams.get("measure") or "top1"
        self.per_image = PerImage(len(self.lambdas))
        self.paths = nn.ModuleList()
        self.results: dict = {}

    def on_validation_start(self) -> None:
        start, end = (x.module.eval_network.state_dict() for x in (self.a, self.b))
        batches = list(self.trainer.datamodule.training_images(self.bn_images)) if self.recompute_bn else []
        self.paths = nn.ModuleList()
        for lam in self.lambdas:
            network = copy.deepcopy(self.a.module.eval_network)
            network.load_state_dict(interpolate(start, end, lam))
            network.to(self.device)
            if self.recompute_bn:  # the same images on every process, so every process gets the same moments
                recompute_batch_norm(network, batches)
            self.paths.append(Logits(self.a, network.eval()))

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        images, labels = batch
        self.per_image.update(dataloader_idx, [path(images) for path in self.paths], labels)

    def on_validation_epoch_end(self) -> None:
        rows, points = self.per_image.compute(), len(self.lambdas)
        self.results = {"a": self.a.name, "b": self.b.name, "lambdas": self.lambdas, "recompute_bn": self.recompute_bn,
                        "measure": self.measure, "resamples": self.resamples}
        for s, split in enumerate(SPLITS):
            mine = rows[rows[:, 0] == s]
            labels, hits, losses = mine[:, 1].astype(np.int64), mine[:, 2:2 + points], mine[:, 2 + points:]
            loss, error = losses.mean(0), 1 - np.array([score_from_counts(*class_sums(hits[:, p], labels), self.measure)
                                                        for p in range(points)])
            self.results[split] = {"images": len(mine), "loss": loss.tolist(), "error": error.tolist(),
                                   "loss_barrier": loss_barrier(self.lambdas, loss),
                                   "error_barrier": loss_barrier(self.lambdas, error),
                                   **bootstrap_barriers(self.lambdas, losses, hits, labels, self.measure, self.resamples, self.seed)}


def class_sums(hits: np.ndarray, labels: np.ndarray) -> tuple[Tensor, Tensor]:
    """(correct, count) per class of one network's hits on images of ``labels``: ``score_from_counts``'s input."""
    return torch.from_numpy(np.bincount(labels, weights=hits)), torch.from_numpy(np.bincount(labels).astype(float))


class Criticality(L.LightningModule):
    """Module criticality of a network against its initial weights (module docstring).

    Args:
        network: maps images to logits (``Logits``, or any module); its parameters are the final weights theta^F.
        initial: theta^0, the state dict of ``network`` where training started (P-T: the pre-trained backbone
            and the new head's initialisation; RI-T: the random initialisation).
        parts: module name -> its parameter names in ``network``.
        alphas: the grid of alpha in [0, 1] (0: the module rewound to theta^0, 1: final).
        sigmas: the noise grid in (0, 1], relative to each tensor's RMS (``noise_scales``).
        num_classes, measure: the task's classes and accuracy measure (the 0-1 error is 1 - the measure).
        draws: noise draws per point (every draw perturbs every parameter of the module afresh).
        epsilon: the admissible rise, see ``admissible``.
        admissible: "error": the mean train 0-1 error over the draws is at most the final network's + epsilon (the
            definition); "loss": the mean train loss is at most (1 + epsilon) x the final network's (the one public
            implementation's).
        seed: seed of the noise; a point's draws are a function of (seed, module, alpha, sigma, draw).
        cache: where the blocks form a chain (``Logits.chained``), run a network perturbed from block k on only
            from there, on what enters block k at the final weights (computed once per batch): the same numbers,
            bit for bit, in about half the time (benchmarks/criticality_speed.py).
    """

    def __init__(self, network: nn.Module, initial: dict[str, Tensor], parts: dict[str, list[str]],
                 alphas: Sequence[float], sigmas: Sequence[float], num_classes: int, measure: str = "top1",
                 draws: int = 10, epsilon: float = 0.01, admissible: Admissible = "error", seed: int = 0,
                 cache: bool = True):
        super().__init__()
        check_grid(alphas, sigmas, draws, admissible)
        self.network = network.eval()
        chainable = cache and isinstance(network, Logits)
        self.cache: Optional[bool] = None if chainable else False  # None: to be checked on the first batch
        # Where a network perturbed in each module starts: the first block it has parameters in (len(blocks): the
        # head); None, the images, where any of them comes before the blocks (the stem).
        prefixes = [f"net.backbone.{name}." for name in network.net.blocks()] + ["net.head."] if chainable else []
        firsts = {part: [next((k for k, p in enumerate(prefixes) if n.startswith(p)), None) for n in names]
                  for part, names in parts.items()}
        self.start = {part: None if None in found else min(found) for part, found in firsts.items()}
        self.initial = {k: v.detach().clone() for k, v in initial.items()}
        self.parts, self.alphas, self.sigmas = parts, [float(a) for a in alphas], [float(s) for s in sigmas]
        self.draws, self.epsilon, self.admissible, self.seed = draws, epsilon, admissible, seed
        final = dict(self.network.named_parameters())
        missing = [n for names in parts.values() for n in names if n not in final or n not in self.initial]
        if missing:
            raise ComparisonError(f"parameters {missing[:5]} are not in both the final and the initial weights: "
                                  f"measure criticality between two checkpoints of one run.")
        self.scales = {part: noise_scales(final, names) for part, names in parts.items()}
        # Points: the final network, each module rewound, then (module, alpha, sigma, draw).
        self.points = [("final", None, None, None)] + [(part, 0.0, 0.0, None) for part in parts]
        self.points += [(part, a, s, d) for part in parts for a in range(len(self.alphas))
                        for s in range(len(self.sigmas)) for d in range(draws)]
        self.sums = LossSums(len(self.points), num_classes, measure)
        self.results: dict = {}

    def overrides(self, point: tuple, device: torch.device) -> dict[str, Tensor]:
        part, alpha, sigma, draw = point
        if part == "final":
            return {}
        final = {n: p.detach() for n, p in self.network.named_parameters() if n in self.parts[part]}
        initial = {n: self.initial[n].to(device) for n in final}
        if draw is None:  # rewound
            return {n: initial[n].to(final[n].dtype).clone() for n in final}
        generator = torch.Generator(device=device).manual_seed(_point_seed(self.seed, part, alpha, sigma, draw))
        stds = {n: self.sigmas[sigma] * scale for n, scale in self.scales[part].items()}
        return perturb(initial, final, self.alphas[alpha], stds, generator)

    @torch.no_grad()
    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        images, labels = batch
        if self.cache is None:
            self.cache = self.network.chained(images)
        final, entering = self.network.entering(images) if self.cache else (self.network(images), [])
        for index, point in enumerate(self.points):
            if dataloader_idx == 1 and point[3] is not None:
                continue  # the test split is for the final and rewound networks only
            start = self.start[point[0]] if self.cache and index else None
            if index == 0:
                logits = final
            elif start is None:
                logits = torch.func.functional_call(self.network, self.overrides(point, images.device), (images,))
            else:
                logits = torch.func.functional_call(self.network, self.overrides(point, images.device), (entering[start],),
                                                    {"start": start})
            self.sums.update(dataloader_idx, index, logits, labels)

    def on_validation_epoch_end(self) -> None:
        loss, error = (x.cpu().numpy() for x in self.sums.compute())
        final_loss, final_error = float(loss[0, 0]), float(error[0, 0])
        bound = final_error + self.epsilon if self.admissible == "error" else (1 + self.epsilon) * final_loss
        final = dict(self.network.named_parameters())
        shape = (len(self.alphas), len(self.sigmas), self.draws)
        modules, total = {}, 0.0
        for k, part in enumerate(self.parts, start=1):
            rows = [i for i, p in enumerate(self.points) if p[0] == part and p[3] is not None]
            losses, errors = loss[0, rows].reshape(shape), error[0, rows].reshape(shape)
            initial = {n: self.initial[n].to(final[n].device) for n in self.parts[part]}
            scaled_sq = scaled_distance_sq(final, initial, self.scales[part])
            values = (errors if self.admissible == "error" else losses).mean(2)
            mu = module_criticality(self.alphas, self.sigmas, values, bound, scaled_sq)
            total = None if mu is None or total is None else total + mu
            modules[part] = {"criticality": mu, "scaled_distance_sq": scaled_sq,
                             "distance_sq": parameter_distance(final, initial, {part: self.parts[part]})[part] ** 2,
                             "noise_scales": self.scales[part], "error": errors.mean(2).tolist(), "loss": losses.mean(2).tolist(),
                             "error_draws": errors.tolist(), "loss_draws": losses.tolist(), "rewound_train_error": float(error[0, k]),
                             "rewound_test_error": float(error[1, k]), "rewound_train_loss": float(loss[0, k])}
        self.results = {"alphas": self.alphas, "sigmas": self.sigmas, "draws": self.draws, "epsilon": self.epsilon,
                        "admissible": self.admissible, "bound": bound, "measure": self.sums.measure,
                        "final_train_loss": final_loss, "final_train_error": final_error,
                        "final_test_error": float(error[1, 0]), "modules": modules, "network_criticality": total}


def _point_seed(seed: int, part: str, alpha: int, sigma: int, draw: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{part}/{alpha}/{sigma}/{draw}".encode()).digest()[:7], "little")


def check_lambdas(lambdas: Sequence[float]) -> None:
    if len(lambdas) == 0:
        raise ComparisonError("The lambda grid is empty; give points along the path, e.g. lambdas: [0, 0.1, ..., 1] "
                              "(0 and 1, the two networks, are needed for the barrier).")
    if 0 not in lambdas or 1 not in lambdas:
        raise ComparisonError(f"The lambda grid {list(lambdas)} must hold 0 and 1 (the two networks): the barrier is "
                              f"measured against the straight line between their losses.")


def check_grid(alphas: Sequence[float], sigmas: Sequence[float], draws: int, admissible: str = "error") -> None:
    if len(alphas) == 0 or any(not 0 <= a <= 1 for a in alphas):
        raise ComparisonError(f"The alpha grid {list(alphas)} must be non-empty, in [0, 1] (0: the module at its initial "
                              f"weights, 1: final), e.g. [0.25, 0.5, 0.75, 1].")
    if len(sigmas) == 0 or any(not 0 < s <= 1 for s in sigmas):
        raise ComparisonError(f"The sigma grid {list(sigmas)} must be non-empty, in (0, 1] (noise std relative to the "
                              f"RMS of each weight tensor; the definition takes sigma <= 1), e.g. [0.01, 0.03, 0.1, 0.3].")
    if draws < 1:
        raise ComparisonError(f"draws={draws}: take at least one noise draw per point (several average out the noise).")
    if admissible not in ("error", "loss"):
        raise ComparisonError(f"admissible={admissible!r}: choose 'error' (the mean train 0-1 error within epsilon of the "
                              f"final network's: the definition) or 'loss' (the mean loss within (1 + epsilon) x the final's).")


# --- commands (python -m study {barrier,distance,criticality}) ---

def barrier(a: str, b: str, lambdas: Sequence[float], data=None, images: int = 1000, batch_size: int = 250,
            bn_images: int = 2000, recompute_bn: bool = True, seed: int = 0, resamples: int = 1000,
            trainer: Optional[L.Trainer] = None) -> dict:
    """Loss and error along the straight path between the checkpoints ``a`` and ``b`` (run folders or .ckpt)
    on ``images`` training and test images of ``data`` (a's run's data module by default), drawn class-balanced
    from ``seed`` (``compare.pass_images``); the barriers with bootstrap intervals over the images."""
    check_lambdas(lambdas)
    loaded = [load_network("a", a), load_network("b", b)]
    check_comparable(loaded)
    data = data if data is not None else data_module_of(run_folder_of(loaded[0].source))
    module = InterpolationPath(*loaded, lambdas, recompute_bn, bn_images, resamples, seed)
    images_module = FixedImages(data, batch_size, images, ("train", "val"), seed=seed)
    (trainer or pass_trainer()).validate(module, datamodule=images_module, verbose=False)
    return {**module.results, "a": a, "b": b, "images": images_module.record()}


def barrier_pair(a: str, b: str, lambdas: Sequence[float], **options) -> dict:
    """A pair's barriers with batch-norm moments recomputed and, to show what that changes, interpolated, and its
    parameter distance: what the report's barrier table and figure draw (``options``: those of ``barrier``)."""
    entry = {"a": a, "b": b, "lambdas": list(lambdas), "distance": distance(a, b)}
    for key, recompute in (("recomputed", True), ("interpolated", False)):
        path = barrier(a, b, lambdas, recompute_bn=recompute, **options)
        entry[key] = {split: path[split] for split in SPLITS}
        entry["images"], entry["measure"] = path["images"], path["measure"]
    return entry


def distance(a: str, b: str) -> dict[str, float]:
    """||theta_a - theta_b||_2 of the evaluated weights, whole network ("all") and per module (``Network.parts``),
    over the parameters both hold with equal shapes (``shared_distance`` names those left out)."""
    return shared_distance(a, b)["distance"]


def shared_distance(a: str, b: str) -> dict:
    """``distance`` of two networks of one backbone, whatever their heads: {"distance": {"all", module: ...},
    "left_out": the parameters not in both with equal shapes (a head of other classes), by name}. The modules are
    a's; a module all of whose parameters are left out has no distance, and "all" is over the rest."""
    loaded = [load_network("a", a), load_network("b", b)]
    check_comparable(loaded, classes=False)
    nets = [x.module.eval_network for x in loaded]
    theta_a, theta_b = dict(nets[0].named_parameters()), dict(nets[1].named_parameters())
    parts, left_out = shared_parts(theta_a, theta_b, nets[0].parts())
    left_out += [n for n in theta_b if n not in theta_a]  # b's own, which a's modules cannot name
    return {"distance": parameter_distance(theta_a, theta_b, parts), "left_out": left_out}


def criticality(final: str, initial: str, alphas: Sequence[float], sigmas: Sequence[float], draws: int = 10,
                epsilon: float = 0.01, admissible: Admissible = "error", modules: Modules = "layers", seed: int = 0,
                data=None, images: int = 1000, batch_size: int = 250, trainer: Optional[L.Trainer] = None,
                cache: bool = True) -> dict:
    """Module criticality of the checkpoint ``final`` against ``initial`` (the same run's starting weights, e.g.
    ``checkpoints/epoch000.ckpt``) on ``images`` training (and, for rewinding, test) images drawn class-balanced
    from ``seed``; ``modules``: each convolution or linear layer with its batch norm (``Network.layers``, the
    papers'), or each block (``Network.parts``)."""
    check_grid(alphas, sigmas, draws, admissible)
    loaded = [load_network("final", final), load_network("initial", initial)]
    check_comparable(loaded)
    data = data if data is not None else data_module_of(run_folder_of(loaded[0].source))
    logits = Logits(loaded[0])
    network = loaded[0].module.eval_network
    grouped = network.layers() if modules == "layers" else network.parts()
    parts = {part: [f"net.{n}" for n in names] for part, names in grouped.items()}
    initial_state = {f"net.{k}": v for k, v in loaded[1].module.eval_network.state_dict().items()}
    hp = loaded[0].module.hparams
    module = Criticality(logits, initial_state, parts, alphas, sigmas, hp.num_classes, hp.get("measure") or "top1", draws,
                         epsilon, admissible, seed, cache)
    images_module = FixedImages(data, batch_size, images, ("train", "val"), seed=seed)
    (trainer or pass_trainer()).validate(module, datamodule=images_module, verbose=False)
    return {**module.results, "modules_by": modules, "final": final, "initial": initial, "images": images_module.record()}


def representations(pairs: Sequence[tuple[str, str]], folders: dict[str, Path], images: Optional[int] = 1000,
                    batch_size: int = 250, seed: int = 0, trainer: Optional[L.Trainer] = None) -> dict:
    """The talk's three tables for ``pairs`` of runs ({name: run folder}), in one pass (``compare``): per pair the CKA
    of each layer of ``compare``'s with ``stem`` (the stem's output, each block, penultimate) against the same layer of
    the other network (the diagonal of its layer x layer CKA, kept whole under ``cka_matrix``), ``shared_distance``,
    and, where both heads have the target's classes, ``errors``: ``prediction_agreement`` with a the pair's first.
    The images are ``images`` test images of the target of the first pair's first run (its data module), drawn
    class-balanced from ``seed`` and read in fixed batches of ``batch_size``: the same on any number of processes."""
    names = list(dict.fromkeys(n for pair in pairs for n in pair))
    first = pairs[0][0]
    classes = {n: checkpoint_hparams(folders[n]).get("num_classes") for n in names}
    predicting = [n for n in names if classes[n] == classes[first]]  # heads of the target's classes
    judged = [(a, b) for a, b in pairs if a in predicting and b in predicting]
    matrix = [n for n in predicting if any(n in pair for pair in judged)]
    found = compare({n: str(folders[n]) for n in names}, list(pairs), matrix, None, agreement=bool(judged),
                    data=data_module_of(folders[first]), batch_size=batch_size, images=images, seed=seed, stem=True,
                    trainer=trainer)
    agreement = {(r["a"], r["b"]): r for r in found["agreement"]}
    rows = []
    for (a, b), cka in zip(pairs, found["pairs"]):
        errors = agreement.get((a, b)) or _swapped(agreement.get((b, a)))
        rows.append({"a": a, "b": b, "cka": dict(zip(cka["layers_a"], np.diag(np.array(cka["cka"])).tolist())),
                     "cka_matrix": cka["cka"], **shared_distance(str(folders[a]), str(folders[b])),
                     "classes": [classes[a], classes[b]], "errors": errors if (a, b) in judged else None})
    return {"pairs": rows, "layers": found["pairs"][0]["layers_a"], "images_of": first, "images": found["images"]}


def _swapped(entry: Optional[dict]) -> Optional[dict]:
    """An agreement entry of (b, a) as (a, b): who alone is right changes sides, the rest is symmetric."""
    if entry is None:
        return None
    return {**entry, "a": entry["b"], "b": entry["a"], "a_right_alone": entry["b_right_alone"],
            "b_right_alone": entry["a_right_alone"]}


# --- a study's transfer analysis (``transfer:`` in its file): written to <report>/transfer.json ---

def finetuning_record(name: str, experiment: str, seed: int, folder: Path, sources: frozenset[Path] = frozenset()) -> dict:
    """What the report needs of one run: its kind (P-T: ``model.init_from`` set; pre-training: a run that ``sources``,
    the run folders other runs start from, holds, or one on the warm-up-exponential schedule of pre-training; else
    RI-T, a run from random initialisation), the pre-training epoch it started from, its block size, and its test
    (validation) loss and accuracy, in the target's measure, along its steps, from its TensorBoard events."""
    import yaml

    from callbacks.checkpoints import finished

    config = yaml.safe_load((folder / "config.yaml").read_text())
    model, data = config.get("model") or {}, (config.get("data") or {}).get("init_args") or {}
    init_from = model.get("init_from")
    if init_from:
        kind = "P-T"
    else:  # both train from random initialisation: what tells them apart is that others start from pre-training
        pretrains = folder.resolve() in sources or model.get("lr_schedule", "warmup_exponential") != "cosine"
        kind = "pre-training" if pretrains else "RI-T"
    epoch, objective = None, None
    if init_from:
        source = Path(init_from)
        # mmap: the hyper-parameters without reading the weights (ResNet-50's 100 MB for every fine-tuning run)
        hparams = torch.load(source, map_location="cpu", weights_only=False, mmap=True).get("hyper_parameters", {})
        objective = str((hparams.get("objective") or {}).get("class_path", "Softmax")).rsplit(".", 1)[-1]
        if source.stem.startswith("epoch"):
            epoch = int(source.stem[5:])
        else:
            done = finished(source.parent.parent)
            epoch = done["epochs"] if done else None
    measure = run_measure(folder)
    curves = scalar_curves(folder, (accuracy_tag(measure), "val/loss"))
    curve = {"accuracy": curves.get(accuracy_tag(measure), []), "loss": curves.get("val/loss", [])}
    # the task, or the training file's name as datamodules.convert writes it (<name>_train.beton: <name>)
    target = data.get("task") or Path(str(data.get("train_path") or data.get("train_root") or "target")).stem.removesuffix("_train")
    decay = model.get("lr_times_weight_decay")
    hyper = f"lr/256 {model.get('lr_per_256')}, " + (f"lr×wd {decay:g}" if decay is not None else f"wd {model.get('weight_decay')}")
    return {"run": name, "experiment": experiment, "seed": seed, "kind": kind, "pretraining_epoch": epoch, "hyper": hyper,
            "pretraining_objective": objective, "target": target, "measure": measure or "top1",
            "block_shuffle": data.get("block_shuffle"), "validation_split": data.get("validation_split"), "curve": curve}


def pretraining_source(folder: Path) -> Optional[Path]:
    """The run folder a fine-tuning run's ``model.init_from`` checkpoint belongs to (None from random initialisation)."""
    import yaml

    init_from = ((yaml.safe_load((folder / "config.yaml").read_text()) or {}).get("model") or {}).get("init_from")
    return run_folder_of(Path(init_from)).resolve() if init_from else None


def run_measure(folder: Path) -> Optional[str]:
    """The accuracy measure a finished run was validated in (its checkpoint's ``measure``, linked from its data)."""
    return checkpoint_hparams(folder).get("measure")


def checkpoint_hparams(folder: Path) -> dict:
    """The hyper-parameters of a finished run's ``last.ckpt``."""
    checkpoint = folder / "checkpoints" / "last.ckpt"
    # mmap: the hyper-parameters without reading the weights
    return torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True).get("hyper_parameters", {})


def checkpoint_probes(folder: Path) -> list[dict]:
    """The probe accuracies (``probe/<dataset>/{linear,knn}_acc``) of each checkpoint a run kept (``epoch<NNN>.ckpt``,
    and its ``last.ckpt`` as the epochs it finished), as its ``TransferProbes`` measured them at that checkpoint's
    step (``at_start`` for epoch 0): the probing half of "which pre-training checkpoint transfers best"; [] for a run
    that probed none."""
    import json

    summary = folder / "measurements.json"
    if not summary.is_file():
        return []
    from callbacks.checkpoints import finished

    measured = {e["step"]: e["measurements"] for e in json.loads(summary.read_text())["evaluations"]}
    kept = {int(path.stem[len("epoch"):]): path for path in (folder / "checkpoints").glob("epoch*.ckpt")}
    done = finished(folder)
    if done is not None:  # last.ckpt: the epochs it finished, as the P-T runs from it count them
        kept.setdefault(done["epochs"], folder / "checkpoints" / "last.ckpt")
    rows = []
    for epoch, path in sorted(kept.items()):
        step = torch.load(path, map_location="cpu", weights_only=False, mmap=True)["global_step"]  # mmap: not the weights
        probes = {tag: value for tag, value in measured.get(step, {}).items()
                  if tag.startswith("probe/") and tag.endswith(("/linear_acc", "/knn_acc"))}
        if probes:
            rows.append({"epoch": epoch, "step": step, "probes": probes})
    return rows


def scalar_curves(folder: Path, tags: Sequence[str]) -> dict[str, list[tuple[int, float]]]:
    """[(step, value)] of each of ``tags`` a run logged to TensorBoard (the tags it has)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    logged = events.Tags().get("scalars", [])
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in tags if tag in logged}


def analyse_transfer(study, trainer: Optional[L.Trainer] = None) -> dict:
    """The study's transfer analysis: every finished run's learning curve, the probes of every checkpoint a run kept
    and probed, barriers (recomputed and interpolated batch-norm moments) and distances of ``transfer.pairs``,
    criticality of ``transfer.criticality``, the talk's tables of ``transfer.representations`` (``representations``);
    runs not finished are listed, and pairs that name one skipped, never silently left out."""
    from callbacks.checkpoints import finished

    from .sweep import grid_scores, run_state

    plan = study.transfer
    folders = {run.name: run_state(run).folder for run in study.runs}
    done = {name: folder for name, folder in folders.items() if finished(folder) is not None}

    sources = frozenset(source for folder in done.values() if (source := pretraining_source(folder)) is not None)
    results = {"runs": [finetuning_record(r.name, r.experiment, r.seed, folders[r.name], sources)
                        for r in study.runs if r.name in done],
               "missing": sorted(set(folders) - set(done)), "barriers": [], "criticality": [],
               "grids": {name: grid_scores(study, name) for name in study.grids}}
    results["checkpoint_probes"] = {name: rows for name, folder in done.items() if (rows := checkpoint_probes(folder))}
    for record in results["runs"]:  # how far training moved each run from where it started
        start = done[record["run"]] / "checkpoints" / "epoch000.ckpt"
        record["distance_from_start"] = distance(str(done[record["run"]]), str(start))["all"] if start.is_file() else None
    common = dict(images=plan.images, batch_size=plan.batch_size, seed=plan.seed, trainer=trainer)
    for a, b in plan.pairs:
        if a in done and b in done:
            entry = barrier_pair(str(done[a]), str(done[b]), plan.lambdas, bn_images=plan.bn_images,
                                 resamples=plan.resamples, **common)
            results["barriers"].append({**entry, "a": a, "b": b})
    for name in plan.criticality:
        if name in done:
            start = done[name] / "checkpoints" / "epoch000.ckpt"
            if not start.is_file():
                raise ComparisonError(f"{name}: no checkpoints/epoch000.ckpt (its starting weights) to measure criticality "
                                      f"against; keep it with checkpoints.epochs: [0].")
            found = criticality(str(done[name]), str(start), plan.alphas, plan.sigmas, plan.draws, plan.epsilon,
                                plan.admissible, plan.modules, **common)
            found["run"] = name
            results["criticality"].append(found)
    if plan.representations:
        ready = [pair for pair in plan.representations if all(n in done for n in pair)]
        found = representations(ready, done, **common) if ready else {"pairs": []}
        results["representations"] = {**found, "skipped": [list(p) for p in plan.representations if p not in ready]}
    return results
