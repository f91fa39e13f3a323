"""Between-model passes on Lightning's Trainer: CKA between every block of two networks (Figure 2a), one
layer's CKA between many networks (Figure 2b), and prediction agreement (Figure C.4).

All networks see the same validation images in one pass. Each network's block outputs (hooked after the
block's final ReLU) and penultimate features are reduced to Gram matrices inside the forward hooks (so an
in-place ReLU later in the network cannot change what was captured, and no activations are held), each
computed once per batch and shared by every comparison that needs it (``measurements.MinibatchCKA``). With
``stem``, the stem's output comes first: the first block's input, reduced by a hook that runs before that block
(the block could otherwise write into its input in place).

CKA needs networks of one backbone only: the blocks and the penultimate features do not depend on the head, so a
pre-trained network (its task's classes) compares with one fine-tuned from it (the target's). Prediction agreement
needs equal heads as well (``check_comparable``).

Which images, in which order: a seeded draw (``pass_images``), class-balanced where it takes a subset and in
random order, from the labels and the seed alone. Converted data sets are written class by class, so "the first
N images" of ImageNet val would be 30 classes per 1,500, and consecutive minibatches would each hold one or two
classes (a minibatch CKA of 0.51 where shuffled batches give 0.29). With ``epochs`` > 1 the pass reads the images
that many times, each time in a fresh random order (the paper processed ImageNet val 10 times). Each epoch's
order is cut into batches of ``batch_size``, and process r of W takes batches r, r + W, ...: every batch is whole
on one process and the metrics' sums are the same for any number of processes (the minibatch estimate depends on
how the images are batched, so that must not change with the GPU count). ``Trainer.validate`` runs the pass, so
the same command uses N GPUs or SLURM. What was read (seed, epochs, images, classes, a digest of the order) is
recorded with the results.

A run is named by its folder (``last.ckpt``'s evaluated weights: the EMA when on) or a ``.ckpt`` file;
``<ref>@untrained`` is the same architecture freshly initialised, with its batch-norm moments computed on
training images (the paper's second control in Figure 2).
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import lightning as L
import numpy as np
import torch
import yaml
from jsonargparse import ArgumentParser

from lightning_modules import ObjectiveClassifier
from measurements import MinibatchCKA, PredictionAgreement, gram

__all__ = ["Comparison", "ComparisonError", "FixedImages", "compare", "load_network", "pass_images", "pass_trainer",
           "recompute_batch_norm"]

PENULTIMATE = "penultimate"
STEM = "stem"  # the stem's output: what the first block reads
UNTRAINED = "@untrained"


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


def compared_layers(loaded: Loaded, stem: bool) -> list[str]:
    """The layers a comparison hooks in forward order: the stem's output when ``stem``, each block, penultimate."""
    return [STEM, *loaded.layers] if stem else loaded.layers


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
    from datamodules import ImageClassificationData

    parser = ArgumentParser()
    parser.add_subclass_arguments(ImageClassificationData, "data")
    return parser.instantiate_classes(parser.parse_object({"data": data})).data


def recompute_batch_norm(network: torch.nn.Module, batches) -> None:
    """Batch-norm running moments of ``network`` replaced by the cumulative average over ``batches`` of
    images (reset, momentum None, train mode, no gradients; then eval): the statistics an untrained
    network (or interpolated weights) would have on those images, never inherited ones."""
    norms = [m for m in network.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: the plain mean over the batches
    was_training = network.training
    network.train()
    with torch.no_grad():
        for images in batches:
            network(images)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    network.train(was_training)


class Comparison(L.LightningModule):
    """One validation pass of every network, feeding the CKA and agreement metrics (module docstring).

    Args:
        networks: the loaded networks, by name.
        pairs: (a, b) names whose every layer is compared with every layer (Figure 2a).
        matrix_layer: the layer compared between every two of ``matrix`` (Figure 2b), or None.
        matrix: names of the networks of the matrix (and of prediction agreement).
        agreement: prediction agreement between every two of ``matrix``.
        bn_images: training images the untrained networks' batch-norm moments are computed on.
        stem: compare the stem's output too, as every network's first layer (``compared_layers``).
    """

    def __init__(self, networks: list[Loaded], pairs: list[tuple[str, str]], matrix_layer: Optional[str],
                 matrix: list[str], agreement: bool, bn_images: int = 2000, stem: bool = False):
        super().__init__()
        self.bn_images = bn_images
        self.loaded = {n.name: n for n in networks}
        self.layers = {n.name: compared_layers(n, stem) for n in networks}
        self.classifiers = torch.nn.ModuleDict({n.name: n.module for n in networks})
        self.pairs, self.matrix, self.matrix_layer = pairs, matrix, matrix_layer
        self.pair_cka = torch.nn.ModuleList(
            MinibatchCKA(len(self.layers[a]), len(self.layers[b])) for a, b in pairs)
        self.matrix_cka = MinibatchCKA(len(matrix), len(matrix)) if matrix_layer and matrix else None
        self.agreement_pairs = list(itertools.combinations(matrix, 2)) if agreement else []
        self.agreement = torch.nn.ModuleList(PredictionAgreement() for _ in self.agreement_pairs)
        # Which layers' Gram matrices each network must give per batch.
        self.needed = {name: set() for name in self.loaded}
        for a, b in pairs:
            self.needed[a].update(self.layers[a])
            self.needed[b].update(self.layers[b])
        if self.matrix_cka is not None:
            for name in matrix:
                self.needed[name].add(matrix_layer)
        self.results: dict = {}

    def on_validation_start(self) -> None:
        for loaded in self.loaded.values():
            if loaded.untrained:  # the same images on every process, so every process gets the same moments
                recompute_batch_norm(loaded.module.eval_network, self.trainer.datamodule.training_images(self.bn_images))

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        images, labels = batch  # every epoch's loader alike
        grams, predictions = {}, {}
        for name, loaded in self.loaded.items():
            grams[name], logits = self._forward(loaded, images)
            predictions[name] = logits.argmax(1)
        for (a, b), metric in zip(self.pairs, self.pair_cka):
            metric.update(torch.stack([grams[a][l] for l in self.layers[a]]),
                          torch.stack([grams[b][l] for l in self.layers[b]]))
        if self.matrix_cka is not None:
            self.matrix_cka.update(torch.stack([grams[n][self.matrix_layer] for n in self.matrix]))
        for (a, b), metric in zip(self.agreement_pairs, self.agreement):
            metric.update(predictions[a], predictions[b], labels)

    def _forward(self, loaded: Loaded, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        network, needed, grams = loaded.module.eval_network, self.needed[loaded.name], {}

        def hook(name, of_input: bool = False):
            def reduce(_module, inputs, output=None):
                x = inputs[0] if of_input else output
                with torch.autocast(x.device.type, enabled=False):
                    grams[name] = gram(x)  # now: a later in-place ReLU would change ``x``
            return reduce

        blocks = network.blocks()
        handles = [blocks[n].register_forward_hook(hook(n)) for n in needed if n not in (PENULTIMATE, STEM)]
        if STEM in needed:  # the stem's output is the first block's input, taken before that block runs
            handles.append(next(iter(blocks.values())).register_forward_pre_hook(hook(STEM, of_input=True)))
        try:
            features = network(images)
        finally:
            for handle in handles:
                handle.remove()
        if PENULTIMATE in needed:
            grams[PENULTIMATE] = gram(features.float())
        return grams, loaded.module.logits(features, network)

    def on_validation_epoch_end(self) -> None:
        # compute() combines the ranks' sums: every rank calls it.
        self.results = {
            "pairs": [{"a": a, "b": b, "layers_a": self.layers[a], "layers_b": self.layers[b],
                       "cka": metric.compute().tolist()} for (a, b), metric in zip(self.pairs, self.pair_cka)],
        }
        if self.matrix_cka is not None:
            self.results["matrix"] = {"layer": self.matrix_layer, "runs": self.matrix, "cka": self.matrix_cka.compute().tolist()}
        self.results["agreement"] = [{"a": a, "b": b, **metric.compute()}
                                     for (a, b), metric in zip(self.agreement_pairs, self.agreement)]


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
        self.data.trainer = self.trainer
        self.data.setup("validate")
        self.data.batch_size_per_process = self.batch_size  # the pass's own batches, not training's
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
        loaders = [self.data.evaluation_dataloader(source, fixed_batches(order, self.batch_size, rank, world), local=True)
                   for source, orders in self.orders.items() for order in orders]
        return loaders[0] if len(loaders) == 1 else loaders

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        return self.data.on_after_batch_transfer(batch, dataloader_idx)

    def training_images(self, count: int):
        """``count`` training images drawn as the pass's are (un-augmented, normalised, on the device), the same
        on every process."""
        labels, device = self.data.labels("train"), self.trainer.strategy.root_device
        for batch in self.data.evaluation_dataloader("train", pass_images(labels, count, self.seed)[0], local=True):
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


def compare(networks: dict[str, str], pairs: list[tuple[str, str]] = (), matrix: list[str] = (),
            matrix_layer: Optional[str] = PENULTIMATE, agreement: bool = False, data=None, batch_size: int = 250,
            images: Optional[int] = None, bn_images: int = 2000, seed: int = 0, epochs: int = 1, stem: bool = False,
            trainer: Optional[L.Trainer] = None) -> dict:
    """CKA (``pairs``: layer x layer, the stem's output first with ``stem``; ``matrix``: ``matrix_layer`` between
    every two) and prediction agreement of ``networks`` ({name: run folder or .ckpt, optionally @untrained}) on
    ``images`` validation images of ``data`` (the first network's run's data module by default) drawn by
    ``pass_images`` from ``seed``, read ``epochs`` times; returns the results (on every process), with what was read
    under ``images``. Every network must have one backbone; those of ``matrix`` one head too when ``agreement``."""
    if batch_size < 4:
        raise ComparisonError(f"batch_size {batch_size}: unbiased HSIC needs more than 3 images per batch (it divides by n(n-3)).")
    loaded = [load_network(name, ref, seed) for name, ref in networks.items()]
    check_comparable(loaded, classes=False)
    if agreement and matrix:  # predictions are compared: the same classes
        check_comparable([x for x in loaded if x.name in matrix])
    layers = compared_layers(loaded[0], stem)
    if matrix_layer is not None and matrix and matrix_layer not in layers:
        raise ComparisonError(f"matrix layer {matrix_layer!r} is not a layer of {loaded[0].name}; its layers: "
                              f"{', '.join(layers)}.")
    if data is None:
        data = data_module_of(run_folder_of(loaded[0].source))
    images_module = FixedImages(data, batch_size, images, min_last_batch=4, seed=seed, epochs=epochs)
    trainer = trainer or pass_trainer()
    module = Comparison(loaded, list(pairs), matrix_layer, list(matrix), agreement, bn_images, stem)
    trainer.validate(module, datamodule=images_module, verbose=False)
    return {**module.results, "images": images_module.record()}


def pass_trainer(accelerator: str = "auto", devices: str = "auto", num_nodes: int = 1) -> L.Trainer:
    """The Trainer of a between-model pass (CKA, barriers, criticality): validation only, nothing logged or saved."""
    return L.Trainer(accelerator=accelerator, devices=devices, num_nodes=num_nodes, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False)


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
