"""The data side: the embedded data set, the .beton writer and checks, and the bad-input errors."""

import json
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import BetonError, DataError, ImageFolderDataModule, ProgressiveResolution, WriterSettings, beton_labels
from datamodules.convert import folder
from datamodules.shapes import NEW_SHAPES, NUM_COLOURS, SHAPES, SIZES, TASKS, TEXTURES, render_shapes, render_sketches

from .helpers import ffcv_datamodule as datamodule
from .helpers import FailAt, StubTrainer, write_indexed_beton




def test_shapes_are_deterministic_and_cover_every_factor():
    a, fa = render_shapes(600, np.random.default_rng([0, 0]))
    b, fb = render_shapes(600, np.random.default_rng([0, 0]))
    assert a.dtype == np.uint8 and a.shape == (600, 32, 32, 3)
    np.testing.assert_array_equal(a, b)
    assert set(fa["shape"]) == set(range(len(SHAPES)))
    assert set(fa["colour"]) == set(range(NUM_COLOURS))
    assert set(fa["texture"]) == set(range(len(TEXTURES)))
    assert a.std() > 20  # real structure, not a flat image


def test_stripe_orientation_is_a_property_of_the_texture_class():
    """Stripes are laid in image axes: were they turned with the randomly rotated object, horizontal,
    vertical and diagonal stripes would be one distribution and the texture task capped at 2/3."""
    images, factors = render_shapes(1200, np.random.default_rng(5))
    grey = images.astype(np.float64).mean(-1)
    across_rows = np.abs(np.diff(grey, axis=1)).mean((1, 2))  # changes from one row to the next
    across_columns = np.abs(np.diff(grey, axis=2)).mean((1, 2))
    ratio = {name: across_rows[factors["texture"] == k].mean() / across_columns[factors["texture"] == k].mean()
             for k, name in enumerate(TEXTURES)}
    assert ratio["horizontal_stripes"] > 1.15 * ratio["plain"] and ratio["vertical_stripes"] < ratio["plain"] / 1.15


def test_shapes_drawn_by_an_older_design_are_regenerated(tmp_path):
    from datamodules.shapes import DESIGN, EmbeddedShapesDataModule

    module = EmbeddedShapesDataModule(str(tmp_path), num_train=64, num_val=16, num_transfer_train=12, num_transfer_test=12)
    module.prepare_data()
    spec = json.loads((tmp_path / "spec.json").read_text())
    assert spec["design"] == DESIGN
    (tmp_path / "spec.json").write_text(json.dumps({**spec, "design": DESIGN - 1}))
    written = (tmp_path / "train.beton").stat().st_mtime_ns
    module.prepare_data()
    assert (tmp_path / "train.beton").stat().st_mtime_ns != written
    assert json.loads((tmp_path / "spec.json").read_text())["design"] == DESIGN


def test_generated_splits_hold_the_right_labels(shapes_root):
    train = beton_labels(shapes_root / "train.beton")
    assert len(train) == 1024 and set(train) <= set(range(len(SHAPES) * NUM_COLOURS))
    assert len(np.unique(train)) > 50
    for task, classes in TASKS.items():
        labels = beton_labels(shapes_root / f"{task}_train.beton")
        assert set(labels) == set(range(len(classes))), task
    assert len(beton_labels(shapes_root / "sketch_train.beton")) == 500  # few labelled images of the target domain


def test_the_transfer_tasks_label_what_was_drawn():
    """Size bins follow the drawn radius; new shapes are none of pre-training's; sketches are ink outlines."""
    from datamodules.shapes import RADIUS, _split_images

    _, factors = render_shapes(300, np.random.default_rng([0, 4]))
    _, size = _split_images("size_train", 300, np.random.default_rng([0, 4]), 32)
    thirds = np.digitize(factors["radius"], np.linspace(*RADIUS, len(SIZES) + 1)[1:-1])
    np.testing.assert_array_equal(size, thirds)
    assert set(NEW_SHAPES).isdisjoint(SHAPES)
    sketches, factors = render_sketches(200, np.random.default_rng(3))
    grey = sketches.astype(np.float64).mean(-1)
    ink = grey < 128
    assert 0.02 < ink.mean() < 0.25  # thin lines on paper, not filled shapes
    assert np.median(grey) > 180
    filled, _ = render_shapes(200, np.random.default_rng(3))
    def colourfulness(images):  # the spread between an image's channels, averaged over pixels
        return float((images.max(-1).astype(int) - images.min(-1)).mean())
    assert colourfulness(sketches) < 0.5 * colourfulness(filled)  # no hue to read the pre-training colour from


def test_the_cross_is_the_union_of_its_two_bars():
    """The cross's radial profile against a brute-force test of points in either bar."""
    from datamodules.shapes import _cross

    theta = np.linspace(0, 2 * np.pi, 721)
    radius = _cross(theta, arm=0.38)
    for t, r in zip(theta, radius):
        steps = np.linspace(0, 1.5, 3001)
        x, y = steps * np.cos(t), steps * np.sin(t)
        inside = ((np.abs(x) <= 1) & (np.abs(y) <= 0.38)) | ((np.abs(y) <= 1) & (np.abs(x) <= 0.38))
        assert abs(steps[inside].max() - r) < 1e-3


def test_loader_yields_normalised_batches_of_the_written_images(tmp_path):
    beton = write_indexed_beton(tmp_path / "d.beton", 16)
    data = datamodule(beton)
    data.setup("fit")
    images, labels = data.on_after_batch_transfer(next(iter(data.val_dataloader())), 0)
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
    assert labels.tolist() == list(range(8))  # sequential validation order, labels as written
    assert -3 < images.mean() < 3 and images.std() > 0.1


def test_a_pipeline_compiles_once_per_process_and_only_where_its_closure_values_match(tmp_path, monkeypatch):
    """FFCV compiles every loader's pipeline afresh (seconds, where the batches take milliseconds); the data module
    reuses a compiled function whose code and closure values are the same (``compat.compile_ffcv_once``)."""
    import numba
    from ffcv.pipeline.compiler import Compiler
    from numba.core.dispatcher import Dispatcher

    beton = write_indexed_beton(tmp_path / "d.beton", 32)
    interned = numba.uint8[::1]  # one object process-wide, which FFCV itself marks read-only (a KeyError on reuse)

    def one_pass(seed: int):
        data = datamodule(beton, seed=seed)
        data.setup("fit")
        loader = data.train_dataloader()
        images = torch.cat([data.on_after_batch_transfer(batch, 0)[0] for batch in loader])
        stages = loader.loader.loader.code[0]  # FFCV's stage functions, which call the compiled operations by name
        return images, {f for stage, _ in stages for f in stage.__globals__.values() if isinstance(f, Dispatcher)}

    images, compiled = one_pass(seed=0)
    again, compiled_again = one_pass(seed=0)
    assert compiled_again == compiled  # the same functions: nothing was compiled again
    torch.testing.assert_close(again, images, rtol=0, atol=0)
    other, compiled_other = one_pass(seed=1)  # the seed is a closure value of the crop and of the flip
    assert compiled_other != compiled and not torch.equal(other, images)

    # FFCV's own compile, as the first loader of a process has it, gives the same batches.
    monkeypatch.setattr(Compiler, "compile", classmethod(Compiler.compile.__func__.__wrapped__))
    fresh, compiled_fresh = one_pass(seed=0)
    assert compiled_fresh.isdisjoint(compiled)
    torch.testing.assert_close(fresh, images, rtol=0, atol=0)
    assert numba.uint8[::1] is interned and interned.mutable


def with_stage(data, stage: FailAt, at: int):
    """``data`` whose training images pass through ``stage`` at position ``at`` of their pipeline."""
    pipelines = data.pipelines

    def with_it(train, crop_ratio=None):
        ops = pipelines(train, crop_ratio)
        if train:
            ops["image"].insert(at, stage)
        return ops

    data.pipelines = with_it
    return data


def test_a_compiled_stage_that_fails_is_an_error_naming_it_and_the_file(tmp_path):
    # FFCV's thread dies on the error; without the watch the first batch is waited for for ever (the pytest timeout).
    beton = write_indexed_beton(tmp_path / "d.beton", 32)
    data = with_stage(datamodule(beton, batch_timeout=120), FailAt(typing_error=True), at=1)  # after the decoder
    data.setup("fit")
    started = time.monotonic()
    with pytest.raises(DataError, match=r"decoding stopped at batch 0 of this pass over .*d\.beton \(epoch 0, rank 0\): "
                                        r"the image pipeline's FailAt raised TypingError") as raised:
        next(iter(data.train_dataloader()))
    assert time.monotonic() - started < 60, "found by the timeout, not by the thread's end"
    assert "no_such_attribute" in str(raised.value) and "--ckpt_path=last" in str(raised.value)


def test_a_stage_that_hangs_is_an_error_after_batch_timeout(tmp_path):
    beton = write_indexed_beton(tmp_path / "d.beton", 32)
    data = with_stage(datamodule(beton), FailAt(batch=5, hang_s=30), at=-1)  # batch 1 of the second pass
    data.setup("fit")
    loader = data.train_dataloader()
    assert len(list(loader)) == 4  # the first pass compiles the pipeline (seconds)
    data.batch_timeout = 1.0
    started = time.monotonic()
    with pytest.raises(DataError, match=r"No batch from FFCV within 1 s at batch 1 of this pass over .*d\.beton.*still in "
                                        r"the image pipeline's FailAt.*batch_timeout"):
        list(loader)
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("left_after", [1, 5])  # 8 batches, FFCV's queue holds 3: it fills, or its end marker waits
def test_a_pass_left_before_its_end_stops_ffcvs_thread(tmp_path, left_after):
    """Lightning leaves passes early (limit_*_batches, max_steps); FFCV's decoding thread then waited for ever to hand
    over a batch or its end-of-pass marker, one thread more for every such pass."""
    from ffcv.loader.epoch_iterator import EpochIterator

    data = datamodule(write_indexed_beton(tmp_path / "d.beton", 64))
    data.setup("fit")
    before = {t for t in threading.enumerate() if isinstance(t, EpochIterator)}
    batches = iter(data.val_dataloader())
    for _ in range(left_after):
        next(batches)
    (thread,) = {t for t in threading.enumerate() if isinstance(t, EpochIterator)} - before
    del batches
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_batch_timeout_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="batch_timeout must be > 0 seconds, got 0"):
        datamodule(tmp_path / "d.beton", batch_timeout=0)


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
    with pytest.raises(DataError, match=r"train: 6 of 12 labels lie outside \[0, 6\).*num_classes"):
        datamodule(beton, num_classes=6).setup("fit")


def test_global_batch_must_divide_over_processes(tmp_path):
    beton = write_indexed_beton(tmp_path / "d.beton", 12)
    data = datamodule(beton, world_size=3)
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        data.setup("fit")


def test_convert_an_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "tree" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(tmp_path / "tree" / cls / f"{i}.jpg")
    out = folder(str(tmp_path / "tree"), str(tmp_path / "tree.beton"), WriterSettings(num_workers=1))
    assert sorted(beton_labels(out).tolist()) == [0, 0, 0, 1, 1, 1]
    assert not list(tmp_path.glob("*.partial"))  # written under a temporary name, then renamed


def folder_datamodule(tree, **kwargs) -> ImageFolderDataModule:
    kwargs = {"global_batch_size": 4, "image_size": 32, "val_resize": 40, "num_workers": 0, **kwargs}
    data = ImageFolderDataModule(str(tree), str(tree), **kwargs)
    data.trainer = StubTrainer()
    return data


def photo_tree(root, classes=("cat", "dog"), per_class=3):
    rng = np.random.default_rng(0)
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            # smooth images, so that two resampling filters agree closely
            small = rng.integers(0, 255, (6, 9, 3), dtype=np.uint8)
            Image.fromarray(small).resize((90, 60), Image.BICUBIC).save(root / cls / f"{i}.png")
    return root


def test_fallback_evaluates_the_same_centre_crop_as_ffcv(tmp_path):
    tree = photo_tree(tmp_path / "tree")
    out = folder(str(tree), str(tmp_path / "tree.beton"), WriterSettings(write_mode="raw", max_resolution=None, num_workers=1))
    ffcv, fallback = datamodule(out, val_resize=40, global_batch_size=4), folder_datamodule(tree)
    ffcv.setup("validate")
    fallback.setup("validate")
    a, la = ffcv.on_after_batch_transfer(next(iter(ffcv.val_dataloader())), 0)
    b, lb = fallback.on_after_batch_transfer(next(iter(fallback.val_dataloader())), 0)
    assert la.tolist() == lb.tolist() == [0, 0, 0, 1]
    assert a.shape == b.shape == (4, 3, 32, 32)
    # same crop, different resampling filters (OpenCV area vs antialiased bilinear): close, not equal
    assert (a - b).abs().mean() < 0.1, "the two evaluation pipelines crop differently"
    assert (a - b.flip(-1)).abs().mean() > 3 * (a - b).abs().mean()


def test_fallback_trains_on_shards_and_counts_skipped_images(tmp_path):
    tree = photo_tree(tmp_path / "tree", per_class=4)
    (tree / "dog" / "broken.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(DataError, match=r"Cannot decode image .*broken\.png"):
        data = folder_datamodule(tree)
        data.setup("fit")
        list(data.train_dataloader())
    data = folder_datamodule(tree, bad_images="skip")
    data.setup("fit")
    batches = [data.on_after_batch_transfer(batch, 0) for batch in data.val_dataloader()]
    assert data.skipped_images == 1 and sum(len(labels) for _, labels in batches) == 8  # 9 files, one broken
    train = [data.on_after_batch_transfer(batch, 0) for batch in data.train_dataloader()]
    assert all(images.shape[1:] == (3, 32, 32) for images, _ in train)


def test_fallback_refuses_mismatched_class_folders(tmp_path):
    train, val = photo_tree(tmp_path / "train"), photo_tree(tmp_path / "val", classes=("cat", "cow"))
    data = ImageFolderDataModule(str(train), str(val), global_batch_size=2)
    data.trainer = StubTrainer()
    with pytest.raises(DataError, match=r"only in val: \['cow'\], only in train: \['dog'\]"):
        data.setup("fit")


def test_progressive_resolution_follows_ffcv_imagenet():
    schedule = ProgressiveResolution()  # ResNet-50, 88 epochs: 160 px up to epoch 65, 192 px from 76
    # by hand: epoch 70 -> 160 + 32 * 5/11 = 174.5 -> 5.45 steps of 32 -> 160; epoch 72 -> 180.4 -> 192
    assert [schedule(e) for e in (0, 65, 70, 72, 76, 88)] == [160, 160, 160, 192, 192, 192]
    with pytest.raises(ValueError, match="min_res <= max_res"):
        ProgressiveResolution(min_res=200, max_res=100)


@pytest.mark.parametrize("library", ["ffcv", "torchvision"])
def test_training_crops_grow_with_the_epoch(tmp_path, library):
    tree = photo_tree(tmp_path / "tree")
    schedule = ProgressiveResolution(min_res=16, max_res=32, start_ramp=1, end_ramp=3, step=8)
    if library == "ffcv":
        beton = folder(str(tree), str(tmp_path / "t.beton"), WriterSettings(num_workers=1))
        data = datamodule(beton, global_batch_size=2, progressive_resolution=schedule)
    else:
        data = folder_datamodule(tree, global_batch_size=2, progressive_resolution=schedule)
    data.setup("fit")
    loader = data.train_dataloader()
    sizes = []
    for epoch in range(4):
        data.trainer.current_epoch = epoch
        sizes.append(next(iter(loader))[0].shape[-1])
    assert sizes == [16, 16, 24, 32]


def test_labels_kept_across_batches_stay_those_of_their_batch(tmp_path):
    # FFCV reuses its label buffers a few batches later: probes and calibration, which keep every batch's
    # labels, read overwritten ones unless the data module hands out copies.
    data = datamodule(write_indexed_beton(tmp_path / "d.beton", 96))  # label = index; 12 batches of 8
    data.setup("fit")
    kept = [data.on_after_batch_transfer(batch, 0)[1] for batch in data.evaluation_dataloader("val")]
    assert torch.cat(kept).tolist() == list(range(96))
