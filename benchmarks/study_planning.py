"""How long a study takes to plan before anything runs: every run's folder and state (``study.runs.run_states``) and
the runs put in stages, for Table 2's A.3 study (configs/studies/imagenet_finetune.yaml: 15,768 runs).

Side by side: a full parse of every run's arguments (the method before ``run_states``: one kept parser, one parse per
run; timed on a sample and scaled to the study) against ``run_states`` (one parse per experiment, its runs derived),
on the whole study; the sample's folders and configs must be equal both ways. Target: <= 60 s for the study.

    python benchmarks/study_planning.py              # a sample of 300 runs parsed in full
    python benchmarks/study_planning.py --sample 0   # every run parsed in full too (about 10 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.chdir(REPO)

from cli import run_folder  # noqa: E402
from study.plan import stages  # noqa: E402
from study.runs import run_config, run_states  # noqa: E402
from study.spec import Study  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default="configs/studies/imagenet_finetune.yaml")
    parser.add_argument("--sample", type=int, default=300, help="runs parsed in full (0: all)")
    options = parser.parse_args()

    start = time.perf_counter()
    study = Study.load(options.study)
    print(f"{options.study}: {len(study.runs)} runs, {len({(r.config, r.template) for r in study.runs})} experiments, "
          f"loaded in {time.perf_counter() - start:.1f} s")
    step = max(1, len(study.runs) // options.sample) if options.sample else 1
    sample = study.runs[::step][: options.sample or None]
    run_config(sample[0])  # the kept parser built outside the timings

    start = time.perf_counter()
    full = {run.name: run_config(run).as_dict() for run in sample}
    per_run = (time.perf_counter() - start) / len(sample)
    start = time.perf_counter()
    states = run_states(study)
    derived = time.perf_counter() - start
    print(f"a full parse per run: {1000 * per_run:.1f} ms per run ({len(sample)} runs), "
          f"{per_run * len(study.runs):.0f} s for the study")
    print(f"run_states (one parse per experiment): {derived:.1f} s for the study (target <= 60 s); "
          f"speed-up {per_run * len(study.runs) / derived:.0f}x")
    folders = {name: run_folder(run_config(state.run)) for name, state in states.items() if name in full}
    assert folders == {name: states[name].folder for name in folders}, "derived folders differ from a full parse's"
    with tempfile.TemporaryDirectory() as where:  # the pre-trained checkpoints the runs start from, empty files
        os.chdir(where)
        for state in states.values():
            if state.init_from is not None and not state.init_from.is_absolute():
                state.init_from.parent.mkdir(parents=True, exist_ok=True)
                state.init_from.touch()
        start = time.perf_counter()
        staged = [len(stage) for stage in stages(study, states)]
        os.chdir(REPO)
    print(f"stages: {time.perf_counter() - start:.1f} s, runs per stage {staged}; the sample's folders equal a full parse's")


if __name__ == "__main__":
    main()
