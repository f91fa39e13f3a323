"""FFCV image classification data: train with random-resized-crop and flip, validate on a centre crop.

The whole data path in one place: FFCV decodes and augments uint8 images in its own threads; the
batch is normalised in torch on the training device (``on_after_batch_transfer``), so no cupy is
needed. Loaders are built inside the ``*_dataloader`` hooks, where the DDP process group exists.
"""

from __future__ import annotations

import os
from typing import Optional

import lightning as L
import numpy as np
import torch
from torch import Tensor

from .beton import BetonError, beton_labels

__all__ = ["FFCVImageDataModule"]

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


class _TrainerAlignedLoader:
    """An FFCV Loader that follows the trainer.

    - Epoch: FFCV keeps its own epoch counter, which restarts at 0 in a new process, and an epoch's
      random order is a function of (seed, epoch). Setting it from the trainer before every pass means a
      resumed run continues with the next epoch's order instead of replaying epoch 0's.
    - Inference mode: FFCV allocates its output buffers when iteration starts, in the calling thread,
      and fills them from its own thread. Buffers allocated under Lightning's ``torch.inference_mode``
      (standalone validate/test) are inference tensors that the filling thread may not write, which
      kills it and hangs the run; so allocate them outside inference mode.
    """

    def __init__(self, loader, trainer: "L.Trainer"):
        self.loader = loader
        self.trainer = trainer

    def __iter__(self):
        # A generator: nothing starts until the first batch is asked for. Lightning creates its
        # iterators before it restores a checkpoint's progress, so the epoch is read only then.
        self.align_epoch()
        with torch.inference_mode(False):
            batches = iter(self.loader)
        yield from batches

    def align_epoch(self) -> None:
        self.loader.next_epoch = self.trainer.current_epoch

    def __len__(self) -> int:
        return len(self.loader)


class FFCVImageDataModule(L.LightningDataModule):
    """Image classification from FFCV .beton files (fields ``image`` and ``label``).

    Args:
        train_path: training .beton.
        val_path: validation .beton (also used by ``test``).
        global_batch_size: images per optimiser step over all processes; each process loads
            ``global_batch_size / world_size``.
        num_classes: classes of the task; read from the training labels when not given.
        image_size: side of the training crop and of the evaluation centre crop.
        val_resize: evaluation resizes the shorter side to this, then centre-crops ``image_size``.
        crop_scale: range of the random crop's area, as a fraction of the image (paper: 10-100 %).
        crop_ratio: range of the random crop's aspect ratio (paper: 3/4 to 4/3).
        flip: random horizontal flips in training.
        num_workers: FFCV decoding threads per process; all CPUs available to the process when unset.
        seed: seed of the training order (and of FFCV's distributed sampler).
        mean: per-channel mean of uint8 pixels, subtracted on the device.
        std: per-channel standard deviation of uint8 pixels.
        make_hint: how to create the .beton files, shown when one is missing.
    """

    def __init__(
        self,
        train_path: str,
        val_path: str,
        global_batch_size: int = 4096,
        num_classes: Optional[int] = None,
        image_size: int = 224,
        val_resize: int = 256,
        crop_scale: tuple[float, float] = (0.1, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: bool = True,
        num_workers: Optional[int] = None,
        seed: int = 0,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        make_hint: str = "Convert your data with `python -m datamodules.convert --help`.",
    ):
        super().__init__()
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}.")
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {crop_scale}.")
        self.train_path = train_path
        self.val_path = val_path
        self.global_batch_size = global_batch_size
        self._num_classes = num_classes
        self.image_size = image_size
        self.val_resize = val_resize
        self.crop_scale = tuple(crop_scale)
        self.crop_ratio = tuple(crop_ratio)
        self.flip = flip
        self.num_workers = num_workers or len(os.sched_getaffinity(0))
        self.seed = seed
        self.make_hint = make_hint
        self._mean = torch.tensor(mean).view(1, 3, 1, 1)
        self._std = torch.tensor(std).view(1, 3, 1, 1)

    @property
    def num_classes(self) -> int:
        if self._num_classes is None:
            self._num_classes = int(beton_labels(self.train_path, self.make_hint).max()) + 1
        return self._num_classes

    def setup(self, stage: str) -> None:
        paths = [self.train_path, self.val_path] if stage == "fit" else [self.val_path]
        for path in paths:
            self._check_labels(path)
        world = self.trainer.world_size if self.trainer is not None else 1
        if self.global_batch_size % world:
            raise ValueError(
                f"global_batch_size={self.global_batch_size} is not divisible by the {world} processes; "
                f"choose a multiple of {world}."
            )
        self.batch_size_per_process = self.global_batch_size // world

    def _check_labels(self, path: str) -> None:
        labels = beton_labels(path, self.make_hint)
        bad = (labels < 0) | (labels >= self.num_classes)
        if bad.any():
            raise BetonError(
                f"{path}: {int(bad.sum())} of {labels.size} labels lie outside [0, {self.num_classes}) "
                f"(e.g. {np.unique(labels[bad])[:5].tolist()}). Set data.num_classes to the true number of "
                f"classes, or rewrite the file with labels 0..num_classes-1."
            )

    # --- loaders ---

    def _device(self) -> torch.device:
        return self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")

    def _loader(self, path: str, train: bool):
        from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder, RandomResizedCropRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToDevice, ToTensor, ToTorchImage

        device = self._device()
        size = (self.image_size, self.image_size)
        if train:
            decode = [RandomResizedCropRGBImageDecoder(size, scale=self.crop_scale, ratio=self.crop_ratio)]
            decode += [RandomHorizontalFlip()] if self.flip else []
        else:
            decode = [CenterCropRGBImageDecoder(size, ratio=self.image_size / self.val_resize)]
        on_gpu = device.type == "cuda"
        to_device = [ToDevice(device, non_blocking=True)] if on_gpu else []
        image = [*decode, ToTensor(), *to_device, ToTorchImage(channels_last=on_gpu)]
        label = [IntDecoder(), ToTensor(), Squeeze(), *to_device]
        distributed = self.trainer is not None and self.trainer.world_size > 1
        try:
            return Loader(
                path,
                batch_size=self.batch_size_per_process,
                num_workers=self.num_workers,
                order=OrderOption.RANDOM if train else OrderOption.SEQUENTIAL,
                drop_last=train,
                pipelines={"image": image, "label": label},
                distributed=distributed,
                seed=self.seed,
            )
        except Exception as err:
            raise BetonError(f"Could not open {path} with FFCV ({type(err).__name__}: {err}). {self.make_hint}") from err

    def train_dataloader(self):
        return _TrainerAlignedLoader(self._loader(self.train_path, train=True), self.trainer)

    def val_dataloader(self):
        return _TrainerAlignedLoader(self._loader(self.val_path, train=False), self.trainer)

    def test_dataloader(self):
        return _TrainerAlignedLoader(self._loader(self.val_path, train=False), self.trainer)

    def on_after_batch_transfer(self, batch: tuple[Tensor, Tensor], dataloader_idx: int) -> tuple[Tensor, Tensor]:
        """Normalise uint8 images to float on the training device; labels to int64."""
        images, labels = batch
        if self._mean.device != images.device:  # moved once, not every batch
            self._mean, self._std = self._mean.to(images.device), self._std.to(images.device)
        return (images.float() - self._mean) / self._std, labels.long()
