"""The fallback without FFCV: torchvision ImageFolder trees through a torch DataLoader.

Same arguments, shards, augmentation and normalisation as ``FFCVImageDataModule`` (both derive from
``ImageClassificationData``); only the decoding differs: PIL in DataLoader worker processes instead of
FFCV's compiled pipeline. Choose it in YAML with
``class_path: datamodules.ImageFolderDataModule`` and ``train_root``/``val_root`` instead of the .beton paths.
"""

from __future__ import annotations

import warnings
from typing import Callable, Literal, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .image_data import EpochAlignedLoader, ImageClassificationData
from .sources import DataError, Split, image_folder, load_rgb

__all__ = ["ImageFolderDataModule"]


class _Images(Dataset):
    """Items ``(uint8 CHW tensor, label)``, or None for an undecodable image in ``skip`` mode."""

    def __init__(self, split: Split, transform: Callable, bad_images: str):
        self.split, self.transform, self.bad_images = split, transform, bad_images

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        try:
            image = load_rgb(self.split.images[i])
        except DataError as err:
            if self.bad_images == "fail":
                raise
            warnings.warn(f"skipped: {err}")
            return None
        return self.transform(image), int(self.split.labels[i])


def _collate(items):
    """Stack the decodable items; the third element counts the skipped ones."""
    good = [item for item in items if item is not None]
    images = torch.stack([image for image, _ in good]) if good else torch.empty(0, 3, 1, 1, dtype=torch.uint8)
    return images, torch.tensor([label for _, label in good], dtype=torch.int64), len(items) - len(good)


class _ShardSampler(Sampler):
    """The indices of ``shard(epoch)`` after the first ``skip``; both are set before every pass."""

    def __init__(self, shard: Callable[[int], np.ndarray]):
        self.shard, self.epoch, self.skip = shard, 0, 0

    def __iter__(self):
        return iter(self.shard(self.epoch)[self.skip:].tolist())

    def __len__(self) -> int:
        return len(self.shard(0))


class ImageFolderDataModule(ImageClassificationData):
    """Image classification from folder trees (``root/<class>/<image>``) decoded by PIL.

    Args:
        train_root: training images, one sub-folder per class.
        val_root: validation images with the same class folders (also used by ``test``).
        bad_images: "fail" stops at an undecodable image and names it; "skip" leaves it out of its batch,
            warns with its path and counts it in ``skipped_images``.
        **kwargs: the shared arguments of ``ImageClassificationData`` (batch size, augmentation, workers).
    """

    def __init__(self, train_root: str, val_root: str, bad_images: Literal["fail", "skip"] = "fail", **kwargs):
        super().__init__(**kwargs)
        self.train_root = train_root
        self.val_root = val_root
        self.bad_images = bad_images
        self.skipped_images = 0
        self._splits: dict[str, Split] = {}

    def split(self, name: str) -> Split:
        """"train", "val", or the root of another folder tree (a transfer data set)."""
        if name not in self._splits:
            self._splits[name] = image_folder({"train": self.train_root, "val": self.val_root}.get(name, name))
            if name == "val" and self._splits["val"].classes != self.split("train").classes:
                train, val = set(self.split("train").classes), set(self._splits["val"].classes)
                raise DataError(
                    f"The class folders of {self.val_root} and {self.train_root} differ (only in val: "
                    f"{sorted(val - train)[:5]}, only in train: {sorted(train - val)[:5]}); labels would not match."
                )
        return self._splits[name]

    def source_labels(self, split: str) -> np.ndarray:
        return self.split(split).labels

    def _loader(self, source: str, train: bool, subset: Optional[np.ndarray] = None,
                crop_ratio: Optional[float] = None, local: bool = False,
                batch_size: Optional[int] = None) -> EpochAlignedLoader:
        from torchvision.transforms import v2

        if train and self.augment:
            crop = v2.RandomResizedCrop(self.image_size, scale=self.crop_scale, ratio=self.crop_ratio, antialias=True)
            steps = [crop, v2.RandomHorizontalFlip()] if self.flip else [crop]
        else:
            resize = round(self.image_size / crop_ratio) if crop_ratio else self.val_resize
            steps = [v2.Resize(resize, antialias=True), v2.CenterCrop(self.image_size)]
        stored, indices = self.resolve(source)  # subset counts in the split, indices in the stored folder
        subset = np.arange(len(self.labels(source))) if subset is None else np.asarray(subset)
        subset = subset if indices is None else indices[subset]
        split = self.split(stored)
        sampler = _ShardSampler(lambda epoch: subset if local else subset[self.shard(len(subset), train, epoch)])
        loader = DataLoader(
            _Images(split, v2.Compose([v2.PILToTensor(), *steps]), self.bad_images),
            batch_size=batch_size or self.batch_size_per_process,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=_collate,
            drop_last=train,
            pin_memory=self.on_cuda,
            # Workers start afresh every pass, so they see this epoch's crop size.
            persistent_workers=False,
        )

        def before_epoch(epoch: int, skip: int) -> None:
            sampler.epoch, sampler.skip = epoch, skip
            if train and self.augment:
                crop.size = (self.train_resolution(epoch),) * 2

        return EpochAlignedLoader(loader, self, before_epoch, train)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        images, labels, skipped = batch
        self.skipped_images += int(skipped)
        return super().on_after_batch_transfer((images, labels), dataloader_idx)
