"""Everything read from a study's run folders: where each run lives and how far it got (``RunState``, every run's
planned once per command by ``run_states``), its measurements (``RunResult``, grouped into experiments whose runs
differ only in their seed), the fine-tuning record the transfer analysis reads (curves from its TensorBoard events),
and the probes of the checkpoints it kept.

A run is read when its fit finished (``checkpoints/finished.json``) and it holds ``measurements.json``; any other run
of the study is listed with the reason, never silently left out of an average: missing (not run or not finished), or
finished without measurements (which a study's transfer section reads from its events instead).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from callbacks.checkpoints import finished
from callbacks.run_config import config_differences, name_run
from cli import fit_config, run_folder
from lightning_modules import objective_name
from lightning_modules.classifier import accuracy_tag

from .passes import checkpoint_hparams, run_folder_of
from .spec import SEED, Run, Study, parse_run_name

__all__ = ["Collected", "FineTuningRecord", "MixedConfigs", "RunResult", "RunState", "checkpoint_probes", "collect",
           "collect_folder", "finetuning_record", "group_experiments", "pretraining_source", "run_config", "run_measure",
           "run_states", "scalar_curves"]

SEED_KEYS = ("seed_everything",)  # what may differ between the runs of one experiment


class MixedConfigs(ValueError):
    """Runs of one experiment whose configs differ in more than the seed."""


# --- where a run lives and how far it got ---

@dataclass(frozen=True)
class RunState:
    """Where ``run`` lives (the folder ``cli.py fit`` names for it), the checkpoint it fine-tunes from
    (``model.init_from``), and the bounds its fit ends at."""
    run: Run
    folder: Path
    init_from: Optional[Path] = None
    bounds: tuple[Optional[int], Optional[int]] = (None, None)  # (max_epochs, max_steps)
    data: Optional[dict] = None  # the config's data section ({class_path, init_args})

    @property
    def state(self) -> Literal["finished", "unfinished", "new"]:
        """How far it got, read from its folder now: finished (``finished.json`` for the same bounds), unfinished (a
        ``last.ckpt`` to resume from) or new."""
        done = finished(self.folder)
        if done is not None and (done.get("max_epochs"), done.get("max_steps")) == self.bounds:
            return "finished"
        return "unfinished" if (self.folder / "checkpoints" / "last.ckpt").is_file() else "new"


def run_config(run: Run):
    """The config ``cli.py fit`` runs ``run`` with (a full parse of its arguments)."""
    return fit_config(run.config_args())


def run_states(study: Study, experiments: Optional[set[str]] = None) -> dict[str, RunState]:
    """Every run's ``RunState`` by name, in the study's order. Each experiment is parsed once, with ``{seed}`` left
    unfilled, and its runs derived from that parse: their seed, ``{seed}`` filled in, a grid point's four values
    set (``GridPoint``), then named as ``cli.py fit`` names them (``name_run``): Table 2's 15,768 runs are 72 parses.
    An experiment whose ``{seed}`` a parse cannot leave unfilled (a number) has each run parsed in full.
    ``experiments``: only the runs of these."""
    templates: dict[tuple, object] = {}
    states = {}
    for run in study.runs:
        if experiments is not None and run.experiment not in experiments:
            continue
        key = (run.config, run.template)
        if key not in templates:
            templates[key] = _template(run)
        config = _derived(templates[key], run) if templates[key] is not None else run_config(run)
        trainer = config.trainer
        states[run.name] = RunState(run, run_folder(config), Path(config.model.init_from) if config.model.init_from else None,
                                    (trainer.max_epochs, trainer.max_steps), config.data.as_dict())
    return states


def _template(run: Run):
    """The unnamed config of ``run``'s experiment, ``{seed}`` unfilled; None when that does not parse or leaves
    ``{seed}`` where ``_derived`` cannot fill it in."""
    try:
        config = fit_config(["--config", str(run.config), f"--seed_everything={run.seed}", *run.template], named=False).clone()
    except (SystemExit, Exception):  # e.g. {seed} in a number: the run's own parse says what is wrong, if anything
        return None
    return config if SEED not in repr(_derived(config, run)) else None


def _derived(template, run: Run):
    """``run``'s config from its experiment's ``_template``: what a full parse of its arguments gives."""
    config = template.clone()
    config.seed_everything = run.seed
    for key, value in config.items():
        if isinstance(value, str) and SEED in value:
            config[key] = value.replace(SEED, str(run.seed))
    if run.point is not None:
        config.model.lr_per_256 = float(run.point.lr_per_256)
        config.model.lr_times_weight_decay = float(run.point.lr_times_weight_decay)
        config.data.init_args.validation_split = float(run.point.validation_split)
        config.trainer.default_root_dir = run.point.root
    name_run(config)
    return config


# --- a run's measurements ---

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
        parsed = parse_run_name(name)
        result, why = read_run(parsed.experiment, parsed.seed, folder)
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
    return RunResult(experiment, int(seed), folder, config, objective_name(objective),
                     dict(objective.get("init_args") or {}), dict(data.get("hparams") or {}), evaluations), None


def collect(study: Study, states: dict[str, RunState]) -> Collected:
    """Every run of a ``Study`` (``states``: ``run_states``), read or listed as missing."""
    found = Collected()
    for run in study.runs:
        found.add(run.name, states[run.name].folder)
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


# --- fine-tuning runs: what the transfer analysis reads ---

RunKind = Literal["P-T", "RI-T", "pre-training"]


@dataclass
class FineTuningRecord:
    """One finished run as the transfer section reads it (transfer.json's ``runs``, via ``asdict``)."""
    run: str
    experiment: str
    seed: int
    kind: RunKind
    pretraining_epoch: Optional[int]  # of the checkpoint a P-T run starts from
    hyper: str  # its lr and weight decay, in words
    pretraining_objective: Optional[str]
    target: str
    measure: str
    block_shuffle: Optional[int]
    validation_split: Optional[float]  # set on a grid point's runs: held-out images, not the test set
    curve: dict[str, list[tuple[int, float]]]  # test accuracy and loss along the steps
    distance_from_start: Optional[float] = None  # ||theta - theta at epoch 0||, where epoch000.ckpt was kept


def finetuning_record(name: str, experiment: str, seed: int, folder: Path,
                      sources: frozenset[Path] = frozenset()) -> FineTuningRecord:
    """What the report needs of one run: its kind (P-T: ``model.init_from`` set; pre-training: a run that ``sources``,
    the run folders other runs start from, holds, or one on the warm-up-exponential schedule of pre-training; else
    RI-T, a run from random initialisation), the pre-training epoch it started from, its block size, and its test
    (validation) loss and accuracy, in the target's measure, along its steps, from its TensorBoard events."""
    config = yaml.safe_load((folder / "config.yaml").read_text())
    model, data = config.get("model") or {}, (config.get("data") or {}).get("init_args") or {}
    init_from = model.get("init_from")
    if init_from:
        kind = "P-T"
    else:  # both train from random initialisation: what tells them apart is that others start from pre-training
        pretrains = folder.resolve() in sources or model.get("lr_schedule", "warmup_exponential") != "cosine"
        kind = "pre-training" if pretrains else "RI-T"
    epoch, objective = None, None
    if init_from:
        source = Path(init_from)
        # mmap: the hyper-parameters without reading the weights (ResNet-50's 100 MB for every fine-tuning run)
        hparams = torch.load(source, map_location="cpu", weights_only=False, mmap=True).get("hyper_parameters", {})
        objective = objective_name(hparams.get("objective"))
        if source.stem.startswith("epoch"):
            epoch = int(source.stem[5:])
        else:
            done = finished(source.parent.parent)
            epoch = done["epochs"] if done else None
    measure = run_measure(folder)
    curves = scalar_curves(folder, (accuracy_tag(measure), "val/loss"))
    curve = {"accuracy": curves.get(accuracy_tag(measure), []), "loss": curves.get("val/loss", [])}
    # the task, or the training file's name as datamodules.convert writes it (<name>_train.beton: <name>)
    target = data.get("task") or Path(str(data.get("train_path") or data.get("train_root") or "target")).stem.removesuffix("_train")
    decay = model.get("lr_times_weight_decay")
    hyper = f"lr/256 {model.get('lr_per_256')}, " + (f"lr×wd {decay:g}" if decay is not None else f"wd {model.get('weight_decay')}")
    return FineTuningRecord(name, experiment, seed, kind, epoch, hyper, objective, target, measure or "top1",
                            data.get("block_shuffle"), data.get("validation_split"), curve)


def pretraining_source(folder: Path) -> Optional[Path]:
    """The run folder a fine-tuning run's ``model.init_from`` checkpoint belongs to (None from random initialisation)."""
    init_from = ((yaml.safe_load((folder / "config.yaml").read_text()) or {}).get("model") or {}).get("init_from")
    return run_folder_of(Path(init_from)).resolve() if init_from else None


def run_measure(folder: Path) -> Optional[str]:
    """The accuracy measure a finished run was validated in (its checkpoint's ``measure``, linked from its data)."""
    return checkpoint_hparams(folder).get("measure")


def checkpoint_probes(folder: Path) -> list[dict]:
    """The probe accuracies (``probe/<dataset>/{linear,knn}_acc``) of each checkpoint a run kept (``epoch<NNN>.ckpt``,
    and its ``last.ckpt`` as the epochs it finished), as its ``TransferProbes`` measured them at that checkpoint's
    step (``at_start`` for epoch 0): the probing half of "which pre-training checkpoint transfers best"; [] for a run
    that probed none."""
    summary = folder / "measurements.json"
    if not summary.is_file():
        return []
    measured = {e["step"]: e["measurements"] for e in json.loads(summary.read_text())["evaluations"]}
    kept = {int(path.stem[len("epoch"):]): path for path in (folder / "checkpoints").glob("epoch*.ckpt")}
    done = finished(folder)
    if done is not None:  # last.ckpt: the epochs it finished, as the P-T runs from it count them
        kept.setdefault(done["epochs"], folder / "checkpoints" / "last.ckpt")
    rows = []
    for epoch, path in sorted(kept.items()):
        step = torch.load(path, map_location="cpu", weights_only=False, mmap=True)["global_step"]  # mmap: not the weights
        probes = {tag: value for tag, value in measured.get(step, {}).items()
                  if tag.startswith("probe/") and tag.endswith(("/linear_acc", "/knn_acc"))}
        if probes:
            rows.append({"epoch": epoch, "step": step, "probes": probes})
    return rows


def scalar_curves(folder: Path, tags: Sequence[str]) -> dict[str, list[tuple[int, float]]]:
    """[(step, value)] of each of ``tags`` a run logged to TensorBoard (the tags it has)."""
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    logged = events.Tags().get("scalars", [])
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in tags if tag in logged}


