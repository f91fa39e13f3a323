"""Training-step overhead of the LightningModule + FFCV path against a plain PyTorch loop.

Same model, objective, optimiser and data in every arm; the arms are interleaved in one process
(``--repeats`` rounds) so that machine noise hits them alike. Arms:

- ``plain/tensors``:     hand-written loop over batches already in memory
- ``lightning/tensors``: Trainer.fit with ObjectiveClassifier over the same in-memory batches
- ``plain/ffcv``:        hand-written loop over the FFCV loader (decode + augment on the fly)
- ``lightning/ffcv``:    the real path: Trainer.fit with ObjectiveClassifier and the FFCV data module

The framework overhead is lightning/X vs plain/X for each X. Seconds per step are the median over the
steps after ``--warmup`` (numba compilation and first-touch costs excluded).

    python benchmarks/step_overhead.py --steps 25 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch

from datamodules import EmbeddedShapesDataModule
from lightning_modules import ObjectiveClassifier


class StepClock(L.Callback):
    def __init__(self):
        self.stamps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.stamps.append(time.perf_counter())


class InMemoryBatches(L.LightningDataModule):
    """Trains on a list of batches held in memory (already normalised, on the device they were made on)."""

    def __init__(self, batches):
        super().__init__()
        self.batches = batches

    def train_dataloader(self):
        return BatchList(self.batches)


class BatchList:
    """A plain iterable (a bare list would be read by Lightning as several dataloaders)."""

    def __init__(self, items):
        self.items = items

    def __iter__(self):
        return iter(self.items)

    def __len__(self):
        return len(self.items)


def make_model(args, num_classes):
    return ObjectiveClassifier(
        num_classes=num_classes, global_batch_size=args.batch, backbone=args.backbone, backbone_source="timm",
        warmup_epochs=0, ema_decay=0.99, ema_reference_batch=args.batch,
    )


def per_step(stamps, warmup):
    """Median step time after warm-up: robust to the odd step that another process on the machine delays."""
    return statistics.median(b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1:]))


def plain_loop(model: ObjectiveClassifier, batches, normalise, steps):
    """What a researcher would write by hand: forward, objective, backward, SGD step, EMA update."""
    model.train()
    net, objective = model.network, model.objective
    opt = torch.optim.SGD(
        [{"params": [p for p in net.parameters() if p.ndim > 1], "weight_decay": 8e-5},
         {"params": [p for p in net.parameters() if p.ndim <= 1], "weight_decay": 0.0}],
        lr=0.1, momentum=0.9, nesterov=True,
    )
    stamps = []
    it = iter(batches)
    for _ in range(steps):
        images, target = normalise(next(it))
        logits = objective.logits(net(images), net.head)
        loss = sum(objective.loss_terms(logits, target, net.head).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.ema.update(net)
        stamps.append(time.perf_counter())
    return stamps


def lightning_fit(model, datamodule, steps):
    clock = StepClock()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[clock],
    )
    trainer.fit(model, datamodule=datamodule)
    return clock.stamps


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="data/shapes")
    parser.add_argument("--backbone", default="resnet10t")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    data = EmbeddedShapesDataModule(root=args.root, global_batch_size=args.batch)
    data.prepare_data()
    trainer_stub = L.Trainer(accelerator="cpu", devices=1, logger=False)
    data.trainer = trainer_stub
    data.setup("fit")
    loader = data.train_dataloader()
    tensors = []
    for batch in loader:  # materialise normalised batches once, the plain/tensor arms reuse them
        tensors.append(data.on_after_batch_transfer(batch, 0))
        if len(tensors) == args.steps:
            break

    results = {k: [] for k in ("plain/tensors", "lightning/tensors", "plain/ffcv", "lightning/ffcv")}
    for r in range(args.repeats):
        torch.manual_seed(r)
        results["plain/tensors"].append(per_step(plain_loop(make_model(args, data.num_classes), tensors, lambda b: b, args.steps), args.warmup))
        results["lightning/tensors"].append(per_step(lightning_fit(make_model(args, data.num_classes), InMemoryBatches(tensors), args.steps), args.warmup))
        normalise = lambda b: data.on_after_batch_transfer(b, 0)  # noqa: E731
        results["plain/ffcv"].append(per_step(plain_loop(make_model(args, data.num_classes), data.train_dataloader(), normalise, args.steps), args.warmup))
        results["lightning/ffcv"].append(per_step(lightning_fit(make_model(args, data.num_classes), data, args.steps), args.warmup))

    print(f"\nbackbone={args.backbone} batch={args.batch} steps={args.steps} (warm-up {args.warmup}) repeats={args.repeats} "
          f"threads={torch.get_num_threads()}")
    med = {k: statistics.median(v) for k, v in results.items()}
    for k, v in results.items():
        print(f"{k:>18}: {med[k]*1000:7.1f} ms/step  {args.batch/med[k]:6.0f} img/s   (rounds: {', '.join(f'{x*1000:.0f}' for x in v)})")
    for src in ("tensors", "ffcv"):
        print(f"overhead lightning vs plain on {src}: {100 * (med[f'lightning/{src}'] / med[f'plain/{src}'] - 1):+.1f} %")
    print(f"cost of on-the-fly FFCV loading vs in-memory tensors (plain loop): {100 * (med['plain/ffcv'] / med['plain/tensors'] - 1):+.1f} %")


if __name__ == "__main__":
    main()
