"""The data side: the embedded data set, the .beton writer and checks, and the bad-input errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import BetonError, FFCVImageDataModule, beton_labels
from datamodules.convert import convert
from datamodules.shapes import NUM_COLOURS, SHAPES, TEXTURES, render_shapes

from .helpers import write_indexed_beton


class _Trainer:
    world_size = 1
    current_epoch = 0


def datamodule(train, val=None, **kwargs):
    data = FFCVImageDataModule(str(train), str(val or train), global_batch_size=8, image_size=32, val_resize=32,
                               num_workers=1, **kwargs)
    data.trainer = _Trainer()
    data._device = lambda: torch.device("cpu")
    return data


def test_shapes_are_deterministic_and_cover_every_factor():
    a, fa = render_shapes(600, np.random.default_rng([0, 0]))
    b, fb = render_shapes(600, np.random.default_rng([0, 0]))
    assert a.dtype == np.uint8 and a.shape == (600, 32, 32, 3)
    np.testing.assert_array_equal(a, b)
    assert set(fa["shape"]) == set(range(len(SHAPES)))
    assert set(fa["colour"]) == set(range(NUM_COLOURS))
    assert set(fa["texture"]) == set(range(len(TEXTURES)))
    assert a.std() > 20  # real structure, not a flat image


def test_generated_splits_hold_the_right_labels(shapes_root):
    train = beton_labels(shapes_root / "train.beton")
    texture = beton_labels(shapes_root / "texture_train.beton")
    assert len(train) == 1024 and set(train) <= set(range(len(SHAPES) * NUM_COLOURS))
    assert len(np.unique(train)) > 50
    assert set(texture) == set(range(len(TEXTURES)))


def test_loader_yields_normalised_batches_of_the_written_images(tmp_path):
    beton = write_indexed_beton(tmp_path / "d.beton", 16)
    data = datamodule(beton)
    data.setup("fit")
    images, labels = data.on_after_batch_transfer(next(iter(data.val_dataloader())), 0)
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
    assert labels.tolist() == list(range(8))  # sequential validation order, labels as written
    assert -3 < images.mean() < 3 and images.std() > 0.1


def test_num_classes_is_read_from_the_labels(tmp_path):
    beton = write_indexed_beton(tmp_path / "d.beton", 12, num_classes=5)
    assert datamodule(beton).num_classes == 5


def test_missing_beton_names_the_file_and_the_fix(tmp_path):
    data = datamodule(tmp_path / "nope.beton")
    with pytest.raises(BetonError, match=r"not found: .*nope\.beton.*datamodules\.convert"):
        data.setup("fit")


def test_corrupt_beton_is_reported(tmp_path):
    bad = tmp_path / "bad.beton"
    bad.write_bytes(b"this is not an ffcv file" * 10)
    with pytest.raises(BetonError, match=r"bad\.beton is not a readable FFCV \.beton"):
        datamodule(bad).setup("fit")


def test_labels_outside_the_classes_are_an_error(tmp_path):
    beton = write_indexed_beton(tmp_path / "d.beton", 12)  # labels 0..11
    with pytest.raises(BetonError, match=r"6 of 12 labels lie outside \[0, 6\).*num_classes"):
        datamodule(beton, num_classes=6).setup("fit")


def test_global_batch_must_divide_over_processes(tmp_path):
    beton = write_indexed_beton(tmp_path / "d.beton", 12)
    data = datamodule(beton)
    data.trainer.world_size = 3
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        data.setup("fit")


def test_convert_an_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "tree" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(tmp_path / "tree" / cls / f"{i}.jpg")
    out = convert(str(tmp_path / "tree"), str(tmp_path / "tree.beton"), num_workers=1)
    assert sorted(beton_labels(out).tolist()) == [0, 0, 0, 1, 1, 1]
    assert not list(tmp_path.glob("*.partial"))  # written under a temporary name, then renamed
