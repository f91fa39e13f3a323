"""The model side: backbones, the nine objectives, and the LightningModule that trains with them."""

from .classifier import Network, ObjectiveClassifier
from .objectives import (
    CosineSoftmax,
    ExtraFinalL2,
    LabelSmoothing,
    LogitNorm,
    LogitPenalty,
    Objective,
    PenultimateDropout,
    Sigmoid,
    Softmax,
    SquaredError,
    make_objective,
    objective_classes,
    objective_name,
)

__all__ = [
    "Network",
    "ObjectiveClassifier",
    "Objective",
    "Softmax",
    "LabelSmoothing",
    "Sigmoid",
    "ExtraFinalL2",
    "PenultimateDropout",
    "LogitPenalty",
    "LogitNorm",
    "CosineSoftmax",
    "SquaredError",
    "objective_classes",
    "objective_name",
    "make_objective",
]
