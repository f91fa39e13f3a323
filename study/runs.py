"""Reading a study's runs back: each run's config and measurements, grouped into experiments whose runs
differ only in their seed.

A run is read when its fit finished (``checkpoints/finished.json``) and it holds ``measurements.json``; any
other run of the study is listed with the reason, never silently left out of an average: missing (not run or not
finished), or finished without measurements (which a study's transfer section reads from its events instead).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from callbacks.checkpoints import finished
from callbacks.run_config import config_differences

__all__ = ["MixedConfigs", "RunResult", "collect", "collect_folder", "group_experiments"]

SEED_KEYS = ("seed_everything",)  # what may differ between the runs of one experiment


class MixedConfigs(ValueError):
    """Runs of one experiment whose configs differ in more than the seed."""


@dataclass
class RunResult:
    experiment: str
    seed: int
    folder: Path
    config: dict
    objective: str  # class name, as the paper's tables name it (Softmax, CosineSoftmax, ...)
    setting: dict  # the objective's hyper-parameters
    hparams: dict  # the module's other hyper-parameters (backbone, num_classes, ...)
    evaluations: list[dict]

    @property
    def name(self) -> str:
        return f"{self.experiment}/seed{self.seed}"

    @property
    def final(self) -> dict[str, float]:
        """Every number of the run's last evaluation (its end of fit)."""
        return self.evaluations[-1]["measurements"] if self.evaluations else {}

    @property
    def final_step(self) -> int:
        return self.evaluations[-1]["step"] if self.evaluations else -1


@dataclass
class Collected:
    runs: list[RunResult] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)  # (run, why): not run, or not finished
    unmeasured: list[tuple[str, str]] = field(default_factory=list)  # (run, why): finished without measurements.json
    looked_in: list[Path] = field(default_factory=list)

    def add(self, name: str, folder: Path) -> None:
        """The run in ``folder`` (``read_run``), or why it cannot be reported."""
        self.looked_in.append(folder)
        result, why = read_run(*name.split("/seed"), folder)
        if result is not None:
            self.runs.append(result)
        else:
            (self.unmeasured if finished(folder) is not None else self.missing).append((name, why))


def read_run(experiment: str, seed: int | str, folder: Path) -> tuple[Optional[RunResult], Optional[str]]:
    """The run in ``folder``, or None and why it cannot be reported."""
    summary = folder / "measurements.json"
    done = finished(folder)
    if done is None:
        last = folder / "checkpoints" / "last.ckpt"
        return None, "unfinished (a last.ckpt to resume from)" if last.is_file() else "not run"
    if not summary.is_file():
        return None, f"finished at step {done['global_step']} without measurements.json (measure it: README, 'Measure a checkpoint')"
    data = json.loads(summary.read_text())
    config = yaml.safe_load(data.get("config") or "{}") or {}
    objective = data.get("objective") or {"class_path": "Softmax", "init_args": {}}
    evaluations = [e for e in data.get("evaluations", []) if e.get("fingerprint", data.get("fingerprint")) == data.get("fingerprint")]
    return RunResult(experiment, int(seed), folder, config, str(objective["class_path"]).rsplit(".", 1)[-1],
                     dict(objective.get("init_args") or {}), dict(data.get("hparams") or {}), evaluations), None


def collect(study) -> Collected:
    """Every run of a ``Study``, read or listed as missing."""
    from .sweep import run_state

    found = Collected()
    for run in study.runs:
        found.add(run.name, run_state(run).folder)
    return found


def collect_folder(root: Path) -> Collected:
    """Every run under ``root`` laid out as ``<experiment>/seed<k>`` (a study's folder without its file)."""
    found = Collected(looked_in=[root])
    for folder in sorted(p for p in Path(root).glob("**/seed*") if p.is_dir() and re.fullmatch(r"seed\d+", p.name)):
        found.add(f"{folder.parent.name}/{folder.name}", folder)
    return found


def group_experiments(runs: list[RunResult]) -> dict[str, list[RunResult]]:
    """Runs by experiment, in the order first seen, seeds ascending; refuses an experiment whose runs' configs
    differ in anything but the seed (``MixedConfigs``, naming the runs and the keys)."""
    groups: dict[str, list[RunResult]] = {}
    for run in runs:
        groups.setdefault(run.experiment, []).append(run)
    for name, members in groups.items():
        members.sort(key=lambda r: r.seed)
        first = members[0]
        for other in members[1:]:
            differences = config_differences(_without_seed(first.config), _without_seed(other.config))
            if differences:
                raise MixedConfigs(
                    f"{first.name} and {other.name} differ in more than the seed, so they are not seeds of one "
                    f"experiment: {'; '.join(differences[:6])}. Give them different experiment names (config files), "
                    f"or re-run one of them with the other's config.")
    return groups


def _without_seed(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in SEED_KEYS}
