"""Measurements taken during training, at checkpoints: thin callbacks that gather activations and call
the pure functions of ``measurements``. Add them under ``trainer.callbacks`` in a config."""

from .measurement import MeasurementCallback
from .representation import RepresentationMeasurements
from .transfer import TransferData, TransferProbes

__all__ = ["MeasurementCallback", "RepresentationMeasurements", "TransferData", "TransferProbes"]
