"""Measurements taken during training, at checkpoints: thin callbacks that gather activations and call
the pure functions of ``measurements``. Add them under ``trainer.callbacks`` in a config.
``Preemption`` (checkpoint, requeue, stop on SLURM's warning signal) is on in every run (cli.py)."""

from .measurement import MeasurementCallback
from .preemption import Preemption
from .representation import RepresentationMeasurements
from .probes import TransferData, TransferProbes
from .run_config import RunLogger

__all__ = ["MeasurementCallback", "Preemption", "RepresentationMeasurements", "RunLogger", "TransferData", "TransferProbes"]
