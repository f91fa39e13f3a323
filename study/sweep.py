"""Running a study's runs: locally one after another, or on SLURM as array jobs with the analysis as a job
that starts when every task has succeeded.

Runs come in stages (``stages``): a run that starts from another run's checkpoint (``model.init_from`` inside
that run's folder: fine-tuning from a pre-training run of the study) comes after it, and a refit after every
point of its grid (appendix A.3: the point is chosen from their held-out scores). Locally the stages run in
order; on SLURM each stage is one array job that waits for the one before (``--dependency=afterok``), and
each task reads its run's arguments when it starts (``python -m study fit_args``), so a refit takes the
point its grid chose.

A run whose folder holds ``checkpoints/finished.json`` for the same bounds (max_epochs, max_steps) is
skipped; any other run is started with ``--ckpt_path=last``, which resumes it from its last checkpoint when
it has one (a study interrupted part-way goes on where it stopped) and starts it afresh when not.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np

from callbacks.checkpoints import finished

from .spec import Run, Study, StudyError

__all__ = ["GridUnfinished", "RunState", "grid_scores", "run_locally", "run_state", "selected", "stages", "submit_to_slurm"]


class GridUnfinished(RuntimeError):
    """A refit run whose grid has runs that did not finish."""

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class RunState:
    run: Run
    folder: Path
    state: str  # "finished", "unfinished" (a checkpoint to resume from) or "new"
    init_from: Optional[Path] = None  # the checkpoint it fine-tunes from (model.init_from)


def run_state(run: Run) -> RunState:
    """Where ``run`` lives and how far it got."""
    from cli import fit_config, run_folder

    config = fit_config(run.config_args())
    folder = run_folder(config)
    init_from = Path(config.model.init_from) if config.model.init_from else None
    done = finished(folder)
    if done is not None:
        trainer = config.trainer
        if (done.get("max_epochs"), done.get("max_steps")) == (trainer.max_epochs, trainer.max_steps):
            return RunState(run, folder, "finished", init_from)
    return RunState(run, folder, "unfinished" if (folder / "checkpoints" / "last.ckpt").is_file() else "new", init_from)


def stages(study: Study, states: list[RunState]) -> list[list[RunState]]:
    """``states`` in the order they can run: stage k holds the runs whose every prerequisite lies in stages
    before k (in the study's order within a stage). A run's prerequisites: the run whose folder holds the
    checkpoint it starts from (``model.init_from``), and, for a refit, every point of its grid. A checkpoint that
    neither exists nor comes from one of the study's runs is an error now, not when its run starts."""
    owners = {s.folder.resolve(): s.run.name for s in states}
    by_experiment: dict[str, list[str]] = {}
    for s in states:
        by_experiment.setdefault(s.run.experiment, []).append(s.run.name)
    needs: dict[str, list[str]] = {}
    for s in states:  # by lookups, not pairs of runs: Table 2's study has 15,768
        grid = study.grids.get(s.run.experiment)
        needs[s.run.name] = [n for p, _, _ in grid.points for n in by_experiment.get(p, [])] if grid else []
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

    ordered: list[list[RunState]] = [[] for _ in range(1 + max((stage_of(s.run.name) for s in states), default=-1))]
    for s in states:
        ordered[depth[s.run.name]].append(s)
    return ordered


def grid_scores(study: Study, experiment: str) -> dict:
    """The grid of ``experiment`` (appendix A.3): each point's last validation accuracy, in the target's measure, on
    the held-out training images, per seed and averaged over the seeds (None while one has not finished), and the
    point chosen: the best average, the first on a tie."""
    from lightning_modules.classifier import accuracy_tag

    from .transfer import run_measure, scalar_curves

    grid, points = study.grids[experiment], []
    names = {p for p, _, _ in grid.points}
    runs = [r for r in study.runs if r.experiment in names]  # one pass over the study's runs, not one per point
    for name, lr, decay in grid.points:
        per_seed = {}
        for run in (r for r in runs if r.experiment == name):
            state, curve = run_state(run), None
            if state.state == "finished":
                tag = accuracy_tag(run_measure(state.folder))
                curve = scalar_curves(state.folder, [tag]).get(tag)
            per_seed[run.seed] = curve[-1][1] if curve else None
        done = None not in per_seed.values()
        points.append({"point": name, "lr_per_256": lr, "lr_times_weight_decay": decay, "per_seed": per_seed,
                       "held_out_accuracy": float(np.mean(list(per_seed.values()))) if done else None})
    scored = [p for p in points if p["held_out_accuracy"] is not None]
    chosen = max(scored, key=lambda p: p["held_out_accuracy"])["point"] if len(scored) == len(points) else None
    return {"points": points, "chosen": chosen, "validation_split": grid.validation_split}


def selected(study: Study, run: Run) -> Run:
    """``run`` with its grid's chosen learning rate and weight decay when its experiment is refit from a grid."""
    if run.experiment not in study.grids:
        return run
    scores = grid_scores(study, run.experiment)
    if scores["chosen"] is None:
        unfinished = [p["point"] for p in scores["points"] if p["held_out_accuracy"] is None]
        raise GridUnfinished(f"{run.name}: its grid has unfinished runs ({', '.join(unfinished)}); the grid runs first "
                             f"(python -m study run, or submit, orders them so), then its refit.")
    point = next(p for p in scores["points"] if p["point"] == scores["chosen"])
    return replace(run, overrides=(*run.overrides, f"--model.lr_per_256={point['lr_per_256']}",
                                   f"--model.lr_times_weight_decay={point['lr_times_weight_decay']}"))


def prepare_data(study: Study) -> float:
    """Generate or check each experiment's data before the runs (the embedded data set is generated on first
    use); returns the seconds it took."""
    from cli import fit_config

    from .compare import instantiate_data

    start = time.perf_counter()
    sections = {}
    for run in study.runs:
        data = fit_config(run.config_args()).as_dict()["data"]
        sections.setdefault(repr(data), data)
    for data in sections.values():
        instantiate_data(data).prepare_data()
    return time.perf_counter() - start


def run_locally(study: Study, timings: Optional[dict] = None, python: str = sys.executable) -> list[RunState]:
    """Run every unfinished run of ``study`` in turn (``cli.py fit``, one process each); returns the runs
    that failed, and adds each run's seconds to ``timings``. A failed run does not stop the others; the
    report lists it as missing."""
    states = [run_state(r) for r in study.runs]
    todo = [s for stage in stages(study, states) for s in stage if s.state != "finished"]
    print(f"study {study.path}: {len(states)} runs, {len(states) - len(todo)} finished, {len(todo)} to run", flush=True)
    failed = []
    for number, state in enumerate(todo, 1):
        verb = "resuming" if state.state == "unfinished" else "starting"
        try:
            run = selected(study, state.run)
        except GridUnfinished as err:
            print(f"\n[{number}/{len(todo)}] {err}", flush=True)
            failed.append(state)
            continue
        print(f"\n[{number}/{len(todo)}] {verb} {run.name} in {state.folder} {' '.join(run.overrides[len(state.run.overrides):])}",
              flush=True)
        start = time.perf_counter()
        result = subprocess.run([python, str(REPO / "cli.py"), "fit", *run.fit_args()])
        seconds = time.perf_counter() - start
        print(f"[{number}/{len(todo)}] {state.run.name}: {'done' if result.returncode == 0 else 'FAILED'} "
              f"in {seconds:.0f} s", flush=True)
        if timings is not None:
            timings[state.run.name] = seconds
        if result.returncode != 0:
            failed.append(state)
    return failed


def submit_to_slurm(study: Study, sbatch_flags: list[str], analysis_flags: Optional[list[str]] = None,
                    max_array_size: int = 1000) -> tuple[list[str], str]:
    """Submit the study's unfinished runs as array jobs stage by stage (``stages``), each stage waiting for every
    array of the one before (``--dependency=afterok``), and its analysis (``slurm/analyse.sbatch``) after the last;
    returns the array job ids and the analysis job's. A stage of more than ``max_array_size`` runs is split into
    arrays of that many (SLURM's MaxArraySize is 1001 unless the cluster raises it). Each task runs as
    ``slurm/train.sbatch`` runs one experiment (N nodes x G GPUs, requeued on preemption); an array's runs are
    listed by name in ``<report>/slurm/<time>-stage<k>[-<part>].runs``, the task's line is its run, and its
    arguments are read when it starts (a refit takes its grid's choice then)."""
    states = [run_state(r) for r in study.runs]
    listing = study.report / "slurm"
    listing.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    arrays: list[str] = []
    before: list[str] = []  # the arrays of the last stage submitted
    for k, stage in enumerate(stages(study, states)):
        todo = [s.run.name for s in stage if s.state != "finished"]
        parts = [todo[i:i + max_array_size] for i in range(0, len(todo), max_array_size)]
        after = [f"--dependency=afterok:{':'.join(before)}"] if before and parts else []
        submitted = []
        for j, names in enumerate(parts):
            runs = listing / f"{stamp}-stage{k}{f'-{j}' if len(parts) > 1 else ''}.runs"
            runs.write_text("".join(f"{name}\n" for name in names))
            submitted.append(_sbatch([f"--array=0-{len(names) - 1}", *after, *sbatch_flags, str(REPO / "slurm" / "train.sbatch"),
                                      f"--study={study.path.resolve()}", f"--runs={runs.resolve()}"]))
        arrays += submitted
        before = submitted or before
    after = [f"--dependency=afterok:{':'.join(before)}"] if before else []
    return arrays, _sbatch([*(analysis_flags or []), *after, str(REPO / "slurm" / "analyse.sbatch"), str(study.path.resolve())])


def _sbatch(args: list[str]) -> str:
    """``sbatch --parsable args`` from the repository root; the job id."""
    job = subprocess.run(["sbatch", "--parsable", *args], check=True, capture_output=True, text=True, cwd=REPO)
    return job.stdout.strip().split(";")[0]
