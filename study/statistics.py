"""The statistics every table uses: mean ± standard error over seeds, the column test that bolds a table's best
and its peers, the two-way ANOVA of Table 2's average, and Figure 5's Spearman correlation (all from scipy)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np
from scipy import stats

__all__ = ["ALPHA", "SPEARMAN_TEST", "T_TEST", "T_TESTS", "Cell", "anova_objective_p", "column", "spearman"]

ALPHA = 0.05  # bold: not significantly different from the best at this level
# The paper says "t-test" (Table 2) without saying which. Welch's is the default: objectives differ in their spread
# over seeds, which Student's pooled variance assumes away; and with the same seeds per row Welch's t is Student's t
# with fewer degrees of freedom, so it never bolds fewer rows than Student's would.
T_TESTS = {"welch": "Welch's", "student": "Student's"}
T_TEST = "welch"
# What Figure 5's p-values are: scipy.stats.spearmanr's, from the t-distribution with n - 2 degrees of freedom.
SPEARMAN_TEST = "two-sided, scipy.stats.spearmanr's t-distribution approximation"


@dataclass
class Cell:
    """One row's values of one column (one per seed), and how it compares with the column's best."""
    values: list[float]
    bold: bool = False
    p_vs_best: Optional[float] = None

    @classmethod
    def of(cls, values: Iterable[Optional[float]]) -> "Cell":
        """The finite values among ``values`` (None and NaN are runs that did not measure it)."""
        return cls([float(v) for v in values if v is not None and math.isfinite(v)])

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if self.values else math.nan

    @property
    def se(self) -> float:
        """Standard error of the mean over seeds (sample standard deviation / sqrt(n)); nan for one seed."""
        return float(stats.sem(self.values)) if len(self.values) > 1 else math.nan

    def text(self, scale: float = 1.0, digits: int = 1) -> str:
        """``mean ± s.e.`` (the mean alone for one value, a dash for none), times ``scale``."""
        if not self.values:
            return "–"
        found = f"{scale * self.mean:.{digits}f}"
        return found + (f" ± {scale * self.se:.{digits}f}" if len(self.values) > 1 else "")


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
