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
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from scipy import stats

from callbacks.run_config import objective_slug

from .runs import Collected, RunResult, group_experiments

__all__ = ["Cell", "ReportError", "T_TESTS", "agreement_by_experiment", "anova_objective_p", "column", "cross_seed",
           "spearman", "write_report"]

PAPER_RESULTS = Path(__file__).resolve().parent / "paper_results.csv"  # the paper's tables as data
# The paper's names of its eight transfer data sets, and names a config may give them.
PAPER_DATASETS = {"food": "food", "food101": "food", "cifar10": "cifar10", "cifar100": "cifar100", "birdsnap": "birdsnap",
                  "sun397": "sun397", "cars": "cars", "stanford_cars": "cars", "pets": "pets", "oxford_pets": "pets",
                  "flowers": "flowers", "flowers102": "flowers", "oxford_flowers102": "flowers"}
TOP1, R2_TRAIN, R2_VAL, NONZERO = "val/acc1", "class_separation/train/penultimate", "class_separation/val/penultimate", "relu_nonzero/penultimate"
ALPHA = 0.05  # bold: not significantly different from the best at this level
# The paper says "t-test" (Table 2) without saying which. Welch's is the default: objectives differ in their spread
# over seeds (the embedded study's texture probe: s.e. 2.6 points for Sigmoid, 0.2 for Softmax), which Student's
# pooled variance assumes away; and with the same seeds per row Welch's t is Student's t with fewer degrees of
# freedom, so it never bolds fewer rows than Student's would.
T_TESTS = {"welch": "Welch's", "student": "Student's"}
T_TEST = "welch"
# What Figure 5's p-values are: scipy.stats.spearmanr's, from the t-distribution with n - 2 degrees of freedom.
SPEARMAN_TEST = "two-sided, scipy.stats.spearmanr's t-distribution approximation"
RUN_NAME = re.compile(r"^(?P<experiment>[^/@]+)/seed(?P<seed>\d+)$")  # a study's run, as study.spec names it


class ReportError(ValueError):
    """Nothing to report."""


@dataclass
class Cell:
    """One experiment's values of one column (one per seed), and how it compares with the column's best."""
    values: list[float]
    bold: bool = False
    p_vs_best: Optional[float] = None

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def se(self) -> float:
        """Standard error of the mean over seeds (sample standard deviation / sqrt(n)); nan for one seed."""
        n = len(self.values)
        return float(np.std(self.values, ddof=1) / math.sqrt(n)) if n > 1 else math.nan


def column(cells: dict[str, Cell], higher_is_better: bool = True, test: str = T_TEST) -> dict[str, Cell]:
    """Marks the best cell (by mean) and every cell not significantly different from it (a two-sided t-test,
    p ≥ ALPHA: ``test`` "welch" or "student", ``T_TESTS``) bold. Cells of one seed cannot be tested: only the
    best is bold then. Every table's bold comes from here (Tables 1-4)."""
    if test not in T_TESTS:
        raise ValueError(f"t-test {test!r}: choose one of {', '.join(T_TESTS)}.")
    if not cells:
        return cells
    best_name = (max if higher_is_better else min)(cells, key=lambda k: cells[k].mean)
    best = cells[best_name]
    for name, cell in cells.items():
        if name == best_name:
            cell.bold, cell.p_vs_best = True, None
            continue
        if len(cell.values) < 2 or len(best.values) < 2:
            cell.bold, cell.p_vs_best = False, None
            continue
        if np.ptp(cell.values) == 0 and np.ptp(best.values) == 0:  # no spread: t undefined; equal or not
            p = 1.0 if cell.mean == best.mean else 0.0
        else:
            p = float(stats.ttest_ind(cell.values, best.values, equal_var=test == "student").pvalue)
        cell.bold, cell.p_vs_best = p >= ALPHA, p
    return cells


def anova_objective_p(rows: list[tuple[str, str, float]]) -> float:
    """p-value of the objective's main effect in a two-way ANOVA (objective x data set) of ``rows`` (objective,
    data set, value; replicates are seeds), as Table 2 tests its average column: type-II sum of squares of the
    objective (the additive model against the data sets alone), over the error of the full model with
    interaction (each cell's spread about its mean). nan without replicates or with one objective."""
    objectives, datasets = sorted({r[0] for r in rows}), sorted({r[1] for r in rows})
    y = np.array([r[2] for r in rows], dtype=float)
    cells = sorted({(r[0], r[1]) for r in rows})
    df_error = len(rows) - len(cells)
    if len(objectives) < 2 or df_error < 1:
        return math.nan

    def rss(columns: list[np.ndarray]) -> float:
        design = np.column_stack(columns)
        residual = y - design @ np.linalg.lstsq(design, y, rcond=None)[0]
        return float(residual @ residual)

    ones = [np.ones(len(rows))]
    by_objective = [np.array([r[0] == o for r in rows], float) for o in objectives[1:]]
    by_dataset = [np.array([r[1] == d for r in rows], float) for d in datasets[1:]]
    by_cell = [np.array([(r[0], r[1]) == c for r in rows], float) for c in cells]
    ss_objective = rss(ones + by_dataset) - rss(ones + by_objective + by_dataset)
    ms_error = rss(by_cell) / df_error
    if ms_error == 0:
        return 1.0 if ss_objective == 0 else 0.0
    f = (ss_objective / (len(objectives) - 1)) / ms_error
    return float(stats.f.sf(f, len(objectives) - 1, df_error))


def spearman(x: list[float], y: list[float]) -> tuple[float, float]:
    """Spearman's ρ and its p-value (``SPEARMAN_TEST``), as Figure 5 reports them; nan below 3 points."""
    if len(x) < 3:
        return math.nan, math.nan
    result = stats.spearmanr(x, y)
    return float(result.statistic), float(result.pvalue)


# --- reading the runs into tables ---

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
            scale = 100.0 if col.percent else 1.0
            digits = 1 if col.percent else 3
            text = f"{scale * cell.mean:.{digits}f}"
            if len(cell.values) > 1:
                text += f" ± {scale * cell.se:.{digits}f}"
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
    transferred when the study measured it (``transfer``: ``study/transfer_report.py``); returns report.md.
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
        from .transfer_report import transfer_section

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
    from .transfer_report import transfer_section

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

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: Path) -> Path:
    """Lay out, write (PNG, 120 dpi) and close ``figure``; returns ``path``."""
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    _pyplot().close(figure)
    return path


def figure_by_layer(groups, prefix: str, ylabel: str, path: Path, title: str) -> Optional[Path]:
    """One line per experiment over the layers in forward order, the mean over its seeds (Figures 3, 4)."""
    plt = _pyplot()
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
    plt = _pyplot()
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


def cka_parts(cka: dict, out: Path) -> tuple[list[str], list[Path]]:
    """The CKA and agreement section and its figures (Figure 2, Figure C.4)."""
    return cka_section(cka), [figure_two(cka, out / "figure2_cka.png"), figure_agreement(cka, out / "figure_c4_agreement.png")]


def experiment_of(name: str) -> str:
    """The experiment of a run named <experiment>/seed<k>; a network named otherwise (a path) is its own."""
    match = RUN_NAME.match(name)
    return match["experiment"] if match else name


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
    matches = [RUN_NAME.match(n) for n in runs]
    if column_seed is None or not all(matches):
        return SeedBlock(runs, runs, values, np.eye(len(runs), dtype=bool), row_seed, None)
    order = list(dict.fromkeys(m["experiment"] for m in matches))

    def of_seed(seed: int) -> list[int]:
        found = [i for i, m in enumerate(matches) if int(m["seed"]) == seed]
        return sorted(found, key=lambda i: order.index(matches[i]["experiment"]))

    rows, columns = of_seed(row_seed), of_seed(column_seed)
    same = np.array([[matches[i]["experiment"] == matches[j]["experiment"] for j in columns] for i in rows], dtype=bool)
    return SeedBlock([runs[i] for i in rows], [runs[j] for j in columns], values[np.ix_(rows, columns)],
                     same.reshape(len(rows), len(columns)), row_seed, column_seed)


def figure_two(cka: dict, path: Path) -> Path:
    """Block x block CKA heatmaps of the chosen pairs (Figure 2a) and one layer's CKA between the experiments'
    runs of one seed (rows) and of another (columns), so that the diagonal is one objective from two
    initialisations (Figure 2b; ``cross_seed``)."""
    plt = _pyplot()
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
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path


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


def seed_of(name: str) -> Optional[int]:
    """The seed of a run named <experiment>/seed<k>; None for a network named otherwise."""
    match = RUN_NAME.match(name)
    return int(match["seed"]) if match else None


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
    plt = _pyplot()
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
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path
