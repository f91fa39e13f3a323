"""From files on disk to .beton files and back through the loaders: labels, pixels, sidecars, bad images."""

import os

import numpy as np
import pytest
from PIL import Image

from datamodules import BetonError, DataError, WriterSettings, beton_info, beton_labels, write_split
from datamodules.convert import folder, imagenet, transfer
from datamodules.sources import Split

from .helpers import ffcv_datamodule
from .test_sources import VAL_WNIDS, WNIDS, cifar_batch, dump, make_flowers, make_pets, write_plain

ONE_WORKER = WriterSettings(num_workers=1)


def photo(path, size=(60, 40), seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def test_imagenet_with_flat_val_and_the_papers_holdout(tmp_path):
    for k, wnid in enumerate(WNIDS):
        for i in range(12):
            photo(tmp_path / "in" / "train" / wnid / f"{wnid}_{i}.JPEG", seed=i)
    for i in range(1, len(VAL_WNIDS) + 1):
        photo(tmp_path / "in" / "val" / f"ILSVRC2012_val_{i:08d}.JPEG", seed=100 + i)
    truth = write_plain(tmp_path / "val_labels.txt", VAL_WNIDS)
    out = imagenet(str(tmp_path / "in"), str(tmp_path / "out"), ground_truth=str(truth), holdout=True, writer=ONE_WORKER)

    assert sorted(out) == ["holdout", "train_minus_holdout", "val"]
    assert beton_labels(out["val"]).tolist() == [WNIDS.index(w) for w in VAL_WNIDS]
    rest, held = beton_labels(out["train_minus_holdout"]), beton_labels(out["holdout"])
    assert len(rest) + len(held) == 36 and len(held) == round(36 * 50046 / 1281167)
    info = beton_info(out["val"])
    assert info["classes"] == WNIDS and info["measure"] == "top1" and info["num_samples"] == 5
    assert info["writer"]["max_resolution"] == 500 and info["writer"]["jpeg_quality"] == 90
    assert not list((tmp_path / "out").glob("*.partial*"))

    stamp = os.stat(out["val"]).st_mtime_ns  # a re-run skips what is already written with the same settings
    imagenet(str(tmp_path / "in"), str(tmp_path / "out"), ground_truth=str(truth), holdout=True, writer=ONE_WORKER)
    assert os.stat(out["val"]).st_mtime_ns == stamp


def test_cifar_pixels_arrive_unchanged_in_the_loader(tmp_path):
    root = tmp_path / "cifar"
    for i in range(1, 6):
        dump(cifar_batch(4, b"labels", [i % 10, 1, 2, 3], first_value=10 * i), root / "cifar-10-batches-py" / f"data_batch_{i}")
    dump(cifar_batch(8, b"labels", list(range(8)), first_value=100), root / "cifar-10-batches-py" / "test_batch")
    dump({b"label_names": [f"c{k}".encode() for k in range(10)]}, root / "cifar-10-batches-py" / "batches.meta")
    out = transfer("cifar10", str(root), str(tmp_path / "out"))
    assert beton_info(out["test"])["writer"]["write_mode"] == "raw"  # 32 px arrays: no JPEG, no resize
    assert len(beton_labels(out["train"])) == 20

    data = ffcv_datamodule(out["test"])
    data.setup("validate")
    images, labels = next(iter(data.val_dataloader()))
    assert labels.numpy().ravel().tolist() == list(range(8))
    pixels = images.numpy()  # uint8 N x 3 x 32 x 32 before normalisation
    assert pixels[:, 0, 0, 0].tolist() == [100 + k for k in range(8)]  # red, row 0, column 0
    assert pixels[0, 2, 5, 7] == 255  # blue, row 5, column 7


@pytest.mark.parametrize("name,make,sizes", [("flowers102", make_flowers, (3, 3)), ("oxford_pets", make_pets, (4, 2))])
def test_mean_per_class_data_sets_record_their_measure(tmp_path, name, make, sizes):
    make(tmp_path / "src")
    out = transfer(name, str(tmp_path / "src"), str(tmp_path / "out"), writer=ONE_WORKER)
    for split, size in zip(("train", "test"), sizes):
        info = beton_info(out[split])
        assert info["measure"] == "mean_per_class" and info["num_samples"] == size == len(beton_labels(out[split]))


def bad_tree(tmp_path):
    """Two classes of good images, one file that is not an image and one truncated JPEG."""
    for cls in ("cat", "dog"):
        for i in range(3):
            photo(tmp_path / "tree" / cls / f"{i}.jpg", seed=i)
    (tmp_path / "tree" / "cat" / "garbage.jpg").write_bytes(b"not a jpeg at all" * 20)
    whole = (tmp_path / "tree" / "dog" / "0.jpg").read_bytes()
    (tmp_path / "tree" / "dog" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    return tmp_path / "tree"


def test_bad_images_fail_by_default_naming_the_file_and_leave_nothing(tmp_path):
    tree = bad_tree(tmp_path)
    with pytest.raises(DataError, match=r"Cannot decode image .*(garbage|truncated)\.jpg"):
        folder(str(tree), str(tmp_path / "out.beton"), ONE_WORKER)
    assert not list(tmp_path.glob("out.beton*")), "a failed conversion must not leave a file behind"


def test_bad_images_can_be_skipped_and_are_listed(tmp_path):
    tree = bad_tree(tmp_path)
    out = folder(str(tree), str(tmp_path / "out.beton"), ONE_WORKER, bad_images="skip")
    assert sorted(beton_labels(out).tolist()) == [0, 0, 0, 1, 1, 1]
    skipped = beton_info(out)["skipped"]
    assert len(skipped) == 2 and any("garbage.jpg" in s for s in skipped) and any("truncated.jpg" in s for s in skipped)


def test_a_beton_with_other_fields_says_what_it_holds(tmp_path):
    from ffcv.fields import IntField
    from ffcv.writer import DatasetWriter

    path = tmp_path / "other.beton"
    DatasetWriter(str(path), {"target": IntField()}, num_workers=1).from_indexed_dataset([(1,), (2,)])
    with pytest.raises(BetonError, match=r"holds fields \{'target': 'IntField'\}.*'image' \(RGBImageField\)"):
        beton_labels(path)


def test_writer_rejects_labels_without_images():
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        write_split(Split(np.zeros((3, 4, 4, 3), np.uint8), np.zeros(2, np.int64), ("a",)), "never.beton")
