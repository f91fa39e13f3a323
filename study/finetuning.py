"""The report's section on what is transferred (Neyshabur et al. 2020), from ``<report>/transfer.json``
(``analyse.analyse_transfer``): fine-tuning P-T against RI-T (final test accuracy and loss, mean ± s.e. over seeds,
and how fast each gets there), learning curves, block shuffling, which pre-training checkpoint transfers best, the
grids' choices, Table 2 of Kornblith et al. (fine-tuned accuracy by pre-training objective); then the barriers',
criticality's and the talk's tables (``barriers``, ``criticality``, ``cka``); and a plain statement of which of the
talk's findings these runs show.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np

from .barriers import barrier_findings, barrier_lines, figure_barriers
from .cka import representation_findings, representation_lines
from .criticality import criticality_findings, criticality_lines, figure_criticality
from .plotting import pyplot, save_figure
from .statistics import ALPHA, T_TEST, T_TESTS, Cell, anova_objective_p, column

__all__ = ["FRACTION", "compared", "findings", "main_arms", "steps_to_reach", "table_two", "transfer_section"]

FRACTION = 0.9  # training speed: the first step at which test accuracy reaches this fraction of the run's final
KIND = {"P-T": "P-T", "RI-T": "RI-T", "pre-training": "P"}  # the talk's names of the runs


def steps_to_reach(curve: list[tuple[int, float]], fraction: float = FRACTION) -> Optional[int]:
    """The first step whose test accuracy is at least ``fraction`` of the run's last (a training-speed measure)."""
    if not curve:
        return None
    target = fraction * curve[-1][1]
    return next(step for step, value in curve if value >= target)


def _groups(runs: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for run in runs:
        if run["kind"] != "pre-training" and not run.get("validation_split") and run["curve"]["accuracy"]:
            groups.setdefault(run["experiment"], []).append(run)
    return groups


def _summary(group: list[dict]) -> dict:
    return {"acc": [r["curve"]["accuracy"][-1][1] for r in group],
            "loss": [r["curve"]["loss"][-1][1] for r in group if r["curve"]["loss"]],
            "speed": [steps_to_reach(r["curve"]["accuracy"]) for r in group]}


def transfer_section(transfer: dict, out: Path, t_test: str = T_TEST) -> tuple[list[str], list[Path]]:
    """Markdown lines and figures of the section (module docstring); ``t_test``: Table 2's per-data-set test."""
    groups = _groups(transfer["runs"])
    lines = ["## What is being transferred (Neyshabur et al. 2020)", ""]
    if transfer.get("missing"):
        lines += [f"Runs not finished, in no number below: {', '.join(transfer['missing'])}.", ""]
    lines += ["### Fine-tuning: P-T (from the pre-trained network) and RI-T (from random initialisation)", "",
              f"Test accuracy ({measures(transfer['runs'])}) and loss at the end of fine-tuning, mean ± s.e. over seeds; "
              f"speed: the first step at which test accuracy reaches {FRACTION:.0%} of the run's final.", "",
              "Hyper-parameters: the point the experiment's grid chose on held-out images (below), or the config's fixed "
              "one where it has no grid.", "",
              "| experiment | target | kind | pre-training epoch | block size | hyper-parameters | seeds | test accuracy (%) "
              f"| test loss | steps to {FRACTION:.0%} | ‖θ − θ_start‖₂ |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    summaries = {}
    for name, group in groups.items():
        first = group[0]
        summaries[name] = s = _summary(group)
        epoch = "–" if first["pretraining_epoch"] is None else first["pretraining_epoch"]
        block = first["block_shuffle"] or "none"
        tuned = " (grid)" if name in transfer.get("grids", {}) else " (fixed)"
        lines.append(f"| {name} | {first['target']} | {first['kind']} | {epoch} | {block} | {first.get('hyper', '?')}{tuned} | {len(group)} | "
                     f"{Cell.of(s['acc']).text(100)} | "
                     f"{Cell.of(s['loss']).text(1, 3)} | {Cell.of(s['speed']).text(1, 0)} | "
                     f"{Cell.of([r.get('distance_from_start') for r in group]).text(1, 2)} |")
    lines.append("")
    figures = [figure_learning_curves(groups, out / "figure_transfer_learning_curves.png"),
               figure_block_shuffle(groups, summaries, out / "figure_transfer_block_shuffle.png"),
               figure_checkpoint_choice(groups, summaries, transfer.get("checkpoint_probes", {}),
                                        out / "figure_transfer_checkpoint_epoch.png")]
    for name, grid in transfer.get("grids", {}).items():
        lines += grid_lines(name, grid)
    lines += checkpoint_lines(groups, summaries, transfer.get("checkpoint_probes", {}))
    lines += table_two(transfer["runs"], t_test)
    lines += barrier_lines(transfer["barriers"])
    if transfer["barriers"]:
        figures.append(figure_barriers(transfer["barriers"], out / "figure_transfer_barriers.png"))
    lines += criticality_lines(transfer["criticality"])
    lines += representation_lines(transfer.get("representations"), _kinds(transfer))
    if transfer["criticality"]:
        figures.append(figure_criticality(transfer["criticality"], out / "figure_transfer_criticality.png"))
    lines += findings(groups, summaries, transfer)
    return lines, [f for f in figures if f is not None]


def measures(runs: list[dict]) -> str:
    """The accuracy measures of ``runs``' targets in words (Table A.2)."""
    words = {"top1": "top-1", "mean_per_class": "mean per-class accuracy"}
    found = {words[r["measure"]] + ("" if r["measure"] == "top1" else f" on {r['target']}") for r in runs
             if r["kind"] != "pre-training"}
    return "; ".join(sorted(found)) or "top-1"


def grid_lines(name: str, grid: dict) -> list[str]:
    """Appendix A.3's choice for one experiment: held-out accuracy at every (lr, weight decay) point, the chosen in bold."""
    lrs = list(dict.fromkeys(p["lr_per_256"] for p in grid["points"]))
    by_lr = {lr: [p for p in grid["points"] if p["lr_per_256"] == lr] for lr in lrs}
    decays = [f"lr x wd = {p['lr_times_weight_decay']:.3g}" if p["lr_times_weight_decay"] else "no decay" for p in by_lr[lrs[0]]]
    lines = [f"Hyper-parameters of {name} (appendix A.3): accuracy (%) on the {grid['validation_split']:.0%} of the training "
             f"images held out, the mean over {_seeds(grid)}; **bold**: chosen, then refit on all of them and tested above"
             f"{'' if grid['chosen'] else ' (not yet: the grid has unfinished runs)'}.", "",
             "| lr_per_256 | " + " | ".join(decays) + " |", "|---|" + "---|" * len(decays)]
    for lr, points in by_lr.items():
        cells = ["–" if p["held_out_accuracy"] is None else f"{100 * p['held_out_accuracy']:.1f}" for p in points]
        cells = [f"**{c}**" if p["point"] == grid["chosen"] else c for c, p in zip(cells, points)]
        lines.append(f"| {lr:g} | " + " | ".join(cells) + " |")
    return lines + [""]


def _seeds(grid: dict) -> str:
    n = len(grid["points"][0]["per_seed"])
    return "one seed" if n == 1 else f"{n} seeds"


def _from_checkpoints(groups: dict) -> list[tuple[int, str]]:
    """(pre-training epoch, experiment) of the un-shuffled P-T experiments started from checkpoints of one pre-training
    objective, on the by-epoch arms' target (that of the earliest start: a contrast target fine-tuned from the last
    checkpoint only is not one of them), by epoch; [] when they all start at one epoch (a study that compares
    objectives, as Table 2's, not checkpoints)."""
    found = sorted({(g[0]["pretraining_epoch"], n, g[0]["target"], g[0].get("pretraining_objective") or "")
                    for n, g in groups.items()
                    if g[0]["kind"] == "P-T" and not g[0]["block_shuffle"] and g[0]["pretraining_epoch"] is not None})
    if not found:
        return []
    first = found[0][2:]
    chosen = [(epoch, name) for epoch, name, *of in found if tuple(of) == first]
    return chosen if len({epoch for epoch, _ in chosen}) > 1 else []


def compared(groups: dict) -> dict:
    """The experiments P-T and RI-T are compared by: RI-T, and P-T from the last pre-training checkpoint (not the
    arms fine-tuned from earlier ones)."""
    last = max((g[0]["pretraining_epoch"] or 0 for g in groups.values() if g[0]["kind"] == "P-T"), default=0)
    return {n: g for n, g in groups.items() if g[0]["kind"] == "RI-T" or g[0]["pretraining_epoch"] == last}


def main_arms(groups: dict) -> dict[str, dict[str, str]]:
    """target -> kind -> its un-shuffled experiment: P-T from the last pre-training checkpoint, RI-T."""
    arms: dict[str, dict[str, str]] = {}
    for name, group in compared(groups).items():
        if not group[0]["block_shuffle"]:
            arms.setdefault(group[0]["target"], {}).setdefault(group[0]["kind"], name)
    return arms


def checkpoint_lines(groups: dict, summaries: dict, probes: dict) -> list[str]:
    """Which pre-training checkpoint transfers best: by pre-training epoch, the test accuracy fine-tuned from it
    (P-T) and its frozen features' probes (linear, kNN) on each target, as the pre-training run measured them."""
    tuned = _from_checkpoints(groups)
    columns = [(run, tag) for run, rows in probes.items() for tag in dict.fromkeys(t for r in rows for t in r["probes"])]
    epochs = sorted({e for e, _ in tuned} | {r["epoch"] for rows in probes.values() for r in rows})
    if len(epochs) < 2:
        return []
    header = ["fine-tuned (P-T)"] + [f"{run}: {tag.split('/')[1]} {tag.split('/')[2].split('_')[0]} probe" for run, tag in columns]
    lines = ["### Which pre-training checkpoint transfers best", "",
             "Test accuracy (%) by the pre-training epoch of the starting checkpoint (0: the initialisation): fine-tuned "
             "from it, mean ± s.e. over fine-tuning seeds, and its frozen penultimate features probed (appendix A.2), as "
             "the pre-training run measured them at that epoch.", "",
             "| epoch | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
    for epoch in epochs:
        names = [n for e, n in tuned if e == epoch]
        cells = [", ".join(f"{Cell.of(summaries[n]['acc']).text(100)} ({n})" for n in names) or "–"]
        for run, tag in columns:
            value = next((r["probes"].get(tag) for r in probes[run] if r["epoch"] == epoch), None)
            cells.append("–" if value is None else f"{100 * value:.1f}")
        lines.append(f"| {epoch} | " + " | ".join(cells) + " |")
    return lines + [""]


def table_two(runs: list[dict], test: str = T_TEST) -> list[str]:
    """Table 2 (Kornblith et al.): fine-tuned test accuracy by pre-training objective x target, mean ± s.e. over
    runs (pre-training or fine-tuning seeds); bold as Table 1 per data set (``column``: the paper's "t-test",
    ``test`` "welch" or "student", Welch's by default for the reason ``report.T_TEST`` gives), and in the average
    column by the objective's main effect in a two-way ANOVA against the best objective. Shown when P-T runs
    start from at least two objectives; un-shuffled runs from each pre-training run's last checkpoint only."""
    final = [r for r in runs if r["kind"] == "P-T" and not r["block_shuffle"] and not r.get("validation_split")
             and r["curve"]["accuracy"]]
    last = {}
    for r in final:  # the last pre-training epoch among the runs of one objective
        last[r["pretraining_objective"]] = max(last.get(r["pretraining_objective"], -1), r["pretraining_epoch"] or 0)
    final = [r for r in final if (r["pretraining_epoch"] or 0) == last[r["pretraining_objective"]]]
    objectives = list(dict.fromkeys(r["pretraining_objective"] for r in final))
    targets = list(dict.fromkeys(r["target"] for r in final))
    if len(objectives) < 2:
        return []
    acc = {(o, t): [100 * r["curve"]["accuracy"][-1][1] for r in final if (r["pretraining_objective"], r["target"]) == (o, t)]
           for o in objectives for t in targets}
    columns = {t: column({o: Cell(acc[o, t]) for o in objectives if acc[o, t]}, test=test) for t in targets}
    means = {o: Cell([float(np.mean([np.mean(acc[o, t]) for t in targets if acc[o, t]]))]) for o in objectives}
    best = max(means, key=lambda o: means[o].mean)
    rows = lambda o: [(o, t, v) for t in targets for v in acc[o, t]]  # noqa: E731
    average = len(targets) > 1  # an average column only over more than one data set, as in Table 1
    lines = ["### Table 2: fine-tuned test accuracy (%) by pre-training objective", "",
             f"In each target's measure ({measures(final)}). Mean ± s.e. over runs; **bold**: the best and those not significantly worse (p ≥ {ALPHA}; per data set a "
             f"two-sided {T_TESTS[test]} t-test, the average by the objective's main effect in a two-way ANOVA, objective x "
             "data set, against the best).", "", "| objective | " + " | ".join(targets) + (" | Avg |" if average else " |"),
             "|---|" + "---|" * (len(targets) + average)]
    for o in objectives:
        cells = []
        for t in targets:
            cell = columns[t].get(o)
            text = "–" if cell is None else cell.text()
            cells.append(f"**{text}**" if cell is not None and cell.bold else text)
        if average:
            p = None if o == best else anova_objective_p(rows(o) + rows(best))
            mean = f"{means[o].mean:.1f}"
            cells.append(f"**{mean}**" if o == best or (p is not None and not math.isnan(p) and p >= ALPHA) else mean)
        lines.append(f"| {o} | " + " | ".join(cells) + " |")
    return lines + [""]


def _kinds(transfer: dict) -> dict[str, str]:
    """Each run's kind in the talk's words, P (pre-training), P-T, RI-T, where the talk's tables name runs."""
    if not transfer.get("representations"):
        return {}
    return {r["run"]: KIND.get(r["kind"], r["kind"]) for r in transfer["runs"]}


def findings(groups: dict, summaries: dict, transfer: dict) -> list[str]:
    """The talk's findings, each checked against these runs' numbers, said as they come out."""
    arms = main_arms(groups)
    lines = ["### Which of the talk's findings these runs show", ""]
    for target, main in arms.items():
        if "P-T" in main and "RI-T" in main:
            pt, rit = summaries[main["P-T"]], summaries[main["RI-T"]]
            better = np.mean(pt["acc"]) > np.mean(rit["acc"])
            faster = np.mean([s for s in pt["speed"] if s is not None]) < np.mean([s for s in rit["speed"] if s is not None])
            lines.append(f"- On {target}, P-T trains {'better' if better else 'no better'} than RI-T "
                         f"({100 * np.mean(pt['acc']):.1f} % vs {100 * np.mean(rit['acc']):.1f} % test accuracy) and "
                         f"{'faster' if faster else 'not faster'} ({np.mean([s for s in pt['speed'] if s is not None]):.0f} "
                         f"vs {np.mean([s for s in rit['speed'] if s is not None]):.0f} steps to {FRACTION:.0%} of final).")
    shuffled = {}  # (target, block size) -> kind -> mean final accuracy (P-T from the last pre-training checkpoint)
    for name, group in compared(groups).items():
        first = group[0]
        if first["block_shuffle"]:
            shuffled.setdefault((first["target"], first["block_shuffle"]), {})[first["kind"]] = float(np.mean(summaries[name]["acc"]))
    gaps = [(t, b, 100 * (k["P-T"] - k["RI-T"])) for (t, b), k in sorted(shuffled.items()) if len(k) == 2]
    if gaps:
        lines.append("- Under block shuffling, P-T minus RI-T test accuracy: "
                     + ", ".join(f"{gap:+.1f} points at {b} px blocks ({t})" for t, b, gap in gaps) + ".")
    for kind in ("P-T", "RI-T"):  # the talk: the smaller the blocks, the more of P-T's benefit is lost
        drops = [(t, b, 100 * (1 - k[kind] / np.mean(summaries[arms[t][kind]]["acc"])))
                 for (t, b), k in sorted(shuffled.items()) if kind in k and kind in arms.get(t, {})]
        if drops:
            lines.append(f"- {kind}'s relative drop in test accuracy under block shuffling, against its un-shuffled run: "
                         + ", ".join(f"{drop:.1f} % at {b} px ({t})" for t, b, drop in drops) + ".")
    tuned = _from_checkpoints(groups)
    if len(tuned) > 1:
        best = max(tuned, key=lambda t: np.mean(summaries[t[1]]["acc"]))
        lines.append(f"- Fine-tuned from pre-training epochs {', '.join(str(e) for e, _ in tuned)}: the best start is epoch "
                     f"{best[0]} ({100 * np.mean(summaries[best[1]]['acc']):.1f} %), the last epoch {tuned[-1][0]} gives "
                     f"{100 * np.mean(summaries[tuned[-1][1]]['acc']):.1f} %.")
    for run, rows in transfer.get("checkpoint_probes", {}).items():
        for tag in dict.fromkeys(t for r in rows for t in r["probes"] if t.endswith("linear_acc")):
            points = [(r["epoch"], r["probes"][tag]) for r in rows if tag in r["probes"]]
            best = max(points, key=lambda p: p[1])
            lines.append(f"- {run}'s linear probe on {tag.split('/')[1]} is best at epoch {best[0]} ({100 * best[1]:.1f} %; "
                         f"epoch {points[-1][0]}: {100 * points[-1][1]:.1f} %).")
    lines += barrier_findings(transfer["barriers"])
    lines += criticality_findings(transfer["criticality"])
    lines += representation_findings(transfer.get("representations"), _kinds(transfer))
    return lines + [""] if len(lines) > 2 else []  # no heading over no finding


# --- figures ---


def figure_learning_curves(groups: dict, path: Path) -> Optional[Path]:
    """Test accuracy and loss against the fine-tuning step of every un-shuffled arm, a row of panels per target."""
    plain = {n: g for n, g in groups.items() if not g[0]["block_shuffle"]}
    if not plain:
        return None
    targets = list(dict.fromkeys(g[0]["target"] for g in plain.values()))
    plt = pyplot()
    fig, axes = plt.subplots(len(targets), 2, figsize=(10, 4 * len(targets)), squeeze=False)
    for name, group in plain.items():
        row = axes[targets.index(group[0]["target"])]
        for r, run in enumerate(group):
            for ax, tag in zip(row, ("accuracy", "loss")):
                curve = run["curve"].get(tag, [])
                if curve:
                    style = "-" if group[0]["kind"] == "P-T" else "--"
                    ax.plot([s for s, _ in curve], [v for _, v in curve], style, alpha=0.8,
                            label=f"{name} ({group[0]['kind']})" if r == 0 else None, color=f"C{list(plain).index(name)}")
    for target, (accuracy, loss) in zip(targets, axes):
        accuracy.set(xlabel="fine-tuning step", ylabel="test accuracy", title=f"{target}: P-T (solid) and RI-T (dashed)")
        loss.set(xlabel="fine-tuning step", ylabel="test loss", title=target)
        accuracy.legend(fontsize=7)
    return save_figure(fig, path)


def figure_block_shuffle(groups: dict, summaries: dict, path: Path) -> Optional[Path]:
    """Final accuracy and steps to 90 % against block size, P-T and RI-T (the talk's block-shuffle plot). Runs
    without shuffling count as one block the size of the image."""
    targets = {g[0]["target"] for g in groups.values() if g[0]["block_shuffle"]}
    if not targets:
        return None
    groups = {n: g for n, g in compared(groups).items() if g[0]["target"] in targets}  # un-shuffled points of the same target
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for kind, style in (("P-T", "o-"), ("RI-T", "s--")):
        points = []
        for name, group in groups.items():
            first = group[0]
            if first["kind"] != kind:
                continue
            block = first["block_shuffle"] or 32
            points.append((block, np.mean(summaries[name]["acc"]), np.mean([s for s in summaries[name]["speed"] if s is not None])))
        points.sort()
        if points:
            axes[0].plot([p[0] for p in points], [p[1] for p in points], style, label=kind)
            axes[1].plot([p[0] for p in points], [p[2] for p in points], style, label=kind)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("block size (px; 32 = not shuffled)")
    axes[0].set(ylabel="final test accuracy", title="block-shuffled target")
    axes[1].set(ylabel=f"steps to {FRACTION:.0%} of final accuracy")
    axes[0].legend()
    return save_figure(fig, path)


def figure_checkpoint_choice(groups: dict, summaries: dict, probes: dict, path: Path) -> Optional[Path]:
    """Target accuracy against the pre-training epoch of the checkpoint: fine-tuned from it (P-T) and probed."""
    tuned = _from_checkpoints(groups)
    if len(tuned) < 2 and not any(len(rows) > 1 for rows in probes.values()):
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    if tuned:
        means = [(cell.mean, cell.se) for _, n in tuned for cell in [Cell.of(summaries[n]["acc"])]]
        ax.errorbar([e for e, _ in tuned], [m for m, _ in means], yerr=[0 if math.isnan(s) else s for _, s in means],
                    fmt="o-", capsize=3, label="fine-tuned (P-T)")
    for run, rows in probes.items():
        for tag in dict.fromkeys(t for r in rows for t in r["probes"]):
            points = [(r["epoch"], r["probes"][tag]) for r in rows if tag in r["probes"]]
            style = "s--" if tag.endswith("linear_acc") else "^:"
            ax.plot([e for e, _ in points], [v for _, v in points], style, label=f"{run}: {tag.split('/')[1]} "
                    f"{tag.split('/')[2].split('_')[0]} probe")
    ax.set(xlabel="pre-training epoch of the checkpoint (0: initialisation)", ylabel="target test accuracy",
           title="Which checkpoint transfers best")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


