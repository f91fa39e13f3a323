"""What every measurement callback shares: when it runs, on which weights, and where its numbers go.

A measurement runs every ``every_n_epochs`` training epochs and once more at the end of fit (if the
last epoch was not already measured), with ``at_start`` also on the initial weights (step 0: what a
run's ``epoch000.ckpt`` holds), on the weights that validation evaluates (the EMA when it is on),
in eval mode. Outside fit, ``cli.py validate --config <run>/config.yaml --ckpt_path <checkpoint>`` measures a
saved checkpoint after validating it, recorded at the checkpoint's step: how a study adds a measurement
to runs that ended without it. The network's forward passes run under the trainer's precision (bf16 autocast on a GPU, as
in training); the statistics computed from them do not: autocast would run their float32 matrix products
(probes, kNN similarities) in bf16. Its numbers go to every logger (TensorBoard: one curve
per tag, at the global step) and to ``measurements.json`` beside the run's logs: for every evaluated
epoch, every measurement, with the objective, the hyper-parameters and the run's config, for reports
to aggregate later; with them, validation's own numbers (``val/acc1``, ``val/loss``, ...) of the same step.

A measurement never ends a run. The training loss is checked first (a non-finite loss stops the run, as
in training); then a measurement that fails, e.g. on a training subset that lacks a class or on weights
that have diverged, is reported as a warning and recorded under ``errors`` in measurements.json, and
training, the other measurements and the epoch's checkpoint go on.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import lightning as L
import numpy as np
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_modules.classifier import PENULTIMATE

from .run_config import fingerprint

__all__ = ["DivergedWeights", "MeasurementCallback", "forward_pass", "gather_rows", "require_finite", "summary_path"]

SUMMARY_FILE = "measurements.json"


def summary_path(trainer: L.Trainer) -> Path:
    """Beside the run's logs. Read from the logger, not ``trainer.log_dir``: that one is a broadcast, which
    rank 0 alone (the only one writing) would enter and wait in forever under DDP."""
    logger = trainer.logger
    folder = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None) or trainer.default_root_dir
    return Path(folder) / SUMMARY_FILE


class DivergedWeights(FloatingPointError):
    """The evaluated network's outputs are not finite although the training loss was."""


def diverged(what: str) -> DivergedWeights:
    return DivergedWeights(
        f"{what} not finite: the evaluated weights have diverged (the training loss may still be finite, if "
        f"huge). Lower the learning rate (model.lr_per_256), lengthen model.warmup_epochs, or check the "
        f"objective's hyper-parameters; `train/loss` in TensorBoard shows where it took off."
    )


def require_finite(values: Tensor, what: str) -> Tensor:
    """``values`` if finite, else ``DivergedWeights`` saying what that means and what to change. Called on
    numbers every process holds alike (gathered or reduced), so all of them fail or none does."""
    if not torch.isfinite(values).all():
        raise diverged(what + " are")
    return values


def forward_pass(trainer: L.Trainer, network: torch.nn.Module, images: Tensor) -> Tensor:
    """``network(images)`` under the trainer's precision. Forward hooks that reduce activations on the way
    run inside it: they turn autocast off for their own arithmetic (representation.py)."""
    with trainer.precision_plugin.forward_context():
        return network(images)


def gather_rows(module: L.LightningModule, positions: np.ndarray, *rows: Tensor) -> tuple[Tensor, ...]:
    """Every process's ``rows``, one per sample, on every process and in the order of the samples'
    ``positions`` (this process's, e.g. ``datamodule.shard(n, train=False)``): what is drawn from them by
    position afterwards (the probe's validation split, the calibration halves) is then the same for any
    number of processes. Checked finite (``require_finite``)."""
    positions = torch.as_tensor(np.asarray(positions), device=module.device)
    if any(len(r) != len(positions) for r in rows):
        raise RuntimeError(f"An evaluation pass gave {[len(r) for r in rows]} rows for the {len(positions)} samples "
                           f"it was given: the loader must keep every sample, in order.")
    if module.trainer.world_size > 1:
        positions = _gather_ragged(module, positions)
        rows = tuple(_gather_ragged(module, r) for r in rows)
    order = torch.argsort(positions)
    return tuple(require_finite(r[order], "The evaluated network's outputs") for r in rows)


def _gather_ragged(module: L.LightningModule, rows: Tensor) -> Tensor:
    """Concatenate every process's ``rows`` (its own number of them), in rank order."""
    counts = module.all_gather(torch.tensor(rows.shape[0], device=rows.device))
    padded = torch.zeros((int(counts.max()), *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
    padded[: rows.shape[0]] = rows
    gathered = module.all_gather(padded)  # (world, max_rows, ...)
    return torch.cat([gathered[r, : int(n)] for r, n in enumerate(counts)])


class MeasurementCallback(Callback):
    """Base of the measurement callbacks: subclasses implement ``measure`` and return tag -> value
    (plus optional TensorBoard figures by tag)."""

    def __init__(self, every_n_epochs: int = 1, at_start: bool = False):
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}.")
        self.every_n_epochs = every_n_epochs
        self.at_start = at_start
        self._last_measured_step: Optional[int] = None
        self._last_scalars: dict[str, float] = {}
        self._last_error: Optional[str] = None
        self._loaders: dict[tuple, object] = {}
        self._fit_started, self.seconds = time.perf_counter(), 0.0  # time spent measuring, for its share of the fit
        self._validation: tuple[Optional[int], dict[str, float]] = (None, {})  # (step, val/* metrics) of the last validation

    def measure(self, trainer: L.Trainer, module: L.LightningModule) -> tuple[dict[str, float], dict[str, object]]:
        raise NotImplementedError

    def loader(self, trainer: L.Trainer, source: str, subset=None, crop_ratio: Optional[float] = None, local: bool = False):
        """The data module's evaluation loader for ``source`` (``evaluation_dataloader``), built once and reused
        at every measurement (an FFCV loader compiles its pipeline when built: seconds that would recur)."""
        chosen = None if subset is None else hashlib.sha1(np.ascontiguousarray(subset).tobytes()).hexdigest()
        key = (id(trainer.datamodule), source, chosen, crop_ratio, local)
        if key not in self._loaders:
            self._loaders[key] = trainer.datamodule.evaluation_dataloader(source, subset, crop_ratio, local)
        return self._loaders[key]

    # --- schedule ---

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._run(trainer, module)

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._fit_started, self.seconds = time.perf_counter(), 0.0

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.at_start and trainer.global_step == 0:  # the initial weights (epoch000.ckpt's), not a resumed run's
            self._run(trainer, module)

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self._validation = (measured_at(trainer, module)[1], metrics)
        if trainer.state.fn == "validate":  # a saved checkpoint, measured after its validation
            self._run(trainer, module)

    def on_fit_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self._last_measured_step != trainer.global_step:
            self._run(trainer, module)
        if trainer.is_global_zero and self._last_scalars:
            share = self.seconds / max(time.perf_counter() - self._fit_started, 1e-9)
            print(final_summary(type(self).__name__, trainer, self._last_scalars))
            print(f"  {type(self).__name__} took {self.seconds:.1f} s, {100 * share:.1f} % of the fit's wall time")
        if trainer.is_global_zero and self._last_error:
            print(f"{type(self).__name__} at step {trainer.global_step} failed (in {summary_path(trainer)}): {self._last_error}")

    def _run(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if hasattr(module, "raise_if_nonfinite"):
            module.raise_if_nonfinite()  # a non-finite loss stops the run before anything is measured
        epoch, step = measured_at(trainer, module)
        start, error = time.perf_counter(), None
        try:
            with self.evaluating(trainer, module):
                scalars, figures = self.measure(trainer, module)
            bad = [tag for tag, value in scalars.items() if not math.isfinite(value)]
            if bad:
                raise diverged(", ".join(bad[:3]) + (" is" if len(bad) == 1 else " are"))
        except Exception as err:  # noqa: BLE001 -- reported and recorded; the run goes on
            scalars, figures = {}, {}
            error = f"{type(err).__name__}: {err}"
            rank_zero_warn(f"{type(self).__name__} failed at step {step}, training goes on: {error}")
        self.seconds += time.perf_counter() - start
        self._last_measured_step, self._last_scalars, self._last_error = step, scalars, error
        if trainer.is_global_zero:
            validated_at, validation = self._validation
            record(trainer, module, epoch, step, scalars, figures, errors={type(self).__name__: error} if error else {},
                   validation=validation if validated_at == step else {})

    @staticmethod
    @contextmanager
    def evaluating(trainer: L.Trainer, module: L.LightningModule):
        """Eval mode and no gradients (autocast only around forward passes: ``forward_pass``); the training mode
        is restored after. Outside inference mode, which ``validate`` runs its hooks in: the fits inside a
        measurement (calibration's temperature, the probes) turn gradients back on."""
        was_training = module.training
        module.eval()
        try:
            with torch.inference_mode(False), torch.no_grad():
                yield
        finally:
            module.train(was_training)


def measured_at(trainer: L.Trainer, module: L.LightningModule) -> tuple[int, int]:
    """(epoch, step) of the evaluated weights: the run's position in fit, a loaded checkpoint's outside it."""
    if trainer.state.fn != "fit" and getattr(module, "checkpoint_position", None) is not None:
        return module.checkpoint_position
    return trainer.current_epoch, trainer.global_step


def final_summary(name: str, trainer: L.Trainer, scalars: dict[str, float]) -> str:
    """The end-of-fit numbers a reader wants first; per-block values are left to TensorBoard and the JSON."""
    lines = [f"{name} at step {trainer.global_step} (all of them in {summary_path(trainer)}):"]
    for tag, value in scalars.items():
        layer = tag.rsplit("/", 1)[-1]
        if tag.startswith(("class_separation/", "relu_nonzero/")) and layer != PENULTIMATE:
            continue
        lines.append(f"  {tag:<40} {value:.4g}")
    return "\n".join(lines)


def record(trainer: L.Trainer, module: L.LightningModule, epoch: int, step: int, scalars: dict[str, float],
           figures: dict[str, object], errors: Optional[dict[str, str]] = None,
           validation: Optional[dict[str, float]] = None) -> None:
    """Log to every logger at ``step`` and merge into the run's measurements.json (rank 0), with the errors of
    measurements that failed at this step, by callback, and validation's numbers of this step (already
    logged by the module)."""
    for logger in trainer.loggers:
        logger.log_metrics(scalars, step=step)
        if isinstance(logger, TensorBoardLogger):
            for tag, figure in figures.items():
                logger.experiment.add_figure(tag, figure, global_step=step)
        logger.save()
    for figure in figures.values():
        import matplotlib.pyplot as plt

        plt.close(figure)

    path = summary_path(trainer)
    config = path.parent / "config.yaml"
    config_text = config.read_text() if config.is_file() else None
    run = fingerprint(yaml.safe_load(config_text)) if config_text else None
    summary = json.loads(path.read_text()) if path.is_file() else {"evaluations": []}
    if summary.get("fingerprint") != run and summary["evaluations"]:
        # Another config's numbers (a folder reused with other hyper-parameters): set aside, never merged.
        path.replace(path.with_name(f"measurements.{summary.get('fingerprint')}.json"))
        summary = {"evaluations": []}
    summary["fingerprint"] = run  # callbacks/run_config.py: what decides the numbers
    summary["objective"] = module.hparams.get("objective")
    summary["hparams"] = {k: v for k, v in module.hparams.items() if k != "objective"}
    if config_text is not None:
        summary["config"] = config_text
    evaluations = {e["step"]: e for e in summary["evaluations"]}  # a resumed run re-measures a step: replace
    entry = evaluations.setdefault(step, {"epoch": epoch, "step": step, "measurements": {}})
    entry["fingerprint"] = run
    entry["measurements"].update({**(validation or {}), **{tag: float(v) for tag, v in scalars.items()}})
    if errors:
        entry.setdefault("errors", {}).update(errors)
    summary["evaluations"] = [evaluations[s] for s in sorted(evaluations)]
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".json.{os.getpid()}.partial")
    partial.write_text(json.dumps(summary, indent=1, default=str))
    partial.replace(path)  # never a half-written summary
