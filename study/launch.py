"""Running a study's runs: locally one after another, or on SLURM as array jobs with the analysis as a job that
starts when every task has succeeded.

Runs come in stages (``plan.stages``): a run that starts from another run's checkpoint comes after it, and a refit
after every point of its grid. Locally the stages run in order; on SLURM each stage is one array job that waits for
the one before (``--dependency=afterok``), and each task reads its run's arguments when it starts (``python -m study
fit_args``), so a refit takes the point its grid chose.

A run whose folder holds ``checkpoints/finished.json`` for the same bounds (max_epochs, max_steps) is skipped; any
other run is started with ``--ckpt_path=last``, which resumes it from its last checkpoint when it has one (a study
interrupted part-way goes on where it stopped) and starts it afresh when not.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from .passes import instantiate_data
from .plan import GridUnfinished, stages, with_chosen_point
from .runs import RunState
from .spec import Study

__all__ = ["prepare_data", "run_locally", "submit_to_slurm"]

REPO = Path(__file__).resolve().parent.parent


def prepare_data(study: Study, states: dict[str, RunState]) -> float:
    """Generate or check each experiment's data before the runs (the embedded data set is generated on first
    use); returns the seconds it took."""
    start = time.perf_counter()
    sections = {}
    for state in states.values():
        sections.setdefault(repr(state.data), state.data)
    for data in sections.values():
        instantiate_data(data).prepare_data()
    return time.perf_counter() - start


def run_locally(study: Study, states: dict[str, RunState], timings: Optional[dict] = None,
                python: str = sys.executable) -> list[RunState]:
    """Run every unfinished run of ``study`` in turn (``cli.py fit``, one process each); returns the runs
    that failed, and adds each run's seconds to ``timings``. A failed run does not stop the others; the
    report lists it as missing."""
    todo = [s for stage in stages(study, states) for s in stage if s.state != "finished"]
    print(f"study {study.path}: {len(states)} runs, {len(states) - len(todo)} finished, {len(todo)} to run", flush=True)
    failed = []
    for number, state in enumerate(todo, 1):
        verb = "resuming" if state.state == "unfinished" else "starting"
        try:
            run = with_chosen_point(study, state.run, states)
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


def submit_to_slurm(study: Study, states: dict[str, RunState], sbatch_flags: list[str], analysis_flags: Optional[list[str]] = None,
                    max_array_size: int = 1000) -> tuple[list[str], str]:
    """Submit the study's unfinished runs as array jobs stage by stage (``stages``), each stage waiting for every
    array of the one before (``--dependency=afterok``), and its analysis (``slurm/analyse.sbatch``) after the last;
    returns the array job ids and the analysis job's. A stage of more than ``max_array_size`` runs is split into
    arrays of that many (SLURM's MaxArraySize is 1001 unless the cluster raises it). Each task runs as
    ``slurm/train.sbatch`` runs one experiment (N nodes x G GPUs, requeued on preemption); an array's runs are
    listed by name in ``<report>/slurm/<time>-stage<k>[-<part>].runs``, the task's line is its run, and its
    arguments are read when it starts (a refit takes its grid's choice then)."""
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


