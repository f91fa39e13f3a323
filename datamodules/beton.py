"""Writing and checking FFCV .beton files: one writer for every data set, real or embedded.

Each .beton holds two fields, ``image`` (RGBImageField) and ``label`` (IntField). Files are written to
a temporary name and renamed when complete, so an interrupted conversion never leaves a file that
looks finished.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

__all__ = ["write_beton", "beton_labels", "BetonError"]

IMAGE_FIELD, LABEL_FIELD = "image", "label"


class BetonError(ValueError):
    """A .beton file is missing, unreadable, or does not hold what the pipeline needs."""


def write_beton(
    dataset: Sequence,
    path: str | os.PathLike,
    *,
    write_mode: Literal["raw", "jpg", "smart", "proportion"] = "proportion",
    max_resolution: int | None = 500,
    jpeg_quality: int = 90,
    compress_probability: float = 0.5,
    num_workers: int | None = None,
    chunksize: int = 100,
) -> Path:
    """Write ``dataset`` (indexable, items ``(image, label)`` with an HWC uint8 array or PIL image) to
    ``path`` as a .beton. Defaults are ffcv-imagenet's settings for ResNet-50: longest side at most 500 px,
    JPEG quality 90, half of the images JPEG-compressed and the rest stored raw (``proportion`` mode)."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    fields = {
        IMAGE_FIELD: RGBImageField(
            write_mode=write_mode,
            max_resolution=max_resolution,
            jpeg_quality=jpeg_quality,
            compress_probability=compress_probability,
        ),
        LABEL_FIELD: IntField(),
    }
    workers = num_workers or len(os.sched_getaffinity(0))
    DatasetWriter(str(tmp), fields, num_workers=workers).from_indexed_dataset(dataset, chunksize=chunksize)
    os.replace(tmp, path)
    return path


def beton_labels(path: str | os.PathLike, hint: str = "") -> np.ndarray:
    """The label of every sample in a .beton, read from its metadata table (no image is decoded).

    Raises BetonError naming the file and the fix when it is missing, unreadable or has no label field.
    """
    from ffcv.reader import Reader

    path = Path(path)
    how = f" {hint}" if hint else ""
    if not path.is_file():
        raise BetonError(f"FFCV dataset file not found: {path}.{how}")
    try:
        reader = Reader(str(path))
    except Exception as err:  # FFCV raises assorted errors on a truncated or foreign file
        raise BetonError(f"{path} is not a readable FFCV .beton ({type(err).__name__}: {err}).{how}") from err
    names = list(reader.field_names)
    if IMAGE_FIELD not in names or LABEL_FIELD not in names:
        raise BetonError(f"{path} holds fields {names}; this pipeline needs '{IMAGE_FIELD}' and '{LABEL_FIELD}'.{how}")
    return np.asarray(reader.metadata[f"f{names.index(LABEL_FIELD)}"]).astype(np.int64).ravel()
