"""What every between-model pass shares: networks loaded comparably, the fixed images they read, per-class loss
sums, a network's logits run from any block on, parameter distances, and the validate-only Trainer.

Which images, in which order: a seeded draw (``pass_images``), class-balanced where it takes a subset and in
random order, from the labels and the seed alone. Converted data sets are written class by class, so "the first
N images" of ImageNet val would be 30 classes per 1,500, and consecutive minibatches would each hold one or two
classes (a minibatch CKA of 0.51 where shuffled batches give 0.29). With ``epochs`` > 1 a pass reads the images
that many times, each time in a fresh random order. Each epoch's order is cut into batches of ``batch_size``, and
process r of W takes batches r, r + W, ...: every batch is whole on one process and the metrics' sums are the same
for any number of processes (a minibatch estimate depends on how the images are batched, so that must not change
with the GPU count). ``Trainer.validate`` runs every pass, so the same command uses N GPUs or SLURM. What was read
(seed, epochs, images, classes, a digest of the order) is recorded with the results.

A network is named by its run folder (``last.ckpt``'s evaluated weights: the EMA when on) or a ``.ckpt`` file;
``<ref>@untrained`` is the same architecture freshly initialised, with its batch-norm moments computed on training
images (the paper's second control in Figure 2).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
import yaml
from jsonargparse import ArgumentParser
from torch import Tensor, nn
from torchmetrics import Metric

from datamodules import ImageClassificationData
from lightning_modules import ObjectiveClassifier
from lightning_modules.classifier import PENULTIMATE
from measurements.accuracy import score_from_counts
from measurements.weight_space import parameter_distance, shared_parts

from .spec import UNTRAINED

__all__ = ["PENULTIMATE", "SPLITS", "STEM", "ComparisonError", "FixedImages", "Loaded", "Logits", "LossSums",
           "check_comparable", "checkpoint_hparams", "data_module_of", "distance", "instantiate_data", "load_network",
           "network_distance", "pass_images", "pass_trainer", "run_folder_of", "shared_distance"]

STEM = "stem"  # the stem's output: what the first block reads
SPLITS = ("train", "test")  # the sources of a two-split pass, in dataloader order: training images, then test


class ComparisonError(ValueError):
    """Networks that cannot be compared, said before the pass starts."""


@dataclass
class Loaded:
    name: str
    module: ObjectiveClassifier
    source: Path  # the checkpoint
    untrained: bool

    @property
    def architecture(self) -> tuple:
        hp = self.module.hparams
        return hp.backbone, hp.backbone_source, hp.num_classes

    @property
    def layers(self) -> list[str]:
        return [*self.module.eval_network.blocks(), PENULTIMATE]


def checkpoint_of(ref: str) -> tuple[Path, bool]:
    """(checkpoint file, untrained?) of a run folder or a .ckpt, with an optional ``@untrained``."""
    untrained = ref.endswith(UNTRAINED)
    path = Path(ref[: -len(UNTRAINED)] if untrained else ref)
    checkpoint = path if path.suffix == ".ckpt" else path / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file():
        raise ComparisonError(f"{ref}: no checkpoint {checkpoint}; name a run folder that holds checkpoints/last.ckpt, "
                              f"or a .ckpt file.")
    return checkpoint, untrained


def run_folder_of(checkpoint: Path) -> Path:
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def load_network(name: str, ref: str, seed: int = 0) -> Loaded:
    checkpoint, untrained = checkpoint_of(ref)
    module = ObjectiveClassifier.load_from_checkpoint(checkpoint, map_location="cpu")
    if untrained:
        torch.manual_seed(seed)  # the untrained control is a function of its seed
        module = ObjectiveClassifier(**{**module.hparams, "objective": module.objective})
    module.eval()
    return Loaded(name, module, checkpoint, untrained)


def checkpoint_hparams(folder: Path) -> dict:
    """The hyper-parameters of a finished run's ``last.ckpt``."""
    checkpoint = folder / "checkpoints" / "last.ckpt"
    # mmap: the hyper-parameters without reading the weights
    return torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True).get("hyper_parameters", {})


def data_module_of(run: Path):
    """The run's data module, built from the ``data`` section of its config.yaml, with the run's seed where the data
    names none (as in the run itself: the block-shuffle permutation is the run's, not this process's)."""
    config = run / "config.yaml"
    if not config.is_file():
        raise ComparisonError(f"{run} has no config.yaml to take the data from; pass the data config explicitly.")
    saved = yaml.safe_load(config.read_text())
    data = saved["data"]
    if (data.get("init_args") or {}).get("seed") is None:
        data = {**data, "init_args": {**(data.get("init_args") or {}), "seed": saved.get("seed_everything") or 0}}
    return instantiate_data(data)


def instantiate_data(data: dict):
    """A data module from a config's ``data`` section ({class_path, init_args})."""
    parser = ArgumentParser()
    parser.add_subclass_arguments(ImageClassificationData, "data")
    return parser.instantiate_classes(parser.parse_object({"data": data})).data


def check_comparable(loaded: list[Loaded], classes: bool = True) -> None:
    """Every network of ``loaded`` is the first's backbone (architecture and source) and, with ``classes``, has its
    number of classes too: what predictions, paths between networks and whole-network distances need. CKA of the
    blocks and of the penultimate features needs the backbone alone (``classes=False``): a pre-trained network and
    one fine-tuned from it to another task's head."""
    first = loaded[0]
    for other in loaded[1:]:
        a, b = first.architecture, other.architecture
        if a[:2] != b[:2] or (classes and a[2] != b[2]):
            what = ("differ in architecture or classes; compare networks of one architecture trained on one data set"
                    if classes else "differ in backbone; compare networks of one backbone architecture")
            raise ComparisonError(
                f"{first.name} ({first.source}: {a[0]} from {a[1]}, {a[2]} classes) and {other.name} ({other.source}: "
                f"{b[0]} from {b[1]}, {b[2]} classes) {what}.")


def pass_images(labels: np.ndarray, count: Optional[int], seed: int, epochs: int = 1) -> list[np.ndarray]:
    """The images a pass reads, one index array per epoch: ``count`` images (all when None) drawn class-balanced
    (each class gives floor(count / K) or one more, fewer only when it has fewer; uniformly within the class; which
    classes give one more is random too), then each epoch a fresh random order of them. A function of the labels,
    ``count``, ``seed`` and ``epochs`` only, so every process and every run computes the same."""
    if epochs < 1:
        raise ComparisonError(f"epochs={epochs}: a pass reads its images at least once.")
    rng = np.random.default_rng(seed)
    n = len(labels)
    if count is None or count >= n:
        chosen = np.arange(n)
    else:
        classes, label_of = np.unique(labels, return_inverse=True)
        perm = rng.permutation(n)  # random order within each class, then grouped by class
        grouped = perm[np.argsort(label_of[perm], kind="stable")]
        sizes = np.bincount(label_of, minlength=len(classes))
        rank = np.empty(n, dtype=np.int64)  # an image's place within its class's random order
        rank[grouped] = np.arange(n) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        priority = rng.permutation(len(classes))[label_of]  # which class's k-th image comes first in round k
        chosen = np.sort(np.lexsort((priority, rank))[:count])
    return [chosen[np.random.default_rng([seed, epoch]).permutation(len(chosen))] for epoch in range(epochs)]


def fixed_batches(order: np.ndarray, batch_size: int, rank: int, world_size: int) -> np.ndarray:
    """This process's share of ``order``: its batches of ``batch_size`` consecutive entries r, r + W, ... (module
    docstring)."""
    starts = np.arange(0, len(order), batch_size)[rank::world_size]
    return np.concatenate([order[s:s + batch_size] for s in starts]) if len(starts) else np.zeros(0, int)


class FixedImages(L.LightningDataModule):
    """Fixed, un-augmented images of a run's data module for ``Trainer.validate``: ``images`` of each of ``sources``
    ("val", "train") drawn by ``pass_images``, read ``epochs`` times in fixed batches (one dataloader per source and
    epoch, in that order: dataloader k is source k // epochs); and the training images batch-norm moments are
    computed on, drawn the same way.

    Args:
        seed: seed of the draw and of the orders.
        epochs: passes over the images, each in a fresh order.
        min_last_batch: refuse a last batch smaller than this (unbiased HSIC needs more than 3 images).
    """

    def __init__(self, data, batch_size: int, images: Optional[int], sources: tuple[str, ...] = ("val",),
                 min_last_batch: int = 1, seed: int = 0, epochs: int = 1):
        super().__init__()
        self.data, self.batch_size, self.images = data, batch_size, images
        self.sources, self.min_last_batch, self.seed, self.epochs = sources, min_last_batch, seed, epochs

    def setup(self, stage: str) -> None:
        self.data.trainer = self.trainer  # as when attached to a fit: its processes, device and batch split
        self.data.setup("validate")
        self.orders = {}
        for source in self.sources:
            self.orders[source] = pass_images(self.data.labels(source), self.images, self.seed, self.epochs)
            count = len(self.orders[source][0])
            if 0 < count % self.batch_size < self.min_last_batch:
                raise ComparisonError(f"{count} {source} images in batches of {self.batch_size} leave a last batch of "
                                      f"{count % self.batch_size}: unbiased HSIC needs more than 3 (it divides by n(n-3)); "
                                      f"choose images or batch_size so that the last batch is full or larger.")

    def val_dataloader(self):
        rank, world = self.trainer.global_rank, self.trainer.world_size
        loaders = [self.data.evaluation_dataloader(source, fixed_batches(order, self.batch_size, rank, world), local=True,
                                                   batch_size=self.batch_size)
                   for source, orders in self.orders.items() for order in orders]
        return loaders[0] if len(loaders) == 1 else loaders

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        return self.data.on_after_batch_transfer(batch, dataloader_idx)

    def training_images(self, count: int):
        """``count`` training images drawn as the pass's are (un-augmented, normalised, on the device), the same
        on every process."""
        labels, device = self.data.labels("train"), self.trainer.strategy.root_device
        for batch in self.data.evaluation_dataloader("train", pass_images(labels, count, self.seed)[0], local=True,
                                                     batch_size=self.batch_size):
            yield self.data.on_after_batch_transfer([t.to(device) for t in batch], 0)[0]

    def record(self) -> dict:
        """What the pass read, for its results: the seed, the epochs, and per source the images, the classes among
        them and a digest of the orders (equal digests: the same images in the same order)."""
        found = {"seed": self.seed, "epochs": self.epochs}
        for source, orders in self.orders.items():
            labels = self.data.labels(source)
            found[source] = {"images": len(orders[0]), "classes": int(len(np.unique(labels[orders[0]]))),
                             "sha256": hashlib.sha256(np.concatenate(orders).astype(np.int64).tobytes()).hexdigest()}
        return found


def pass_trainer(accelerator: str = "auto", devices: str = "auto", num_nodes: int = 1) -> L.Trainer:
    """The Trainer of a between-model pass (CKA, barriers, criticality): validation only, nothing logged or saved."""
    return L.Trainer(accelerator=accelerator, devices=devices, num_nodes=num_nodes, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False)


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


def distance(a: str, b: str) -> dict[str, float]:
    """||theta_a - theta_b||_2 of the evaluated weights, whole network ("all") and per module (``Network.parts``),
    over the parameters both hold with equal shapes (``network_distance`` names those left out)."""
    return shared_distance(a, b)["distance"]


def shared_distance(a: str, b: str) -> dict:
    """``network_distance`` of two checkpoints (run folders or .ckpt)."""
    return network_distance(load_network("a", a), load_network("b", b))


def network_distance(a: Loaded, b: Loaded) -> dict:
    """The distance of two networks of one backbone, whatever their heads: {"distance": {"all", module: ...},
    "left_out": the parameters not in both with equal shapes (a head of other classes), by name}. The modules are
    a's; a module all of whose parameters are left out has no distance, and "all" is over the rest."""
    check_comparable([a, b], classes=False)
    nets = [a.module.eval_network, b.module.eval_network]
    theta_a, theta_b = dict(nets[0].named_parameters()), dict(nets[1].named_parameters())
    parts, left_out = shared_parts(theta_a, theta_b, nets[0].parts())
    left_out += [n for n in theta_b if n not in theta_a]  # b's own, which a's modules cannot name
    return {"distance": parameter_distance(theta_a, theta_b, parts), "left_out": left_out}
