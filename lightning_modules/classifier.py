"""The LightningModule: a backbone, a linear head, and an objective that turns them into a loss.

Defaults are the ResNet-50 ImageNet recipe of Kornblith et al. (2021), appendix A.1:
SGD + Nesterov 0.9, peak lr 0.1 per 256 images (1.6 at batch 4096), weight decay 8e-5 on conv/linear
weights only, 10 epochs of linear warm-up then x0.975 per epoch, and an exponential moving average of
the weights (0.9999 per step at batch 4096) that validation evaluates.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal, Optional, Union

import lightning as L
import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from timm.utils.model_ema import ModelEmaV3
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from compat import attached_trainer, training_batches_per_epoch
from measurements.accuracy import MeasuredAccuracy, check_measure

from .backbones import build_backbone, residual_blocks
from .objectives import Objective, make_objective

__all__ = ["Network", "ObjectiveClassifier", "PretrainingError", "accuracy_tag", "ema_decay_at", "warmup_cosine",
           "warmup_exponential_decay"]


PENULTIMATE = "penultimate"  # the features the head reads, as every measurement and comparison names them


class PretrainingError(ValueError):
    """A pre-training checkpoint or a target that cannot start a fine-tuning run, said before it trains."""


def accuracy_tag(measure: Optional[str], stage: str = "val") -> str:
    """The logged accuracy in a task's measure: ``<stage>/acc1`` (top-1, also when no measure is known) or
    ``<stage>/acc_mean_per_class``."""
    return f"{stage}/acc_mean_per_class" if measure == "mean_per_class" else f"{stage}/acc1"


class Network(nn.Module):
    """Backbone plus linear head. ``forward`` returns the pooled penultimate features ``x``; the
    objective forms the logits from ``x`` and ``head`` (so cosine softmax can normalise W and x)."""

    def __init__(self, backbone: nn.Module, head: nn.Linear):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: Tensor) -> Tensor:
        return self.backbone(images)

    def blocks(self) -> dict[str, nn.Module]:
        """Per-block modules in forward order (hook their outputs for per-layer measurements: ``hooked``)."""
        return residual_blocks(self.backbone)

    @contextmanager
    def hooked(self, blocks: Iterable[str], reduce: Callable[[str, Tensor], None],
               stem: Optional[Callable[[Tensor], None]] = None) -> Iterator[None]:
        """While open, each forward pass gives ``reduce(name, output)`` every one of ``blocks``' outputs (after the
        block's final ReLU) and ``stem(x)`` the stem's output, the first block's input, before that block runs (it
        could write into its input in place). Reduce in the hook: a later in-place ReLU can change a kept output."""
        modules = self.blocks()

        def on_output(name: str):
            def hook(_module, _inputs, output) -> None:
                reduce(name, output)
            return hook

        handles = [modules[name].register_forward_hook(on_output(name)) for name in blocks]
        if stem is not None:
            handles.append(next(iter(modules.values())).register_forward_pre_hook(lambda _module, args: stem(args[0])))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def parts(self) -> dict[str, list[str]]:
        """The network's parameters by module, in forward order: ``stem`` (what precedes and surrounds the blocks),
        each block, ``head``; the units of parameter distance and module criticality (Neyshabur et al. 2020)."""
        in_block = {f"backbone.{block}.{name}": block for block, module in self.blocks().items()
                    for name, _ in module.named_parameters()}
        parts: dict[str, list[str]] = {"stem": []}
        parts.update({block: [] for block in self.blocks()})
        parts["head"] = []
        for name, _ in self.named_parameters():
            part = "head" if name.startswith("head.") else in_block.get(name, "stem")
            parts[part].append(name)
        return {part: names for part, names in parts.items() if names}

    def layers(self) -> dict[str, list[str]]:
        """The network's parameters by layer, in registration order: each convolution or linear layer with the
        batch norm that follows it (named by the convolution, ``head`` for the head); the modules of module
        criticality in Chatterji et al. (2020) and Neyshabur et al. (2020). A parameter of any other module
        joins the layer before it."""
        layers: dict[str, list[str]] = {}
        current = None
        for name, module in self.named_modules():
            own = [f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False)]
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) or current is None:
                current = name.removeprefix("backbone.") or "input"
                layers.setdefault(current, [])
            layers[current] += own
        return {layer: names for layer, names in layers.items() if names}


def warmup_exponential_decay(step: int, steps_per_epoch: int, warmup_epochs: float, decay_per_epoch: float) -> float:
    """Learning-rate factor of appendix A.1: linear warm-up to 1 over ``warmup_epochs`` (per step), then
    multiplied by ``decay_per_epoch`` once per completed epoch after the warm-up."""
    warmup_steps = warmup_epochs * steps_per_epoch
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return decay_per_epoch ** math.floor((step - warmup_steps) / steps_per_epoch)


def warmup_cosine(step: int, total_steps: int, warmup_steps: float) -> float:
    """Learning-rate factor of fine-tuning (appendix A.3): linear warm-up over ``warmup_steps``, then cosine decay
    from 1 to 0 at ``total_steps``: 0.5 (1 + cos(pi t / T)) over the steps after the warm-up."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1.0, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def ema_decay_at(step: int, decay: float, warmup: str, batch_ratio: float = 1.0) -> float:
    """EMA momentum for the update after optimiser step ``step`` (0-based) at a global batch of
    ``batch_ratio`` times the reference batch at which ``decay`` holds.

    ``warmup="tensorflow"`` is ``tf.train.ExponentialMovingAverage(decay, num_updates=t)``, the averaging of
    the paper's TensorFlow code: min(decay, (1 + t) / (10 + t)), with t counted in reference-batch steps,
    so early averages forget the random initialisation (without it, 0.9999 at batch 4096 leaves ~78 % of
    the initial weights in the EMA after 8 epochs). ``"none"``: ``decay`` from the first step. Either way the
    momentum is raised to ``batch_ratio``, which keeps the averaging horizon in images (appendix A.1).
    """
    if warmup == "tensorflow":
        t = (step + 1) * batch_ratio
        decay = min(decay, (1 + t) / (10 + t))
    return decay**batch_ratio


class ObjectiveClassifier(L.LightningModule):
    """Trains a classifier with a chosen objective, evaluating the EMA of its weights.

    Args:
        objective: the training objective by class name (Softmax, LabelSmoothing, Sigmoid, ExtraFinalL2,
            PenultimateDropout, LogitPenalty, LogitNorm, CosineSoftmax, SquaredError). Softmax when unset.
        num_classes: classes of the training task (linked from the data module).
        global_batch_size: images per optimiser step over all processes (linked from the data module);
            sets the peak lr and the EMA decay.
        backbone: network name in ``backbone_source`` (e.g. resnet50, resnet18).
        backbone_source: "torchvision" or "timm".
        zero_init_last_bn: start the last batch-norm gamma of each residual block at 0 (Goyal et al.).
        lr_per_256: peak learning rate per 256 images; peak = lr_per_256 * global_batch_size / 256.
        momentum: SGD momentum.
        nesterov: use Nesterov momentum.
        weight_decay: L2 on conv and linear weights (not batch-norm parameters, not biases).
        lr_times_weight_decay: appendix A.3's parametrisation of the decay: when given, the weight decay is this
            divided by the peak lr (the actual one, at this batch size), in place of ``weight_decay``; 0: none.
        warmup_epochs: epochs of linear warm-up to the peak lr.
        lr_decay_per_epoch: factor applied to the lr once per epoch after warm-up (0.985 in appendix C.6).
        ema_decay: EMA momentum per step at ``ema_reference_batch``; None disables the EMA. With another
            global batch B the horizon in images is kept: decay = ema_decay ** (B / ema_reference_batch).
        ema_reference_batch: global batch at which ``ema_decay`` holds.
        ema_warmup: "tensorflow" (default): the momentum ramps up as min(decay, (1 + t) / (10 + t)) over
            the first optimiser steps t, as in the paper's TensorFlow code (``ema_decay_at``), so the EMA
            measured at early epochs describes trained weights, not the initialisation; "none": constant.
        compile: ``torch.compile`` the network's forward (in place: checkpoints keep their keys). The
            first steps are slower while it compiles; worth it for long GPU runs.
        channels_last: keep the network (and its EMA) in the channels_last layout, the one cuDNN's convolutions
            are fastest in under bf16; None: on a GPU only. The CLI links it to ``data.channels_last``, which
            gives the batches the same layout.
        lr_schedule: "warmup_exponential" (appendix A.1, above) or "cosine": warm-up, then cosine decay to 0 at
            the run's last step (fine-tuning, appendix A.3).
        init_from: fine-tune (Neyshabur et al.'s P-T): a pre-training checkpoint whose evaluated backbone (the
            EMA when it had one) this run starts from, with a new head for this task's ``num_classes``; the
            backbone must be the same. None trains from random initialisation (RI-T). Loaded when fit
            starts, before a resumed run restores its own weights over it.
        measure: the task's accuracy measure (linked from the data module: Table A.2's, as its files record it):
            "mean_per_class" adds ``val/acc_mean_per_class`` to ``val/acc1`` (Pets, Flowers). A fine-tuning run
            (``init_from``, or the cosine schedule of appendix A.3) needs one: it is scored in it.

    On a GPU the network is kept in channels_last (``channels_last``); on the CPU nothing changes unless asked.
    """

    def __init__(
        self,
        objective: Union[Objective, str, None] = None,
        num_classes: int = 1000,
        global_batch_size: int = 4096,
        backbone: str = "resnet50",
        backbone_source: Literal["torchvision", "timm"] = "torchvision",
        zero_init_last_bn: bool = True,
        lr_per_256: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 8e-5,
        lr_times_weight_decay: Optional[float] = None,
        warmup_epochs: float = 10.0,
        lr_decay_per_epoch: float = 0.975,
        ema_decay: Optional[float] = 0.9999,
        ema_reference_batch: int = 4096,
        ema_warmup: Literal["tensorflow", "none"] = "tensorflow",
        compile: bool = False,
        lr_schedule: Literal["warmup_exponential", "cosine"] = "warmup_exponential",
        init_from: Optional[str] = None,
        measure: Optional[Literal["top1", "mean_per_class"]] = None,
        channels_last: Optional[bool] = None,
    ):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
        if ema_decay is not None and not 0.0 < ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in (0, 1] or None (no EMA), got {ema_decay} (the paper uses 0.9999).")
        if warmup_epochs < 0 or not 0.0 < lr_decay_per_epoch <= 1.0:
            raise ValueError("warmup_epochs must be >= 0 and lr_decay_per_epoch in (0, 1].")
        if ema_warmup not in ("tensorflow", "none"):
            raise ValueError(f"ema_warmup must be 'tensorflow' or 'none', got {ema_warmup!r}.")
        if lr_schedule not in ("warmup_exponential", "cosine"):
            raise ValueError(f"lr_schedule must be 'warmup_exponential' or 'cosine', got {lr_schedule!r}.")
        if init_from is not None and not Path(init_from).is_file():
            raise PretrainingError(f"model.init_from: no checkpoint {init_from}; name a pre-training run's "
                                   f"checkpoints/last.ckpt or epochNNN.ckpt, or null to train from random initialisation.")
        if measure is not None:
            check_measure(measure)
        self.save_hyperparameters(ignore=["objective"])
        self.objective = make_objective(objective)
        self.hparams["objective"] = self.objective.config()  # which objective and variant a run used

        features, width = build_backbone(backbone, backbone_source, zero_init_last_bn)
        head = nn.Linear(width, num_classes)
        self.objective.init_head(head)
        self.network = Network(features, head)
        self.ema = None
        if ema_decay is not None:
            # The decay after warm-up (each update passes its own, ``ema_decay_at``).
            self.ema = ModelEmaV3(self.network, decay=ema_decay ** (global_batch_size / ema_reference_batch))
            self.ema.requires_grad_(False)  # updated by averaging, never by the optimiser (or DDP)
            # Its mode follows the module's like every child (eval whenever it is evaluated); timm leaves
            # it in eval, which Lightning would flag at the start of fit.
            self.ema.train()

        top5 = min(5, num_classes)
        self.train_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_acc5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro")
        self.val_mean_per_class = MeasuredAccuracy(num_classes, "mean_per_class") if measure == "mean_per_class" else None
        # Sums over every evaluated image, reduced across ranks by summation: exact when ranks hold
        # different numbers of images (Lightning's own epoch mean would average the per-rank means).
        self.val_loss = MeanMetric()
        # First step whose loss was not finite (-1: none). Kept on the device so the check costs no sync; a
        # plain attribute, not a buffer: DDP broadcasts buffers from rank 0, overwriting the other ranks' flags.
        self.first_nonfinite_step = torch.tensor(-1)
        self._ema_updated_at = 0  # global step of the last EMA update: one per optimiser step
        self.checkpoint_position: Optional[tuple[int, int]] = None  # (epoch, step) of loaded weights
        self._compiled = False

    def configure_model(self) -> None:
        # Before the strategy moves the module and DDP builds its gradient buckets, which take the
        # parameters' layout as it is then. ``load_from_checkpoint`` calls this hook without a trainer.
        trainer = attached_trainer(self)
        on_gpu = trainer is not None and isinstance(trainer.accelerator, CUDAAccelerator)
        if trainer is not None and (on_gpu if self.hparams.channels_last is None else self.hparams.channels_last):
            for net in [self.network, self.ema]:
                if net is not None:
                    net.to(memory_format=torch.channels_last)
        if self.hparams.compile and not self._compiled:
            self.network.compile()
            self._compiled = True

    @property
    def eval_network(self) -> Network:
        """The weights that validation and measurements evaluate: the EMA when it is on."""
        return self.ema.module if self.ema is not None else self.network

    def forward(self, images: Tensor) -> Tensor:
        """Logits of the evaluated network (EMA when on), as the objective forms them."""
        net = self.eval_network
        return self.logits(net(images), net)

    def logits(self, features: Tensor, net: Network) -> Tensor:
        """The objective's logits from ``net``'s penultimate ``features``, formed in the head's own precision:
        float32 under bf16 autocast. bf16 keeps 8 bits of mantissa, so logits scaled by 1/tau (Eq. 6, 7; tau
        down to 0.01 in Table 4) or pulled to M = 60 (Eq. 9) would move in steps of 0.125-0.5; the head is
        0.05 % of ResNet-50's FLOPs (benchmarks/bf16_head.py measures the difference)."""
        with torch.autocast(features.device.type, enabled=False):
            return self.objective.logits(features.to(net.head.weight.dtype), net.head)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, target = batch
        logits = self.logits(self.network(images), self.network)
        terms = self.objective.loss_terms(logits, target, self.network.head)
        loss = sum(terms.values())
        self._track_nonfinite(loss)

        batch_size = target.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        if len(terms) > 1:
            for name, value in terms.items():
                self.log(f"train/{name}", value, batch_size=batch_size)
        self.train_acc1(logits.detach(), target)
        self.log("train/acc1", self.train_acc1, prog_bar=True, batch_size=batch_size)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=batch_size)
        return loss

    def on_train_start(self) -> None:
        self._ema_updated_at = self.global_step  # also after a resume: the next update follows the next step

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # Once per optimiser step, not per micro-batch (accumulate_grad_batches > 1): decay and warm-up
        # count optimiser steps at the global batch.
        if self.ema is not None and self.global_step != self._ema_updated_at:
            hp = self.hparams
            ratio = hp.global_batch_size / hp.ema_reference_batch
            self.ema.apply_update_(self.network, ema_decay_at(self.global_step - 1, hp.ema_decay, hp.ema_warmup, ratio))
            self._ema_updated_at = self.global_step
        if self.global_step % self.trainer.log_every_n_steps == 0:
            self.raise_if_nonfinite()

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        images, target = batch
        logits = self(images)
        terms = self.objective.loss_terms(logits, target, self.eval_network.head)
        batch_size = target.shape[0]
        self.val_loss.update(sum(terms.values()), weight=batch_size)
        self.log(f"{stage}/loss", self.val_loss, batch_size=batch_size)
        self.val_acc1(logits, target)
        self.val_acc5(logits, target)
        self.log(f"{stage}/acc1", self.val_acc1, prog_bar=True, batch_size=batch_size)
        self.log(f"{stage}/acc5", self.val_acc5, batch_size=batch_size)
        if self.val_mean_per_class is not None:
            self.val_mean_per_class(logits, target)
            self.log(accuracy_tag("mean_per_class", stage), self.val_mean_per_class, batch_size=batch_size)

    def configure_optimizers(self):
        hp = self.hparams
        decay, no_decay = [], []
        for param in self.network.parameters():
            (decay if param.ndim > 1 else no_decay).append(param)  # conv/linear weights vs BN and biases
        peak_lr = hp.lr_per_256 * hp.global_batch_size / 256
        weight_decay = hp.weight_decay if hp.get("lr_times_weight_decay") is None else hp.lr_times_weight_decay / peak_lr
        optimizer = torch.optim.SGD(
            [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=peak_lr,
            momentum=hp.momentum,
            nesterov=hp.nesterov,
        )
        steps_per_epoch = self.steps_per_epoch()
        if hp.lr_schedule == "cosine":
            total = int(self.trainer.estimated_stepping_batches)
            factor = lambda step: warmup_cosine(step, total, hp.warmup_epochs * steps_per_epoch)  # noqa: E731
        else:
            factor = lambda step: warmup_exponential_decay(step, steps_per_epoch, hp.warmup_epochs, hp.lr_decay_per_epoch)  # noqa: E731
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def steps_per_epoch(self) -> int:
        """Optimiser steps per training epoch, whatever bounds the run (max_epochs or max_steps): the warm-up
        and the per-epoch decay are in epochs of the data, not fractions of the run."""
        batches = training_batches_per_epoch(self.trainer)
        return max(1, math.ceil(batches / self.trainer.accumulate_grad_batches))

    # --- a non-finite loss stops the run without writing a checkpoint of broken weights ---

    def _track_nonfinite(self, loss: Tensor) -> None:
        if self.first_nonfinite_step.device != loss.device:
            self.first_nonfinite_step = self.first_nonfinite_step.to(loss.device)
        first_seen = (~torch.isfinite(loss.detach())) & (self.first_nonfinite_step < 0)
        self.first_nonfinite_step = torch.where(first_seen, self.global_step, self.first_nonfinite_step)

    def raise_if_nonfinite(self) -> None:
        flag = self.first_nonfinite_step.to(self.device).float()
        flag = torch.where(flag < 0, torch.full_like(flag, math.inf), flag)
        step = self.trainer.strategy.reduce(flag, reduce_op="min")  # every rank agrees, so all stop
        if math.isfinite(step.item()):
            raise FloatingPointError(
                f"Training loss became non-finite at step {int(step.item())} with objective "
                f"{self.objective!r}. Stopped before writing another checkpoint; the last checkpoint "
                f"saved before that step is intact. Lower the learning rate (model.lr_per_256), lengthen "
                f"model.warmup_epochs, or check the objective's hyper-parameters."
            )

    def on_train_epoch_end(self) -> None:
        self.raise_if_nonfinite()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.raise_if_nonfinite()

    # --- fine-tuning from a pre-training checkpoint (P-T) ---

    @property
    def fine_tunes(self) -> bool:
        """Trains on a transfer target: from a pre-training checkpoint (P-T), or with appendix A.3's cosine
        schedule (RI-T: the same recipe from random initialisation)."""
        return self.hparams.init_from is not None or self.hparams.lr_schedule == "cosine"

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.fine_tunes and self.hparams.measure is None:
            data = self.trainer.datamodule if attached_trainer(self) is not None else None
            where = next((f" {getattr(data, a)}" for a in ("val_path", "val_root") if hasattr(data, a)), "")
            raise PretrainingError(
                f"No accuracy measure is known for the fine-tuning target{where}: its files record none (a .beton "
                f"sidecar from python -m datamodules.convert does). Name it: --data.init_args.measure=top1 (CIFAR, "
                f"Food-101, Cars, SUN397, Birdsnap) or mean_per_class (Pets, Flowers).")
        # Here, not in __init__: a resumed fine-tuning run restores its own weights after this hook, and
        # load_from_checkpoint (which does not call it) needs no pre-training file.
        if stage == "fit" and self.hparams.init_from is not None:
            self.network.backbone.load_state_dict(pretrained_backbone(self.hparams.init_from, self.hparams))
            if self.ema is not None:
                self.ema.module.load_state_dict(self.network.state_dict())

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Where loaded weights stand in their run: measurements of a checkpoint outside fit
        # (``cli.py validate --ckpt_path``) are recorded at its step, not at 0.
        self.checkpoint_position = (int(checkpoint.get("epoch", 0)), int(checkpoint.get("global_step", 0)))


def pretrained_backbone(path: str, hparams) -> dict[str, Tensor]:
    """The evaluated backbone weights (``eval_network``: the EMA when on) of the checkpoint ``path``, checked
    against this run's architecture (``hparams``)."""
    source = ObjectiveClassifier.load_from_checkpoint(path, map_location="cpu", init_from=None)  # its own start is not needed
    theirs, ours = (source.hparams.backbone, source.hparams.backbone_source), (hparams.backbone, hparams.backbone_source)
    if theirs != ours:
        raise PretrainingError(f"model.init_from {path} holds a {theirs[0]} from {theirs[1]}, this run builds a {ours[0]} "
                               f"from {ours[1]}: set model.backbone and model.backbone_source to the pre-training run's.")
    return source.eval_network.backbone.state_dict()
