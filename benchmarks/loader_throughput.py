"""Loader throughput: the FFCV data module vs FFCV's own Loader vs the torchvision fallback.

All three arms read the same JPEGs (written here: ImageNet-like 500 x 375 photos-to-be, smooth enough
to compress like real images) with the same augmentation (random-resized crop to 224 and flip), batch
and worker count, and are interleaved in rounds so machine noise hits them alike:

- ``ffcv/datamodule``: ``FFCVImageDataModule.train_dataloader()``, as training uses it
- ``ffcv/Loader``:     FFCV's ``Loader`` built by hand with the pipeline the data module builds on the CPU,
                       but FFCV's own crop and flip (drawn from per-thread generators): the difference is
                       the data module's overhead plus the reproducible per-image draws
                       (``datamodules/seeded_augmentation.py``)
- ``torchvision``:     ``ImageFolderDataModule`` (PIL decode in DataLoader worker processes)

Also a pass's start-up, the wait for the first batch of a new loader: FFCV compiles the whole pipeline for
every loader it builds, the data module once per process (``compat.compile_ffcv_once``); rounds interleave a
loader compiled afresh with one reusing the compile. And the writer: images/s and the file size with
ffcv-imagenet's ResNet-50 settings.

    python benchmarks/loader_throughput.py --images 1000 --batches 8 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from datamodules import FFCVImageDataModule, ImageFolderDataModule, WriterSettings
from datamodules.convert import folder


def write_jpegs(root: Path, n: int, classes: int = 10, size=(500, 375), seed: int = 0, first: int = 0) -> None:
    """Smooth random scenes (upsampled noise plus edges), JPEG quality 90 like ImageNet's files; numbered
    from ``first`` (so that several processes can write parts of one set)."""
    rng = np.random.default_rng(seed)
    for i in range(first, first + n):
        base = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize(size, Image.BICUBIC)
        pixels = np.asarray(image).copy()
        pixels[rng.integers(0, size[1]), :] = 255  # a few sharp edges, as photographs have
        pixels[:, rng.integers(0, size[0])] = 0
        path = root / f"class{i % classes:02d}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=90)


def images_per_second(loader, batches: int) -> float:
    it = iter(loader)
    next(it)  # first batch: thread start-up and (FFCV) compilation
    start, seen = time.perf_counter(), 0
    for _ in range(batches):
        seen += len(next(it)[0])
    return seen / (time.perf_counter() - start)


def first_batch_seconds(data, fresh: bool) -> float:
    """Seconds from building the data module's training loader to its first batch, compiling its pipeline afresh
    (what FFCV does for every loader) or reusing this process's compile."""
    from ffcv.pipeline.compiler import Compiler

    if fresh:  # FFCV's own compile back; the data module then installs a new, empty memo
        Compiler.compile = classmethod(Compiler.compile.__func__.__wrapped__)
    start = time.perf_counter()
    next(iter(data.train_dataloader()))
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--batches", type=int, default=8, help="timed batches per arm and round")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()

    from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import RandomHorizontalFlip, ToTensor, ToTorchImage

    with tempfile.TemporaryDirectory() as tmp:
        tree, beton = Path(tmp, "jpegs"), Path(tmp, "train.beton")
        write_jpegs(tree, args.images)
        start = time.perf_counter()
        folder(str(tree), str(beton), WriterSettings(num_workers=args.workers))
        write_rate = args.images / (time.perf_counter() - start)
        jpeg_bytes = sum(f.stat().st_size for f in tree.rglob("*.jpg"))
        beton_bytes = beton.stat().st_size

        shared = dict(global_batch_size=args.batch, num_workers=args.workers, image_size=224)
        ffcv_data = FFCVImageDataModule(str(beton), str(beton), **shared)
        torch_data = ImageFolderDataModule(str(tree), str(tree), **shared)
        for data in (ffcv_data, torch_data):
            data.setup("fit")  # without a trainer: one process, rank 0, epoch 0, on the CPU
        direct = Loader(
            str(beton), batch_size=args.batch, num_workers=args.workers, order=OrderOption.RANDOM, drop_last=True,
            pipelines={"image": [RandomResizedCropRGBImageDecoder((224, 224), scale=(0.1, 1.0), ratio=(3 / 4, 4 / 3)),
                                 RandomHorizontalFlip(), ToTensor(), ToTorchImage(channels_last=False)],
                       "label": [IntDecoder(), ToTensor()]},
        )
        # One loader per arm for every round, as a fit keeps its loaders for all epochs.
        loaders = {"ffcv/datamodule": ffcv_data.train_dataloader(), "ffcv/Loader": direct,
                   "torchvision": torch_data.train_dataloader()}
        rates = {name: [] for name in loaders}
        for _ in range(args.repeats):
            for name, loader in loaders.items():
                rates[name].append(images_per_second(loader, args.batches))
        startup = {"compiled afresh (FFCV)": [], "compile reused": []}
        for _ in range(args.repeats):
            for name, fresh in (("compiled afresh (FFCV)", True), ("compile reused", False)):
                startup[name].append(first_batch_seconds(ffcv_data, fresh))

    print(f"\n{args.images} JPEGs 500x375 q90 ({jpeg_bytes / args.images / 1024:.0f} KiB each), batch {args.batch}, "
          f"{args.workers} workers, crop 224 + flip, {args.batches} timed batches x {args.repeats} rounds")
    med = {name: statistics.median(r) for name, r in rates.items()}
    for name, r in rates.items():
        print(f"{name:>16}: {med[name]:6.0f} img/s  {med[name] / args.workers:5.0f} img/s per core   "
              f"(rounds: {', '.join(f'{x:.0f}' for x in r)})")
    print(f"FFCV data module vs torchvision fallback: {med['ffcv/datamodule'] / med['torchvision']:.2f}x")
    print(f"FFCV data module vs FFCV Loader directly: {med['ffcv/datamodule'] / med['ffcv/Loader']:.2f}x")
    for name, seconds in startup.items():
        print(f"first batch of a new loader, {name}: {statistics.median(seconds):.2f} s  "
              f"(rounds: {', '.join(f'{x:.2f}' for x in seconds)})")
    print(f"writer (max side 500, q90, proportion 0.5): {write_rate:.0f} img/s; .beton {beton_bytes / 2**20:.1f} MiB "
          f"vs {jpeg_bytes / 2**20:.1f} MiB of JPEGs")


if __name__ == "__main__":
    main()
