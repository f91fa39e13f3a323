"""End-to-end training through LightningCLI on the embedded shapes data, on the CPU."""

import hashlib
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import cli
from datamodules import DataError
from lightning_modules import objective_classes

from .conftest import REPO
from .helpers import scalars

TINY = [
    "--data.init_args.num_train=1024",
    "--data.init_args.num_val=256",
    "--data.init_args.num_transfer_train=128",
    "--data.init_args.num_transfer_test=128",
    "--data.init_args.global_batch_size=64",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.num_sanity_val_steps=0",
]
NO_MEASUREMENTS = "--trainer.callbacks=[]"  # for tests of training alone: the quickstart's callbacks off


def fit(tmp_path: Path, shapes_root: Path, *extra: str, epochs: int = 1, run: bool = True):
    args = [
        *(["fit"] if run else []),  # run=False builds the objects only, without subcommands
        "--config", str(REPO / "configs" / "quickstart.yaml"),
        f"--data.init_args.root={shapes_root}",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--trainer.max_epochs={epochs}",
        *TINY,
        *extra,
    ]
    return cli.main(args, run=run)


def test_quickstart_trains_and_the_loss_falls(tmp_path, shapes_root):
    run = fit(tmp_path, shapes_root, "--trainer.log_every_n_steps=2", "--checkpoints.epochs=[0, 3]",
              "--checkpoints.every_n_epochs=2", epochs=3)
    log_dir = Path(run.trainer.logger.log_dir)
    logged = scalars(log_dir)
    for tag in ("train/loss", "train/acc1", "val/loss", "val/acc1", "val/acc5", "lr"):
        assert tag in logged, f"missing TensorBoard tag {tag}; have {sorted(logged)}"
    losses = [v for _, v in logged["train/loss"]]
    assert sum(losses[-4:]) / 4 < 0.9 * sum(losses[:4]) / 4, losses
    assert logged["val/acc1"][-1][1] > 2 / 60  # above chance (1/60), though the EMA lags on so short a run
    assert (log_dir / "config.yaml").is_file()  # the run's full config, to reproduce it

    # Kept: the initial weights, every 2 epochs, the last; weights-only, with the EMA that was evaluated.
    folder = log_dir / "checkpoints"
    assert {p.name for p in folder.iterdir()} == {"last.ckpt", "epoch000.ckpt", "epoch002.ckpt", "epoch003.ckpt", "finished.json"}
    final = torch.load(folder / "epoch003.ckpt", weights_only=False)
    assert "optimizer_states" not in final and "optimizer_states" in torch.load(folder / "last.ckpt", weights_only=False)
    ema = {k.removeprefix("ema."): v for k, v in final["state_dict"].items() if k.startswith("ema.")}
    torch.testing.assert_close(ema, run.model.ema.state_dict(), rtol=0, atol=0)
    initial = torch.load(folder / "epoch000.ckpt", weights_only=False)["state_dict"]
    untrained = fit(tmp_path / "untrained", shapes_root, run=False).model  # the same seed's initialisation
    torch.testing.assert_close({k: initial[f"network.{k}"] for k in untrained.network.state_dict()},
                               untrained.network.state_dict(), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(objective_classes()))
def test_every_objective_trains_a_few_steps_with_finite_logs(tmp_path, shapes_root, name):
    # The penultimate measurements see each objective's own parts (class weights, probability kind); the probes
    # and per-block R² do not, and are tested once elsewhere.
    penultimate = "[{class_path: callbacks.RepresentationMeasurements, init_args: {layers: penultimate}}]"
    run = fit(tmp_path, shapes_root, f"--model.objective={name}", "--trainer.limit_train_batches=3",
              "--trainer.limit_val_batches=2", "--trainer.log_every_n_steps=1", f"--trainer.callbacks={penultimate}")
    metrics = run.trainer.logged_metrics
    for tag in ("train/loss", "val/loss", "val/acc1", "lr"):
        assert math.isfinite(float(metrics[tag])), (tag, metrics)
    expected_terms = {"LogitPenalty": "train/logit_penalty", "ExtraFinalL2": "train/final_layer_l2"}
    if name in expected_terms:
        assert expected_terms[name] in metrics


def test_validation_evaluates_the_ema_weights(tmp_path, shapes_root):
    # decay 1.0 freezes the EMA at the initial weights, so EMA and live weights surely differ.
    run = fit(tmp_path, shapes_root, NO_MEASUREMENTS, "--model.ema_decay=1.0", "--model.ema_warmup=none", "--model.ema_reference_batch=64",
              "--model.warmup_epochs=0", "--model.lr_per_256=0.8", "--trainer.limit_train_batches=8")
    model, data = run.model, run.datamodule
    logged = run.trainer.validate(model, datamodule=data, verbose=False)[0]["val/loss"]

    def loss_of(net):
        total, count = 0.0, 0
        with torch.inference_mode():  # as Lightning validates (FFCV's buffers must not change mode)
            for batch in data.val_dataloader():
                images, target = data.on_after_batch_transfer(batch, 0)
                logits = model.objective.logits(net(images), net.head)
                total += sum(model.objective.loss_terms(logits, target, net.head).values()).item() * len(target)
                count += len(target)
        return total / count

    model.eval()
    ema, live = loss_of(model.ema.module), loss_of(model.network)
    assert logged == pytest.approx(ema, rel=1e-5)
    assert abs(live - logged) > 100 * abs(ema - logged) and abs(live - logged) > 1e-2


def test_resume_continues_exactly(tmp_path, shapes_root):
    # With random crops and flips: a resumed epoch draws the same ones (datamodules/seeded_augmentation.py).
    straight = fit(tmp_path / "straight", shapes_root, NO_MEASUREMENTS, epochs=2)
    fit(tmp_path / "resumed", shapes_root, NO_MEASUREMENTS, epochs=1)
    resumed = fit(tmp_path / "resumed", shapes_root, NO_MEASUREMENTS, "--ckpt_path=last", epochs=2)

    # Same weights and EMA only if the resumed run restored the optimiser, the schedule, the EMA and
    # the data order of epoch 1 (not a replay of epoch 0).
    assert_same_end(straight, resumed, steps=32, epochs=2)


def assert_same_end(straight, resumed, steps: int, epochs: int) -> None:
    """An interrupted-and-resumed run ended where the straight one did: step, epoch, lr, weights, EMA."""
    a, b = straight.trainer, resumed.trainer
    assert (a.global_step, a.current_epoch) == (b.global_step, b.current_epoch) == (steps, epochs)
    assert a.optimizers[0].param_groups[0]["lr"] == b.optimizers[0].param_groups[0]["lr"]
    torch.testing.assert_close(straight.model.network.state_dict(), resumed.model.network.state_dict(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(straight.model.ema.state_dict(), resumed.model.ema.state_dict(), rtol=1e-5, atol=1e-6)


def test_accumulation_and_max_steps_follow_the_global_batch_and_the_epoch(tmp_path, shapes_root, monkeypatch):
    from timm.utils.model_ema import ModelEmaV3

    updates = []
    real_update = ModelEmaV3.apply_update_
    monkeypatch.setattr(ModelEmaV3, "apply_update_", lambda self, model, decay: (updates.append(decay), real_update(self, model, decay)))
    # 2 optimiser steps of 2 micro-batches each, bounded by max_steps alone.
    run = fit(tmp_path, shapes_root, NO_MEASUREMENTS, "--trainer.accumulate_grad_batches=2", "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
              epochs=-1)
    assert run.datamodule.batch_size_per_process == 32  # global batch 64 = 2 micro-batches of 32
    assert run.trainer.global_step == 2 and len(updates) == 2  # the EMA moves once per optimiser step
    # Warm-up over 1 epoch of 1024 images = 16 optimiser steps, not over the 2 steps of the run: after 2 steps
    # the lr is 3/16 of the peak (0.2 * 64 / 256).
    assert run.model.steps_per_epoch() == 16
    assert run.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.2 * 64 / 256 * 3 / 16)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, shapes_root, monkeypatch):
    # Checked at the end of the epoch only (log_every_n_steps > steps): before any measurement of broken weights.
    args = ["--trainer.limit_train_batches=2", "--trainer.limit_val_batches=0", "--trainer.log_every_n_steps=50"]
    fit(tmp_path, shapes_root, *args)
    last = next(tmp_path.rglob("last.ckpt"))
    before = hashlib.sha256(last.read_bytes()).hexdigest()
    from lightning_modules.objectives import Objective

    def overflowing(self, logits, target, head):  # the resumed epoch's loss overflows on its first step
        return {"cross_entropy": logits.sum() * float("inf")}

    monkeypatch.setattr(Objective, "loss_terms", overflowing)
    with pytest.raises(FloatingPointError, match=r"non-finite at step 2 with objective Softmax"):
        fit(tmp_path, shapes_root, *args, "--ckpt_path=last", epochs=2)
    assert hashlib.sha256(last.read_bytes()).hexdigest() == before
    torch.load(last, map_location="cpu", weights_only=False)  # still loadable


def test_invalid_hyper_parameter_from_the_command_line(tmp_path, shapes_root):
    with pytest.raises(ValueError, match="CosineSoftmax: temperature must be > 0, got -0.1"):
        fit(tmp_path, shapes_root, "--model.objective=CosineSoftmax", "--model.objective.temperature=-0.1")


def test_validate_measures_a_saved_checkpoint_and_test_scores_it(tmp_path, shapes_root):
    # A run that trained without measurements; validate adds them at the checkpoint's step, in its folder.
    fit(tmp_path, shapes_root, "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=0", NO_MEASUREMENTS,
        "--checkpoints.epochs=[1]")
    folder = tmp_path / "softmax" / "seed0"
    kept = folder / "checkpoints" / "epoch001.ckpt"
    assert not (folder / "measurements.json").exists()
    for sub in ("validate", "test"):
        run = cli.main([sub, "--config", str(folder / "config.yaml"), f"--ckpt_path={kept}", *TINY, "--trainer.limit_val_batches=1.0",
                        "--trainer.callbacks=[{class_path: callbacks.RepresentationMeasurements, init_args: {layers: penultimate}}]"])
        assert math.isfinite(float(run.trainer.logged_metrics[f"{'val' if sub == 'validate' else 'test'}/acc1"]))
        assert run.trainer.logger.log_dir == str(folder)  # the run's own folder, from its config
    (evaluation,) = json.loads((folder / "measurements.json").read_text())["evaluations"]  # validate's, not test's
    assert (evaluation["epoch"], evaluation["step"]) == (0, 2)  # the checkpoint's, not the validating trainer's 0
    values = evaluation["measurements"]
    assert 0 <= values["class_separation/train/penultimate"] <= 1 and math.isfinite(values["calibration/val_split/ece"])
    assert values["val/acc1"] == pytest.approx(float(run.trainer.logged_metrics["test/acc1"]))  # val = test split here
    assert [step for step, _ in scalars(folder)["class_separation/train/penultimate"]] == [2]


def test_ddp_on_two_cpu_processes_sees_disjoint_data_and_ends_with_identical_weights(tmp_path):
    from .helpers import write_indexed_beton

    n, n_val = 64, 37  # label == sample index, so the labels a rank sees name the samples it read
    beton, val = write_indexed_beton(tmp_path / "indexed.beton", n), write_indexed_beton(tmp_path / "val.beton", n_val, n)
    record = tmp_path / "record"
    config = {
        "seed_everything": 0,
        "model": {"backbone": "resnet10t", "backbone_source": "timm", "warmup_epochs": 0, "ema_decay": 0.9, "ema_reference_batch": 16},
        "data": {"class_path": "datamodules.FFCVImageDataModule",
                 "init_args": {"train_path": str(beton), "val_path": str(val), "global_batch_size": 16,
                               "image_size": 32, "val_resize": 32, "num_workers": 1}},
        "trainer": {"accelerator": "cpu", "devices": 2, "strategy": "ddp", "max_epochs": 2, "check_val_every_n_epoch": 2,
                    "num_sanity_val_steps": 0, "enable_progress_bar": False, "default_root_dir": str(tmp_path),
                    "logger": {"class_path": "callbacks.RunLogger", "init_args": {"save_dir": str(tmp_path)}},
                    "callbacks": [{"class_path": "tests.helpers.RecordBatches", "init_args": {"out_dir": str(record)}}]},
    }
    config_file = tmp_path / "ddp.yaml"
    config_file.write_text(yaml.safe_dump(config))
    # torchrun, unlike Lightning's own launcher, fails when any rank fails, also after training (as srun does).
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "tests.cli_entry", "fit", "--config", str(config_file)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):  # a gloo group left to interpreter shutdown can abort the process (cli.end_process_group)
        assert f"rank {rank} exits with its process group destroyed: True" in done.stdout, done.stdout[-2000:]

    import json

    ranks = [json.loads((record / f"rank{r}.json").read_text()) for r in (0, 1)]
    per_epoch = n // 2
    for epoch in range(2):
        seen = [set(r["labels"][epoch * per_epoch:(epoch + 1) * per_epoch]) for r in ranks]
        assert not seen[0] & seen[1], "the two ranks trained on the same samples"
        assert seen[0] | seen[1] == set(range(n)), "an epoch did not cover the data set"
    assert ranks[0]["labels"][:per_epoch] != ranks[0]["labels"][per_epoch:], "epoch order did not change"
    assert ranks[0]["network"] == ranks[1]["network"], "ranks ended with different weights"
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 2 * (n // 16)  # 2 epochs of 64 at global batch 16

    # Validation: 37 images over 2 ranks (19 + 18) are each evaluated exactly once, and the logged
    # numbers are the exact means over the 37, not means of per-rank means or of padded shards.
    assert sorted(ranks[0]["val_labels"] + ranks[1]["val_labels"]) == list(range(n_val))
    logged = scalars(tmp_path / "softmax" / "seed0")
    acc1 = sum(r["val_correct"] for r in ranks) / n_val
    loss = sum(r["val_loss_sum"] for r in ranks) / n_val
    assert logged["val/acc1"][-1][1] == pytest.approx(acc1, abs=1e-6)
    assert logged["val/loss"][-1][1] == pytest.approx(loss, rel=1e-4)


def torchrun(*args: str, processes: int = 2) -> subprocess.CompletedProcess:
    """``cli.py`` on ``processes`` gloo processes; torchrun, unlike Lightning's own launcher, fails when any rank fails."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                           "-m", "tests.cli_entry", *args, "--trainer.devices=2", "--trainer.strategy=ddp"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def quickstart_args(tmp_path: Path, shapes_root: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(REPO / "configs" / "quickstart.yaml"), f"--data.init_args.root={shapes_root}",
            f"--trainer.default_root_dir={tmp_path}", *TINY, *extra]


def test_a_nonfinite_loss_on_one_rank_stops_every_rank_at_its_step(tmp_path, shapes_root):
    # The flag is not a buffer, which DDP would broadcast from rank 0 over rank 1's at the next forward pass.
    done = torchrun(*quickstart_args(tmp_path, shapes_root, "--trainer.max_epochs=1", "--trainer.log_every_n_steps=4",
                                     "--trainer.callbacks+=tests.helpers.NanOnRank", "--trainer.callbacks.rank=1",
                                     "--trainer.callbacks.step=2"))
    assert done.returncode != 0
    assert "Training loss became non-finite at step 2 " in done.stderr, done.stderr[-3000:]


def test_a_data_stage_that_hangs_on_one_rank_ends_every_rank_with_a_failure(tmp_path, shapes_root):
    # Rank 1's pipeline hangs at its third batch; rank 0 waits for it in the gradient all-reduce. Rank 1 stops after
    # batch_timeout, and the launcher (torchrun here, srun --kill-on-bad-exit on SLURM) ends rank 0: a failure, not
    # the 75 of a preemption, which SLURM's batch script would resume.
    started = time.monotonic()
    done = torchrun(*quickstart_args(tmp_path, shapes_root, NO_MEASUREMENTS, "--data.class_path=tests.helpers.FailingShapes",
                                     "--data.init_args.batch=2", "--data.init_args.hang_s=600", "--data.init_args.rank=1",
                                     "--data.init_args.batch_timeout=20"))
    assert done.returncode not in (0, 75), done.stderr[-3000:]
    assert re.search(r"No batch from FFCV within 20 s at batch 2 of this pass over .*train\.beton \(epoch 0, rank 1\): "
                     r"its decoding thread is still in the image pipeline's FailAt", done.stderr), done.stderr[-3000:]
    assert time.monotonic() - started < 200


def test_measurements_do_not_depend_on_the_number_of_processes(tmp_path, shapes_root):
    # No training (max_steps=0): both measure the initial weights, the probes' split and calibration's halves included.
    args = quickstart_args(tmp_path / "two", shapes_root, "--trainer.max_steps=0")
    done = torchrun(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    cli.main(quickstart_args(tmp_path / "one", shapes_root, "--trainer.max_steps=0"))
    one, two = (json.loads((tmp_path / n / "softmax" / "seed0" / "measurements.json").read_text())["evaluations"][0]["measurements"]
                for n in ("one", "two"))
    assert set(one) == set(two)
    for tag in ("probe/texture/linear_l2", "probe/texture/knn_k", "probe/sketch/linear_l2", "probe/sketch/knn_k"):
        assert one[tag] == two[tag], tag
    # The probes' accuracy to one test image of 128: two processes evaluate the features in other batch shapes, which
    # can change their last float bits (the kernels are chosen by shape), and on the untrained network's features an
    # image on the decision boundary then goes either way (seen once on design 3's texture images: 0.398 vs 0.391).
    for task in ("texture", "size", "new_shapes", "sketch"):
        for kind in ("linear", "knn"):
            assert one[f"probe/{task}/{kind}_acc"] == pytest.approx(two[f"probe/{task}/{kind}_acc"], abs=1.01 / 128), task
    for tag in ("calibration/val_split/ece",
                "calibration/val_split/ece_tempscaled", "calibration/val_split/temperature", "class_separation/val/penultimate",
                "class_separation/train/layer2.0", "neural_collapse/within_over_between"):
        assert one[tag] == pytest.approx(two[tag], abs=1e-5), tag


IMAGENET_EXPERIMENTS = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs" / "imagenet").rglob("*.yaml")
                              if p.name not in ("data.yaml", "data_folders.yaml", "data_holdout.yaml", "measurements.yaml",
                                                "finetune.yaml"))


@pytest.mark.parametrize("config", IMAGENET_EXPERIMENTS)
def test_every_imagenet_config_builds(config):
    # Builds the model, data module and trainer as `fit` would, without touching the (absent) ImageNet files.
    built = cli.main(["--config", str(REPO / config)], run=False)
    assert built.model.hparams.num_classes == 1000 and built.model.hparams.global_batch_size == 4096
    assert type(built.datamodule).__name__ == "FFCVImageDataModule"
    assert "RepresentationMeasurements" in [type(c).__name__ for c in built.trainer.callbacks]


def test_the_imagenet_fine_tuning_config_is_appendix_a3s_recipe(tmp_path):
    # Built as `fit` would (the checkpoint is read at the start of fit), the target's classes and measure given
    # as its (absent) sidecar would give them.
    (tmp_path / "last.ckpt").touch()
    built = cli.main(["--config", str(REPO / "configs/imagenet/finetune.yaml"), "--data.init_args.num_classes=37",
                      "--data.init_args.measure=mean_per_class", f"--model.init_from={tmp_path / 'last.ckpt'}"], run=False)
    hp = built.model.hparams
    assert (hp.num_classes, hp.measure, hp.global_batch_size, hp.backbone) == (37, "mean_per_class", 256, "resnet50")
    assert (hp.lr_schedule, hp.momentum, hp.nesterov, hp.warmup_epochs, hp.ema_decay) == ("cosine", 0.9, False, 0, None)
    assert built.model.fine_tunes and built.trainer.max_steps == 20_000
    assert built.datamodule.crop_scale == (0.08, 1.0) and built.datamodule.image_size == 224


def test_the_torchvision_fallback_replaces_ffcv_with_one_flag():
    built = cli.main(["--config", str(REPO / "configs/imagenet/softmax.yaml"),
                      "--data", str(REPO / "configs/imagenet/data_folders.yaml")], run=False)
    assert type(built.datamodule).__name__ == "ImageFolderDataModule"
    assert built.model.hparams.num_classes == 1000 and built.datamodule.global_batch_size == 4096


def test_inception_v3_trains_and_is_measured_block_by_block(tmp_path, shapes_root):
    # Appendix B's second architecture, from timm, at 80 px (Inception v3 needs >= 75) on the shapes images.
    config = {
        "seed_everything": 0,
        "model": {"backbone": "inception_v3", "backbone_source": "timm", "warmup_epochs": 0, "ema_reference_batch": 16},
        "data": {"class_path": "datamodules.FFCVImageDataModule",
                 "init_args": {"train_path": str(shapes_root / "train.beton"), "val_path": str(shapes_root / "val.beton"),
                               "global_batch_size": 16, "image_size": 80, "val_resize": 80, "num_workers": 1}},
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 3, "limit_val_batches": 0, "num_sanity_val_steps": 0,
                    "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(tmp_path),
                    "callbacks": [{"class_path": "callbacks.RepresentationMeasurements",
                                   "init_args": {"train_images": 120, "penultimate_train_images": 120,
                                                 "neural_collapse": False, "calibration": False}}]},
    }
    (tmp_path / "inception.yaml").write_text(yaml.safe_dump(config))
    run = cli.main(["fit", "--config", str(tmp_path / "inception.yaml")])
    blocks = list(run.model.network.blocks())
    assert blocks == ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
                      "Mixed_7a", "Mixed_7b", "Mixed_7c"]
    (evaluation,) = json.loads((Path(run.trainer.log_dir) / "measurements.json").read_text())["evaluations"]
    measured = evaluation["measurements"]
    assert "errors" not in evaluation and run.trainer.global_step == 3
    for layer in [*blocks, "penultimate"]:
        assert 0 < measured[f"relu_nonzero/{layer}"] <= 1 and -1 < measured[f"class_separation/val/{layer}"] < 1, layer


def test_last_checkpoint_is_written_at_the_end_of_every_epoch(tmp_path, shapes_root):
    # What a preempted or killed job resumes from: after epoch 0 of 2, not only at the end of fit.
    import lightning as L

    written = []

    class AtSecondEpoch(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                written.append(torch.load(next(tmp_path.rglob("last.ckpt")), weights_only=False)["global_step"])

    run = fit(tmp_path, shapes_root, NO_MEASUREMENTS, "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=0",
              epochs=2, run=False)
    run.trainer.callbacks.append(AtSecondEpoch())
    run.trainer.fit(run.model, datamodule=run.datamodule)
    assert written == [2]


def test_a_data_stage_that_raises_ends_the_fit_and_keeps_what_was_written(tmp_path, shapes_root):
    # Epoch 0's 16 batches train, checkpoint and log; the training pipeline raises at epoch 1's third batch.
    # Without the watch (datamodules.FFCVImageDataModule.batch_timeout) FFCV's thread dies and the fit waits for ever.
    failing = ["--data.class_path=tests.helpers.FailingShapes", "--data.init_args.batch=18",
               "--data.init_args.batch_timeout=120", "--trainer.log_every_n_steps=1", NO_MEASUREMENTS]
    started = time.monotonic()
    with pytest.raises(DataError, match=r"decoding stopped at batch 2 of this pass over .*train\.beton \(epoch 1, rank 0\): "
                                        r"the image pipeline's FailAt raised RuntimeError"):
        fit(tmp_path, shapes_root, *failing, epochs=3)
    assert time.monotonic() - started < 100, "found by the timeout, not by the thread's end"
    folder = tmp_path / "softmax" / "seed0"
    last = torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert (last["epoch"], last["global_step"]) == (0, 16)
    logged = scalars(folder)
    assert [step for step, _ in logged["val/acc1"]] == [15]  # Lightning's step of epoch 0's last batch
    assert [step for step, _ in logged["train/loss"]] == list(range(18)), "every step trained before the error is logged"
