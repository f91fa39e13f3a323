"""One seed, one run: the seed changes everything random, and the same config and seed give the same numbers."""

import json

import numpy as np
import pytest
import torch

from datamodules.seeded_augmentation import image_keys

from .helpers import ffcv_datamodule, parameter_digest
from .test_training import NO_MEASUREMENTS, fit


def batches(data, epoch: int, count: int = 3) -> list[torch.Tensor]:
    data.trainer.current_epoch = epoch
    out = []
    for images, _ in data.train_dataloader():
        out.append(images.clone())
        if len(out) == count:
            return out
    return out


def test_augmentation_is_a_function_of_seed_epoch_and_image_not_of_threads(shapes_root):
    path = shapes_root / "train.beton"
    one = ffcv_datamodule(path, seed=5, num_workers=1, crop_scale=(0.2, 1.0))
    two = ffcv_datamodule(path, seed=5, num_workers=2, crop_scale=(0.2, 1.0))
    other = ffcv_datamodule(path, seed=6, num_workers=2, crop_scale=(0.2, 1.0))
    for data in (one, two, other):
        data.setup("fit")
    a, b, c = batches(one, 0), batches(two, 0), batches(two, 1)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)  # threads do not change a crop
    assert not torch.equal(a[0], batches(other, 0)[0])  # another seed, other crops (and order)
    assert not torch.equal(a[0], c[0])  # another epoch, other crops (and order)
    # Every image of a batch has its own draws.
    keys = image_keys(5, np.arange(8), 1)
    assert len(set(keys.tolist())) == 8 and not np.array_equal(keys, image_keys(6, np.arange(8), 1))


def test_the_seed_sets_initial_weights_data_order_and_the_run_folder(tmp_path, shapes_root):
    def build(seed):
        run = fit(tmp_path, shapes_root, f"--seed_everything={seed}", run=False)
        run.datamodule.trainer = run.trainer
        return run

    zero, one, zero_again = build(0), build(1), build(0)
    assert parameter_digest(zero.model) != parameter_digest(one.model)
    assert parameter_digest(zero.model) == parameter_digest(zero_again.model)
    assert zero.datamodule.seed == 0 and one.datamodule.seed == 1
    assert not np.array_equal(zero.datamodule.shard(1024, True, 0), one.datamodule.shard(1024, True, 0))
    assert one.trainer.logger.log_dir == str(tmp_path / "softmax" / "seed1")
    named = fit(tmp_path, shapes_root, "--seed_everything=2", "--model.objective=CosineSoftmax",
                "--trainer.logger.init_args.version=mine", run=False)
    assert named.trainer.logger.log_dir == str(tmp_path / "cosine_softmax" / "mine")


def test_same_config_and_seed_give_identical_weights_and_measurements(tmp_path, shapes_root):
    # Default augmentation (random crops and flips), dropout on, every measurement at the end.
    args = ["--model.objective=PenultimateDropout", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2"]
    runs = [fit(tmp_path / name, shapes_root, *args) for name in ("a", "b")]
    assert parameter_digest(runs[0].model) == parameter_digest(runs[1].model)
    torch.testing.assert_close(runs[0].model.ema.state_dict(), runs[1].model.ema.state_dict(), rtol=0, atol=0)
    a, b = (json.loads((tmp_path / n / "penultimate_dropout" / "seed0" / "measurements.json").read_text()) for n in "ab")
    assert a["evaluations"] and a["evaluations"] == b["evaluations"]
    assert a["fingerprint"] == b["fingerprint"]


def test_a_folder_holds_one_run(tmp_path, shapes_root):
    from callbacks.run_config import RunFolderError

    args = [NO_MEASUREMENTS, "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=0"]
    fit(tmp_path, shapes_root, *args)
    with pytest.raises(RunFolderError, match=r"another config \(model.lr_per_256: 0.2 -> 0.3\)"):
        fit(tmp_path, shapes_root, *args, "--model.lr_per_256=0.3")
    with pytest.raises(RunFolderError, match="--ckpt_path=last"):
        fit(tmp_path, shapes_root, *args)
    fit(tmp_path, shapes_root, *args, "--ckpt_path=last", epochs=2)  # resuming it is what the folder is for
