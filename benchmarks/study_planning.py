"""How long a study takes to plan before anything runs: every run's config parsed (``study.sweep.run_state``) and
the runs put in stages, for Table 2's A.3 study (configs/studies/imagenet_finetune.yaml: 15,768 runs).

Side by side on the same runs: a parser built for every run (as ``cli.fit_config`` did) against the one parser it
keeps; then the whole study with the kept parser (``--all``), and ``stages`` over it.

    python benchmarks/study_planning.py              # a sample of 300 runs each way
    python benchmarks/study_planning.py --all        # and the whole study (minutes)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.chdir(REPO)

import cli  # noqa: E402
from study.spec import Study  # noqa: E402
from study.sweep import run_state, stages  # noqa: E402


def fresh_parser_config(args: list[str]):
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)  # as fit_config does
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cli.parse_only(args).config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default="configs/studies/imagenet_finetune.yaml")
    parser.add_argument("--sample", type=int, default=300)
    parser.add_argument("--all", action="store_true")
    options = parser.parse_args()

    start = time.perf_counter()
    study = Study.load(options.study)
    print(f"{options.study}: {len(study.runs)} runs, loaded in {time.perf_counter() - start:.1f} s")
    step = max(1, len(study.runs) // options.sample)
    sample = study.runs[::step][: options.sample]
    cli.fit_config(sample[0].config_args())  # the kept parser built outside the timing
    seconds = {}
    for name, parse in (("parser per run", fresh_parser_config), ("one parser", cli.fit_config)):
        start = time.perf_counter()
        folders = [cli.run_folder(parse(run.config_args())) for run in sample]
        seconds[name] = (time.perf_counter() - start) / len(sample)
        print(f"{name:>15}: {1000 * seconds[name]:.1f} ms per run, {seconds[name] * len(study.runs) / 60:.1f} min for the study")
    assert folders == [run_state(run).folder for run in sample]
    print(f"speed-up {seconds['parser per run'] / seconds['one parser']:.2f}x")
    if options.all:
        start = time.perf_counter()
        states = [run_state(run) for run in study.runs]
        parsed = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as where:  # the pre-trained checkpoints the runs start from, empty files
            os.chdir(where)
            for state in states:
                if state.init_from is not None and not state.init_from.is_absolute():
                    state.init_from.parent.mkdir(parents=True, exist_ok=True)
                    state.init_from.touch()
            start = time.perf_counter()
            staged = [len(stage) for stage in stages(study, states)]
            os.chdir(REPO)
        print(f"whole study: run_state {parsed / 60:.1f} min, stages {time.perf_counter() - start:.1f} s, runs per stage {staged}")


if __name__ == "__main__":
    main()
