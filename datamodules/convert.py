"""Convert data you already have on disk into FFCV .beton files (with JSON sidecars), nothing downloaded.

    python -m datamodules.convert imagenet --root /data/imagenet --out_dir /data/ffcv/imagenet
    python -m datamodules.convert imagenet --root /data/imagenet --out_dir /data/ffcv/imagenet \\
        --ground_truth /data/imagenet/ILSVRC2012_devkit_t12 --holdout true
    python -m datamodules.convert transfer --name cifar10 --root /data/cifar --out_dir /data/ffcv
    python -m datamodules.convert folder --root /data/mine/train --out /data/ffcv/mine_train.beton
    python -m datamodules.convert shapes --root data/shapes      # the embedded data set (drawn, not converted)

Where each data set's files must lie is in ``datamodules/sources.py``. Writer settings default to
ffcv-imagenet's for ResNet-50 (``--writer.max_resolution 500 --writer.jpeg_quality 90
--writer.write_mode proportion --writer.compress_probability 0.5``). Every file is written under a
temporary name and renamed when complete; re-running skips files already written with the same
settings, so an interrupted conversion continues where it stopped.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Literal, Optional

import numpy as np
from jsonargparse import CLI

from .beton import WriterSettings, write_split
from .shapes import EmbeddedShapesDataModule
from .sources import TRANSFER_DATASETS, Split, holdout_split, image_folder
from .sources import imagenet as imagenet_split

__all__ = ["folder", "imagenet", "transfer"]

BadImages = Literal["fail", "skip"]


def _write(split: Split, out: Path, writer: WriterSettings, bad_images: str, source: str, overwrite: bool) -> Path:
    sidecar = Path(f"{out}.json")
    if out.is_file() and sidecar.is_file() and not overwrite:
        info = json.loads(sidecar.read_text())
        if info.get("writer") == asdict(writer) and info.get("num_samples", -1) + len(info.get("skipped", [])) == len(split):
            print(f"{out}: already written with these settings, skipped (pass --overwrite true to rewrite)")
            return out
    print(f"{source}: {len(split)} images in {len(split.classes)} classes -> {out}")
    return write_split(split, out, writer, bad_images=bad_images, source=source)


def folder(
    root: str,
    out: str,
    writer: WriterSettings = WriterSettings(),
    bad_images: BadImages = "fail",
    overwrite: bool = False,
) -> Path:
    """Any image folder tree, ``root/<class>/<image>``; classes are the sorted folder names.

    Args:
        root: folder with one sub-folder per class.
        out: the .beton file to write.
        writer: how images are stored.
        bad_images: "fail" stops at an undecodable image and names it; "skip" leaves such images out
            and lists them in the sidecar.
        overwrite: rewrite a file already written with the same settings.
    """
    return _write(image_folder(root), Path(out), writer, bad_images, root, overwrite)


def imagenet(
    root: str,
    out_dir: str,
    ground_truth: Optional[str] = None,
    holdout: bool = False,
    holdout_seed: int = 0,
    writer: WriterSettings = WriterSettings(),
    bad_images: BadImages = "fail",
    overwrite: bool = False,
) -> dict[str, Path]:
    """ImageNet ILSVRC-2012: ``root/train/<wnid>/*.JPEG`` and ``root/val`` (synset folders, or flat with
    ``ground_truth``). Writes ``val.beton`` and ``train.beton``, or with ``holdout`` the paper's split of
    train into ``train_minus_holdout.beton`` and ``holdout.beton`` (50,046 images, about 50 per class).

    Args:
        root: the ImageNet folder holding train/ and val/.
        out_dir: where the .beton files go.
        ground_truth: labels of a flat val/: the devkit folder (ILSVRC2012_devkit_t12), Kaggle's
            LOC_val_solution.csv, or a text file of ``<filename> <wnid>`` lines.
        holdout: split the paper's hold-out set off train (Kornblith et al. 2021, appendix A.1).
        holdout_seed: seed of the images chosen for the hold-out set.
        writer: how images are stored.
        bad_images: "fail" stops at an undecodable image and names it; "skip" leaves it out.
        overwrite: rewrite files already written with the same settings.
    """
    out = Path(out_dir)
    train = imagenet_split(root, "train")
    splits = {"val": imagenet_split(root, "val", ground_truth=ground_truth)}
    if holdout:
        splits["train_minus_holdout"], splits["holdout"] = holdout_split(train, seed=holdout_seed)
    else:
        splits["train"] = train
    return {name: _write(split, out / f"{name}.beton", writer, bad_images, f"{root} ({name})", overwrite)
            for name, split in splits.items()}


def transfer(
    name: Literal[tuple(TRANSFER_DATASETS)],  # type: ignore[valid-type]
    root: str,
    out_dir: str,
    writer: Optional[WriterSettings] = None,
    bad_images: BadImages = "fail",
    overwrite: bool = False,
) -> dict[str, Path]:
    """A transfer data set of Table A.2 from the local root torchvision's class for it reads. Writes
    ``<name>_train.beton`` and ``<name>_test.beton`` with the split and accuracy measure of the paper.

    Args:
        name: the data set.
        root: the folder you would give torchvision's dataset class (see datamodules/sources.py).
        out_dir: where the .beton files go.
        writer: how images are stored; default: ffcv-imagenet's settings for image files, and raw pixels
            at their own size for data sets stored as arrays (CIFAR's 32 px images).
        bad_images: "fail" stops at an undecodable image and names it; "skip" leaves it out.
        overwrite: rewrite files already written with the same settings.
    """
    written = {}
    for split_name in ("train", "test"):
        split = TRANSFER_DATASETS[name](root, split_name)
        settings = writer or (WriterSettings(max_resolution=None, write_mode="raw") if isinstance(split.images, np.ndarray) else WriterSettings())
        out = Path(out_dir) / f"{name}_{split_name}.beton"
        written[split_name] = _write(split, out, settings, bad_images, f"{name} {split_name} from {root}", overwrite)
    return written


def shapes(root: str = "data/shapes", num_train: int = 8000, num_val: int = 2000, num_transfer: int = 2000,
           num_sketch_train: int = 500, seed: int = 0, image_size: int = 32) -> dict[str, int]:
    """The embedded shapes data set (``datamodules/shapes.py``), drawn procedurally: every split as a .beton under
    ``root``, as the data module draws it on first use (nothing rewritten when ``root`` already holds it).

    Args:
        root: where the .beton files go.
        num_train: pre-training images (60 classes).
        num_val: pre-training validation images.
        num_transfer: images of each transfer task's training and test split.
        num_sketch_train: the sketch target's training images (few labelled images).
        seed: seed of the drawing.
        image_size: image side in pixels.
    """
    module = EmbeddedShapesDataModule(root, num_train, num_val, num_transfer, num_transfer, num_sketch_train,
                                      data_seed=seed, image_size=image_size)
    module.prepare_data()
    print(f"wrote {', '.join(f'{k}.beton ({v})' for k, v in module.sizes.items())} to {root}")
    return module.sizes


if __name__ == "__main__":
    CLI([folder, imagenet, transfer, shapes], as_positional=False)
