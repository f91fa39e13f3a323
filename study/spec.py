"""A study: which experiment configs, which seeds, and how its runs are compared (a YAML file under
``configs/studies/``, so a study is reproducible like a run).

    experiments:            # cli.py fit configs; each config's file name (its stem) names the experiment
      - configs/embedded/softmax.yaml
      - configs/embedded/sigmoid.yaml
    seeds: [0, 1]           # every experiment runs once per seed (--seed_everything)
    overrides: []           # cli.py arguments for every run, e.g. ["--trainer.max_epochs=2"]
    report: runs/embedded/report
    cka:                    # between-model CKA (Figure 2); optional
      pairs:                # block x block heatmaps (Figure 2a): runs as <experiment>/seed<k>
        - [softmax/seed0, softmax/seed1]          # control: two seeds of one objective
        - [softmax/seed0, softmax/seed0@untrained]  # control: an untrained network, BN moments of training images
      layer: penultimate    # the objective x objective matrix of this layer's CKA (Figure 2b); null: none
      seed: 0               # ... rows: the experiments' runs of this seed; columns: those of the study's next seed
      batch_size: 250       # images per CKA minibatch (the paper: 1,500), random samples of validation
      images: null          # this many validation images, class-balanced (all by default)
      epochs: 1             # passes over them, each in a fresh random order (the paper: 10)
    agreement: true         # prediction agreement between the matrix's runs (Figure C.4)

An experiment may also be a variant of a config: ``{name: ri_t, config: configs/transfer/finetune.yaml,
overrides: [--model.init_from=null, --trainer.default_root_dir=runs/transfer/ri_t]}`` (its own folder, since
the folder is named by the objective). ``{seed}`` in a variant's overrides is the run's seed, so fine-tuning seed k
can start from pre-training seed k (``--model.init_from=runs/imagenet/softmax/seed{seed}/checkpoints/last.ckpt``).
``grid:`` chooses its lr and weight decay as appendix A.3 does (``GridPlan``). ``transfer:`` adds Neyshabur et al.'s passes on the runs' checkpoints
(``TransferPlan``: barriers between pairs, module criticality against each run's ``epoch000.ckpt``, the talk's
tables of CKA by stage, distance and errors between ``representations`` pairs).

A run is ``<experiment>/seed<k>``; it lives in the folder ``cli.py fit`` names for it (``cli.run_folder``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import yaml

from lightning_modules import objective_classes, objective_name

__all__ = ["CKAPlan", "GridPlan", "GridPoint", "Run", "RunName", "Study", "StudyError", "TransferPlan", "UNTRAINED",
           "check_grid", "check_lambdas", "parse_run_name"]

UNTRAINED = "@untrained"  # a run's architecture at initialisation, its BN moments computed on training images
SEED = "{seed}"  # in an experiment's overrides: the run's seed
RUN_NAME = re.compile(r"^(?P<experiment>[^/@]+)/seed(?P<seed>\d+)(?P<untrained>@untrained)?$")


class StudyError(ValueError):
    """A study, or the plan of one of its passes, that cannot run: said before anything runs."""


class RunName(NamedTuple):
    experiment: str
    seed: int
    untrained: bool  # ``@untrained``: the run's architecture at initialisation


def parse_run_name(name: str) -> Optional[RunName]:
    """``<experiment>/seed<k>[@untrained]`` in its parts; None for a name of another form (a path)."""
    match = RUN_NAME.match(name)
    return RunName(match["experiment"], int(match["seed"]), bool(match["untrained"])) if match else None


@dataclass(frozen=True)
class GridPoint:
    """One (lr, weight decay) point of an experiment's grid (``GridPlan``): an experiment of its own, named
    ``<experiment>_grid_lr<i>_wd<j>``, trained on the target's training images less the held-out ``validation_split``
    in its own folder ``root`` (``<experiment's root>/<experiment>_grid/lr<i>_wd<j>``)."""
    experiment: str
    lr_per_256: float
    lr_times_weight_decay: float
    validation_split: float
    root: str

    def overrides(self) -> tuple[str, ...]:
        """The ``cli.py fit`` arguments that make the experiment this point."""
        return (f"--model.lr_per_256={self.lr_per_256}", f"--model.lr_times_weight_decay={self.lr_times_weight_decay}",
                f"--data.init_args.validation_split={self.validation_split}", f"--trainer.default_root_dir={self.root}")


@dataclass(frozen=True)
class Run:
    """A run of a study: ``cli.py fit --config <config> --seed_everything=<seed> <overrides>``. ``template``: the
    arguments of the experiment it derives from (a grid point's is its grid's experiment) with ``{seed}`` unfilled,
    so that planning parses each experiment once and derives its runs (``runs.run_states``)."""
    experiment: str
    seed: int
    config: Path
    overrides: tuple[str, ...] = ()
    template: tuple[str, ...] = ()
    point: Optional[GridPoint] = None

    @property
    def name(self) -> str:
        return f"{self.experiment}/seed{self.seed}"

    def config_args(self) -> list[str]:
        """The arguments that make its config (``cli.fit_config``)."""
        return ["--config", str(self.config), f"--seed_everything={self.seed}", *self.overrides]

    def fit_args(self) -> list[str]:
        """``cli.py fit`` arguments that run it, or resume it from its last checkpoint."""
        return [*self.config_args(), "--ckpt_path=last"]


@dataclass(frozen=True)
class CKAPlan:
    pairs: tuple[tuple[str, str], ...] = ()
    layer: Optional[str] = "penultimate"
    seed: int = 0
    batch_size: int = 250  # images per minibatch (the paper: 1,500)
    images: Optional[int] = None  # this many validation images, class-balanced (compare.pass_images); all by default
    epochs: int = 1  # passes over them, each in a fresh random order (the paper: 10)


@dataclass(frozen=True)
class GridPlan:
    """Appendix A.3's choice of fine-tuning hyper-parameters: every (lr, decay) point trained on the target's
    training images less a held-out ``validation_split``, once per seed of the experiment (A.3: from each of the
    3 pre-trained networks), or of ``seeds``; the point of best held-out accuracy averaged over them; then the
    experiment itself refit with it on all of the training images and tested. ``lr_times_weight_decay`` is A.3's
    grid variable (``model.lr_times_weight_decay``: the decay is value / the run's actual peak lr; None: no decay)."""

    lr_per_256: tuple[float, ...]
    lr_times_weight_decay: tuple[Optional[float], ...] = (None,)
    validation_split: float = 0.2
    points: tuple[GridPoint, ...] = ()
    seeds: Optional[tuple[int, ...]] = None  # the seeds every point trains with; None: the experiment's


@dataclass(frozen=True)
class TransferPlan:
    """What is transferred (``study/transfer.py``): loss and error barriers between ``pairs`` of runs along
    ``lambdas`` (batch-norm moments recomputed on ``bn_images`` training images, and, to show the difference,
    interpolated; 95 % bootstrap intervals from ``resamples`` resamples of the images), parameter distances of the
    same pairs, and the module criticality of ``criticality`` runs against their starting weights (``modules``:
    layers or blocks; admissible by train ``error`` within ``epsilon`` of the final's, or by ``loss``), on
    ``images`` training and test images drawn class-balanced from ``seed``, which also seeds the noise. For the
    ``representations`` pairs, the talk's tables (``transfer.representations``): CKA by stage, parameter distance
    (whole and per module, over the parameters both share) and, between runs of the target's head, where they err;
    on ``images`` test images of the target of the first pair's first run (name a fine-tuned run first)."""

    pairs: tuple[tuple[str, str], ...] = ()
    lambdas: tuple[float, ...] = tuple(round(0.02 * i, 2) for i in range(51))  # 51 points in [0, 1], as the authors' 50
    criticality: tuple[str, ...] = ()
    alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)
    sigmas: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0)
    draws: int = 10  # as the reference code
    epsilon: float = 0.01
    admissible: str = "error"
    modules: str = "layers"
    images: int = 1000
    bn_images: int = 2000
    batch_size: int = 250
    resamples: int = 1000
    seed: int = 0
    representations: tuple[tuple[str, str], ...] = ()


@dataclass
class Study:
    path: Path
    experiments: dict[str, Path]
    seeds: tuple[int, ...]
    overrides: tuple[str, ...] = ()
    report: Path = Path("report")
    cka: Optional[CKAPlan] = None
    agreement: bool = False
    variants: dict[str, tuple[str, ...]] = field(default_factory=dict)  # an experiment's own overrides
    transfer: Optional[TransferPlan] = None
    own_seeds: dict[str, tuple[int, ...]] = field(default_factory=dict)  # an experiment's own seeds
    grids: dict[str, GridPlan] = field(default_factory=dict)  # experiments refit at the best point of a grid
    runs: list[Run] = field(init=False)

    def __post_init__(self):
        points = {p.experiment: (name, p) for name, grid in self.grids.items() for p in grid.points}
        self.runs = []
        for name, config in self.experiments.items():
            family, point = points.get(name, (name, None))
            template = (*self.variants.get(family, ()), *self.overrides)
            args = (*self.variants.get(name, ()), *self.overrides)
            self.runs += [Run(name, seed, config, tuple(arg.replace(SEED, str(seed)) for arg in args), template, point)
                          for seed in self.own_seeds.get(name, self.seeds)]

    @classmethod
    def load(cls, path: str | Path) -> "Study":
        """Read and check a study file: every config exists, names its objective by a known class, and every
        run a CKA pair names is one of the study's."""
        path = Path(path)
        if not path.is_file():
            raise StudyError(f"No study file {path}; the studies that come with the code are in configs/studies/.")
        spec = yaml.safe_load(path.read_text()) or {}
        unknown = set(spec) - {"experiments", "seeds", "overrides", "report", "cka", "agreement", "transfer"}
        if unknown:
            raise StudyError(f"{path}: unknown keys {sorted(unknown)}; a study has experiments, seeds, overrides, report, "
                             f"cka, agreement and transfer.")
        experiments: dict[str, Path] = {}
        variants: dict[str, tuple[str, ...]] = {}
        own_seeds: dict[str, tuple[int, ...]] = {}
        grids: dict[str, GridPlan] = {}
        for entry in spec.get("experiments") or []:
            if isinstance(entry, dict):
                if set(entry) - {"name", "config", "overrides", "seeds", "grid"} or "config" not in entry or "name" not in entry:
                    raise StudyError(f"{path}: an experiment is a config path, or {{name, config, overrides, seeds, grid}}; "
                                     f"got {entry}.")
                name, config = str(entry["name"]), Path(entry["config"])
                variants[name] = tuple(entry.get("overrides") or ())
                if "seeds" in entry:
                    own_seeds[name] = tuple(_check_seeds(path, entry["seeds"]))
                if "grid" in entry:
                    if not config.is_file():
                        raise StudyError(f"{path}: experiment config {config} does not exist.")
                    grid = _grid(path, name, entry["grid"], _root(config, variants[name]))
                    for point in grid.points:  # the grid's runs come first, with its or the experiment's seeds
                        experiments[point.experiment] = config
                        variants[point.experiment] = (*variants[name], *point.overrides())
                        own_seeds[point.experiment] = grid.seeds or own_seeds.get(name) or tuple(spec.get("seeds", [0]))
                    grids[name] = grid
            else:
                config = Path(entry)
                name = config.stem
            if not config.is_file():
                raise StudyError(f"{path}: experiment config {config} does not exist (paths are relative to the "
                                 f"repository root, where the study runs).")
            if name in experiments:
                raise StudyError(f"{path}: two experiments are named {name!r} ({experiments[name]} and "
                                 f"{config}); an experiment is named by its config's file name, or by its name.")
            if "/" in name or "@" in name:
                raise StudyError(f"{path}: experiment name {name!r} may not hold '/' or '@' (runs are named <experiment>/seed<k>).")
            _check_objective(config)
            experiments[name] = config
        if not experiments:
            raise StudyError(f"{path}: no experiments; list cli.py fit configs under `experiments:`.")
        seeds = _check_seeds(path, spec.get("seeds", [0]))
        cka = None
        if spec.get("cka"):
            c = spec["cka"]
            unknown = set(c) - {"pairs", "layer", "seed", "batch_size", "images", "epochs"}
            if unknown:
                raise StudyError(f"{path}: unknown cka keys {sorted(unknown)}; cka has pairs, layer, seed, batch_size, images, "
                                 f"epochs.")
            cka = CKAPlan(tuple(tuple(p) for p in c.get("pairs", [])), c.get("layer", "penultimate"), c.get("seed", seeds[0]),
                          c.get("batch_size", 250), c.get("images"), c.get("epochs", 1))
        transfer = None
        if spec.get("transfer") is not None:  # {} asks for the fine-tuning section alone
            t = dict(spec["transfer"])
            known = set(TransferPlan.__dataclass_fields__)
            if set(t) - known:
                raise StudyError(f"{path}: unknown transfer keys {sorted(set(t) - known)}; transfer has {', '.join(sorted(known))}.")
            for key in ("pairs", "representations", "lambdas", "criticality", "alphas", "sigmas"):
                if key in t:
                    t[key] = tuple(tuple(p) if key in ("pairs", "representations") else p for p in t[key] or ())
            transfer = TransferPlan(**t)
        study = cls(path, experiments, tuple(seeds), tuple(spec.get("overrides") or ()), Path(spec.get("report", "report")),
                    cka, bool(spec.get("agreement", False)), variants, transfer, own_seeds, grids)
        study._check_pairs()
        study._check_transfer()
        return study

    def find_run(self, name: str) -> Run:
        """The run ``<experiment>/seed<k>`` (``@untrained`` allowed: the same run's architecture)."""
        parsed = parse_run_name(name)
        if not parsed:
            raise StudyError(f"{self.path}: {name!r} is not a run name; write <experiment>/seed<k>, e.g. "
                             f"{next(iter(self.experiments))}/seed{self.seeds[0]}.")
        found = [r for r in self.runs if r.experiment == parsed.experiment and r.seed == parsed.seed]
        if not found:
            raise StudyError(f"{self.path}: {name!r} is not one of the study's runs (experiments: "
                             f"{', '.join(self.experiments)}; seeds: {list(self.seeds)}, unless an experiment names its own).")
        return found[0]

    def _check_run_pairs(self, pairs, what: str) -> None:
        for pair in pairs:
            if len(pair) != 2:
                raise StudyError(f"{self.path}: a {what} pair names two runs, got {list(pair)}.")
            for name in pair:
                self.find_run(name)

    def _check_pairs(self) -> None:
        if self.cka is None:
            return
        self._check_run_pairs(self.cka.pairs, "CKA")
        if self.cka.seed not in self.seeds:
            raise StudyError(f"{self.path}: cka.seed {self.cka.seed} is not one of the study's seeds {list(self.seeds)}.")

    def _check_transfer(self) -> None:
        """Names and grids of ``transfer`` checked now, not after the runs have trained."""
        if self.transfer is None:
            return
        self._check_run_pairs(self.transfer.pairs, "barrier")
        self._check_run_pairs(self.transfer.representations, "representations")
        for pair in self.transfer.representations:
            if any(n.endswith(UNTRAINED) for n in pair):
                raise StudyError(f"{self.path}: transfer.representations pair {list(pair)}: these tables compare trained "
                                 f"runs; an untrained control belongs in cka.pairs.")
        for name in self.transfer.criticality:
            self.find_run(name)
        try:
            if self.transfer.pairs:
                check_lambdas(self.transfer.lambdas)
            if self.transfer.criticality:
                check_grid(self.transfer.alphas, self.transfer.sigmas, self.transfer.draws, self.transfer.admissible)
                if self.transfer.modules not in ("layers", "blocks"):
                    raise StudyError(f"modules={self.transfer.modules!r}: choose layers (each convolution or linear layer "
                                     f"with its batch norm, the papers') or blocks.")
        except StudyError as err:
            raise StudyError(f"{self.path}: transfer: {err}") from None


def _root(config: Path, overrides: tuple[str, ...]) -> str:
    """The experiment's trainer.default_root_dir: its last override, else its config's, else runs."""
    for arg in reversed(overrides):
        if arg.startswith("--trainer.default_root_dir="):
            return arg.split("=", 1)[1]
    return str(((yaml.safe_load(config.read_text()) or {}).get("trainer") or {}).get("default_root_dir") or "runs")


def _grid(path: Path, name: str, grid: dict, root: str) -> GridPlan:
    """``name``'s grid (``GridPlan``), its points' folders under ``root``, the experiment's own."""
    known = {"lr_per_256", "lr_times_weight_decay", "validation_split", "seeds"}
    if set(grid) - known or not grid.get("lr_per_256"):
        raise StudyError(f"{path}: {name}'s grid has lr_per_256 (a non-empty list), lr_times_weight_decay (values or null), "
                         f"validation_split and seeds; got {sorted(grid)}.")
    lrs, decays = tuple(grid["lr_per_256"]), tuple(grid.get("lr_times_weight_decay") or (None,))
    number = (int, float)
    if any(not isinstance(v, number) for v in lrs) or any(d is not None and not isinstance(d, number) for d in decays):
        raise StudyError(f"{path}: {name}'s grid holds values that are not numbers: {lrs}, {decays} (YAML reads 1e-5 "
                         f"as text; write 1.0e-5).")
    if any(lr <= 0 for lr in lrs) or any(d is not None and d < 0 for d in decays):
        raise StudyError(f"{path}: {name}'s grid needs positive learning rates and non-negative decays, got {lrs}, {decays}.")
    split = float(grid.get("validation_split", 0.2))
    points = tuple(GridPoint(f"{name}_grid_lr{i}_wd{j}", lr, 0.0 if d is None else float(d), split,
                             f"{root}/{name}_grid/lr{i}_wd{j}")
                   for i, lr in enumerate(lrs) for j, d in enumerate(decays))
    seeds = tuple(_check_seeds(path, grid["seeds"])) if "seeds" in grid else None
    return GridPlan(lrs, decays, split, points, seeds)


def _check_seeds(path: Path, seeds) -> list[int]:
    if not seeds or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds) or len(set(seeds)) < len(seeds):
        raise StudyError(f"{path}: seeds must be distinct non-negative integers, got {seeds}.")
    return list(seeds)


def _check_objective(config: Path) -> None:
    """An experiment's objective must be one of lightning_modules' classes, said now rather than after the
    runs before it have trained."""
    objective = ((yaml.safe_load(config.read_text()) or {}).get("model") or {}).get("objective")
    if isinstance(objective, dict):
        objective = objective.get("class_path")
    if objective is None:
        return  # the module's default (Softmax)
    known = objective_classes()
    if objective_name(objective) not in known:
        raise StudyError(f"{config}: unknown objective {objective!r}; choose one of {', '.join(sorted(known))}.")


def check_lambdas(lambdas: Sequence[float]) -> None:
    if len(lambdas) == 0:
        raise StudyError("The lambda grid is empty; give points along the path, e.g. lambdas: [0, 0.1, ..., 1] "
                         "(0 and 1, the two networks, are needed for the barrier).")
    if 0 not in lambdas or 1 not in lambdas:
        raise StudyError(f"The lambda grid {list(lambdas)} must hold 0 and 1 (the two networks): the barrier is "
                         f"measured against the straight line between their losses.")


def check_grid(alphas: Sequence[float], sigmas: Sequence[float], draws: int, admissible: str = "error") -> None:
    if len(alphas) == 0 or any(not 0 <= a <= 1 for a in alphas):
        raise StudyError(f"The alpha grid {list(alphas)} must be non-empty, in [0, 1] (0: the module at its initial "
                         f"weights, 1: final), e.g. [0.25, 0.5, 0.75, 1].")
    if len(sigmas) == 0 or any(not 0 < s <= 1 for s in sigmas):
        raise StudyError(f"The sigma grid {list(sigmas)} must be non-empty, in (0, 1] (noise std relative to the "
                         f"RMS of each weight tensor; the definition takes sigma <= 1), e.g. [0.01, 0.03, 0.1, 0.3].")
    if draws < 1:
        raise StudyError(f"draws={draws}: take at least one noise draw per point (several average out the noise).")
    if admissible not in ("error", "loss"):
        raise StudyError(f"admissible={admissible!r}: choose 'error' (the mean train 0-1 error within epsilon of the "
                         f"final network's: the definition) or 'loss' (the mean loss within (1 + epsilon) x the final's).")
