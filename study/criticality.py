"""Module criticality (Chatterji et al. 2020, Definition 1; Neyshabur et al. 2020, Section 3.5) as a pass on
Lightning's Trainer, and the report's table, findings and figure on it.

For every module i (a layer: a convolution or linear layer with its batch norm; or a block), point (alpha, sigma)
and noise draw, module i at (1 - alpha) theta_i^0 + alpha theta_i^F plus Gaussian noise, each tensor t's of std
sigma s_t with s_t its RMS (noise proportional to each weight matrix's norm), the other modules final; admissible when
the mean train 0-1 error over the draws is within epsilon of the final network's (or, as an option, the mean loss
within (1 + epsilon) of its loss); mu_i = min (alpha / sigma)^2 sum_t ||theta_t^F - theta_t^0||^2 / s_t^2, the
distance over the std actually added. Batch-norm moments stay the final network's (the definition perturbs weights;
the moments are not). Also every module rewound to theta_i^0 alone, on train and test. The loss is the softmax
cross-entropy of the logits as the network's objective forms them; the error is 1 - the target's accuracy measure.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal, Optional, Sequence

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn

from measurements.weight_space import module_criticality, noise_scales, parameter_distance, perturb, scaled_distance_sq

from .passes import (ComparisonError, FixedImages, Logits, LossSums, check_comparable, data_module_of, load_network,
                     pass_trainer, run_folder_of)
from .plotting import pyplot, save_figure

__all__ = ["Admissible", "Criticality", "Modules", "criticality", "criticality_findings", "criticality_lines",
           "figure_criticality"]

Admissible = Literal["error", "loss"]
Modules = Literal["layers", "blocks"]


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


def criticality(final: str, initial: str, alphas: Sequence[float], sigmas: Sequence[float], draws: int = 10,
                epsilon: float = 0.01, admissible: Admissible = "error", modules: Modules = "layers", seed: int = 0,
                data=None, images: int = 1000, batch_size: int = 250, trainer: Optional[L.Trainer] = None,
                cache: bool = True) -> dict:
    """Module criticality of the checkpoint ``final`` against ``initial`` (the same run's starting weights, e.g.
    ``checkpoints/epoch000.ckpt``) on ``images`` training (and, for rewinding, test) images drawn class-balanced
    from ``seed``; ``modules``: each convolution or linear layer with its batch norm (``Network.layers``, the
    papers'), or each block (``Network.parts``)."""
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


# --- the report's table, findings and figure ---


def criticality_lines(found: list[dict]) -> list[str]:
    if not found:
        return []
    parts = list(found[0]["modules"])
    c0 = found[0]
    rule = (f"the mean train 0-1 error ({c0.get('measure', 'top1')}) over the draws is at most the final network's + "
            f"{c0['epsilon']}" if c0.get("admissible", "loss") == "error" else
            f"the mean train loss over the draws is at most (1 + {c0['epsilon']}) × the final network's (the public "
            f"implementation's rule, not the definition's)")
    lines = ["### Module criticality (Chatterji et al. 2020)", "",
             "μ_i = min over admissible (α, σ) of α² Σ_t ‖θ_t^F − θ_t^0‖²_F / (σ s_t)²: every tensor t of module i gets noise "
             "of std σ s_t, s_t its RMS (noise proportional to each weight matrix's Frobenius norm), and μ divides by that "
             f"std; admissible when {rule}, over {c0['draws']} noise draws; modules: "
             f"{'each convolution or linear layer with its batch norm' if c0.get('modules_by') == 'layers' else 'blocks'}; "
             "'>' where no point of the grid was admissible. Below each μ: the test error (%) with that module alone "
             "rewound to its starting weights.", "",
             "| module | " + " | ".join(c["run"] for c in found) + " |", "|---|" + "---|" * len(found)]
    for part in parts:
        cells = []
        for c in found:
            m = c["modules"].get(part)
            if m is None:
                cells.append("–")
                continue
            mu = "> grid" if m["criticality"] is None else f"{m['criticality']:.3g}"
            cells.append(f"{mu} / {100 * m['rewound_test_error']:.0f} %")
        lines.append(f"| {part} | " + " | ".join(cells) + " |")
    totals = ["–" if c["network_criticality"] is None else f"{c['network_criticality']:.3g}" for c in found]
    lines.append("| network Σμ | " + " | ".join(totals) + " |")
    return lines + [""]


def criticality_findings(found: list[dict]) -> list[str]:
    """Each run's modules from least to most critical."""
    lines = []
    for c in found:
        mus = [(p, m["criticality"]) for p, m in c["modules"].items()]
        known = [(p, mu) for p, mu in mus if mu is not None]
        if known:
            low, high = min(known, key=lambda x: x[1]), max(known, key=lambda x: x[1])
            order = " < ".join(p for p, _ in sorted(known, key=lambda x: x[1]))
            lines.append(f"- {c['run']}: modules from least to most critical: {order} (μ from {low[1]:.3g} to {high[1]:.3g})"
                         f"{'; beyond the grid: ' + ', '.join(p for p, mu in mus if mu is None) if len(known) < len(mus) else ''}.")
    return lines


def figure_criticality(found: list[dict], path: Path) -> Path:
    plt = pyplot()
    parts = list(found[0]["modules"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(found)
    for k, c in enumerate(found):
        x = np.arange(len(parts)) + k * width
        mu = [c["modules"][p]["criticality"] for p in parts]
        top = max([m for m in mu if m is not None] or [1.0])
        axes[0].bar(x, [m if m is not None else top * 10 for m in mu], width, label=c["run"],
                    hatch=None, color=f"C{k}", alpha=0.85)
        axes[1].bar(x, [100 * c["modules"][p]["rewound_test_error"] for p in parts], width, label=c["run"], color=f"C{k}")
    for ax in axes:
        ax.set_xticks(np.arange(len(parts)) + 0.4 - width / 2, parts, rotation=90, fontsize=6)
    axes[0].set_yscale("symlog", linthresh=1)  # mu = 0 (the module rewound at no cost) stays visible as 0
    axes[0].set(ylabel="module criticality μ", title="criticality by module (beyond the grid: 10x the largest)")
    axes[1].set(ylabel="test error (%) with the module rewound", title="rewinding one module")
    axes[0].legend(fontsize=7)
    return save_figure(fig, path)


