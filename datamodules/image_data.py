"""What the image-classification data modules share, whichever library decodes the images.

The FFCV module and the torchvision fallback take the same arguments, shard the data by the same rule
(``distributed.epoch_shard``), apply the same augmentation (random-resized crop and flip for training,
resize and centre crop for evaluation) and normalise uint8 batches in torch on the training device, so
a YAML file switches between them by changing ``class_path`` and the data paths only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Optional

import lightning as L
import numpy as np
import torch
from torch import Tensor

from compat import batches_done_this_epoch
from measurements.accuracy import check_measure

from .distributed import cpus_per_process, epoch_shard
from .sources import DataError

__all__ = [
    "ImageClassificationData", "ProgressiveResolution", "EpochAlignedLoader", "DataError", "IMAGENET_MEAN", "IMAGENET_STD",
    "block_permutation", "shuffle_blocks",
]

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def run_seed() -> int:
    """The seed ``seed_everything`` gave this process (LightningCLI's ``--seed_everything``), 0 if none."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


@dataclass(frozen=True)
class ProgressiveResolution:
    """ffcv-imagenet's low-to-high resolution schedule for training crops: ``min_res`` up to epoch
    ``start_ramp``, then linear to ``max_res`` at ``end_ramp``, rounded to multiples of ``step`` pixels.
    Defaults are its ResNet-50 88-epoch settings (evaluation stays at the module's image_size)."""

    min_res: int = 160
    max_res: int = 192
    start_ramp: int = 65
    end_ramp: int = 76
    step: int = 32

    def __post_init__(self):
        if not 0 < self.min_res <= self.max_res or self.start_ramp > self.end_ramp or self.step < 1:
            raise ValueError(f"ProgressiveResolution needs 0 < min_res <= max_res and start_ramp <= end_ramp, got {self}.")

    def __call__(self, epoch: int) -> int:
        if epoch <= self.start_ramp:
            return self.min_res
        if epoch >= self.end_ramp:
            return self.max_res
        res = np.interp(epoch, [self.start_ramp, self.end_ramp], [self.min_res, self.max_res])
        return int(round(res / self.step)) * self.step


class EpochAlignedLoader:
    """A loader that prepares every pass for the trainer's current epoch (``before_epoch(epoch, skip)``: the
    epoch's shard without its first ``skip`` samples, the crop resolution), so a resumed run continues with
    the next epoch's order instead of replaying epoch 0's, and a run preempted mid-epoch continues with the
    batch after the last one it trained on.

    Iteration is a generator: nothing starts until the first batch is asked for, because Lightning
    creates its iterators before it restores a checkpoint's progress. Iteration also starts outside
    ``torch.inference_mode``: FFCV allocates its output buffers then, in the calling thread, and fills
    them from its own thread; inference tensors (standalone validate/test) may not be written there,
    which killed that thread and hung the run.
    """

    def __init__(self, loader: Iterable, data: "ImageClassificationData", before_epoch: Callable[[int, int], None], train: bool):
        self.loader = loader
        self.data = data
        self.before_epoch = before_epoch
        self.train = train

    def __iter__(self):
        done = self.data.batches_done_this_epoch() if self.train else 0
        done = done if done < len(self) else 0  # a finished epoch: Lightning goes on with the next one
        self.before_epoch(self.data.current_epoch, done * self.data.batch_size_per_process)
        with torch.inference_mode(False):
            batches = iter(self.loader)
        yield from batches

    def __len__(self) -> int:
        return len(self.loader)


class ImageClassificationData(L.LightningDataModule):
    """Base of the image-classification data modules.

    Args:
        global_batch_size: images per optimiser step over all processes; each process loads batches of
            ``global_batch_size / (world_size * accumulate_grad_batches)``.
        num_classes: classes of the task; read from the training labels when not given.
        image_size: side of the training crop and of the evaluation centre crop.
        val_resize: evaluation resizes the shorter side to this, then centre-crops ``image_size``.
        crop_scale: range of the random crop's area, as a fraction of the image (paper: 10-100 %).
        crop_ratio: range of the random crop's aspect ratio (paper: 3/4 to 4/3).
        flip: random horizontal flips in training.
        num_workers: decoding workers per process; default: SLURM's CPUs per task, else this process's
            share of the CPUs in its affinity mask.
        seed: seed of the training order and augmentation (epoch e's order is a function of (seed, e) only);
            by default the run's seed (``seed_everything``), so one knob changes initialisation, order,
            augmentation and dropout together.
        mean: per-channel mean of uint8 pixels, subtracted on the device.
        std: per-channel standard deviation of uint8 pixels.
        progressive_resolution: optional schedule of the training crop size by epoch.
        holdout_path: images held out from training in this module's format (``convert imagenet
            --holdout true`` writes the paper's 50,046); calibration fits its temperature on them
            (Table C.3), else on half of validation.
        validation_split: hold out this fraction of the training images, class by class, and validate on them
            instead of ``val`` (which then stays the untouched test set): the split on which fine-tuning's
            hyper-parameters are chosen (appendix A.3). The draw is fixed (``stratified_split``, seed 0),
            the same for every run and every seed.
        block_shuffle: cut every image into square blocks of this many pixels and permute them with one
            permutation, the same for every image, train and test alike, drawn from the run's seed
            (Neyshabur et al. 2020, section 3.1); a divisor of ``image_size``. None: images as they are.
        augment: train on random-resized crops and flips (True) or on the evaluation crop (False); by default on,
            except for block-shuffled images, which the authors trained without augmentation.
        measure: the task's accuracy measure (Table A.2): "top1", or "mean_per_class" (Pets, Flowers); by
            default the one its files record (the sidecar ``datamodules.convert`` writes), None if they record
            none. Validation reports it (``ObjectiveClassifier``); a fine-tuning target must have one.
        channels_last: batches (and, linked in the CLI, the model's weights) in the channels_last layout, the one
            cuDNN's convolutions are fastest in under bf16. None: on a GPU only. True runs that part of the fast
            path on the CPU too, where a test can exercise it; the CUDA-only parts follow the device alone
            (``on_cuda``).
    """

    def __init__(
        self,
        global_batch_size: int = 4096,
        num_classes: Optional[int] = None,
        image_size: int = 224,
        val_resize: int = 256,
        crop_scale: tuple[float, float] = (0.1, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: bool = True,
        num_workers: Optional[int] = None,
        seed: Optional[int] = None,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        progressive_resolution: Optional[ProgressiveResolution] = None,
        holdout_path: Optional[str] = None,
        validation_split: Optional[float] = None,
        block_shuffle: Optional[int] = None,
        augment: Optional[bool] = None,
        measure: Optional[Literal["top1", "mean_per_class"]] = None,
        channels_last: Optional[bool] = None,
    ):
        super().__init__()
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}.")
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {crop_scale}.")
        if not 0 < crop_ratio[0] <= crop_ratio[1]:
            raise ValueError(f"crop_ratio must satisfy 0 < low <= high, got {crop_ratio}.")
        if val_resize < image_size:
            raise ValueError(f"val_resize={val_resize} must be at least image_size={image_size} (it is cropped to it).")
        if validation_split is not None and not 0 < validation_split < 1:
            raise ValueError(f"validation_split must lie in (0, 1) (a fraction of the training images), got {validation_split}.")
        sizes = {image_size} | ({progressive_resolution.min_res, progressive_resolution.max_res} if progressive_resolution else set())
        if block_shuffle is not None and any(block_shuffle < 1 or size % block_shuffle for size in sizes):
            divisors = [b for b in range(1, image_size + 1) if image_size % b == 0]
            raise ValueError(f"block_shuffle={block_shuffle} does not divide the image size {sorted(sizes)}; choose one of "
                             f"{divisors}.")
        self.global_batch_size = global_batch_size
        self._num_classes = num_classes
        self.image_size = image_size
        self.val_resize = val_resize
        self.crop_scale = tuple(crop_scale)
        self.crop_ratio = tuple(crop_ratio)
        self.flip = flip
        self.num_workers = num_workers
        self.seed = run_seed() if seed is None else seed
        self.progressive_resolution = progressive_resolution
        self.holdout_path = holdout_path
        self.validation_split = validation_split
        self.block_shuffle = block_shuffle
        self.augment = block_shuffle is None if augment is None else augment
        if progressive_resolution is not None and not self.augment:
            raise ValueError("progressive_resolution schedules the size of the training crop; without augmentation "
                             "(augment=false, the default with block_shuffle) there is none: set augment=true or drop it.")
        self._measure = None if measure is None else check_measure(measure)
        self.channels_last = channels_last
        self._held_out: Optional[tuple[np.ndarray, np.ndarray]] = None
        self._permutations: dict[tuple[int, torch.device], Tensor] = {}  # drawn once per size and device, not per batch
        self._mean = torch.tensor(mean).view(1, 3, 1, 1)
        self._std = torch.tensor(std).view(1, 3, 1, 1)

    # --- what a subclass provides ---

    def source_labels(self, source: str) -> np.ndarray:
        """Every label of the file or folder ``source`` ("train", "val", or another data set in this module's
        format, by path), without decoding images."""
        raise NotImplementedError

    def recorded_measure(self) -> Optional[str]:
        """The accuracy measure the task's files record, None when they record none."""
        return None

    def transfer_paths(self) -> dict[str, tuple[str, str]]:
        """Downstream tasks that come with this data, ``{name: (train, test)}`` in this module's format
        (transfer probes use them when a config names none)."""
        return {}

    def _loader(self, source: str, train: bool, subset: Optional[np.ndarray] = None, crop_ratio: Optional[float] = None,
                local: bool = False, batch_size: Optional[int] = None) -> EpochAlignedLoader:
        """Batches of ``source``: augmented, shuffled and sharded across processes (``epoch_shard``) when ``train``;
        else as ``evaluation_dataloader`` says."""
        raise NotImplementedError

    # --- shared ---

    def train_dataloader(self) -> EpochAlignedLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> EpochAlignedLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> EpochAlignedLoader:
        return self._loader("val", train=False)

    def evaluation_dataloader(self, source: str, subset: Optional[np.ndarray] = None, crop_ratio: Optional[float] = None,
                              local: bool = False, batch_size: Optional[int] = None) -> EpochAlignedLoader:
        """Batches of ``source`` (as in ``labels``) without augmentation: a centre crop of ``crop_ratio`` of
        the shorter side resized to ``image_size`` (by default validation's, ``image_size / val_resize``;
        1.0 keeps the whole shorter side, as transfer probes do, appendix A.2). Only the samples ``subset``
        (all by default), in order; each is read by exactly one process, or with ``local`` this process
        reads all of ``subset`` (its own share, chosen by the caller); in batches of ``batch_size`` (by default
        training's per process). Measurements use it for fixed training subsets and for transfer data sets."""
        return self._loader(source, train=False, subset=subset, crop_ratio=crop_ratio, local=local, batch_size=batch_size)

    def labels(self, source: str) -> np.ndarray:
        """Every label of ``source`` as the loaders see it ("train" and "val" after ``validation_split``)."""
        source, indices = self.resolve(source)
        labels = self.source_labels(source)
        return labels if indices is None else labels[indices]

    def resolve(self, source: str) -> tuple[str, Optional[np.ndarray]]:
        """The stored source a split reads and its indices in it (None: all): with ``validation_split``, "train"
        and "val" are the kept and the held-out training images."""
        if self.validation_split is None or source not in ("train", "val"):
            return source, None
        if self._held_out is None:
            from measurements.probes import stratified_split

            kept, held = stratified_split(torch.from_numpy(self.source_labels("train")).long(), self.validation_split)
            self._held_out = (kept.numpy(), held.numpy())
        return "train", self._held_out[0 if source == "train" else 1]

    @property
    def measure(self) -> Optional[str]:
        """The task's accuracy measure: the one given, else the one its files record (None: neither)."""
        return self._measure or self.recorded_measure()

    @property
    def num_classes(self) -> int:
        if self._num_classes is None:
            self._num_classes = int(self.labels("train").max()) + 1
        return self._num_classes

    def setup(self, stage: str) -> None:
        for split in ["train", "val"] if stage == "fit" else ["val"]:
            self._check_labels(split)
        # One optimiser step sees the global batch: world_size processes x accumulate_grad_batches micro-batches.
        world = self.world_size
        accumulate = getattr(self.trainer, "accumulate_grad_batches", 1)
        if self.global_batch_size % (world * accumulate):
            raise ValueError(
                f"global_batch_size={self.global_batch_size} is not divisible by the {world} processes x "
                f"{accumulate} accumulated micro-batches; choose a multiple of {world * accumulate}."
            )
        self.batch_size_per_process = self.global_batch_size // (world * accumulate)
        if self.num_workers is None:
            self.num_workers = cpus_per_process(self.trainer.num_devices if self.trainer is not None else 1)

    def _check_labels(self, split: str) -> None:
        labels = self.labels(split)
        bad = (labels < 0) | (labels >= self.num_classes)
        if bad.any():
            raise DataError(
                f"{split}: {int(bad.sum())} of {labels.size} labels lie outside [0, {self.num_classes}) "
                f"(e.g. {np.unique(labels[bad])[:5].tolist()}). Set data.num_classes to the true number of "
                f"classes, or rewrite the data with labels 0..num_classes-1."
            )

    @property
    def world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    @property
    def rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    @property
    def device(self) -> torch.device:
        return self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")

    @property
    def on_cuda(self) -> bool:
        """Whether this process trains on a CUDA device: the one switch of the fast path's CUDA-only parts (FFCV's
        ``ToDevice`` with non-blocking copies, pinned memory; cuDNN's benchmark mode is the trainer's)."""
        return self.device.type == "cuda"

    @property
    def uses_channels_last(self) -> bool:
        """Whether batches arrive in channels_last: ``channels_last``, by default on a GPU."""
        return self.on_cuda if self.channels_last is None else self.channels_last

    @property
    def current_epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def batches_done_this_epoch(self) -> int:
        """Training batches of the current epoch this run already trained on: 0, except in a run resumed
        from a checkpoint written mid-epoch (``callbacks.Preemption``), whose progress Lightning restores
        before the first batch is asked for."""
        return batches_done_this_epoch(self.trainer)

    def shard(self, num_samples: int, train: bool, epoch: int = 0) -> np.ndarray:
        """This process's indices for ``epoch`` (``distributed.epoch_shard``)."""
        return epoch_shard(num_samples, self.rank, self.world_size, shuffle=train, seed=self.seed, epoch=epoch)

    def train_resolution(self, epoch: int) -> int:
        return self.progressive_resolution(epoch) if self.progressive_resolution else self.image_size

    def _permutation(self, blocks_per_side: int, device: torch.device) -> Tensor:
        key = (blocks_per_side, device)
        if key not in self._permutations:
            self._permutations[key] = block_permutation(blocks_per_side, self.seed).to(device)
        return self._permutations[key]

    def on_after_batch_transfer(self, batch: tuple[Tensor, Tensor], dataloader_idx: int) -> tuple[Tensor, Tensor]:
        """Normalise uint8 images to float on the training device (in channels_last when ``uses_channels_last``;
        elementwise arithmetic keeps the layout); labels to int64 of shape (B,), also for a last batch of one (FFCV
        gives (B, 1)), owned by the caller."""
        images, labels = batch
        if self._mean.device != images.device:  # moved once, not every batch
            self._mean, self._std = self._mean.to(images.device), self._std.to(images.device)
        if self.uses_channels_last:
            images = images.contiguous(memory_format=torch.channels_last)  # a no-op for FFCV's, which arrive in it
        images = (images.float() - self._mean) / self._std
        if self.block_shuffle is not None:  # after normalisation, as the authors' code does
            images = shuffle_blocks(images, self.block_shuffle, self._permutation(images.shape[-1] // self.block_shuffle, images.device))
        # A copy: FFCV hands out the same label buffers again a few batches later.
        return images, labels.to(torch.long, copy=True).reshape(-1)


def block_permutation(blocks_per_side: int, seed: int) -> Tensor:
    """The one permutation of an image's blocks_per_side^2 blocks that ``seed`` draws (on the CPU: the same on every
    device and process)."""
    return torch.randperm(blocks_per_side**2, generator=torch.Generator().manual_seed(seed))


def shuffle_blocks(images: Tensor, block: int, permutation: Tensor) -> Tensor:
    """Images (N, C, H, W) cut into block x block squares, read row by row, and laid out again in the order
    ``permutation``: output block k is input block permutation[k]. The output keeps the images' layout."""
    n, c, h, w = images.shape
    rows, cols = h // block, w // block
    blocks = images.reshape(n, c, rows, block, cols, block).permute(0, 1, 2, 4, 3, 5).reshape(n, c, rows * cols, block, block)
    blocks = blocks[:, :, permutation.to(images.device)]  # a no-op when it is there already
    out = blocks.reshape(n, c, rows, cols, block, block).permute(0, 1, 2, 4, 3, 5).reshape(n, c, h, w)
    return out.contiguous(memory_format=torch.channels_last) if images.is_contiguous(memory_format=torch.channels_last) else out
