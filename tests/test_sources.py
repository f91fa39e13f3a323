"""The on-disk readers in datamodules/sources.py, on tiny fake copies of each real layout."""

import json
import os
import pickle
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from datamodules import sources
from datamodules.sources import DataLayoutError, Split, holdout_split, image_folder, imagenet


def write_image(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (10, 20, 30)).save(path, format="PNG" if path.suffix.lower() == ".png" else "JPEG")
    return str(path)


def write_lines(path: Path, lines) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def mat_struct(records: list[dict]) -> np.ndarray:
    """A MATLAB 1 x N struct array as savemat writes it, each field a 1 x 1 cell like the real .mat files."""
    fields = list(records[0])
    struct = np.zeros((1, len(records)), dtype=[(f, "O") for f in fields])
    for i, record in enumerate(records):
        struct[0, i] = tuple(np.array([[v]]) if not isinstance(v, str) else np.array([v]) for v in record.values())
    return struct


def mat_cells(strings: list[str]) -> np.ndarray:
    cells = np.empty((1, len(strings)), dtype=object)
    cells[0, :] = strings
    return cells


def assert_layout_error(match: str, reader, *args, **kwargs) -> DataLayoutError:
    with pytest.raises(DataLayoutError, match=match) as caught:
        reader(*args, **kwargs)
    return caught.value


# ---------------------------------------------------------------------------------------------------------------
# image_folder


def test_image_folder_orders_classes_and_files_like_imagefolder(tmp_path):
    zebras = [f"{c}.jpg" for c in "hcfadgeb"] + ["a.JPEG"]  # created unsorted; extensions are case-insensitive
    for name in zebras:
        write_image(tmp_path / "zebra" / name)
    write_image(tmp_path / "ant" / "nested" / "c.png")  # found recursively, as ImageFolder does
    write_image(tmp_path / "ant" / "b.png")
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    split = image_folder(tmp_path)
    assert split.classes == ("ant", "zebra")
    names = [Path(p).relative_to(tmp_path).as_posix() for p in split.images]
    assert names == ["ant/b.png", "ant/nested/c.png", *(f"zebra/{name}" for name in sorted(zebras))]
    assert split.labels.tolist() == [0, 0] + [1] * len(zebras) and split.labels.dtype == np.int64
    assert all(os.path.isabs(p) for p in split.images) and split.measure == "top1" and len(split) == 11


def test_image_extensions_match_torchvision():
    from torchvision.datasets.folder import IMG_EXTENSIONS

    assert sources.IMAGE_EXTENSIONS == IMG_EXTENSIONS


def test_image_folder_errors(tmp_path):
    error = assert_layout_error("expected a folder", image_folder, tmp_path / "missing")
    assert str(tmp_path / "missing") in str(error)
    assert_layout_error("no class folders", image_folder, tmp_path)
    (tmp_path / "a").mkdir()
    assert_layout_error("holds an image", image_folder, tmp_path)
    write_image(tmp_path / "b" / "x.jpg")
    error = assert_layout_error("class folders without images", image_folder, tmp_path)
    assert ": a." in str(error)  # names the empty class


# ---------------------------------------------------------------------------------------------------------------
# ImageNet

WNIDS = ["n01440764", "n01443537", "n01484850"]
VAL_WNIDS = ["n01484850", "n01440764", "n01443537", "n01440764", "n01484850"]  # of ILSVRC2012_val_0000000{1..5}


@pytest.fixture
def imagenet_root(tmp_path) -> Path:
    for wnid in WNIDS:
        for i in range(2):
            write_image(tmp_path / "train" / wnid / f"{wnid}_{i}.JPEG")
    for i in range(1, len(VAL_WNIDS) + 1):
        write_image(tmp_path / "val" / f"ILSVRC2012_val_{i:08d}.JPEG")
    return tmp_path


def write_devkit(folder: Path, val_wnids: list[str]) -> Path:
    """The real meta.mat lists 1,860 synsets: ILSVRC2012_IDs 1..1000 are the leaves, not in WNID order, and the
    rest inner nodes. Ours: the three leaves in reverse WNID order, then one inner node."""
    wnids = [*reversed(WNIDS), "n00001740"]
    records = [
        {"ILSVRC2012_ID": i, "WNID": w, "words": "some, words", "gloss": "g", "num_children": 0 if i <= 3 else 3}
        for i, w in enumerate(wnids, start=1)
    ]
    data = folder / "data"
    data.mkdir(parents=True)
    synsets = mat_struct(records).T  # the real table is 1860 x 1
    scipy.io.savemat(data / "meta.mat", {"synsets": synsets})
    write_lines(data / "ILSVRC2012_validation_ground_truth.txt", [wnids.index(w) + 1 for w in val_wnids])
    return folder


def write_kaggle(path: Path, val_wnids: list[str]) -> Path:
    rows = [f"ILSVRC2012_val_{i:08d},{w} 1 2 3 4 {w} 5 6 7 8" for i, w in enumerate(val_wnids, start=1)]
    return write_lines(path, ["ImageId,PredictionString", *reversed(rows)])  # row order must not matter


def write_plain(path: Path, val_wnids: list[str]) -> Path:
    return write_lines(path, [f"ILSVRC2012_val_{i:08d}.JPEG {w}" for i, w in enumerate(val_wnids, start=1)])


GROUND_TRUTHS = {"devkit": write_devkit, "kaggle": write_kaggle, "plain": write_plain}


def test_imagenet_train(imagenet_root):
    split = imagenet(imagenet_root, "train")
    assert split.classes == tuple(WNIDS)
    assert split.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert [Path(p).parent.name for p in split.images] == [WNIDS[label] for label in split.labels]


@pytest.mark.parametrize("form", GROUND_TRUTHS)
def test_imagenet_flat_val_labels_from_each_ground_truth(imagenet_root, tmp_path_factory, form):
    ground_truth = GROUND_TRUTHS[form](tmp_path_factory.mktemp("gt") / f"{form}_truth", VAL_WNIDS)
    split = imagenet(imagenet_root, "val", ground_truth=ground_truth)
    assert split.classes == tuple(WNIDS)
    assert [Path(p).name for p in split.images] == [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, 6)]
    assert [split.classes[label] for label in split.labels] == VAL_WNIDS


def test_imagenet_val_in_synset_folders_agrees_with_flat_val(imagenet_root, tmp_path_factory):
    flat = imagenet(imagenet_root, "val", ground_truth=write_plain(tmp_path_factory.mktemp("gt") / "t", VAL_WNIDS))
    for path, label in zip(flat.images, flat.labels):
        target = imagenet_root / "val" / WNIDS[label] / Path(path).name
        target.parent.mkdir(exist_ok=True)
        os.rename(path, target)
    folders = imagenet(imagenet_root, "val")
    assert folders.classes == flat.classes
    label_of = {Path(p).name: label for p, label in zip(folders.images, folders.labels)}
    assert [label_of[Path(p).name] for p in flat.images] == flat.labels.tolist()


def test_imagenet_flat_val_needs_ground_truth(imagenet_root):
    error = assert_layout_error("ground_truth", imagenet, imagenet_root, "val")
    for name in ("ILSVRC2012_devkit_t12", "LOC_val_solution.csv", "<filename> <wnid>"):
        assert name in str(error)


@pytest.mark.parametrize("form", GROUND_TRUTHS)
def test_imagenet_val_wnid_missing_from_train(imagenet_root, tmp_path_factory, form):
    (imagenet_root / "train" / WNIDS[2]).rename(imagenet_root / "train" / "n09999999")
    ground_truth = GROUND_TRUTHS[form](tmp_path_factory.mktemp("gt") / "truth", VAL_WNIDS)
    error = assert_layout_error("classes differ", imagenet, imagenet_root, "val", ground_truth=ground_truth)
    assert WNIDS[2] in str(error) and "n09999999" in str(error)


def test_imagenet_val_folders_class_mismatch(imagenet_root):
    for i, wnid in enumerate(VAL_WNIDS, start=1):
        folder = imagenet_root / "val" / ("n07777777" if wnid == WNIDS[0] else wnid)  # one synset misnamed
        folder.mkdir(exist_ok=True)
        os.rename(imagenet_root / "val" / f"ILSVRC2012_val_{i:08d}.JPEG", folder / f"ILSVRC2012_val_{i:08d}.JPEG")
    error = assert_layout_error("classes differ", imagenet, imagenet_root, "val")
    assert "n07777777" in str(error) and WNIDS[0] in str(error)


def test_imagenet_val_ground_truth_must_cover_the_images(imagenet_root, tmp_path):
    short = write_plain(tmp_path / "short.txt", VAL_WNIDS[:4])
    assert_layout_error("no label for 1", imagenet, imagenet_root, "val", ground_truth=short)
    long = write_plain(tmp_path / "long.txt", VAL_WNIDS + [WNIDS[0]])
    assert_layout_error("not in", imagenet, imagenet_root, "val", ground_truth=long)
    ids_only = write_lines(tmp_path / "ILSVRC2012_validation_ground_truth.txt", [1, 2, 3, 4, 1])
    assert_layout_error("pass the ILSVRC2012_devkit_t12 folder", imagenet, imagenet_root, "val", ground_truth=ids_only)


# ---------------------------------------------------------------------------------------------------------------
# holdout_split


def fake_split(sizes) -> Split:
    labels = np.repeat(np.arange(len(sizes)), sizes)
    np.random.default_rng(1).shuffle(labels)
    return Split(np.arange(len(labels)), labels, tuple(f"c{i}" for i in range(len(sizes))))


def largest_remainder_by_hand(sizes, total):
    exact = [Fraction(size * total, sum(sizes)) for size in sizes]
    quotas = [int(q) for q in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda c: (-(exact[c] - quotas[c]), c))
    for c in by_remainder[: total - sum(quotas)]:
        quotas[c] += 1
    return quotas


@pytest.mark.parametrize("sizes,fraction", [([3, 5, 7, 11, 13], 0.3), ([1, 1, 1, 2], 0.5), ([10, 0, 7], 0.21)])
def test_holdout_split_is_stratified_by_largest_remainder(sizes, fraction):
    split = fake_split(sizes)
    rest, held = holdout_split(split, fraction=fraction, seed=3)
    assert len(held) == round(sum(sizes) * fraction)
    assert np.bincount(held.labels, minlength=len(sizes)).tolist() == largest_remainder_by_hand(sizes, len(held))
    assert set(rest.images.tolist()).isdisjoint(held.images.tolist())
    assert sorted(rest.images.tolist() + held.images.tolist()) == list(range(sum(sizes)))
    for part in (rest, held):  # each image keeps its label and its place in the original order
        assert (split.labels[part.images] == part.labels).all() and part.classes == split.classes
        assert (np.diff(part.images) > 0).all()


def test_holdout_split_is_seeded():
    split = fake_split([40, 60, 80])
    first, again, other = (holdout_split(split, fraction=0.25, seed=s)[1] for s in (0, 0, 1))
    assert first.images.tolist() == again.images.tolist()
    assert first.images.tolist() != other.images.tolist()
    assert first.labels.tolist() == split.labels[first.images].tolist()


def test_holdout_split_of_full_imagenet_is_50046():
    sizes = np.random.default_rng(0).integers(732, 1301, size=1000)
    sizes[-1] += 1281167 - sizes.sum()  # ImageNet's 1,281,167 train images over 1,000 classes
    rest, held = holdout_split(fake_split(sizes.tolist()))
    assert len(held) == 50046 and len(rest) == 1281167 - 50046
    per_class = np.bincount(held.labels, minlength=1000)
    assert per_class.tolist() == largest_remainder_by_hand(sizes.tolist(), 50046)


def test_holdout_split_keeps_path_lists(tmp_path):
    paths = [f"/data/{i}.jpg" for i in range(10)]
    split = Split(paths, np.array([0, 1] * 5, dtype=np.int64), ("a", "b"), "mean_per_class")
    rest, held = holdout_split(split, fraction=0.2)
    assert isinstance(held.images, list) and len(held) == 2 and sorted(held.labels.tolist()) == [0, 1]
    assert held.measure == "mean_per_class" and set(rest.images) | set(held.images) == set(split.images)


# ---------------------------------------------------------------------------------------------------------------
# CIFAR


def cifar_batch(n: int, label_key: bytes, labels, first_value: int) -> dict:
    data = np.zeros((n, 3072), dtype=np.uint8)
    data[:, 0] = first_value + np.arange(n)  # channel 0 (red), row 0, column 0: identifies the image
    data[0, 2 * 1024 + 5 * 32 + 7] = 255  # channel 2 (blue), row 5, column 7 of the batch's first image
    return {b"data": data, label_key: list(labels), b"batch_label": b"fake"}


def dump(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def test_cifar10(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    for i in range(1, 6):
        dump(cifar_batch(2, b"labels", [i % 10, (i + 1) % 10], first_value=10 * i), folder / f"data_batch_{i}")
    dump(cifar_batch(3, b"labels", [9, 0, 1], first_value=100), folder / "test_batch")
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    dump({b"label_names": names, b"num_cases_per_batch": 10000}, folder / "batches.meta")
    train, test = sources.cifar10(tmp_path, "train"), sources.cifar10(tmp_path, "test")
    assert train.classes[0] == "airplane" and len(train.classes) == 10
    assert train.images.shape == (10, 32, 32, 3) and train.images.dtype == np.uint8
    assert train.images[:, 0, 0, 0].tolist() == [10, 11, 20, 21, 30, 31, 40, 41, 50, 51]  # batch order kept
    assert train.labels.tolist() == [1, 2, 2, 3, 3, 4, 4, 5, 5, 6]
    assert test.labels.tolist() == [9, 0, 1] and test.images[0, 5, 7, 2] == 255
    assert np.count_nonzero(test.images[0] == 255) == 1 and test.images[0, 7, 5, 2] == 0


def test_cifar100_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    for name, n in (("train", 4), ("test", 2)):
        batch = cifar_batch(n, b"fine_labels", [99 - i for i in range(n)], first_value=0)
        batch[b"coarse_labels"] = [0] * n
        dump(batch, folder / name)
    fine = [f"fine_{i}".encode() for i in range(100)]
    dump({b"fine_label_names": fine, b"coarse_label_names": [b"c"] * 20}, folder / "meta")
    train, test = sources.cifar100(tmp_path, "train"), sources.cifar100(tmp_path, "test")
    assert len(train) == 4 and len(test) == 2 and train.classes[99] == "fine_99"
    assert train.labels.tolist() == [99, 98, 97, 96]
    assert train.images[0, 5, 7].tolist() == [0, 0, 255]  # HWC: row 5, column 7, blue


def test_cifar_label_out_of_range(tmp_path):
    folder = tmp_path / "cifar-100-python"
    dump(cifar_batch(2, b"fine_labels", [0, 100], first_value=0), folder / "test")
    dump({b"fine_label_names": [b"x"] * 100}, folder / "meta")
    assert_layout_error("0..99", sources.cifar100, tmp_path, "test")


# ---------------------------------------------------------------------------------------------------------------
# Food-101, SUN397


def make_food(root: Path) -> Path:
    base = root / "food-101"
    listing = {
        "train": {"apple_pie": ["apple_pie/1", "apple_pie/2"], "baklava": ["baklava/3"]},
        "test": {"apple_pie": ["apple_pie/4"], "baklava": ["baklava/5", "baklava/6"]},
    }
    for split, classes in listing.items():
        (base / "meta").mkdir(parents=True, exist_ok=True)
        (base / "meta" / f"{split}.json").write_text(json.dumps(classes))
        for names in classes.values():
            for name in names:
                write_image(base / "images" / f"{name}.jpg")
    write_lines(base / "meta" / "classes.txt", ["apple_pie", "baklava"])
    return base


def test_food101(tmp_path):
    make_food(tmp_path)
    train, test = sources.food101(tmp_path, "train"), sources.food101(tmp_path, "test")
    assert train.classes == ("apple_pie", "baklava") and train.labels.tolist() == [0, 0, 1]
    assert [Path(p).name for p in test.images] == ["4.jpg", "5.jpg", "6.jpg"] and test.labels.tolist() == [0, 1, 1]
    assert all(Path(p).parent.name == train.classes[label] for p, label in zip(train.images, train.labels))


def test_food101_missing_image(tmp_path):
    os.remove(make_food(tmp_path) / "images" / "baklava" / "6.jpg")
    error = assert_layout_error("1 images that are not on disk", sources.food101, tmp_path, "test")
    assert "6.jpg" in str(error) and "test.json" in str(error)


SUN_CLASSES = ["/a/abbey", "/a/apartment_building/outdoor", "/b/bakery/shop"]


def make_sun(root: Path, partitions: Path) -> Path:
    base = root / "SUN397"
    write_lines(base / "ClassName.txt", SUN_CLASSES)
    train = ["/a/abbey/sun_a.jpg", "/b/bakery/shop/sun_b.jpg", "/a/apartment_building/outdoor/sun_c.jpg"]
    test = ["/b/bakery/shop/sun_d.jpg", "/a/abbey/sun_e.jpg"]
    for line in train + test + ["/a/abbey/sun_unused.jpg"]:  # images in no first-partition list
        write_image(base / line.strip("/"))
    write_lines(partitions / "Training_01.txt", train)
    write_lines(partitions / "Testing_01.txt", test)
    return base


@pytest.mark.parametrize("where", ["SUN397/Partitions", "Partitions"])
def test_sun397_first_partition(tmp_path, where):
    base = make_sun(tmp_path, tmp_path / where)
    train, test = sources.sun397(tmp_path, "train"), sources.sun397(tmp_path, "test")
    assert train.classes == ("abbey", "apartment_building/outdoor", "bakery/shop")
    assert train.labels.tolist() == [0, 2, 1] and test.labels.tolist() == [2, 0]
    assert test.images == [str(base / "b/bakery/shop/sun_d.jpg"), str(base / "a/abbey/sun_e.jpg")]


def test_sun397_missing_partitions(tmp_path):
    make_sun(tmp_path, tmp_path / "elsewhere")
    error = assert_layout_error("partition file not found", sources.sun397, tmp_path, "test")
    for place in (tmp_path / "SUN397" / "Partitions" / "Testing_01.txt", tmp_path / "Partitions" / "Testing_01.txt"):
        assert str(place) in str(error)
    assert "Partitions.zip" in str(error)


def test_sun397_unknown_class_folder(tmp_path):
    make_sun(tmp_path, tmp_path / "Partitions")
    write_lines(tmp_path / "Partitions" / "Testing_01.txt", ["/z/zoo/sun_z.jpg"])
    assert_layout_error("/z/zoo", sources.sun397, tmp_path, "test")


# ---------------------------------------------------------------------------------------------------------------
# Stanford Cars, Oxford-IIIT Pets, Flowers-102, Birdsnap


def make_cars(root: Path, test_classes=(3, 1)) -> Path:
    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    scipy.io.savemat(base / "devkit" / "cars_meta.mat", {"class_names": mat_cells(["AM General", "Audi", "BMW"])})
    for annos_file, folder, classes in (
        (base / "devkit" / "cars_train_annos.mat", "cars_train", (1, 2, 2)),
        (base / "cars_test_annos_withlabels.mat", "cars_test", test_classes),
    ):
        records = [
            {"bbox_x1": 1, "bbox_y1": 2, "bbox_x2": 3, "bbox_y2": 4, "class": c, "fname": f"{i + 1:05d}.jpg"}
            for i, c in enumerate(classes)
        ]
        scipy.io.savemat(annos_file, {"annotations": mat_struct(records)})
        for record in records:
            write_image(base / folder / record["fname"])
    return base


def test_stanford_cars(tmp_path):
    base = make_cars(tmp_path)
    train, test = sources.stanford_cars(tmp_path, "train"), sources.stanford_cars(tmp_path, "test")
    assert train.classes == ("AM General", "Audi", "BMW")
    assert train.labels.tolist() == [0, 1, 1] and test.labels.tolist() == [2, 0]
    assert test.images == [str(base / "cars_test" / "00001.jpg"), str(base / "cars_test" / "00002.jpg")]


def test_stanford_cars_label_out_of_range(tmp_path):
    make_cars(tmp_path, test_classes=(4, 1))
    error = assert_layout_error("1..3", sources.stanford_cars, tmp_path, "test")
    assert "cars_test_annos_withlabels.mat" in str(error)


def make_pets(root: Path) -> Path:
    base = root / "oxford-iiit-pet"
    trainval = ["Abyssinian_1 1 1 1", "american_bulldog_2 2 2 1", "Abyssinian_3 1 1 1", "yorkshire_terrier_4 3 2 3"]
    test = ["yorkshire_terrier_5 3 2 3", "american_bulldog_6 2 2 1"]
    write_lines(base / "annotations" / "trainval.txt", trainval)
    write_lines(base / "annotations" / "test.txt", test)
    for line in trainval + test:
        write_image(base / "images" / f"{line.split()[0]}.jpg")
    return base


def test_oxford_pets(tmp_path):
    base = make_pets(tmp_path)
    train, test = sources.oxford_pets(tmp_path, "train"), sources.oxford_pets(tmp_path, "test")
    assert train.classes == test.classes == ("Abyssinian", "American Bulldog", "Yorkshire Terrier")
    assert train.labels.tolist() == [0, 1, 0, 2] and test.labels.tolist() == [2, 1]
    assert test.images[0] == str(base / "images" / "yorkshire_terrier_5.jpg")
    assert train.measure == test.measure == "mean_per_class"


def test_oxford_pets_missing_image(tmp_path):
    os.remove(make_pets(tmp_path) / "images" / "american_bulldog_6.jpg")
    assert_layout_error("american_bulldog_6.jpg", sources.oxford_pets, tmp_path, "test")


def make_flowers(root: Path, labels=(1, 102, 5, 5, 7, 1)) -> Path:
    base = root / "flowers-102"
    base.mkdir(parents=True)
    scipy.io.savemat(base / "imagelabels.mat", {"labels": np.array([labels], dtype=np.uint8)})
    setid = {"trnid": np.array([[4, 1]]), "valid": np.array([[2]]), "tstid": np.array([[6, 3, 5]])}
    scipy.io.savemat(base / "setid.mat", setid)
    for i in range(1, len(labels) + 1):
        write_image(base / "jpg" / f"image_{i:05d}.jpg")
    return base


def test_flowers102_trains_on_train_plus_val(tmp_path):
    base = make_flowers(tmp_path)
    train, test = sources.flowers102(tmp_path, "train"), sources.flowers102(tmp_path, "test")
    assert [Path(p).name for p in train.images] == ["image_00001.jpg", "image_00002.jpg", "image_00004.jpg"]
    assert train.labels.tolist() == [0, 101, 4] and test.labels.tolist() == [4, 6, 0]
    assert test.images[0] == str(base / "jpg" / "image_00003.jpg")
    assert len(train.classes) == 102 and train.classes[0] == "pink primrose"
    assert train.measure == test.measure == "mean_per_class"


def test_flowers102_label_out_of_range(tmp_path):
    make_flowers(tmp_path, labels=(1, 103, 5, 5, 7, 1))
    assert_layout_error("103", sources.flowers102, tmp_path, "train")


def test_birdsnap(tmp_path):
    for split, names in (("train", ["a1.jpg", "a2.jpg"]), ("test", ["a3.jpg"])):
        for name in names:
            write_image(tmp_path / split / "Acadian_Flycatcher" / name)
        write_image(tmp_path / split / "Barn_Owl" / "b.jpg")
    train, test = sources.birdsnap(tmp_path, "train"), sources.birdsnap(tmp_path, "test")
    assert train.classes == test.classes == ("Acadian_Flycatcher", "Barn_Owl")
    assert train.labels.tolist() == [0, 0, 1] and test.labels.tolist() == [0, 1]
    write_image(tmp_path / "test" / "Cactus_Wren" / "c.jpg")
    error = assert_layout_error("classes differ", sources.birdsnap, tmp_path, "train")
    assert "Cactus_Wren" in str(error)


# ---------------------------------------------------------------------------------------------------------------
# The registry, and missing layouts


EXPECTED_FOLDER = {
    "cifar10": "cifar-10-batches-py",
    "cifar100": "cifar-100-python",
    "food101": "food-101",
    "sun397": "SUN397",
    "stanford_cars": "stanford_cars",
    "oxford_pets": "oxford-iiit-pet",
    "flowers102": "flowers-102",
    "birdsnap": "train",
}


@pytest.mark.parametrize("name", sorted(EXPECTED_FOLDER))
def test_each_transfer_reader_names_the_missing_path(tmp_path, name):
    assert set(sources.TRANSFER_DATASETS) == set(EXPECTED_FOLDER)
    error = assert_layout_error("expected a folder", sources.TRANSFER_DATASETS[name], str(tmp_path), "test")
    assert str(tmp_path / EXPECTED_FOLDER[name]) in str(error)


def test_missing_files_inside_the_layout_are_named(tmp_path):
    base = make_cars(tmp_path)
    os.remove(base / "devkit" / "cars_meta.mat")
    error = assert_layout_error("expected a file", sources.stanford_cars, tmp_path, "train")
    assert str(base / "devkit" / "cars_meta.mat") in str(error)
    with pytest.raises(ValueError, match="split must be one of"):
        sources.flowers102(tmp_path, "val")
