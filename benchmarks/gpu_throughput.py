"""ResNet-50 training throughput on one GPU: the fast path on vs off, from tensors on the GPU and through FFCV.

Every arm is a real ``Trainer.fit`` of ``ObjectiveClassifier`` (softmax, SGD, EMA, TensorBoard logging every
``--log_every`` steps and the preemption callback, as ``cli.py fit`` trains); the arms are interleaved in
``--repeats`` rounds so that noise on the machine hits them alike. Arms:

- ``off``:            fp32 (``32-true``), NCHW weights and batches, cudnn.benchmark off
- ``on``:             the default on a GPU: bf16 autocast, channels_last, cudnn.benchmark, non-blocking copies
- ``on+compile``:     also ``model.compile: true`` (with ``--compile``; compiling falls in the warm-up)
- ``on, no EMA``:     ``ema_decay: null``; the EMA update's share of a step is 1 - t(no EMA) / t(on)
- ``on, no logging``: no logger and ``self.log`` a no-op; logging's share of a step likewise

Data: ``synthetic``, one batch of normalised images already on the GPU (the model's ceiling), and ``ffcv``,
ImageNet-like JPEGs written here (500 x 375, quality 90) and read by ``FFCVImageDataModule`` as training
reads ImageNet: decoded, random-resized-cropped to 224 and flipped on ``--workers`` CPU cores, copied to the
GPU without blocking. Throughput is images/s over the steps after ``--warmup`` (cuDNN autotuning, FFCV's
numba compilation and torch.compile fall before), between two CUDA synchronisations.

    python benchmarks/gpu_throughput.py --compile --out results.json            # on a GPU machine
    python benchmarks/gpu_throughput.py --backbone resnet18 --batch 8 --steps 6 --warmup 2 --log_every 2 \\
        --images 64 --repeats 1 --data synthetic ffcv                              # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from callbacks import Preemption
from cli import default_precision
from datamodules import FFCVImageDataModule, WriterSettings
from datamodules.convert import folder
from lightning_modules import ObjectiveClassifier
from loader_throughput import write_jpegs
from step_overhead import InMemoryBatches

NUM_CLASSES = 1000


class NCHW(ObjectiveClassifier):
    """The ``off`` arm: weights and batches in the default (NCHW) layout instead of channels_last."""

    def configure_model(self) -> None:
        pass

    def training_step(self, batch, batch_idx):
        images, target = batch
        return super().training_step((images.contiguous(), target), batch_idx)


class Unlogged(ObjectiveClassifier):
    """The ``on, no logging`` arm: ``self.log`` does nothing."""

    def log(self, *args, **kwargs) -> None:
        pass


class Clock(L.Callback):
    """Wall time from the end of step ``warmup`` to the end of step ``steps``, each once the device is done."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps, self.start, self.seconds = warmup, steps, None, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step in (self.warmup, self.steps):
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize(pl_module.device)
            now = time.perf_counter()
            if trainer.global_step == self.warmup:
                self.start = now
            else:
                self.seconds = now - self.start


def images_per_second(arm: str, data: L.LightningDataModule, args, log_dir: str) -> float:
    fast = arm != "off"
    model_class = {"off": NCHW, "on, no logging": Unlogged}.get(arm, ObjectiveClassifier)
    model = model_class(
        num_classes=NUM_CLASSES, global_batch_size=args.batch, backbone=args.backbone,
        ema_decay=None if arm == "on, no EMA" else 0.9999, compile=arm == "on+compile",
    )
    clock = Clock(args.warmup, args.steps)
    trainer = L.Trainer(
        devices=1, max_steps=args.steps, limit_val_batches=0, num_sanity_val_steps=0,
        precision=default_precision(None, "auto") if fast else "32-true", benchmark=fast,
        logger=False if arm == "on, no logging" else TensorBoardLogger(log_dir, name=arm),
        log_every_n_steps=args.log_every, enable_progress_bar=False, enable_model_summary=False,
        # As cli.py trains: last.ckpt (written after the timed steps) and a preemption check every 10 steps.
        callbacks=[ModelCheckpoint(Path(log_dir, "checkpoints"), save_last=True), Preemption(), clock],
    )
    trainer.fit(model, datamodule=data)
    return (args.steps - args.warmup) * args.batch / clock.seconds


def synthetic_data(args, channels_last: bool) -> InMemoryBatches:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images = torch.randn(args.batch, 3, 224, 224, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    target = torch.randint(NUM_CLASSES, (args.batch,), device=device)
    return InMemoryBatches([(images, target)] * args.steps)


def ffcv_data(args, tmp: Path) -> FFCVImageDataModule:
    """``--images`` JPEGs, written by all workers in parts, converted as for ImageNet."""
    tree, beton = tmp / "jpegs", tmp / "train.beton"
    parts = np.array_split(np.arange(args.images), min(args.workers, args.images))
    with ProcessPoolExecutor(len(parts)) as pool:
        writes = [pool.submit(write_jpegs, tree, len(numbers), seed=part, first=int(numbers[0]))
                  for part, numbers in enumerate(parts)]
        for write in writes:
            write.result()  # raises what a writer raised
    folder(str(tree), str(beton), WriterSettings(num_workers=args.workers))
    return FFCVImageDataModule(
        str(beton), str(beton), num_classes=NUM_CLASSES, global_batch_size=args.batch, num_workers=args.workers,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--batch", type=int, default=256, help="images per step on the one GPU")
    parser.add_argument("--steps", type=int, default=100, help="steps per arm and round, warm-up included")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--log_every", type=int, default=50, help="Trainer log_every_n_steps (Lightning's default)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also the on+compile arm")
    parser.add_argument("--data", nargs="+", choices=["synthetic", "ffcv"], default=["synthetic", "ffcv"])
    parser.add_argument("--images", type=int, default=None, help="JPEGs for the ffcv arms (default: one epoch of --steps)")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--out", default=None, help="also write the results here as JSON")
    args = parser.parse_args()
    if not 0 < args.warmup < args.steps:
        parser.error(f"--warmup must be in (0, --steps), got {args.warmup} with --steps {args.steps}")
    args.images = args.images or args.batch * (args.steps + 1)

    arms = ["off", "on", *(["on+compile"] if args.compile else []), "on, no EMA", "on, no logging"]
    rates = {(source, arm): [] for source in args.data for arm in arms}
    with tempfile.TemporaryDirectory() as tmp:
        if "ffcv" in args.data:
            start = time.perf_counter()
            ffcv = ffcv_data(args, Path(tmp))
            print(f"wrote and converted {args.images} JPEGs in {time.perf_counter() - start:.0f} s")
        for r in range(args.repeats):
            for source in args.data:
                for arm in arms:
                    data = ffcv if source == "ffcv" else synthetic_data(args, channels_last=arm != "off")
                    rates[source, arm].append(images_per_second(arm, data, args, tmp))
                    print(f"round {r}: {source:>9} {arm:>15}: {rates[source, arm][-1]:7.0f} img/s", flush=True)

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"\n{args.backbone}, batch {args.batch} at 224 px on one {device}, {args.workers} loader workers, "
          f"steps {args.steps} (warm-up {args.warmup}), median of {args.repeats} rounds, torch {torch.__version__}")
    median = {key: statistics.median(v) for key, v in rates.items()}
    for source in args.data:
        line = "  ".join(f"{arm}: {median[source, arm]:.0f}" for arm in arms)
        print(f"{source:>9} img/s  {line}")
        on = median[source, "on"]
        print(f"{'':>9} fast path speed-up {on / median[source, 'off']:.2f}x", end="")
        if args.compile:
            print(f", compile {median[source, 'on+compile'] / on:.2f}x on top", end="")
        # Share of the step time: 1 - t(without) / t(with) = 1 - rate(with) / rate(without).
        print(f"; EMA {100 * (1 - on / median[source, 'on, no EMA']):.1f} % of a step, "
              f"logging {100 * (1 - on / median[source, 'on, no logging']):.1f} %")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "device": device, "args": vars(args),
            "img_per_s": {f"{source}/{arm}": v for (source, arm), v in rates.items()},
        }, indent=2))


if __name__ == "__main__":
    main()
