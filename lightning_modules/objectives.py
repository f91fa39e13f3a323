"""The nine training objectives of Kornblith et al. (2021), section 2 and Table A.1.

Each objective is one small class whose constructor arguments are the paper's hyper-parameters, with
the Table A.1 values as defaults. An objective decides two things:

- ``logits(features, head)``: the logits that the loss sees, formed from the penultimate features ``x``
  and the linear head ``(W, b)``. Accuracy is read from these same logits, so that top-1 matches what
  the objective optimises (e.g. normalised logits for LogitNorm).
- ``loss_terms(logits, target, head)``: a dict of per-batch mean loss terms; the training loss is their
  sum and each term is logged under ``train/<name>``.

The two head regularisers, PenultimateDropout and ExtraFinalL2, wrap another objective (``loss``,
Softmax by default), so they stack with any loss as in Table C.4 without new code, e.g.
``PenultimateDropout(keep_prob=0.7, loss=LabelSmoothing(alpha=0.1))``.

Adding an objective: subclass ``Objective`` here and name it in a config (``model.objective``). Its
constructor arguments are recorded as given, with defaults, for the run's hparams (``Objective.config``).
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
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

HEAD_INIT_STD = 0.01  # appendix A.1: final layer weights ~ N(0, 0.01^2), bias 0


def _wide(t: Tensor) -> Tensor:
    """At least float32, so squared norms do not overflow or lose precision under bf16 autocast."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


class Objective(nn.Module):
    """Base class: plain linear logits ``z = W x + b`` fed to softmax cross-entropy (Eq. 1).

    Every objective records the arguments it is constructed with, defaults included, before its
    ``__init__`` body runs (``__init_subclass__`` wraps each subclass's ``__init__``, as Lightning's
    ``save_hyperparameters`` captures a module's); ``config()`` returns that record.
    """

    # How calibration turns logits into class probabilities (measurements.calibration).
    probability_kind = "softmax"
    # The recorded constructor arguments; an objective with no __init__ of its own takes none.
    _init_args: dict[str, object] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" in vars(cls):
            cls.__init__ = _recording_arguments(cls.__init__)

    def init_head(self, head: nn.Linear) -> None:
        nn.init.normal_(head.weight, std=HEAD_INIT_STD)
        nn.init.zeros_(head.bias)

    def logits(self, features: Tensor, head: nn.Linear) -> Tensor:
        return head(features)

    def loss_terms(self, logits: Tensor, target: Tensor, head: nn.Linear) -> dict[str, Tensor]:
        return {"cross_entropy": F.cross_entropy(logits, target)}

    def class_weights(self, head: nn.Linear) -> Tensor:
        """The class weight vectors w_c the logits use (neural-collapse statistics, Table E.2)."""
        return head.weight

    def config(self) -> dict[str, object]:
        """The objective as LightningCLI writes it, recorded with each run and read back by
        ``make_objective``: class_path, and init_args, every argument it was constructed with (defaults
        included; a wrapped objective as its own config)."""
        return {"class_path": f"{type(self).__module__}.{type(self).__name__}", "init_args": copy.deepcopy(self._init_args)}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config()["init_args"].items() if not isinstance(v, dict))


def _recording_arguments(init):
    """``init`` preceded by recording its bound arguments, defaults included, as ``self._init_args`` (an
    objective among them as its config, so the record is a plain, nested {class_path, init_args} dict).
    Only the outermost call records: a subclass's ``super().__init__(...)`` keeps the record of the class
    actually constructed."""
    signature = inspect.signature(init)
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in signature.parameters.values()):
        raise TypeError(f"{init.__qualname__}: an objective's arguments must be named, so a run can record them.")

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        if "_init_args" not in self.__dict__:
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            _, *arguments = bound.arguments.items()  # less self
            # Straight into __dict__: nn.Module.__init__ has not run yet.
            self.__dict__["_init_args"] = {k: v.config() if isinstance(v, Objective) else v for k, v in arguments}
        init(self, *args, **kwargs)

    return __init__


class Softmax(Objective):
    """Softmax cross-entropy, Eq. 1: ``-z_y + logsumexp(z)``. Trained 146 epochs (Table A.1)."""


class LabelSmoothing(Objective):
    """Label smoothing, Eq. 2: cross-entropy with targets ``(1-alpha) t + alpha/K``, scaled by ``1/(1-alpha)``.

    The ``1/(1-alpha)`` factor keeps the gradient on the positive logit at softmax's scale (section 2).

    Args:
        alpha: smoothing weight in [0, 1). Table A.1: 0.1 (tuned over 0.08-0.12).
    """

    def __init__(self, alpha: float = 0.1):
        super().__init__()
        _require(0.0 <= alpha < 1.0, f"LabelSmoothing: alpha must be in [0, 1), got {alpha} (the paper uses 0.1).")
        self.alpha = alpha

    def loss_terms(self, logits: Tensor, target: Tensor, head: nn.Linear) -> dict[str, Tensor]:
        smoothed = F.cross_entropy(logits, target, label_smoothing=self.alpha)
        return {"cross_entropy": smoothed / (1.0 - self.alpha)}


class Sigmoid(Objective):
    """Sigmoid cross-entropy, Eq. 8: ``sum_k softplus(z_k) - t_k z_k`` (summed over classes).

    Initial probabilities are ~1/K. The paper initialises the head bias to ``-log K``; the released code
    instead subtracts a constant ``log K`` from the logits (``variant="released"``), which is the same
    function at initialisation but keeps the bias at 0. Accuracy ranks the logits.

    Args:
        variant: "paper" (bias initialised to -log K) or "released" (logits shifted by -log K).
    """

    probability_kind = "sigmoid_normalised"  # per-class sigmoids, normalised to sum to 1 (Table C.3)

    def __init__(self, variant: Literal["paper", "released"] = "paper"):
        super().__init__()
        _require(variant in ("paper", "released"), f"Sigmoid: variant must be 'paper' or 'released', got {variant!r}.")
        self.variant = variant

    def init_head(self, head: nn.Linear) -> None:
        super().init_head(head)
        if self.variant == "paper":
            nn.init.constant_(head.bias, -math.log(head.out_features))

    def logits(self, features: Tensor, head: nn.Linear) -> Tensor:
        z = head(features)
        return z - math.log(head.out_features) if self.variant == "released" else z

    def loss_terms(self, logits: Tensor, target: Tensor, head: nn.Linear) -> dict[str, Tensor]:
        onehot = F.one_hot(target, logits.shape[1]).to(logits.dtype)
        per_class = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
        return {"sigmoid_cross_entropy": per_class.sum(dim=1).mean()}


class LogitPenalty(Objective):
    """Logit penalty, Eq. 5: ``CE(z, t) + beta * ||z||^2 / 2``.

    The factor 1/2 follows the released code, with which the Table A.1 value was tuned.

    Args:
        beta: penalty strength, >= 0. Table A.1: 6e-4 (tuned over 5e-5 to 8e-4).
    """

    def __init__(self, beta: float = 6e-4):
        super().__init__()
        _require(beta >= 0.0, f"LogitPenalty: beta must be >= 0, got {beta} (the paper uses 6e-4).")
        self.beta = beta

    def loss_terms(self, logits: Tensor, target: Tensor, head: nn.Linear) -> dict[str, Tensor]:
        penalty = 0.5 * self.beta * _wide(logits).pow(2).sum(dim=1).mean()
        return {"cross_entropy": F.cross_entropy(logits, target), "logit_penalty": penalty}


class LogitNorm(Objective):
    """Logit normalisation, Eq. 6: ``CE(z / (tau ||z||), t)``.

    Args:
        temperature: tau > 0. Table A.1: 0.04 (tuned over 0.03-0.06).
    """

    def __init__(self, temperature: float = 0.04):
        super().__init__()
        _require(temperature > 0.0, f"LogitNorm: temperature must be > 0, got {temperature} (the paper uses 0.04).")
        self.temperature = temperature

    def logits(self, features: Tensor, head: nn.Linear) -> Tensor:
        return F.normalize(head(features), dim=1) / self.temperature


class CosineSoftmax(Objective):
    """Cosine softmax, Eq. 7: ``CE(s, t)`` with ``s_k = cos(W_k, x) / tau + b_k``.

    ``variant="paper"`` normalises both the class weight vectors and the features (Eq. 7). The released
    code (``variant="released"``) normalises only the weight vectors and divides the bias by tau too:
    ``s = (W_hat x + b) / tau``.

    Args:
        temperature: tau > 0. Table A.1: 0.05; Table 4 sweeps 0.01-0.08.
        loss_scale: multiplies the loss. For tau < 0.05 the paper scales the loss by tau to keep the
            gradient on the correct-class logit comparable (footnote in section 3.4): set it to tau.
        variant: "paper" or "released", see above.
    """

    def __init__(
        self,
        temperature: float = 0.05,
        loss_scale: float = 1.0,
        variant: Literal["paper", "released"] = "paper",
    ):
        super().__init__()
        _require(temperature > 0.0, f"CosineSoftmax: temperature must be > 0, got {temperature} (the paper uses 0.05).")
        _require(loss_scale > 0.0, f"CosineSoftmax: loss_scale must be > 0, got {loss_scale}.")
        _require(variant in ("paper", "released"), f"CosineSoftmax: variant must be 'paper' or 'released', got {variant!r}.")
        self.temperature = temperature
        self.loss_scale = loss_scale
        self.variant = variant

    def class_weights(self, head: nn.Linear) -> Tensor:
        return F.normalize(head.weight, dim=1)  # Table E.2 reports Std ||w_c|| = 0 for cosine softmax

    def logits(self, features: Tensor, head: nn.Linear) -> Tensor:
        w = self.class_weights(head)
        if self.variant == "paper":
            return F.linear(F.normalize(features, dim=1), w) / self.temperature + head.bias
        return F.linear(features, w, head.bias) / self.temperature

    def loss_terms(self, logits: Tensor, target: Tensor, head: nn.Linear) -> dict[str, Tensor]:
        return {"cross_entropy": self.loss_scale * F.cross_entropy(logits, target)}


class SquaredError(Objective):
    """Squared error (Hui & Belkin), Eq. 9: ``scale * (1/K) sum_k [kappa t_k (z_k - M)^2 + (1 - t_k) z_k^2]``.

    ``variant="paper"`` averages over the K classes as Eq. 9 does; the released code sums over classes
    (``variant="released"``), a K-times larger loss and gradient. The 1/K form makes the gradient per
    logit shrink with K: on a task with far fewer classes than ImageNet, scale ``loss_scale`` by K/1000
    to keep the paper's step size.

    Args:
        kappa: weight of the correct-class term, > 0. Table A.1: 9.
        m: target value M of the correct-class logit, > 0. Table A.1: 60.
        loss_scale: overall scale, > 0. Table A.1: 10.
        variant: "paper" (mean over classes) or "released" (sum over classes).
    """

    def __init__(
        self,
        kappa: float = 9.0,
        m: float = 60.0,
        loss_scale: float = 10.0,
        variant: Literal["paper", "released"] = "paper",
    ):
        super().__init__()
        _require(kappa > 0.0, f"SquaredError: kappa must be > 0, got {kappa} (the paper uses 9).")
        _require(m > 0.0, f"SquaredError: m must be > 0, got {m} (the paper uses 60).")
        _require(loss_scale > 0.0, f"SquaredError: loss_scale must be > 0, got {loss_scale} (the paper uses 10).")
        _require(variant in ("paper", "released"), f"SquaredError: variant must be 'paper' or 'released', got {variant!r}.")
        self.kappa = kappa
        self.m = m
        self.loss_scale = loss_scale
        self.variant = variant

    def loss_terms(self, logits: Tensor, target: Tensor, head: nn.Linear) -> dict[str, Tensor]:
        z = _wide(logits)
        correct = z.gather(1, target[:, None]).squeeze(1)
        # sum_k (1-t_k) z_k^2 + kappa (z_y - M)^2  ==  sum_k z_k^2 - z_y^2 + kappa (z_y - M)^2
        per_example = z.pow(2).sum(dim=1) - correct.pow(2) + self.kappa * (correct - self.m).pow(2)
        if self.variant == "paper":
            per_example = per_example / z.shape[1]
        return {"squared_error": self.loss_scale * per_example.mean()}


class _HeadRegularizer(Objective):
    """An objective that regularises the head and delegates the loss to another objective."""

    def __init__(self, loss: Optional[Objective] = None):
        super().__init__()
        self.loss = loss if loss is not None else Softmax()
        self._init_args["loss"] = self.loss.config()  # None stands for Softmax: the record names it

    @property
    def probability_kind(self) -> str:
        return self.loss.probability_kind

    def init_head(self, head: nn.Linear) -> None:
        self.loss.init_head(head)

    def class_weights(self, head: nn.Linear) -> Tensor:
        return self.loss.class_weights(head)

    def logits(self, features: Tensor, head: nn.Linear) -> Tensor:
        return self.loss.logits(features, head)

    def loss_terms(self, logits: Tensor, target: Tensor, head: nn.Linear) -> dict[str, Tensor]:
        return self.loss.loss_terms(logits, target, head)


class PenultimateDropout(_HeadRegularizer):
    """Dropout on the penultimate features (Eq. 3): ``x * xi / rho``, ``xi_i ~ Bernoulli(rho)``, training only.

    Args:
        keep_prob: rho in (0, 1]. Table A.1: 0.7 (tuned over 0.6-0.85).
        loss: the objective fed by the dropped-out features; Softmax when not given.
    """

    def __init__(self, keep_prob: float = 0.7, loss: Optional[Objective] = None):
        super().__init__(loss)
        _require(
            0.0 < keep_prob <= 1.0,
            f"PenultimateDropout: keep_prob must be in (0, 1], got {keep_prob} (the paper keeps 0.7).",
        )
        self.keep_prob = keep_prob

    def logits(self, features: Tensor, head: nn.Linear) -> Tensor:
        dropped = F.dropout(features, p=1.0 - self.keep_prob, training=self.training)
        return self.loss.logits(dropped, head)


class ExtraFinalL2(_HeadRegularizer):
    """Extra L2 on the final layer's weight matrix, Eq. 4: ``loss + lambda_final * ||W||_F^2 / 2``.

    The factor 1/2 follows the released code (TensorFlow's ``l2_loss``), with which Table A.1 was tuned,
    so this is exactly an additional weight decay of ``lambda_final`` on W (not on the bias).

    Args:
        lambda_final: >= 0. Table A.1: 8e-4 (tuned over 4e-4 to 1e-3).
        loss: the regularised objective; Softmax when not given.
    """

    def __init__(self, lambda_final: float = 8e-4, loss: Optional[Objective] = None):
        super().__init__(loss)
        _require(lambda_final >= 0.0, f"ExtraFinalL2: lambda_final must be >= 0, got {lambda_final} (the paper uses 8e-4).")
        self.lambda_final = lambda_final

    def loss_terms(self, logits: Tensor, target: Tensor, head: nn.Linear) -> dict[str, Tensor]:
        terms = self.loss.loss_terms(logits, target, head)
        terms["final_layer_l2"] = 0.5 * self.lambda_final * _wide(head.weight).pow(2).sum()
        return terms


def objective_classes() -> dict[str, type[Objective]]:
    """Every objective defined (any public subclass of Objective, however deep), by class name."""
    found, todo = {}, list(Objective.__subclasses__())
    while todo:
        cls = todo.pop(0)
        todo.extend(cls.__subclasses__())
        if not cls.__name__.startswith("_"):
            found[cls.__name__] = cls
    return found


def objective_name(spec: Any) -> str:
    """The class name of an objective given as a name, a class path, LightningCLI's {class_path, init_args} (a dict
    or a Namespace), an instance, or None (the default, Softmax): how configs, checkpoints and tables name it."""
    if spec is None:
        return "Softmax"
    if isinstance(spec, Objective):
        return type(spec).__name__
    if not isinstance(spec, str):
        spec = spec["class_path"] if isinstance(spec, dict) else spec.class_path
    return str(spec).rsplit(".", 1)[-1]


def make_objective(spec: Objective | str | dict | None) -> Objective:
    """An objective instance from an instance, a class name (with default hyper-parameters), the
    {class_path, init_args} a run's hparams record (``Objective.config``), or None (Softmax)."""
    if spec is None:
        return Softmax()
    if isinstance(spec, Objective):
        return spec
    args = {}
    if isinstance(spec, dict):  # a checkpoint's hparams: load_from_checkpoint builds the module from them
        spec, args = objective_name(spec), dict(spec.get("init_args") or {})
        args = {k: make_objective(v) if isinstance(v, dict) and "class_path" in v else v for k, v in args.items()}
    classes = objective_classes()
    if spec not in classes:
        raise ValueError(
            f"Unknown objective {spec!r}. Valid objectives: {', '.join(classes)}. "
            f"Name one by class, e.g. --model.objective=CosineSoftmax --model.objective.temperature=0.05."
        )
    return classes[spec](**args)
