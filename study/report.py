"""The study's report: its runs' numbers in the layout of the paper's tables, with the statistics the
paper uses, and its figures (Kornblith et al. 2021, Tables 1, 3, 4 and Figures 2-5).

Written to one folder:
- ``results.csv``: tidy, one row per run x evaluation x metric (experiment, run, objective, setting, seed,
  epoch, step, metric, value);
- ``report.md``: Table 1 (top-1 and linear / kNN transfer), Table 3 (class separation and sparsity) and,
  when the study sweeps the cosine-softmax temperature, Table 4; each cell the mean ± standard error over
  seeds of the runs' final evaluations; per column the best and every row not significantly different
  from it (a two-sided t-test, p ≥ 0.05: Welch's by default, Student's on request; the text says which)
  in bold; the paper's value beside each cell where the setting is the paper's (ResNet-50 on ImageNet);
  Spearman's ρ (with scipy's two-sided p) between penultimate R² and mean linear transfer accuracy over
  the experiments (Figure 5a) and within the temperature sweep (5b); the runs that are missing, by name and
  reason; when the study computed CKA, Figure 2b with rows and columns of different seeds (its diagonal:
  one objective from two initialisations) and prediction agreement within and between objectives (C.4);
- ``figure2_cka.png``, ``figure_c4_agreement.png`` (when the study computed CKA),
  ``figure3_sparsity_by_layer.png``, ``figure4_r2_by_layer.png``, ``figure5_r2_vs_transfer.png``.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from callbacks.run_config import objective_slug

from .cka import cka_parts
from .finetuning import transfer_section
from .plotting import pyplot, save_figure
from .runs import Collected, RunResult, group_experiments
from .statistics import ALPHA, SPEARMAN_TEST, T_TEST, T_TESTS, Cell, column, spearman

__all__ = ["ReportError", "paper_points", "paper_values", "write_report"]

PAPER_RESULTS = Path(__file__).resolve().parent / "paper_results.csv"  # the paper's tables as data
# The paper's names of its eight transfer data sets, and names a config may give them.
PAPER_DATASETS = {"food": "food", "food101": "food", "cifar10": "cifar10", "cifar100": "cifar100", "birdsnap": "birdsnap",
                  "sun397": "sun397", "cars": "cars", "stanford_cars": "cars", "pets": "pets", "oxford_pets": "pets",
                  "flowers": "flowers", "flowers102": "flowers", "oxford_flowers102": "flowers"}
TOP1, R2_TRAIN, R2_VAL, NONZERO = "val/acc1", "class_separation/train/penultimate", "class_separation/val/penultimate", "relu_nonzero/penultimate"


class ReportError(ValueError):
    """Nothing to report."""


def paper_values() -> dict[tuple[str, str, str], float]:
    """(table, objective or objective@setting, metric) -> the paper's value."""
    values = {}
    with PAPER_RESULTS.open() as f:
        for row in csv.DictReader(f):
            key = row["objective"] + (f"@{row['setting']}" if row["setting"] else "")
            values[(row["table"], key, row["metric"])] = float(row["value"])
    return values


def paper_points(paper: dict, table_name: str = "table3") -> tuple[list[str], list[float], list[float]]:
    """The paper's points of Figure 5: (objectives, penultimate R² on the ImageNet training set, mean linear transfer
    accuracy over its eight data sets), from Tables 3 and 1 (5a, ``table3``) or from Table 4 (5b, ``table4``)."""
    datasets = sorted(set(PAPER_DATASETS.values()))
    accuracy = "table1" if table_name == "table3" else table_name
    objectives = sorted({k[1] for k in paper if k[0] == table_name})
    xs = [paper[(table_name, o, "class_separation_r2_train")] for o in objectives]
    ys = [float(np.mean([paper[(accuracy, o, f"linear_{d}")] for d in datasets])) for o in objectives]
    return objectives, xs, ys


def is_paper_setting(run: RunResult) -> bool:
    """ResNet-50 trained on ImageNet's 1000 classes: the setting the paper's numbers are for."""
    return run.hparams.get("backbone") == "resnet50" and run.hparams.get("num_classes") == 1000


def transfer_datasets(runs: list[RunResult]) -> list[str]:
    names: list[str] = []
    for run in runs:
        for tag in run.final:
            if tag.startswith("probe/") and tag.endswith("/linear_acc") and tag.split("/")[1] not in names:
                names.append(tag.split("/")[1])
    return names


def mean_linear(run: RunResult, datasets: list[str], kind: str = "linear") -> float:
    """The run's transfer accuracy averaged over the data sets (nan if one is missing)."""
    values = [run.final.get(f"probe/{d}/{kind}_acc", math.nan) for d in datasets]
    return float(np.mean(values)) if values else math.nan


def setting_label(run: RunResult) -> str:
    return ", ".join(f"{k}={v}" for k, v in run.setting.items() if not isinstance(v, dict))


@dataclass
class Column:
    title: str
    value: object  # RunResult -> float
    paper_metric: Optional[str] = None
    percent: bool = False
    higher_is_better: Optional[bool] = True  # None: no bold (a property, not a score)


def table(groups: dict[str, list[RunResult]], columns: list[Column], paper: dict, paper_table: str,
          row_key, row_label, test: str = T_TEST) -> list[str]:
    """A markdown table: a row per experiment, a cell per column (mean ± s.e. over seeds, bold as ``column``),
    the paper's value in brackets where the setting is the paper's."""
    cells_by_column = []
    for col in columns:
        cells = {}
        for name, runs in groups.items():
            values = [float(col.value(r)) for r in runs]
            values = [v for v in values if math.isfinite(v)]
            if values:
                cells[name] = Cell(values)
        if col.higher_is_better is not None:
            column(cells, col.higher_is_better, test)
        cells_by_column.append(cells)
    lines = ["| " + " | ".join(["Objective", "seeds", *[c.title for c in columns]]) + " |",
             "|" + "---|" * (len(columns) + 2)]
    for name, runs in groups.items():
        row = [row_label(name, runs), str(len(runs))]
        for col, cells in zip(columns, cells_by_column):
            cell = cells.get(name)
            if cell is None:
                row.append("–")
                continue
            text = cell.text(100.0, 1) if col.percent else cell.text(1.0, 3)
            if cell.bold:
                text = f"**{text}**"
            reference = paper.get((paper_table, row_key(runs[0]), col.paper_metric)) if col.paper_metric else None
            if reference is not None and is_paper_setting(runs[0]):
                text += f" ({reference:g})"
            row.append(text)
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _final(tag: str):
    return lambda run: run.final.get(tag, math.nan)


def write_report(collected: Collected, out: Path, title: str = "Study", cka: Optional[dict] = None,
                 transfer: Optional[dict] = None, t_test: str = T_TEST) -> Path:
    """Write results.csv, report.md and the figures of ``collected`` runs into ``out``, with the section on what is
    transferred when the study measured it (``transfer``: ``finetuning.transfer_section``); returns report.md.
    ``t_test``: the test of the tables' bold, "welch" or "student" (``column``)."""
    if not collected.runs and transfer is not None:  # a transfer study: its runs measure nothing at the end of fit
        return write_transfer_only(out, title, transfer, cka, t_test)
    if not collected.runs:
        where = "\n".join(f"  {p}" for p in collected.looked_in[:20]) or "  (nowhere: the study lists no runs)"
        missing = "".join(f"\n  {name}: {why}" for name, why in (collected.missing + collected.unmeasured)[:20])
        raise ReportError(f"No finished run with measurements to report. Looked in:\n{where}{missing}")
    groups = group_experiments(collected.runs)
    out.mkdir(parents=True, exist_ok=True)
    write_results_csv(collected.runs, out / "results.csv")
    paper = paper_values()
    datasets = transfer_datasets(collected.runs)
    sweep = temperature_sweep(groups)
    main = {k: v for k, v in groups.items() if k not in sweep} if len(sweep) > 1 and len(groups) > len(sweep) else groups

    lines = [f"# {title}", ""]
    seeds = sorted({r.seed for r in collected.runs})
    lines += [f"{len(collected.runs)} runs of {len(groups)} experiments, seeds {seeds}; each cell: the mean ± standard "
              f"error over seeds of the run's last evaluation. **Bold**: the best of the column and every row not "
              f"significantly different from it (two-sided {T_TESTS[t_test]} t-test, p ≥ {ALPHA}; rows with one seed are "
              f"not tested). In brackets: the paper's value, where the setting is the paper's (ResNet-50 on ImageNet).", ""]
    # Finished runs without measurements are missing from these tables, unless the transfer section reports them.
    missing = collected.missing + (collected.unmeasured if transfer is None else [])
    if missing:
        lines += ["**Missing runs** (not in any average):", ""]
        lines += [f"- {name}: {why}" for name, why in missing] + [""]
    uneven = {k: len(v) for k, v in groups.items() if len(v) != max(len(g) for g in groups.values())}
    if uneven:
        lines += [f"Partial: experiments with fewer seeds than the others: {uneven}.", ""]
    if max(len(g) for g in groups.values()) == 2:
        freedom = "between one and two degrees" if t_test == "welch" else "two degrees"
        lines += [f"With 2 seeds per row {T_TESTS[t_test]} test has {freedom} of freedom: only very large differences "
                  f"are significant, so most of a column is bold. The paper uses 8 seeds.", ""]

    def by_objective(run):
        return run.objective

    def label(name, runs):  # the paper's name when the experiment is the objective's own
        return runs[0].objective if name == objective_slug(runs[0].objective) else f"{name} ({runs[0].objective})"

    average = len(datasets) > 1  # an average column only where there is more than one data set
    linear = [Column("Top-1", _final(TOP1), "imagenet_top1", percent=True)]
    linear += [Column(d, _final(f"probe/{d}/linear_acc"), f"linear_{PAPER_DATASETS.get(d, d)}", percent=True) for d in datasets]
    if average:
        linear.append(Column("Avg", lambda r: mean_linear(r, datasets), None, percent=True))
    lines += ["## Table 1: top-1 on the pre-training task (validation) and linear transfer accuracy (%)", ""]
    lines += table(main, linear, paper, "table1", by_objective, label, t_test) + [""]
    if datasets:
        knn = [Column(d, _final(f"probe/{d}/knn_acc"), f"knn_{PAPER_DATASETS.get(d, d)}", percent=True) for d in datasets]
        if average:
            knn.append(Column("Avg", lambda r: mean_linear(r, datasets, "knn"), None, percent=True))
        lines += ["## Table 1 (continued): k-nearest-neighbour transfer accuracy (%)", ""]
        lines += table(main, knn, paper, "table1", by_objective, label, t_test) + [""]

    separation = [Column("R² train (penultimate)", _final(R2_TRAIN), "class_separation_r2_train", higher_is_better=None),
                  Column("R² val (penultimate)", _final(R2_VAL), higher_is_better=None),
                  Column("non-zero (penultimate)", _final(NONZERO), higher_is_better=None)]
    if any(math.isfinite(c.value(r)) for c in separation for runs in main.values() for r in runs):
        lines += ["## Table 3: class separation R² and ReLU sparsity of the penultimate layer", ""]
        lines += table(main, separation, paper, "table3", by_objective, label, t_test) + [""]

    figures = [figure_by_layer(groups, "relu_nonzero/", "fraction of non-zero activations", out / "figure3_sparsity_by_layer.png",
                               "Figure 3: sparsity by layer (validation)"),
               figure_by_layer(groups, "class_separation/train/", "class separation R² (training images)",
                               out / "figure4_r2_by_layer.png", "Figure 4: R² by layer")]
    points = {name: (np.mean([r.final.get(R2_TRAIN, math.nan) for r in runs]),
                     np.mean([mean_linear(r, datasets) for r in runs])) for name, runs in main.items()} if datasets else {}
    points = {name: xy for name, xy in points.items() if all(map(math.isfinite, xy))}
    if len(points) >= 3:  # a rank correlation of fewer points says nothing
        rho, p = spearman([v[0] for v in points.values()], [v[1] for v in points.values()])
        objectives, xs, ys = paper_points(paper)
        paper_rho, paper_p = spearman(xs, ys)
        lines += ["## Figure 5: class separation against transfer", "",
                  f"Figure 5a, over the {len(points)} experiments: Spearman ρ(penultimate R² on the training set, mean "
                  f"linear transfer accuracy) = {rho:.2f} (p = {p:.3g}; {SPEARMAN_TEST}). The paper: ρ = {paper_rho:.2f} "
                  f"over its {len(objectives)} objectives (Tables 1 and 3). Its p = 0.002 does not follow from those points "
                  f"by this test, which gives p = {paper_p:.2g} on them.", ""]
    if len(sweep) > 1:
        lines += table_four(sweep, datasets, paper, t_test)
    if len(points) >= 3:
        figures.append(figure_five(points, {n: main[n][0] for n in points}, paper, out / "figure5_r2_vs_transfer.png", rho, p))
    if cka:
        section, drawn = cka_parts(cka, out)
        lines += section
        figures += drawn
    if transfer is not None:
        section, found = transfer_section(transfer, out, t_test)
        lines += section
        figures += found
    lines += ["## Figures", ""] + [f"![{f.stem}]({f.name})" for f in figures if f is not None] + [""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def write_transfer_only(out: Path, title: str, transfer: dict, cka: Optional[dict] = None, t_test: str = T_TEST) -> Path:
    """The report of a study whose runs measured nothing at the end of fit (fine-tuning): its transfer section, and
    CKA between its networks when it computed that."""
    out.mkdir(parents=True, exist_ok=True)
    lines, figures = transfer_section(transfer, out, t_test)
    if cka:
        section, drawn = cka_parts(cka, out)
        lines += section
        figures += drawn
    lines = [f"# {title}", "", *lines, "## Figures", "", *[f"![{f.stem}]({f.name})" for f in figures if f is not None], ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def temperature_sweep(groups: dict[str, list[RunResult]]) -> dict[str, list[RunResult]]:
    """Cosine-softmax experiments by temperature (Table 4), when the study has more than one temperature."""
    cosine = {k: v for k, v in groups.items() if v[0].objective == "CosineSoftmax" and "temperature" in v[0].setting}
    temperatures = {v[0].setting["temperature"] for v in cosine.values()}
    return dict(sorted(cosine.items(), key=lambda kv: kv[1][0].setting["temperature"])) if len(temperatures) > 1 else {}


def table_four(sweep: dict[str, list[RunResult]], datasets: list[str], paper: dict, t_test: str = T_TEST) -> list[str]:
    columns = [Column("Top-1", _final(TOP1), "imagenet_top1", percent=True),
               Column("R² train", _final(R2_TRAIN), "class_separation_r2_train", higher_is_better=None)]
    columns += [Column(d, _final(f"probe/{d}/linear_acc"), f"linear_{PAPER_DATASETS.get(d, d)}", percent=True) for d in datasets]
    lines = ["## Table 4: cosine softmax temperature", ""]
    lines += table(sweep, columns, paper, "table4", lambda r: f"CosineSoftmax@tau={r.setting['temperature']:g}",
                   lambda name, runs: f"τ = {runs[0].setting['temperature']:g}", t_test) + [""]
    if datasets:
        x = [np.mean([r.final.get(R2_TRAIN, math.nan) for r in runs]) for runs in sweep.values()]
        y = [np.mean([mean_linear(r, datasets) for r in runs]) for runs in sweep.values()]
        rho, p = spearman(x, y)
        temperatures, xs, ys = paper_points(paper, "table4")
        lines += [f"Figure 5b, within the temperature sweep ({len(x)} temperatures): Spearman ρ(R², mean linear transfer) "
                  f"= {rho:.2f} (p = {p:.3g}; {SPEARMAN_TEST}). The paper: ρ = {spearman(xs, ys)[0]:.2f} over its "
                  f"{len(temperatures)} temperatures (Table 4).", ""]
    return lines


def write_results_csv(runs: list[RunResult], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["experiment", "run", "objective", "setting", "seed", "epoch", "step", "metric", "value"])
        for run in runs:
            for evaluation in run.evaluations:
                for metric, value in evaluation["measurements"].items():
                    writer.writerow([run.experiment, run.name, run.objective, setting_label(run), run.seed,
                                     evaluation["epoch"], evaluation["step"], metric, repr(float(value))])


# --- figures ---


def figure_by_layer(groups, prefix: str, ylabel: str, path: Path, title: str) -> Optional[Path]:
    """One line per experiment over the layers in forward order, the mean over its seeds (Figures 3, 4)."""
    plt = pyplot()
    series = {}
    for name, runs in groups.items():
        layers = [t[len(prefix):] for t in runs[0].final if t.startswith(prefix) and "/" not in t[len(prefix):]]
        if layers:
            series[name] = (layers, [np.mean([r.final.get(prefix + l, math.nan) for r in runs]) for l in layers])
    if not series:
        return None
    layers = max((v[0] for v in series.values()), key=len)
    figure, ax = plt.subplots(figsize=(max(5.0, 0.4 * len(layers)), 3.6))
    for name, (names, values) in series.items():
        ax.plot([layers.index(n) for n in names], values, marker="o", markersize=3, label=name)
    ax.set_xticks(range(len(layers)), layers, rotation=90, fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    return save_figure(figure, path)


def figure_five(points: dict[str, tuple[float, float]], examples: dict[str, RunResult], paper: dict, path: Path,
                rho: float, p: float) -> Path:
    """Mean linear transfer accuracy against penultimate R², one point per experiment (Figure 5a), beside the
    paper's nine objectives (Table 3's R², Table 1's average over its eight data sets)."""
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(9.0, 3.8))
    ax = axes[0]
    for name, (x, y) in points.items():
        ax.scatter(x, 100 * y)
        ax.annotate(name, (x, 100 * y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("penultimate R² (training set)")
    ax.set_ylabel("mean linear transfer accuracy (%)")
    ax.set_title(f"this study: ρ = {rho:.2f} (p = {p:.2g})", fontsize=9)
    ax.grid(alpha=0.3)
    ax = axes[1]
    objectives, xs, ys = paper_points(paper)
    ax.scatter(xs, ys, color="grey")
    for o, x, y in zip(objectives, xs, ys):
        ax.annotate(o, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("penultimate R² (ImageNet training set)")
    ax.set_title(f"the paper (ResNet-50, ImageNet): ρ = {spearman(xs, ys)[0]:.2f}", fontsize=9)
    ax.grid(alpha=0.3)
    figure.suptitle("Figure 5: class separation against transfer", fontsize=10)
    return save_figure(figure, path)


