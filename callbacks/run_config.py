"""What a run is: its folder, its config and the fingerprint that tells two runs' configs apart.

A run lives in ``<root>/<name>/<version>``: ``root`` is the logger's ``save_dir`` when a config sets one,
else ``trainer.default_root_dir`` when given, else ``runs``; ``name`` the objective (``cosine_softmax``) unless the logger names it, and
``version`` the seed (``seed3``) unless the logger names it (``name_run``). The folder holds one run of one
config: ``RunConfig`` writes ``config.yaml`` there at the start of fit and refuses a second, different
config, or a fresh start over an unfinished one, before anything is written.

The fingerprint hashes what decides the numbers a run produces: the model, the data and the seed, and the
trainer's arithmetic (precision, accumulation, clipping). It leaves out how the run is executed (devices,
nodes, workers, paths, logging, progress bars, ``max_epochs``/``max_steps``, which only say how far it goes,
and the measurement callbacks, which do not change training), so a resumed or requeued run, on other
hardware or extended by more epochs, keeps its fingerprint.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
from pathlib import Path
from typing import Any, Optional, Union

from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_modules.objectives import objective_name

__all__ = ["RunConfig", "RunFolderError", "RunLogger", "config_differences", "fingerprint", "is_tensorboard", "name_run",
           "objective_slug"]

DEFAULT_NAME = "lightning_logs"  # TensorBoardLogger's name when a config gives none
DEFAULT_SAVE_DIR = "runs"  # cli.trainer_defaults' logger

# Keys (dotted, from the config's top) that say how a run executes, not what it computes.
EXECUTION_KEYS = {
    "ckpt_path",
    "config",
    "trainer.accelerator", "trainer.strategy", "trainer.devices", "trainer.num_nodes", "trainer.plugins",
    "trainer.callbacks", "trainer.logger", "trainer.default_root_dir", "trainer.enable_progress_bar",
    "trainer.enable_model_summary", "trainer.enable_checkpointing", "trainer.num_sanity_val_steps",
    "trainer.log_every_n_steps", "trainer.max_epochs", "trainer.min_epochs", "trainer.max_steps", "trainer.min_steps",
    "trainer.max_time", "trainer.benchmark", "trainer.profiler", "trainer.barebones", "trainer.val_check_interval",
    "trainer.check_val_every_n_epoch", "trainer.limit_val_batches", "trainer.limit_test_batches",
    "trainer.limit_predict_batches", "trainer.fast_dev_run", "trainer.reload_dataloaders_every_n_epochs",
    "checkpoints",
    "model.compile",
    "data.init_args.num_workers", "data.init_args.os_cache", "data.init_args.batch_timeout", "data.init_args.channels_last",
}
PATH_KEYS = re.compile(r"^data\.init_args\.(\w+_path|root)$")  # the same data moved elsewhere is the same data


class RunFolderError(RuntimeError):
    """A run would write into a folder that holds another run."""


def objective_slug(objective: Any) -> str:
    """``CosineSoftmax`` (as ``objective_name`` takes it) -> ``cosine_softmax``."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", objective_name(objective)).lower()


class RunLogger(TensorBoardLogger):
    """Lightning's TensorBoardLogger with every argument spelled out (SummaryWriter's ``max_queue`` and ``flush_secs``
    among them): the logger of every run (``cli.trainer_defaults``; ``class_path: callbacks.RunLogger`` in a config).

    jsonargparse reads a signature with ``**kwargs`` from the class's source (its AST resolver, ``ast.parse``) and,
    when that raises, takes the parent's signature instead: fabric's, which requires ``root_dir``, so a config that
    parsed a moment ago fails. CPython 3.11's ``ast.parse`` raises "AST constructor recursion depth mismatch" when a
    traceback is printed in the middle of a parse (python/cpython#106905; 3.11 formats a traceback's carets with
    ``ast.parse``, and the process prints many an ignored finalizer exception). A signature without ``**kwargs`` is read
    without the source."""

    def __init__(self, save_dir: Union[str, Path] = DEFAULT_SAVE_DIR, name: Optional[str] = DEFAULT_NAME,
                 version: Optional[Union[int, str]] = None, log_graph: bool = False, default_hp_metric: bool = True,
                 prefix: str = "", sub_dir: Optional[Union[str, Path]] = None, max_queue: int = 10, flush_secs: int = 120):
        super().__init__(save_dir, name, version, log_graph, default_hp_metric, prefix, sub_dir, max_queue=max_queue,
                         flush_secs=flush_secs)


def is_tensorboard(logger) -> bool:
    """Whether a config's logger ({class_path, init_args}) writes TensorBoard event files in its own folder."""
    if not hasattr(logger, "init_args"):
        return False
    module, _, name = str(logger.class_path).rpartition(".")
    found = getattr(importlib.import_module(module), name, None) if module else None
    return isinstance(found, type) and issubclass(found, TensorBoardLogger)


def name_run(config) -> None:
    """Fill in the run's folder (module docstring) in a fit config (a jsonargparse Namespace), in place."""
    logger = config.trainer.logger
    if not is_tensorboard(logger):
        return  # another logger (or none) names its own run
    args = logger.init_args
    if config.trainer.default_root_dir is not None and args.save_dir in (None, DEFAULT_SAVE_DIR):
        args.save_dir = config.trainer.default_root_dir  # a save_dir the logger was given explicitly wins
    if args.name in (None, DEFAULT_NAME):
        args.name = objective_slug(config.model.objective)
    if args.version is None:
        seed = config.seed_everything  # LightningCLI has made True an int by now; False: no seeding
        args.version = "unseeded" if seed is None or isinstance(seed, bool) else f"seed{seed}"


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: tree}


def _identity(config: dict) -> dict[str, Any]:
    """The config's keys that decide its numbers (module docstring), flattened."""
    def executes(key: str) -> bool:
        return PATH_KEYS.match(key) is not None or any(key == k or key.startswith(k + ".") for k in EXECUTION_KEYS)

    return {key: value for key, value in _flatten(config).items() if not executes(key)}


def fingerprint(config: dict) -> str:
    """12 hex digits that change with anything that decides a run's numbers, and nothing else."""
    text = json.dumps(_identity(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def config_differences(a: dict, b: dict) -> list[str]:
    """``key: a -> b`` for every deciding key whose value differs between two configs."""
    ia, ib = _identity(a), _identity(b)
    return [f"{k}: {ia.get(k)!r} -> {ib.get(k)!r}" for k in sorted(set(ia) | set(ib)) if ia.get(k) != ib.get(k)]


def read_config(path: Path) -> Optional[dict]:
    import yaml

    return yaml.safe_load(path.read_text()) if path.is_file() else None


class RunConfig(SaveConfigCallback):
    """Writes the run's ``config.yaml`` at the start of fit, after checking the folder holds no other run:
    a different config there, or a ``last.ckpt`` when this fit does not resume (``--ckpt_path=last``), stops
    the run before it writes anything. ``validate`` and ``test`` leave the run's config as it is."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or self.already_saved:
            return
        folder = Path(trainer.log_dir)  # a broadcast: every rank calls it
        problem = self.problem(folder) if trainer.is_global_zero else None
        problem = trainer.strategy.broadcast(problem)
        if problem:
            raise RunFolderError(problem)
        super().setup(trainer, pl_module, stage)

    def config_dict(self) -> dict:
        import yaml

        return yaml.safe_load(self.parser.dump(self.config, skip_none=False))

    def problem(self, folder: Path) -> Optional[str]:
        previous = read_config(folder / self.config_filename)
        elsewhere = ("give this run its own folder (--trainer.logger.init_args.version=<name>, or another seed or "
                     "default_root_dir), or delete that folder")
        if previous is not None:
            differences = config_differences(previous, self.config_dict())
            if differences:
                return (f"{folder} holds a run of another config ({'; '.join(differences[:8])}"
                        f"{'; ...' if len(differences) > 8 else ''}). To keep it, {elsewhere}.")
        last = folder / "checkpoints" / "last.ckpt"
        if last.is_file() and self.config.get("ckpt_path") is None:
            return (f"{folder} holds a run of this config with a checkpoint ({last}). Resume it with "
                    f"--ckpt_path=last; or {elsewhere}.")
        return None
