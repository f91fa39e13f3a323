"""The order a study's runs train in, and the grids' choices: the stages of runs that start from one another
(pre-training before fine-tuning, a grid before its refit), each grid's held-out scores (appendix A.3), and the
refit's arguments with the point its grid chose.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import numpy as np

from lightning_modules.classifier import accuracy_tag

from .runs import RunState, run_measure, scalar_curves
from .spec import Run, Study, StudyError

__all__ = ["GridScores", "GridUnfinished", "PointScore", "grid_scores", "stages", "with_chosen_point"]


class GridUnfinished(RuntimeError):
    """A refit run whose grid has runs that did not finish."""


@dataclass(frozen=True)
class PointScore:
    point: str  # the grid point's experiment
    lr_per_256: float
    lr_times_weight_decay: float
    per_seed: dict[int, Optional[float]]  # the last held-out accuracy of each seed's run; None: not finished
    held_out_accuracy: Optional[float]  # their mean; None while one has not finished


@dataclass(frozen=True)
class GridScores:
    points: list[PointScore]
    chosen: Optional[str]  # the point of best held-out accuracy, the first on a tie; None while one is unscored
    validation_split: float


def stages(study: Study, states: dict[str, RunState]) -> list[list[RunState]]:
    """``states`` (``runs.run_states``) in the order they can run: stage k holds the runs whose every prerequisite lies
    in stages before k (in the study's order within a stage). A run's prerequisites: the run whose folder holds the
    checkpoint it starts from (``model.init_from``), and, for a refit, every point of its grid. A checkpoint that
    neither exists nor comes from one of the study's runs is an error now, not when its run starts."""
    owners = {s.folder.resolve(): s.run.name for s in states.values()}
    by_experiment: dict[str, list[str]] = {}
    for s in states.values():
        by_experiment.setdefault(s.run.experiment, []).append(s.run.name)
    needs: dict[str, list[str]] = {}
    for s in states.values():  # by lookups, not pairs of runs: Table 2's study has 15,768
        grid = study.grids.get(s.run.experiment)
        needs[s.run.name] = [n for p in grid.points for n in by_experiment.get(p.experiment, [])] if grid else []
        if s.init_from is not None:
            source = s.init_from.resolve()
            owner = [owners[f] for f in (source, *source.parents) if f in owners and owners[f] != s.run.name]
            if not owner and not s.init_from.is_file():
                raise StudyError(f"{study.path}: {s.run.name} starts from {s.init_from} (model.init_from), which does not exist "
                                 f"and which none of the study's runs trains. Train that run first, or correct the path.")
            needs[s.run.name] += owner
    depth: dict[str, int] = {}

    def stage_of(name: str, path: tuple[str, ...] = ()) -> int:
        if name in path:
            raise StudyError(f"{study.path}: runs that start from one another in a circle: {' -> '.join((*path, name))}.")
        if name not in depth:
            depth[name] = 1 + max((stage_of(n, (*path, name)) for n in needs[name]), default=-1)
        return depth[name]

    ordered: list[list[RunState]] = [[] for _ in range(1 + max((stage_of(name) for name in states), default=-1))]
    for s in states.values():
        ordered[depth[s.run.name]].append(s)
    return ordered


def grid_scores(study: Study, experiment: str, states: dict[str, RunState]) -> GridScores:
    """The grid of ``experiment`` (appendix A.3): each point's last validation accuracy, in the target's measure, on
    the held-out training images, per seed and averaged over the seeds, and the point chosen: the best average."""
    grid, points = study.grids[experiment], []
    names = {p.experiment for p in grid.points}
    runs = [r for r in study.runs if r.experiment in names]  # one pass over the study's runs, not one per point
    for point in grid.points:
        per_seed = {}
        for run in (r for r in runs if r.experiment == point.experiment):
            state, curve = states[run.name], None
            if state.state == "finished":
                tag = accuracy_tag(run_measure(state.folder))
                curve = scalar_curves(state.folder, [tag]).get(tag)
            per_seed[run.seed] = curve[-1][1] if curve else None
        done = None not in per_seed.values()
        points.append(PointScore(point.experiment, point.lr_per_256, point.lr_times_weight_decay, per_seed,
                                 float(np.mean(list(per_seed.values()))) if done else None))
    scored = [p for p in points if p.held_out_accuracy is not None]
    chosen = max(scored, key=lambda p: p.held_out_accuracy).point if len(scored) == len(points) else None
    return GridScores(points, chosen, grid.validation_split)


def with_chosen_point(study: Study, run: Run, states: dict[str, RunState]) -> Run:
    """``run`` with its grid's chosen learning rate and weight decay when its experiment is refit from a grid."""
    if run.experiment not in study.grids:
        return run
    scores = grid_scores(study, run.experiment, states)
    if scores.chosen is None:
        unfinished = [p.point for p in scores.points if p.held_out_accuracy is None]
        raise GridUnfinished(f"{run.name}: its grid has unfinished runs ({', '.join(unfinished)}); the grid runs first "
                             f"(python -m study run, or submit, orders them so), then its refit.")
    point = next(p for p in scores.points if p.point == scores.chosen)
    return replace(run, overrides=(*run.overrides, f"--model.lr_per_256={point.lr_per_256}",
                                   f"--model.lr_times_weight_decay={point.lr_times_weight_decay}"))
