"""Which images a between-model pass reads: a seeded, class-balanced draw in random order, the same on any number
of processes, so that numbers hold on real data sets, whose converted files are written class by class."""

import numpy as np
import pytest
import torch

from datamodules import FFCVImageDataModule
from datamodules.beton import WriterSettings, write_split
from datamodules.shapes import NUM_COLOURS, render_shapes
from datamodules.sources import Split
from measurements import MinibatchCKA, gram
from study.passes import ComparisonError, FixedImages, fixed_batches, pass_images

from .helpers import StubTrainer


def sorted_labels(classes: int = 20, per_class: int = 30) -> np.ndarray:
    return np.repeat(np.arange(classes), per_class)  # as datamodules.convert writes ImageNet: class by class


def test_a_subset_is_class_balanced_random_and_a_function_of_the_seed_alone():
    labels = sorted_labels()
    [first] = pass_images(labels, 100, seed=3)
    assert len(first) == len(set(first.tolist())) == 100
    counts = np.bincount(labels[first], minlength=20)
    assert counts.min() == counts.max() == 5  # 100 of 20 classes: 5 each
    [odd] = pass_images(labels, 50, seed=3)
    assert sorted(np.bincount(labels[odd], minlength=20).tolist()) == [2] * 10 + [3] * 10
    np.testing.assert_array_equal(first, pass_images(labels, 100, seed=3)[0])
    assert not np.array_equal(first, pass_images(labels, 100, seed=4)[0])
    assert (np.diff(first) < 0).any()  # in random order, not the file's
    # A class with fewer images than its share gives what it has; the others make up the count.
    uneven = np.concatenate([np.zeros(2, int), np.ones(40, int), np.full(40, 2)])
    [few] = pass_images(uneven, 30, seed=0)
    assert np.bincount(uneven[few]).tolist() == [2, 14, 14]


def test_every_image_once_per_epoch_each_epoch_in_a_fresh_order():
    labels = sorted_labels(5, 8)
    epochs = pass_images(labels, None, seed=0, epochs=3)
    assert len(epochs) == 3
    for order in epochs:
        assert sorted(order.tolist()) == list(range(40))
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    with pytest.raises(ComparisonError, match="at least once"):
        pass_images(labels, None, seed=0, epochs=0)


def test_batches_of_class_sorted_data_hold_many_classes_on_any_number_of_processes():
    labels = sorted_labels(50, 30)  # 1,500 images; consecutive batches of 150 would hold 5 classes each
    [order] = pass_images(labels, None, seed=0)
    single = fixed_batches(order, 150, 0, 1)
    for batch in single.reshape(-1, 150):
        assert len(np.unique(labels[batch])) >= 40
    shares = [fixed_batches(order, 150, r, 3) for r in range(3)]
    batches = sorted(tuple(b) for s in shares for b in s.reshape(-1, 150).tolist())
    assert batches == sorted(tuple(b) for b in single.reshape(-1, 150).tolist())  # the same batches, dealt out


def write_shapes(path, images, labels):
    split = Split(images, labels.astype(np.int64), tuple(str(c) for c in range(int(labels.max()) + 1)))
    return write_split(split, path, WriterSettings(max_resolution=None, write_mode="raw", num_workers=1))


@pytest.fixture(scope="module")
def sorted_and_shuffled(tmp_path_factory):
    """The same 600 shapes images written class-sorted (as converted data sets are) and in random order."""
    root = tmp_path_factory.mktemp("sorted")
    images, factors = render_shapes(600, np.random.default_rng(5), 32)
    labels = factors["shape"] * NUM_COLOURS + factors["colour"]
    by_class = np.argsort(labels, kind="stable")
    return (write_shapes(root / "sorted.beton", images[by_class], labels[by_class]),
            write_shapes(root / "shuffled.beton", images, labels))


def test_batch_norm_moments_of_a_class_sorted_file_come_from_many_classes(sorted_and_shuffled):
    sorted_file, _ = sorted_and_shuffled
    data = FFCVImageDataModule(str(sorted_file), str(sorted_file), global_batch_size=8, image_size=32, val_resize=32,
                               num_workers=1)
    images = FixedImages(data, batch_size=50, images=None)
    images.trainer = StubTrainer()
    images.setup("validate")
    labels = data.labels("train")
    [order] = pass_images(labels, 60, images.seed)
    assert len(np.unique(labels[order])) >= 30  # the first 60 images of the file are 2-3 classes
    seen = sum(len(batch) for batch in images.training_images(60))
    assert seen == 60
    record = images.record()
    assert record["val"]["images"] == 600 and record["val"]["classes"] == len(np.unique(labels))


def class_structured(seed: int = 0, classes: int = 100, per_class: int = 20, width: int = 64):
    """Two representations of class-sorted images that share their class structure and little else (the toy of the
    issue: 1,000 x 50 there, 100 x 20 here)."""
    rng = np.random.default_rng(seed)
    labels = sorted_labels(classes, per_class)
    means = rng.normal(size=(classes, width))
    x = means[labels] + rng.normal(size=(len(labels), width))
    y = np.tanh(means[labels] @ rng.normal(size=(width, width)) / 8) + 0.5 * rng.normal(size=(len(labels), width))
    return labels, torch.from_numpy(x), torch.from_numpy(y)


def minibatch_cka(x, y, order, batch_size):
    metric = MinibatchCKA(1, 1)
    for batch in fixed_batches(order, batch_size, 0, 1).reshape(-1, batch_size):
        metric.update(gram(x[batch])[None], gram(y[batch])[None])
    return float(metric.compute().reshape(-1)[0])


def test_cka_on_class_sorted_data_is_the_cka_on_the_same_data_shuffled():
    labels, x, y = class_structured()
    shuffle = np.random.default_rng(1).permutation(len(labels))  # the same images, written in random order
    on_sorted = minibatch_cka(x, y, pass_images(labels, None, seed=0)[0], 100)
    on_shuffled = minibatch_cka(x[shuffle], y[shuffle], pass_images(labels[shuffle], None, seed=0)[0], 100)
    full = minibatch_cka(x, y, np.arange(len(labels)), len(labels))  # one batch of all: the full-data estimate
    assert on_sorted == pytest.approx(on_shuffled, abs=0.02) and on_sorted == pytest.approx(full, abs=0.02)
    # The file's own order, as the pass read it before (consecutive images: one class per batch here), is far off.
    assert minibatch_cka(x, y, np.arange(len(labels)), 100) > full + 0.3
    # Several epochs, each in a fresh order, estimate the same thing.
    epochs = pass_images(labels, None, seed=0, epochs=3)
    assert np.mean([minibatch_cka(x, y, order, 100) for order in epochs]) == pytest.approx(full, abs=0.02)
