"""Command line: ``python cli.py {fit,validate,test} --config configs/<experiment>.yaml``.

LightningCLI builds the model, the data module and the trainer from the YAML; every constructor
argument is a knob (``python cli.py fit --help``) that the command line can override, e.g.
``--model.objective=CosineSoftmax --model.objective.temperature=0.03``.
"""

import logging
import signal
import warnings
from pathlib import Path
from typing import Optional

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from jsonargparse import lazy_instance

import compat
from callbacks import Preemption
from callbacks.checkpoints import RunCheckpoints
from callbacks.preemption import Preempted
from callbacks.run_config import RunConfig, RunLogger, is_tensorboard, name_run
from datamodules import ImageClassificationData
from lightning_modules import ObjectiveClassifier
from lightning_modules.atomic_checkpoint import AtomicCheckpointIO


class TransferStudyCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # `checkpoints:` in a config: last.ckpt always, plus the epochs later analyses need (callbacks/checkpoints.py).
        parser.add_lightning_class_args(RunCheckpoints, "checkpoints")
        # What only the data knows sets the model: classes, the global batch (peak lr, EMA decay), the accuracy measure.
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.global_batch_size", "model.global_batch_size", apply_on="instantiate")
        parser.link_arguments("data.measure", "model.measure", apply_on="instantiate")  # Table A.2's, for fine-tuning
        parser.link_arguments("data.channels_last", "model.channels_last", apply_on="instantiate")  # weights as batches

    names_run = True

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        config.trainer.precision = default_precision(config.trainer.precision, config.trainer.accelerator)
        if self.names_run:
            name_run(config)  # <root>/<objective>/seed<k> unless the config names it (callbacks/run_config.py)

    def instantiate_trainer(self, **kwargs) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        # A checkpoint write cut short never replaces the last good one. Installed here rather than as a
        # trainer default: jsonargparse cannot write a plugin instance into the run's config.yaml, which
        # must stay loadable for `fit --config <run>/config.yaml`.
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer


class _ParseOnly(TransferStudyCLI):
    """Parses a command line as ``fit`` would, without naming its run or building anything."""

    names_run = False

    def instantiate_classes(self) -> None:
        pass

    def after_instantiate_classes(self) -> None:
        pass


def parse_only(args: list[str]) -> _ParseOnly:
    """A new parser, ``args`` parsed by it as ``fit`` would parse them (``.config``; its run not yet named)."""
    return _ParseOnly(ObjectiveClassifier, ImageClassificationData, subclass_mode_data=True,
                      trainer_defaults=trainer_defaults(), args=args, run=False)


def fit_config(args: list[str], named: bool = True):
    """The config ``cli.py fit <args>`` would run (a jsonargparse Namespace), its run named (``named``; else its
    folder left for ``name_run`` to fill in), found without building the model, the data or the trainer: the study
    reads it to plan its runs. One parser per process, built on the first call: building it costs twice what a
    parse does."""
    global _kept_parser
    seed_log = logging.getLogger("lightning.fabric.utilities.seed")  # "Seed set to k", once per parsed run
    level = seed_log.level
    seed_log.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():  # a study's command lines come as args by design
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            if _kept_parser is None:
                _kept_parser = parse_only(args)
            else:
                compat.reparse(_kept_parser, args)
            config = _kept_parser.config
            if named:
                name_run(config)
            return config
    finally:
        seed_log.setLevel(level)


_kept_parser: Optional[_ParseOnly] = None


def run_folder(config) -> Path:
    """The folder a ``fit_config`` runs in (``callbacks.run_config.name_run``)."""
    logger = config.trainer.logger
    if not is_tensorboard(logger):
        raise ValueError(f"A study needs a TensorBoardLogger to name its runs' folders, got {logger}.")
    return Path(logger.init_args.save_dir) / logger.init_args.name / logger.init_args.version


def default_precision(precision, accelerator, gpu_has_bf16: Optional[bool] = None):
    """The precision a run gets when its config names none: bf16 autocast when it trains on a GPU that
    has bf16 (the fast path, as in the ImageNet configs), else full fp32 (the CPU path, unchanged)."""
    if precision is not None:
        return precision
    if gpu_has_bf16 is None:
        gpu_has_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    on_gpu = accelerator in ("auto", "gpu", "cuda") and gpu_has_bf16
    return "bf16-mixed" if on_gpu else "32-true"


# Every run writes TensorBoard logs, keeps a last.ckpt (the `checkpoints` arguments) and checkpoints,
# requeues and stops on SLURM's SIGUSR1 or SIGTERM; these callbacks are added to whatever a config lists.
def trainer_defaults() -> dict:
    return {
        "benchmark": True,  # cuDNN picks the fastest convolution algorithms for the shapes in use (GPU only)
        "logger": lazy_instance(RunLogger, save_dir="runs"),  # its signature is read without its source (RunLogger)
        "callbacks": [Preemption()],
    }


def main(args=None, run: bool = True) -> TransferStudyCLI:
    """Parse ``args`` (the command line when None) and run the subcommand; returns the CLI object."""
    try:
        cli = TransferStudyCLI(
            ObjectiveClassifier,
            ImageClassificationData,  # any of its subclasses, by class_path: FFCV, torchvision folders, shapes
            subclass_mode_data=True,
            trainer_defaults=trainer_defaults(),
            save_config_callback=RunConfig,  # one run per folder: refuses another config's, or a fresh fit over one
            save_config_kwargs={"overwrite": True},  # a resumed or requeued run writes its config again
            auto_configure_optimizers=False,  # the recipe lives in ObjectiveClassifier.configure_optimizers
            args=args,
            run=run,
        )
    except Preempted:  # every rank stopped at the same step (callbacks/preemption.py)
        end_process_group()
        raise
    end_process_group()
    return cli


def end_process_group() -> None:
    """Destroy the default process group while the interpreter is still whole. Lightning does so only for
    NCCL; a gloo group (DDP on CPUs) left to interpreter shutdown aborts one rank or another about half the
    time ('terminate called without an active exception', pytorch#190489), which srun and torchrun report
    as a failed job after a finished run. Called only once every rank has finished or stopped together:
    after an error on one rank the others may be blocked in a collective."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def script() -> None:
    """``python cli.py ...``: ``main``, and after a preemption checkpoint an exit with its own status. The first
    rank to exit with 75 makes ``srun --kill-on-bad-exit`` send SIGTERM to the others; Python's shutdown puts
    the default handler back (death, status 143, which the batch script reads as a failure) but leaves an
    ignored signal ignored."""
    try:
        main()
    except Preempted:
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(signum, signal.SIG_IGN)
        raise


if __name__ == "__main__":
    script()
