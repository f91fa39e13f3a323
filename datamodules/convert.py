"""Convert an image folder tree (one sub-folder per class, e.g. ImageNet's train/) into an FFCV .beton.

    python -m datamodules.convert --root /data/imagenet/train --out /data/imagenet/train.beton
    python -m datamodules.convert --root /data/imagenet/val   --out /data/imagenet/val.beton

Class indices follow the sorted folder names (torchvision's ImageFolder), so train and val agree when
both have the same class folders. Defaults are ffcv-imagenet's settings for ResNet-50. The file is
written under a temporary name and renamed when complete, so re-running after an interruption is safe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from jsonargparse import CLI

from .beton import write_beton


def convert(
    root: str,
    out: str,
    max_resolution: int = 500,
    jpeg_quality: int = 90,
    write_mode: Literal["raw", "jpg", "smart", "proportion"] = "proportion",
    compress_probability: float = 0.5,
    num_workers: Optional[int] = None,
) -> Path:
    """Write every image under ``root`` (``root/<class>/<image>``) to ``out``.

    Args:
        root: folder with one sub-folder per class.
        out: the .beton file to write.
        max_resolution: longest side in pixels after resizing (ffcv-imagenet: 500).
        jpeg_quality: JPEG quality of compressed images (ffcv-imagenet: 90).
        write_mode: how images are stored; "proportion" compresses a random ``compress_probability``.
        compress_probability: share of images JPEG-compressed in "proportion" mode (ffcv-imagenet: 0.5).
        num_workers: writer processes; all available CPUs when unset.
    """
    from torchvision.datasets import ImageFolder

    if not Path(root).is_dir():
        raise FileNotFoundError(f"Image folder not found: {root} (expected {root}/<class>/<image files>).")
    dataset = ImageFolder(root, loader=lambda path: _rgb(path))
    print(f"{root}: {len(dataset)} images in {len(dataset.classes)} classes -> {out}")
    return write_beton(
        dataset,
        out,
        write_mode=write_mode,
        max_resolution=max_resolution,
        jpeg_quality=jpeg_quality,
        compress_probability=compress_probability,
        num_workers=num_workers,
    )


def _rgb(path: str):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


if __name__ == "__main__":
    CLI(convert, as_positional=False)
