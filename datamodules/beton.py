"""Writing and checking FFCV .beton files: one writer for every data set, real or embedded.

Each .beton holds two fields, ``image`` (RGBImageField) and ``label`` (IntField), and has a JSON sidecar
(``<file>.json``) with what the loaders and probes need to know about it: class names, the accuracy
measure its authors ask for (Table A.2), where it came from, the writer settings and any images left out.
Files are written to a temporary name and renamed when complete, so an interrupted conversion never
leaves a file that looks finished, and re-running it is safe.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
from tqdm import tqdm

from .sources import DataError, Split, load_rgb

__all__ = ["WriterSettings", "write_split", "beton_labels", "beton_info", "BetonError"]

IMAGE_FIELD, LABEL_FIELD = "image", "label"


class BetonError(DataError):
    """A .beton file is missing, unreadable, or does not hold what the pipeline needs."""


@dataclass(frozen=True)
class WriterSettings:
    """How images are stored. Defaults are ffcv-imagenet's settings for ResNet-50: longest side at most
    500 px, JPEG quality 90, and a random half of the images JPEG-compressed, the rest stored raw.

    Args:
        max_resolution: longest side in pixels after resizing; None keeps every image's size.
        jpeg_quality: quality of the JPEG-compressed images.
        write_mode: "proportion" compresses a random ``compress_probability`` share; "jpg" all; "raw" none;
            "smart" compresses images whose raw size would be large.
        compress_probability: share of images compressed in "proportion" mode.
        num_workers: writer processes; all CPUs available to this process when unset.
        chunksize: images a writer process takes at a time.
    """

    max_resolution: Optional[int] = 500
    jpeg_quality: int = 90
    write_mode: Literal["raw", "jpg", "smart", "proportion"] = "proportion"
    compress_probability: float = 0.5
    num_workers: Optional[int] = None
    chunksize: int = 100

    @property
    def workers(self) -> int:
        return self.num_workers or len(os.sched_getaffinity(0))


class _Decoded:
    """``split`` as the indexable (HWC uint8 image, label) dataset FFCV's writer reads, in its worker processes.

    A worker that cannot decode an image records it in ``error_dir`` and from then on every worker hands
    out tiny placeholders, so the writer finishes in seconds instead of decoding the rest of the data
    before the error is reported (FFCV's writer waits forever on a worker that raises).
    """

    PLACEHOLDER = np.zeros((8, 8, 3), np.uint8)

    def __init__(self, split: Split, error_dir: Optional[str] = None):
        self.split, self.error_dir = split, error_dir
        self.failed = mp.Value("b", 0, lock=False)

    def __len__(self) -> int:
        return len(self.split)

    def image(self, i: int) -> np.ndarray:
        source = self.split.images[i]
        return source if isinstance(source, np.ndarray) else np.asarray(load_rgb(source))

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        label = int(self.split.labels[i])
        if self.failed.value:
            return self.PLACEHOLDER, label
        try:
            return self.image(i), label
        except DataError as err:
            if self.error_dir is None:
                raise
            self.failed.value = 1
            Path(self.error_dir, f"{i}.txt").write_text(str(err))
            return self.PLACEHOLDER, label


_checked: Optional[Split] = None  # the split a checking process decodes, set once per process


def _check_split(split: Split) -> None:
    global _checked
    _checked = split


def _decode_error(i: int) -> Optional[str]:
    """Why image ``i`` of the checked split cannot be decoded, or None when it can."""
    try:
        load_rgb(_checked.images[i])
        return None
    except DataError as err:
        return str(err)


def write_split(
    split: Split,
    path: str | os.PathLike,
    settings: WriterSettings = WriterSettings(),
    *,
    bad_images: Literal["fail", "skip"] = "fail",
    source: str = "",
) -> Path:
    """Write ``split`` to ``path`` as a .beton, with its JSON sidecar.

    bad_images="fail" stops at the first image that cannot be decoded, naming it, and writes nothing;
    "skip" first checks every image (in parallel, with a progress bar), leaves out the undecodable ones
    and lists them in the sidecar.
    """
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    fields = {
        IMAGE_FIELD: RGBImageField(
            write_mode=settings.write_mode,
            max_resolution=settings.max_resolution,
            jpeg_quality=settings.jpeg_quality,
            compress_probability=settings.compress_probability,
        ),
        LABEL_FIELD: IntField(),
    }
    indices, skipped = np.arange(len(split)), []
    if bad_images == "skip" and not isinstance(split.images, np.ndarray):
        with mp.Pool(settings.workers, initializer=_check_split, initargs=(split,)) as pool:
            verdicts = list(tqdm(pool.imap(_decode_error, range(len(split)), chunksize=64),
                                 total=len(split), desc=f"checking {path.name}"))
        skipped = [verdict for verdict in verdicts if verdict is not None]
        indices = np.array([i for i, verdict in zip(indices, verdicts) if verdict is None])
        if skipped:
            print(f"{path.name}: left out {len(skipped)} undecodable images (listed in {path.name}.json)")
    with tempfile.TemporaryDirectory() as error_dir:
        data = _Decoded(split, error_dir)
        writer = DatasetWriter(str(tmp), fields, num_workers=settings.workers)
        writer.from_indexed_dataset(data, indices=indices, chunksize=settings.chunksize)
        errors = [Path(error_dir, name).read_text() for name in sorted(os.listdir(error_dir))]
    if errors:
        tmp.unlink(missing_ok=True)
        raise DataError(f"{path.name} not written: {errors[0]} ({len(errors)} undecodable image(s) found before stopping)")
    info = {
        "num_samples": len(indices),
        "classes": list(split.classes),
        "measure": split.measure,
        "source": source,
        "writer": asdict(settings),
        "skipped": skipped,
    }
    Path(f"{tmp}.json").write_text(json.dumps(info, indent=1))
    os.replace(f"{tmp}.json", f"{path}.json")
    os.replace(tmp, path)
    return path


def beton_info(path: str | os.PathLike) -> dict:
    """The JSON sidecar written with a .beton (classes, measure, source, writer settings, skipped images)."""
    sidecar = Path(f"{path}.json")
    if not sidecar.is_file():
        raise BetonError(f"{path} has no sidecar {sidecar.name}; rewrite it with `python -m datamodules.convert`.")
    return json.loads(sidecar.read_text())


def recorded_measure(path: str | os.PathLike) -> Optional[str]:
    """The accuracy measure a .beton's sidecar records (top1 or mean_per_class), None without a sidecar."""
    sidecar = Path(f"{path}.json")
    return json.loads(sidecar.read_text()).get("measure") if sidecar.is_file() else None


def beton_labels(path: str | os.PathLike, hint: str = "") -> np.ndarray:
    """The label of every sample in a .beton, read from its metadata table (no image is decoded).

    Raises BetonError naming the file and the fix when it is missing, unreadable or has other fields.
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
    fields = {name: type(handler).__name__ for name, handler in reader.handlers.items()}
    if fields.get(IMAGE_FIELD) != "RGBImageField" or fields.get(LABEL_FIELD) != "IntField":
        raise BetonError(
            f"{path} holds fields {fields}; this pipeline reads '{IMAGE_FIELD}' (RGBImageField) and "
            f"'{LABEL_FIELD}' (IntField).{how}"
        )
    return np.asarray(reader.metadata[f"f{list(fields).index(LABEL_FIELD)}"]).astype(np.int64).ravel()
