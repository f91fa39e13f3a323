"""The mathematics of the measurements: pure functions and torchmetrics Metrics, tensors in, numbers out.

Callbacks (``callbacks/``) gather activations during training and call these; the same functions serve
offline analysis of saved checkpoints. Each is tested against a brute-force or textbook computation.
"""

from .class_separation import ClassSeparation, class_separation, class_separation_from_sums
from .relu_sparsity import NonzeroFraction, relu_nonzero_fraction
from .neural_collapse import NeuralCollapseStats, neural_collapse_statistics
from .calibration import calibration_statistics, expected_calibration_error, fit_temperature, negative_log_likelihood, probabilities
from .accuracy import MEASURES, MeasuredAccuracy, score
from .probes import KnnProbeResult, LinearProbeResult, knn_probe, linear_probe
from .cka import MinibatchCKA, feature_space_cka, gram, linear_cka, unbiased_hsic
from .agreement import PredictionAgreement, prediction_agreement

__all__ = [
    "class_separation", "class_separation_from_sums", "ClassSeparation",
    "relu_nonzero_fraction", "NonzeroFraction",
    "NeuralCollapseStats", "neural_collapse_statistics",
    "calibration_statistics", "expected_calibration_error", "fit_temperature", "negative_log_likelihood", "probabilities",
    "MEASURES", "MeasuredAccuracy", "score",
    "linear_probe", "knn_probe", "LinearProbeResult", "KnnProbeResult",
    "gram", "unbiased_hsic", "linear_cka", "feature_space_cka", "MinibatchCKA",
    "prediction_agreement", "PredictionAgreement",
]
