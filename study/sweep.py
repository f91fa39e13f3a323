"""Running a study's runs: locally one after another, or on SLURM as one array job with the analysis as a
job that starts when every task has succeeded.

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

from callbacks.checkpoints import finished

from .spec import Run, Study

__all__ = ["GridUnfinished", "RunState", "grid_scores", "run_locally", "run_state", "selected", "submit_to_slurm"]


class GridUnfinished(RuntimeError):
    """A refit run whose grid has runs that did not finish."""

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class RunState:
    run: Run
    folder: Path
    state: str  # "finished", "unfinished" (a checkpoint to resume from) or "new"


def run_state(run: Run) -> RunState:
    """Where ``run`` lives and how far it got."""
    from cli import fit_config, run_folder

    config = fit_config(run.config_args())
    folder = run_folder(config)
    done = finished(folder)
    if done is not None:
        trainer = config.trainer
        if (done.get("max_epochs"), done.get("max_steps")) == (trainer.max_epochs, trainer.max_steps):
            return RunState(run, folder, "finished")
    return RunState(run, folder, "unfinished" if (folder / "checkpoints" / "last.ckpt").is_file() else "new")


def grid_scores(study: Study, experiment: str) -> dict:
    """The grid of ``experiment`` (appendix A.3): each point's last validation top-1 on the held-out training
    images (None while it has not finished), and the point chosen: the best score, the first on a tie."""
    from .transfer import scalar_curves

    grid, points = study.grids[experiment], []
    for name, lr, decay in grid.points:
        run = next(r for r in study.runs if r.experiment == name)
        state = run_state(run)
        curve = scalar_curves(state.folder, ["val/acc1"]).get("val/acc1") if state.state == "finished" else None
        points.append({"point": name, "lr_per_256": lr, "weight_decay": decay, "held_out_acc1": curve[-1][1] if curve else None})
    scored = [p for p in points if p["held_out_acc1"] is not None]
    chosen = max(scored, key=lambda p: p["held_out_acc1"])["point"] if len(scored) == len(points) else None
    return {"points": points, "chosen": chosen, "validation_split": grid.validation_split}


def selected(study: Study, run: Run) -> Run:
    """``run`` with its grid's chosen learning rate and weight decay when its experiment is refit from a grid."""
    if run.experiment not in study.grids:
        return run
    scores = grid_scores(study, run.experiment)
    if scores["chosen"] is None:
        unfinished = [p["point"] for p in scores["points"] if p["held_out_acc1"] is None]
        raise GridUnfinished(f"{run.name}: its grid has unfinished runs ({', '.join(unfinished)}); run the study again.")
    point = next(p for p in scores["points"] if p["point"] == scores["chosen"])
    return replace(run, overrides=(*run.overrides, f"--model.lr_per_256={point['lr_per_256']}",
                                   f"--model.weight_decay={point['weight_decay']}"))


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
    todo = [s for s in states if s.state != "finished"]
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


def submit_to_slurm(study: Study, sbatch_flags: list[str], analysis_flags: Optional[list[str]] = None) -> tuple[str, str]:
    """Submit the study's runs as one array job (``slurm/sweep.sh``: a task per config x seed) and its analysis
    (``slurm/analyse.sbatch``) to start once every task has succeeded (``--dependency=afterok``); returns
    the two job ids. A config whose every seed has finished is left out of the array; a finished run of a
    config that is in it resumes at its end, so trains no further (its end-of-fit measurements run again)."""
    if study.variants or study.own_seeds or study.grids:
        from .spec import StudyError

        raise StudyError(
            f"{study.path}: experiments with their own overrides or seeds ({', '.join(sorted({*study.variants, *study.own_seeds}))}) "
            f"do not fit one config x seed array yet. Run it here (python -m study run), or submit each variant with "
            f"slurm/sweep.sh CONFIG.yaml --seeds=... <its overrides> and then python -m study analyse under sbatch.")
    states = [run_state(r) for r in study.runs]
    todo = [s.run for s in states if s.state != "finished"]
    analysis = ["sbatch", "--parsable", *(analysis_flags or [])]
    if todo:
        seeds = sorted({r.seed for r in todo})
        configs = sorted({str(r.config) for r in todo}, key=[str(c) for c in study.experiments.values()].index)
        sweep = subprocess.run(
            [str(REPO / "slurm" / "sweep.sh"), "--parsable", *sbatch_flags, f"--seeds={','.join(map(str, seeds))}",
             *configs, *study.overrides],
            check=True, capture_output=True, text=True, cwd=REPO,
        )
        array = sweep.stdout.strip().split(";")[0]
        analysis.append(f"--dependency=afterok:{array}")
    else:
        array = ""
    job = subprocess.run([*analysis, str(REPO / "slurm" / "analyse.sbatch"), str(study.path)],
                         check=True, capture_output=True, text=True, cwd=REPO)
    return array, job.stdout.strip().split(";")[0]
