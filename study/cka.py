"""Between-model CKA and prediction agreement (Kornblith et al. 2021, Figures 2 and C.4; the talk's tables by stage):
the pass on Lightning's Trainer, and the report's section and figures on it.

All networks see the same images in one pass (``passes.FixedImages``). Each network's block outputs (hooked after the
block's final ReLU) and penultimate features are reduced to Gram matrices inside the forward hooks (so an in-place
ReLU later in the network cannot change what was captured, and no activations are held), each computed once per
batch and shared by every comparison that needs it (``measurements.MinibatchCKA``). With ``stem``, the stem's output
comes first: the first block's input, reduced by a hook that runs before that block (the block could otherwise write
into its input in place).

CKA needs networks of one backbone only: the blocks and the penultimate features do not depend on the head, so a
pre-trained network (its task's classes) compares with one fine-tuned from it (the target's). Prediction agreement
needs equal heads as well (``passes.check_comparable``).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import lightning as L
import numpy as np
import torch
from torch.optim.swa_utils import update_bn

from measurements import MinibatchCKA, PredictionAgreement, gram

from .passes import (PENULTIMATE, STEM, ComparisonError, FixedImages, Loaded, check_comparable, checkpoint_hparams,
                     data_module_of, load_network, pass_trainer, run_folder_of, shared_distance)
from .plotting import pyplot, save_figure
from .spec import RunName, parse_run_name

__all__ = ["Comparison", "SeedBlock", "agreement_by_experiment", "agreement_matrix", "cka_section", "compare",
           "cka_parts", "cross_seed", "figure_agreement", "figure_two", "pair_kind", "representation_findings", "representation_lines",
           "representations"]


def compared_layers(loaded: Loaded, stem: bool) -> list[str]:
    """The layers a comparison hooks in forward order: the stem's output when ``stem``, each block, penultimate."""
    return [STEM, *loaded.layers] if stem else loaded.layers


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
                update_bn(self.trainer.datamodule.training_images(self.bn_images), loaded.module.eval_network)

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

        def reduce(name: str, x: torch.Tensor) -> None:
            with torch.autocast(x.device.type, enabled=False):
                grams[name] = gram(x)

        blocks = [n for n in needed if n not in (PENULTIMATE, STEM)]
        with network.hooked(blocks, reduce, (lambda x: reduce(STEM, x)) if STEM in needed else None):
            features = network(images)
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


# --- the report's section and figures ---


def trained_run(name: str) -> Optional[RunName]:
    """A study's trained run named <experiment>/seed<k>; None for a network named otherwise (a path, @untrained)."""
    parsed = parse_run_name(name)
    return parsed if parsed and not parsed.untrained else None


def experiment_of(name: str) -> str:
    """The experiment of a run named <experiment>/seed<k>; a network named otherwise (a path) is its own."""
    parsed = trained_run(name)
    return parsed.experiment if parsed else name


def seed_of(name: str) -> Optional[int]:
    """The seed of a run named <experiment>/seed<k>; None for a network named otherwise."""
    parsed = trained_run(name)
    return parsed.seed if parsed else None


@dataclass
class SeedBlock:
    """Figure 2b: one layer's CKA with rows the runs of ``row_seed`` and columns those of ``column_seed``;
    ``same[i, j]``: row i and column j are one experiment (the paper's diagonal, two initialisations)."""
    rows: list[str]
    columns: list[str]
    cka: np.ndarray
    same: np.ndarray
    row_seed: Optional[int]
    column_seed: Optional[int]

    @property
    def crossed(self) -> bool:
        """Rows and columns of different seeds; otherwise the diagonal compares each run with itself."""
        return self.column_seed is not None


def cross_seed(matrix: dict) -> SeedBlock:
    """The block of cka.json's ``matrix`` (every two of its runs; ``study_cka`` puts the runs of two seeds in it)
    with rows its row seed's runs (``seed``) and columns its column seed's (``column_seed``), each ordered by
    experiment. Without a column seed (a study of one seed, or networks named by path) the whole matrix."""
    runs, values = matrix["runs"], np.array(matrix["cka"], dtype=float)
    row_seed, column_seed = matrix.get("seed"), matrix.get("column_seed")
    matches = [trained_run(n) for n in runs]
    if column_seed is None or not all(matches):
        return SeedBlock(runs, runs, values, np.eye(len(runs), dtype=bool), row_seed, None)
    order = list(dict.fromkeys(m.experiment for m in matches))

    def of_seed(seed: int) -> list[int]:
        found = [i for i, m in enumerate(matches) if m.seed == seed]
        return sorted(found, key=lambda i: order.index(matches[i].experiment))

    rows, columns = of_seed(row_seed), of_seed(column_seed)
    same = np.array([[matches[i].experiment == matches[j].experiment for j in columns] for i in rows], dtype=bool)
    return SeedBlock([runs[i] for i in rows], [runs[j] for j in columns], values[np.ix_(rows, columns)],
                     same.reshape(len(rows), len(columns)), row_seed, column_seed)


def figure_two(cka: dict, path: Path) -> Path:
    """Block x block CKA heatmaps of the chosen pairs (Figure 2a) and one layer's CKA between the experiments'
    runs of one seed (rows) and of another (columns), so that the diagonal is one objective from two
    initialisations (Figure 2b; ``cross_seed``)."""
    plt = pyplot()
    pairs = cka.get("pairs", [])
    panels = len(pairs) + (1 if cka.get("matrix") else 0)
    figure, axes = plt.subplots(1, panels, figsize=(3.6 * panels, 3.6), squeeze=False)
    for ax, pair in zip(axes[0], pairs):
        image = ax.imshow(np.array(pair["cka"]), vmin=0, vmax=1, cmap="magma", origin="lower")
        ax.set_title(f"{pair['a']} (rows)\nvs {pair['b']}", fontsize=7)
        ax.set_xticks(range(len(pair["layers_b"])), pair["layers_b"], rotation=90, fontsize=5)
        ax.set_yticks(range(len(pair["layers_a"])), pair["layers_a"], fontsize=5)
    if cka.get("matrix"):
        block = cross_seed(cka["matrix"])
        ax = axes[0][-1]
        image = ax.imshow(block.cka, vmin=0, vmax=1, cmap="magma")
        ax.set_xticks(range(len(block.columns)), block.columns, rotation=90, fontsize=5)
        ax.set_yticks(range(len(block.rows)), block.rows, fontsize=5)
        seeds = (f"rows seed {block.row_seed}, columns seed {block.column_seed}" if block.crossed
                 else "diagonal: each run with itself")
        ax.set_title(f"CKA of {cka['matrix']['layer']}\n{seeds}", fontsize=8)
    figure.subplots_adjust(wspace=0.6)
    figure.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    figure.suptitle("Figure 2: linear CKA (minibatch, unbiased HSIC)", fontsize=10)
    return save_figure(figure, path, tight=False)


def _spread(values, digits: int = 2) -> str:
    """mean, min and max of ``values`` (NaN left out), or a dash without any."""
    values = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if not len(values):
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"mean {values.mean():.{digits}f}, min {values.min():.{digits}f}, max {values.max():.{digits}f}"


def cka_section(cka: dict) -> list[str]:
    lines = ["## Figure 2: between-model CKA", ""]
    for a, b in cka.get("skipped_pairs", []):
        lines.append(f"- {a} vs {b}: not computed, a run is missing")
    for pair in cka.get("pairs", []):
        diagonal = np.diag(np.array(pair["cka"])) if len(pair["layers_a"]) == len(pair["layers_b"]) else []
        summary = (f"diagonal from {diagonal[0]:.2f} ({pair['layers_a'][0]}) to {diagonal[-1]:.2f} ({pair['layers_a'][-1]})"
                   if len(diagonal) else "")
        lines.append(f"- {pair['a']} vs {pair['b']}: {summary}")
    if cka.get("matrix"):
        block, layer = cross_seed(cka["matrix"]), cka["matrix"]["layer"]
        if block.crossed:
            diagonal = {experiment_of(block.rows[i]): block.cka[i, j] for i, j in zip(*np.nonzero(block.same))}
            lines.append(f"- Figure 2b, {layer} CKA, rows: the experiments' runs of seed {block.row_seed}, columns: their runs "
                         f"of seed {block.column_seed}. Same objective, different initialisation (the diagonal, "
                         f"{len(diagonal)} experiments): {_spread(diagonal.values())}; different objectives (off the "
                         f"diagonal, {int((~block.same).sum())} pairs of runs): {_spread(block.cka[~block.same])}.")
            if diagonal:
                lines.append("  The diagonal by experiment: " + ", ".join(f"{e} {v:.2f}" for e, v in diagonal.items()) + ".")
        else:
            why = ", the study has one seed" if "column_seed" in cka["matrix"] else ""
            seed = f" of seed {block.row_seed}" if block.row_seed is not None else ""
            lines.append(f"- {layer} CKA between the {len(block.rows)} runs{seed}: between different runs "
                         f"{_spread(block.cka[~block.same])}; the diagonal compares each run with itself (1 by "
                         f"definition{why}), not two initialisations of one objective as the paper's does.")
    if cka.get("agreement"):
        found = agreement_by_experiment(cka["agreement"])
        lines += ["", "Prediction agreement on validation (Figure C.4, figure_c4_agreement.png): the fraction of images two "
                      "runs predict alike, and among those both get wrong, the fraction with the same wrong prediction. "
                      "Within: two runs of the experiment from different seeds; between: a run of the experiment and a "
                      "run of another from a different seed, so that both compare different initialisations; same seed: "
                      "a run of another experiment from the same seed (one initialisation, data order and augmentation: "
                      "apart, since that alone makes runs agree).", "",
                  "| experiment | agreement within | agreement between | agreement between, same seed | same wrong within "
                  "| same wrong between |", "|---|---|---|---|---|---|"]
        for name, row in found.items():
            lines.append(f"| {name} | {_spread(row['within']['agreement'], 3)} | {_spread(row['between']['agreement'], 3)} | "
                         f"{_spread(row['same_seed']['agreement'], 3)} | {_spread(row['within']['shared_wrong'], 3)} | "
                         f"{_spread(row['between']['shared_wrong'], 3)} |")
        kinds = {kind: [r for r in cka["agreement"] if pair_kind(r) == kind] for kind in ("within", "between", "same_seed")}
        lines.append(f"| all ({len(kinds['within'])} pairs within, {len(kinds['between'])} between, "
                     f"{len(kinds['same_seed'])} same seed) | "
                     + " | ".join(_spread([r[key] for r in kinds[kind]], 3)
                                  for key, kind in (("agreement", "within"), ("agreement", "between"),
                                                    ("agreement", "same_seed"), ("shared_wrong", "within"),
                                                    ("shared_wrong", "between"))) + " |")
        if not kinds["within"]:
            lines += ["", "No experiment has two seeds in the comparison: agreement within objectives is not measured."]
    return lines + [""]


def pair_kind(row: dict) -> str:
    """``within`` (one experiment, different seeds), ``between`` (different experiments and seeds) or ``same_seed``
    (different experiments, one seed: one initialisation and data order)."""
    if experiment_of(row["a"]) == experiment_of(row["b"]):
        return "within"
    same = seed_of(row["a"]) is not None and seed_of(row["a"]) == seed_of(row["b"])
    return "same_seed" if same else "between"


def agreement_by_experiment(rows: list[dict]) -> dict[str, dict[str, dict[str, list[float]]]]:
    """Figure C.4 by experiment, from the agreement of every two runs (cka.json's ``agreement``): for each
    experiment, its pairs of each ``pair_kind``, each a list per statistic."""
    experiments = list(dict.fromkeys(experiment_of(n) for r in rows for n in (r["a"], r["b"])))
    keys = [k for k in rows[0] if k not in ("a", "b")] if rows else []
    found = {e: {kind: {k: [] for k in keys} for kind in ("within", "between", "same_seed")} for e in experiments}
    for row in rows:
        for experiment in dict.fromkeys((experiment_of(row["a"]), experiment_of(row["b"]))):
            for key in keys:
                found[experiment][pair_kind(row)][key].append(row[key])
    return found


def agreement_matrix(rows: list[dict], key: str) -> tuple[list[str], np.ndarray]:
    """Experiment x experiment mean of ``key`` over the pairs of their runs from different seeds (``pair_kind``: runs of
    one seed share their initialisation); the diagonal: two seeds of one experiment, NaN where it has one run (never a
    run with itself)."""
    experiments = list(dict.fromkeys(experiment_of(n) for r in rows for n in (r["a"], r["b"])))
    sums, counts = np.zeros((len(experiments),) * 2), np.zeros((len(experiments),) * 2)
    for row in rows:
        value = row[key]
        if value is None or not math.isfinite(value) or pair_kind(row) == "same_seed":
            continue
        i, j = experiments.index(experiment_of(row["a"])), experiments.index(experiment_of(row["b"]))
        for x, y in {(i, j), (j, i)}:
            sums[x, y] += value
            counts[x, y] += 1
    with np.errstate(invalid="ignore"):
        return experiments, np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def figure_agreement(cka: dict, path: Path) -> Optional[Path]:
    """Figure C.4: for every two experiments, the fraction of validation images with the same prediction, and among
    those both get wrong, the fraction with the same wrong prediction, each the mean over their runs' pairs of
    different seeds; the diagonal: two seeds of one experiment (``agreement_matrix``)."""
    rows = cka.get("agreement") or []
    if not rows:
        return None
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(10.0, 4.6))
    for ax, key, title in zip(axes, ("agreement", "shared_wrong"), ("same prediction", "same wrong prediction, among both wrong")):
        names, matrix = agreement_matrix(rows, key)
        image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
        ax.set_yticks(range(len(names)), names, fontsize=6)
        ax.set_title(title, fontsize=9)
    figure.subplots_adjust(wspace=0.6)
    figure.colorbar(image, ax=axes.tolist(), shrink=0.8)
    figure.suptitle("Figure C.4: prediction agreement, mean over pairs of runs from different seeds (diagonal: two seeds of one objective)", fontsize=10)
    return save_figure(figure, path, tight=False)


def _pair_kind(pair: dict, kinds: dict[str, str]) -> str:
    return f"{kinds.get(pair['a'], '?')} & {kinds.get(pair['b'], '?')}"


def representation_lines(found: Optional[dict], kinds: dict[str, str]) -> list[str]:
    """The talk's three tables between pairs of runs (``representations``; ``kinds``: each run's kind, P, P-T or
    RI-T): CKA of each stage with the same stage of the other network; ℓ2 distance whole and per module, naming what
    was left out; and, between runs with the target's head, prediction agreement and who alone is right. [] without
    them (an older transfer.json)."""
    if not found:
        return []
    lines = ["### Representations, distances and mistakes between runs (the talk's tables)", ""]
    if found.get("skipped"):
        lines += [f"Pairs not computed, a run is not finished: {', '.join(' – '.join(p) for p in found['skipped'])}.", ""]
    pairs = found.get("pairs") or []
    if not pairs:
        return lines
    read = found.get("images") or {}
    val = read.get("val") or {}
    images = (f"{val.get('images', '?')} test images of {found.get('images_of', '?')}'s target ({val.get('classes', '?')} "
              f"classes), drawn class-balanced from seed {read.get('seed', '?')}")
    layers = found.get("layers") or list(pairs[0]["cka"])
    lines += [f"Linear CKA (minibatch, unbiased HSIC) of each stage with the same stage of the other network: the stem's "
              f"output, each block, the penultimate features; on {images}. The talk: P-T models are similar to each "
              "other and to P in the lower layers, RI-T models are not, even to each other.", "",
              "| pair | kinds | " + " | ".join(layers) + " |", "|---|---|" + "---|" * len(layers)]
    for pair in pairs:
        cells = ["–" if pair["cka"].get(layer) is None else f"{pair['cka'][layer]:.3f}" for layer in layers]
        lines.append(f"| {pair['a']} – {pair['b']} | {_pair_kind(pair, kinds)} | " + " | ".join(cells) + " |")
    modules = list(dict.fromkeys(m for pair in pairs for m in pair["distance"] if m != "all"))
    lines += ["", "‖θ_a − θ_b‖₂ of the evaluated weights, whole network and per module, over the parameters both "
              "networks hold with equal shapes; those left out (a head of other classes) are named, and a row that leaves "
              "some out has its 'all' over the rest. The talk: two P-T models are much closer to each other than two "
              "RI-T models.", "",
              "| pair | kinds | all | " + " | ".join(modules) + " | left out |", "|---|---|---|" + "---|" * (len(modules) + 1)]
    for pair in pairs:
        d = pair["distance"]
        cells = ["–" if d.get(m) is None else f"{d[m]:.2f}" for m in modules]
        lines.append(f"| {pair['a']} – {pair['b']} | {_pair_kind(pair, kinds)} | {d['all']:.2f} | " + " | ".join(cells)
                     + f" | {', '.join(pair.get('left_out') or []) or 'none'} |")
    judged = [pair for pair in pairs if pair.get("errors")]
    if judged:
        lines += ["", f"Where the runs err, on the same {val.get('images', '?')} test images: agreement, the fraction "
                  "predicted alike; same mistake, among the images both get wrong, the fraction with the same wrong "
                  "class; and who is right: both, a (the pair's first) alone, b alone, neither (these four sum to 100 %). "
                  "Pairs with a head of other classes (P) have no row. The talk: P-T models make similar mistakes (two "
                  "of them agree more and share more mistakes than two RI-T models).", "",
                  "| pair | kinds | agreement (%) | same mistake (%) | both right (%) | a alone (%) | b alone (%) | "
                  "both wrong (%) |", "|---|---|---|---|---|---|---|---|"]
        for pair in judged:
            e = pair["errors"]
            same = "–" if e["shared_wrong"] is None or math.isnan(e["shared_wrong"]) else f"{100 * e['shared_wrong']:.1f}"
            lines.append(f"| {pair['a']} – {pair['b']} | {_pair_kind(pair, kinds)} | {100 * e['agreement']:.1f} | {same} | "
                         f"{100 * e['both_right']:.1f} | {100 * e['a_right_alone']:.1f} | {100 * e['b_right_alone']:.1f} | "
                         f"{100 * e['both_wrong']:.1f} |")
    return lines + [""]


def representation_findings(found: Optional[dict], kinds: dict[str, str]) -> list[str]:
    """The talk's three findings between runs, each said as these runs' numbers come out: two P-T runs against two
    RI-T runs, by the mean over the pairs of each kind (``kinds``: as ``representation_lines``)."""
    pairs = (found or {}).get("pairs") or []
    if not pairs:  # an older transfer.json, or no pair finished: nothing to say, and nothing of the runs needed
        return []
    by_kind: dict[str, list[dict]] = {}
    for pair in pairs:
        by_kind.setdefault(_pair_kind(pair, kinds), []).append(pair)
    pt, rit = by_kind.get("P-T & P-T", []), by_kind.get("RI-T & RI-T", [])
    if not pt or not rit:
        return []
    mean = lambda rows, value: float(np.mean([value(r) for r in rows]))  # noqa: E731
    lines = []
    lowest = (found.get("layers") or list(pairs[0]["cka"]))[0]
    a, b = mean(pt, lambda r: r["cka"][lowest]), mean(rit, lambda r: r["cka"][lowest])
    to_p = [r for k, rows in by_kind.items() if k in ("P-T & P", "P & P-T") for r in rows]
    with_p = f", P-T & P {mean(to_p, lambda r: r['cka'][lowest]):.3f}" if to_p else ""
    lines.append(f"- CKA of the {lowest}: P-T & P-T {a:.3f}{with_p}, RI-T & RI-T {b:.3f}: two P-T runs are "
                 f"{'more' if a > b else 'not more'} alike in the lowest layer than two RI-T runs.")
    a, b = mean(pt, lambda r: r["distance"]["all"]), mean(rit, lambda r: r["distance"]["all"])
    lines.append(f"- ‖θ_a − θ_b‖₂: P-T & P-T {a:.2f}, RI-T & RI-T {b:.2f}: two P-T runs are {'closer' if a < b else 'not closer'} "
                 f"to each other than two RI-T runs.")
    if all(r.get("errors") for r in pt + rit):
        a, b = mean(pt, lambda r: r["errors"]["agreement"]), mean(rit, lambda r: r["errors"]["agreement"])
        lines.append(f"- Prediction agreement: P-T & P-T {100 * a:.1f} %, RI-T & RI-T {100 * b:.1f} %: two P-T runs "
                     f"{'agree more' if a > b else 'do not agree more'} than two RI-T runs.")
    return lines


def cka_parts(cka: dict, out: Path) -> tuple[list[str], list[Path]]:
    """The CKA and agreement section and its figures (Figure 2, Figure C.4)."""
    return cka_section(cka), [figure_two(cka, out / "figure2_cka.png"), figure_agreement(cka, out / "figure_c4_agreement.png")]


