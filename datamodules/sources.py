"""Readers that turn data already on disk into labelled splits. Nothing is downloaded.

Each reader returns a `Split`: image paths (or, for CIFAR, a uint8 array N x 32 x 32 x 3), int64 labels and
class names. The layouts are the ones torchvision's dataset classes read, parsed here directly (torchvision's
classes verify md5 sums and would download). Any missing or inconsistent file raises `DataLayoutError`,
naming the path, what belongs there and the fix.

Where to put the files (``root`` is the folder you pass):

ImageFolder       ``image_folder(root)``: root/<class>/<image>; classes are the sorted folder names
                  (torchvision's ImageFolder order), images any of `IMAGE_EXTENSIONS`, case-insensitive.
ImageNet          ``imagenet(root, split)``, split "train" or "val":
                    root/train/<wnid>/*.JPEG
                    root/val/<wnid>/*.JPEG (synset folders), or flat root/val/*.JPEG with ``ground_truth`` one of
                      - the devkit folder ILSVRC2012_devkit_t12/ (data/ILSVRC2012_validation_ground_truth.txt
                        and data/meta.mat, from ILSVRC2012_devkit_t12.tar.gz),
                      - Kaggle's LOC_val_solution.csv (root is then ILSVRC/Data/CLS-LOC),
                      - a text file of lines ``<filename> <wnid>``.
                  Labels index the sorted train synsets in both splits.

Transfer sets (Table A.2), ``TRANSFER_DATASETS[name](root, split)`` with split "train" or "test":
cifar10           root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}   (cifar-10-python.tar.gz)
cifar100          root/cifar-100-python/{train, test, meta}; fine labels                  (cifar-100-python.tar.gz)
food101           root/food-101/meta/{classes.txt, train.json, test.json}, root/food-101/images/<class>/<id>.jpg
sun397            root/SUN397/ClassName.txt, root/SUN397/<letter>/<class>/sun_*.jpg, and the first official
                  partition Training_01.txt / Testing_01.txt from Partitions.zip, in root/SUN397/Partitions/
                  or root/Partitions/
stanford_cars     root/stanford_cars/devkit/{cars_meta.mat, cars_train_annos.mat},
                  root/stanford_cars/cars_test_annos_withlabels.mat, root/stanford_cars/{cars_train, cars_test}/
oxford_pets       root/oxford-iiit-pet/images/*.jpg, root/oxford-iiit-pet/annotations/{trainval.txt, test.txt};
                  "train" is trainval; scored by mean per-class accuracy
flowers102        root/flowers-102/{jpg/image_00001.jpg.., imagelabels.mat, setid.mat}; "train" is the paper's
                  train + val (2,040 images), "test" is tstid (6,149); scored by mean per-class accuracy
birdsnap          root/train/<class>/*, root/test/<class>/* (no official layout; both splits need the same classes)
"""

from __future__ import annotations

import csv
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from measurements.accuracy import MEASURES

__all__ = [
    "Split",
    "DataError",
    "DataLayoutError",
    "load_rgb",
    "image_folder",
    "imagenet",
    "holdout_split",
    "cifar10",
    "cifar100",
    "food101",
    "sun397",
    "stanford_cars",
    "oxford_pets",
    "flowers102",
    "birdsnap",
    "TRANSFER_DATASETS",
    "IMAGE_EXTENSIONS",
    "IMAGENET_HOLDOUT_FRACTION",
]

# The same tuple as torchvision.datasets.folder.IMG_EXTENSIONS, so image_folder finds what ImageFolder finds.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Kornblith et al. 2021 hold out 50,046 of the 1,281,167 ImageNet training images (about 50 per class).
IMAGENET_HOLDOUT_FRACTION = 50046 / 1281167
LAYOUTS = "the expected layouts are listed at the top of datamodules/sources.py"


class DataError(ValueError):
    """The data on disk is missing, unreadable, or does not match what the pipeline needs."""


class DataLayoutError(DataError):
    """Files on disk are missing, misplaced, or disagree with each other."""


@dataclass(frozen=True)
class Split:
    """One split of a data set: images and their integer labels."""

    images: Sequence[str] | np.ndarray  # absolute file paths, or a uint8 array N x H x W x 3 (CIFAR)
    labels: np.ndarray  # int64 in 0..len(classes)-1, one per image
    classes: tuple[str, ...]  # class names; index = label
    measure: str = "top1"  # "top1", or "mean_per_class" (Pets, Flowers; Table A.2)

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise ValueError(f"Split has {len(self.images)} images but {len(self.labels)} labels")
        if self.measure not in MEASURES:
            raise ValueError(f"measure must be one of {MEASURES}, got {self.measure!r}")

    def __len__(self) -> int:
        return len(self.labels)


def load_rgb(path: str):
    """Decode an image file to an RGB PIL image, naming the file when it is corrupt or truncated."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # decodes every pixel: a truncated file fails here, not later
    except Exception as err:
        raise DataError(f"Cannot decode image {path} ({type(err).__name__}: {err}). Replace or delete the file, "
                        f"or set bad_images=skip to leave it out and count it.") from err


# ---------------------------------------------------------------------------------------------------------------
# ImageFolder and ImageNet


def image_folder(root: str | os.PathLike) -> Split:
    """root/<class>/<image>, read as torchvision's ImageFolder does: classes are the sorted sub-folder names,
    images are found recursively and sorted. An empty class folder is an error, since it would silently
    shift the label of every class after it."""
    root = _absolute(root)
    classes = _class_folders(root)
    images: list[str] = []
    labels: list[int] = []
    empty = []
    for label, name in enumerate(classes):
        found = _images_under(root / name)
        if not found:
            empty.append(name)
        images += found
        labels += [label] * len(found)
    if not images:
        raise DataLayoutError(
            f"{root}: none of its {len(classes)} class folders holds an image ({', '.join(IMAGE_EXTENSIONS)}); "
            "put the images inside root/<class>/."
        )
    if empty:
        raise DataLayoutError(
            f"{root}: class folders without images: {_examples(empty)}. An empty class shifts every later label; "
            "add its images or remove the folder."
        )
    return Split(images, np.asarray(labels, dtype=np.int64), classes)


def imagenet(
    root: str | os.PathLike, split: str = "train", ground_truth: str | os.PathLike | None = None
) -> Split:
    """ImageNet-1k (ILSVRC2012) train or val. Classes are the sorted WNIDs of root/train, for both splits.

    val is root/val/<wnid>/* or a flat root/val/*.JPEG; a flat val needs ``ground_truth``: the devkit folder
    ILSVRC2012_devkit_t12, Kaggle's LOC_val_solution.csv, or a text file of ``<filename> <wnid>`` lines.
    ``ground_truth`` is not read when val already has synset folders.
    """
    _check_split(split, ("train", "val"))
    root = _absolute(root)
    train = _directory(root / "train", "the ImageNet train images in one folder per synset (train/<wnid>/*.JPEG)")
    if split == "train":
        return image_folder(train)
    synsets = _class_folders(train)
    val = _directory(root / "val", "the 50,000 ImageNet val images, flat (val/*.JPEG) or per synset")
    entries = list(os.scandir(val))
    loose = sorted(e.path for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
    if any(e.is_dir() for e in entries):
        if loose:
            raise DataLayoutError(
                f"{val}: holds synset folders and also {len(loose)} loose images (e.g. {_examples(loose, 2)}); "
                "finish sorting the images into val/<wnid>/ or move the folders' images back to val/."
            )
        held = image_folder(val)
        _require_same_classes(held.classes, synsets, val, f"{train} (the train synsets)")
        return held
    if not loose:
        raise DataLayoutError(f"{val}: no images and no synset folders; extract ILSVRC2012_img_val.tar here.")
    if ground_truth is None:
        raise DataLayoutError(
            f"{val} holds {len(loose)} images without synset folders, so their labels must come from "
            "ground_truth: pass the devkit folder ILSVRC2012_devkit_t12 (with data/meta.mat and "
            "data/ILSVRC2012_validation_ground_truth.txt), Kaggle's LOC_val_solution.csv, or a text file of "
            "'<filename> <wnid>' lines."
        )
    source = _absolute(ground_truth)
    wnid_of = _val_ground_truth(source)
    stems = [Path(path).stem for path in loose]
    unlabelled = [stem for stem in stems if stem not in wnid_of]
    if unlabelled:
        raise DataLayoutError(
            f"{source} gives no label for {len(unlabelled)} of the images in {val}, e.g. {_examples(unlabelled)}; "
            "pass the ground truth that belongs to these images."
        )
    if len(wnid_of) != len(set(stems)):
        unseen = sorted(set(wnid_of) - set(stems))
        raise DataLayoutError(
            f"{source} labels {len(unseen)} images that are not in {val}, e.g. {_examples(unseen)}; "
            "the val folder is incomplete: extract all of ILSVRC2012_img_val.tar there."
        )
    wnids = [wnid_of[stem] for stem in stems]
    _require_same_classes(sorted(set(wnids)), synsets, source, f"{train} (the train synsets)")
    index = {wnid: label for label, wnid in enumerate(synsets)}
    return Split(loose, np.asarray([index[w] for w in wnids], dtype=np.int64), synsets)


def _val_ground_truth(source: Path) -> dict[str, str]:
    """Val image file name without extension -> WNID, from any of the three ground-truth forms."""
    if source.is_dir():  # the devkit
        data = source / "data"
        ids_file = _file(
            data / "ILSVRC2012_validation_ground_truth.txt", "the devkit's val labels (ILSVRC2012_devkit_t12.tar.gz)"
        )
        meta_file = data / "meta.mat"
        synsets = _mat_entry(_load_mat(meta_file, "the devkit's synset table"), "synsets", meta_file)
        ids = _mat_values(_struct_field(synsets, "ILSVRC2012_ID", meta_file))
        wnid_of_id = dict(zip((int(i) for i in ids), _mat_values(_struct_field(synsets, "WNID", meta_file))))
        val_ids = [int(line) for line in _lines(ids_file)]
        unknown = sorted(set(val_ids) - set(wnid_of_id))
        if unknown:
            raise DataLayoutError(f"{ids_file}: ILSVRC2012_IDs {_examples(unknown)} are not in {meta_file}.")
        # Line i labels ILSVRC2012_val_<i, 8 digits>.JPEG (the sorted-file-name order of the val images).
        return {f"ILSVRC2012_val_{i:08d}": wnid_of_id[val_id] for i, val_id in enumerate(val_ids, start=1)}
    lines = _lines(_file(source, "the ImageNet val ground truth (devkit folder, LOC_val_solution.csv or text)"))
    if lines and lines[0].startswith("ImageId"):  # Kaggle: ImageId,PredictionString with the wnid first
        rows = list(csv.DictReader(lines))
        if not rows or "PredictionString" not in rows[0]:
            raise DataLayoutError(f"{source}: expected Kaggle's columns 'ImageId,PredictionString' and rows.")
        return {Path(row["ImageId"]).stem: row["PredictionString"].split()[0] for row in rows}
    pairs = [line.split() for line in lines]
    malformed = [line for line, pair in zip(lines, pairs) if len(pair) != 2]
    if malformed:
        hint = (
            " A single number per line is the devkit's ILSVRC2012_validation_ground_truth.txt: pass the "
            "ILSVRC2012_devkit_t12 folder instead, whose meta.mat maps the numbers to WNIDs."
            if malformed[0].strip().isdigit()
            else ""
        )
        raise DataLayoutError(
            f"{source}: expected lines '<filename> <wnid>', found e.g. {malformed[0]!r}.{hint}"
        )
    return {Path(name).stem: wnid for name, wnid in pairs}


def holdout_split(
    split: Split, fraction: float = IMAGENET_HOLDOUT_FRACTION, seed: int = 0
) -> tuple[Split, Split]:
    """Hold out ``round(N * fraction)`` images, stratified by class: (rest, held_out), disjoint and covering.

    Kornblith et al. 2021 hold out 50,046 ImageNet training images (about 50 per class) for hyper-parameter
    selection; with the default fraction the full train set gives exactly that. Class c holds out the floor of
    N_c * total / N, and the images left over go one each to the classes with the largest remainders (ties
    to the lower label); within a class the images are a seeded random permutation's first ones.
    """
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    if len(split) == 0:
        raise ValueError("cannot hold out images from an empty split")
    sizes = np.bincount(split.labels, minlength=len(split.classes))
    quotas = _largest_remainder(sizes, round(len(split) * fraction))
    by_class = np.argsort(split.labels, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rng = np.random.default_rng(seed)
    held = [
        rng.permutation(by_class[start : start + size])[:quota] for start, size, quota in zip(starts, sizes, quotas)
    ]
    is_held = np.zeros(len(split), dtype=bool)
    is_held[np.concatenate(held)] = True
    return _subset(split, np.flatnonzero(~is_held)), _subset(split, np.flatnonzero(is_held))


def _largest_remainder(sizes: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` across classes in proportion to ``sizes`` (Hamilton's method), in exact integers."""
    quotas, remainders = np.divmod(sizes.astype(np.int64) * total, int(sizes.sum()))
    leftover = total - int(quotas.sum())
    quotas[np.argsort(-remainders, kind="stable")[:leftover]] += 1
    return quotas


def _subset(split: Split, index: np.ndarray) -> Split:
    images = split.images[index] if isinstance(split.images, np.ndarray) else [split.images[i] for i in index]
    return Split(images, split.labels[index], split.classes, split.measure)


# ---------------------------------------------------------------------------------------------------------------
# Transfer sets (Table A.2)


def cifar10(root: str | os.PathLike, split: str = "train") -> Split:
    """CIFAR-10: root/cifar-10-batches-py, 50,000 / 10,000 images of 32 x 32."""
    _check_split(split, ("train", "test"))
    folder = _directory(_absolute(root) / "cifar-10-batches-py", "the extracted cifar-10-python.tar.gz")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    meta = _unpickle(folder / "batches.meta")
    classes = tuple(name.decode() for name in _entry(meta, b"label_names", folder / "batches.meta"))
    return _cifar_split([folder / name for name in names], b"labels", classes)


def cifar100(root: str | os.PathLike, split: str = "train") -> Split:
    """CIFAR-100 with its 100 fine labels: root/cifar-100-python, 50,000 / 10,000 images of 32 x 32."""
    _check_split(split, ("train", "test"))
    folder = _directory(_absolute(root) / "cifar-100-python", "the extracted cifar-100-python.tar.gz")
    meta = _unpickle(folder / "meta")
    classes = tuple(name.decode() for name in _entry(meta, b"fine_label_names", folder / "meta"))
    return _cifar_split([folder / split], b"fine_labels", classes)


def _cifar_split(files: list[Path], label_key: bytes, classes: tuple[str, ...]) -> Split:
    images, labels = [], []
    for path in files:
        batch = _unpickle(path)
        data = np.asarray(_entry(batch, b"data", path), dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataLayoutError(f"{path}: b'data' should be N x 3072 (32 x 32 RGB), found {data.shape}.")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # rows are channel-major: CHW -> HWC
        labels.append(_labels(_entry(batch, label_key, path), len(classes), path))
    return Split(np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels), classes)


def food101(root: str | os.PathLike, split: str = "train") -> Split:
    """Food-101: root/food-101, 75,750 / 25,250 images in 101 classes, split by meta/{train,test}.json."""
    _check_split(split, ("train", "test"))
    base = _directory(_absolute(root) / "food-101", "the extracted food-101.tar.gz")
    classes_file = _file(base / "meta" / "classes.txt", "the Food-101 class names, one per line")
    classes = tuple(_lines(classes_file))
    listing_file = _file(base / "meta" / f"{split}.json", f"the Food-101 {split} list (class -> 'class/id')")
    with open(listing_file) as f:
        listing = json.load(f)
    _require_same_classes(sorted(listing), classes, listing_file, str(classes_file))
    images_dir = _directory(base / "images", "the Food-101 images, images/<class>/<id>.jpg")
    images = [
        os.path.join(images_dir, *f"{name}.jpg".split("/")) for class_name in classes for name in listing[class_name]
    ]
    labels = [label for label, class_name in enumerate(classes) for _ in listing[class_name]]
    return Split(_existing(images, listing_file), np.asarray(labels, dtype=np.int64), classes)


def sun397(root: str | os.PathLike, split: str = "train") -> Split:
    """SUN397 on its first official partition (Training_01 / Testing_01, 19,850 images each, 397 classes).
    Class names are ClassName.txt's lines without the leading letter folder, as torchvision names them."""
    _check_split(split, ("train", "test"))
    root = _absolute(root)
    base = _directory(root / "SUN397", "the extracted SUN397.tar.gz (ClassName.txt, a/abbey/sun_*.jpg, ...)")
    class_dirs = _lines(_file(base / "ClassName.txt", "the SUN397 class list (lines like /a/abbey)"))
    classes = tuple(d[3:] for d in class_dirs)  # "/a/abbey" -> "abbey"
    index = {d: label for label, d in enumerate(class_dirs)}
    name = "Training_01.txt" if split == "train" else "Testing_01.txt"
    places = [base / "Partitions" / name, root / "Partitions" / name]
    partition = next((p for p in places if p.is_file()), None)
    if partition is None:
        raise DataLayoutError(
            f"SUN397 partition file not found at {places[0]} or {places[1]}. The paper uses the first of the "
            "official ten train/test partitions: extract Partitions.zip (from the SUN397 page, "
            "https://vision.princeton.edu/projects/2010/SUN/download/Partitions.zip) into one of these folders."
        )
    lines = _lines(partition)
    unknown = sorted({os.path.dirname(line) for line in lines} - set(index))
    if unknown:
        raise DataLayoutError(f"{partition}: folders {_examples(unknown)} are not classes in {base / 'ClassName.txt'}.")
    images = [os.path.join(base, *line.strip("/").split("/")) for line in lines]
    labels = np.asarray([index[os.path.dirname(line)] for line in lines], dtype=np.int64)
    return Split(_existing(images, partition), labels, classes)


def stanford_cars(root: str | os.PathLike, split: str = "train") -> Split:
    """Stanford Cars in torchvision's layout: root/stanford_cars, 8,144 / 8,041 images of 196 classes."""
    _check_split(split, ("train", "test"))
    base = _directory(_absolute(root) / "stanford_cars", "the Stanford Cars devkit, annotations and images")
    meta_file = base / "devkit" / "cars_meta.mat"
    classes = tuple(_mat_values(_mat_entry(_load_mat(meta_file, "the car class names"), "class_names", meta_file)))
    if split == "train":
        annos_file, images_dir = base / "devkit" / "cars_train_annos.mat", base / "cars_train"
    else:
        annos_file, images_dir = base / "cars_test_annos_withlabels.mat", base / "cars_test"
    annos = _mat_entry(_load_mat(annos_file, f"the {split} annotations (fname, class)"), "annotations", annos_file)
    images_dir = _directory(images_dir, f"the {split} images named in {annos_file.name}")
    images = [os.path.join(images_dir, name) for name in _mat_values(_struct_field(annos, "fname", annos_file))]
    labels = _labels(_mat_values(_struct_field(annos, "class", annos_file)), len(classes), annos_file, first=1)
    return Split(_existing(images, annos_file), labels, classes)


def oxford_pets(root: str | os.PathLike, split: str = "train") -> Split:
    """Oxford-IIIT Pets: root/oxford-iiit-pet, 3,680 (trainval) / 3,669 (test) images of 37 breeds, mean per-class.
    Class names are the breeds from the file names, title-cased as torchvision does ("American Bulldog")."""
    _check_split(split, ("train", "test"))
    base = _directory(_absolute(root) / "oxford-iiit-pet", "the extracted images.tar.gz and annotations.tar.gz")
    lists = {s: base / "annotations" / f"{s}.txt" for s in ("trainval", "test")}
    rows = {s: _pet_rows(path) for s, path in lists.items()}  # both lists, so both splits name classes alike
    breeds: dict[int, set[str]] = {}
    for image_id, class_id in rows["trainval"] + rows["test"]:
        breeds.setdefault(class_id, set()).add(image_id.rsplit("_", 1)[0])
    if sorted(breeds) != list(range(1, len(breeds) + 1)) or any(len(b) > 1 for b in breeds.values()):
        raise DataLayoutError(
            f"{lists['trainval'].parent}: class ids should run 1..K with one breed each, found "
            f"{_examples(f'{i}: {sorted(b)}' for i, b in sorted(breeds.items()))}."
        )
    classes = tuple(" ".join(part.title() for part in min(breeds[i]).split("_")) for i in sorted(breeds))
    listed = "trainval" if split == "train" else "test"
    images_dir = _directory(base / "images", "the pet images, images/<Breed>_<n>.jpg")
    images = [os.path.join(images_dir, f"{image_id}.jpg") for image_id, _ in rows[listed]]
    labels = _labels([class_id for _, class_id in rows[listed]], len(classes), lists[listed], first=1)
    return Split(_existing(images, lists[listed]), labels, classes, measure="mean_per_class")


def _pet_rows(path: Path) -> list[tuple[str, int]]:
    """(image id, 1-based class id) from lines like 'Abyssinian_100 1 1 1'."""
    rows = [line.split() for line in _lines(_file(path, "the Oxford-IIIT Pets split list")) if not line.startswith("#")]
    bad = [" ".join(row) for row in rows if len(row) < 2 or not row[1].isdigit()]
    if bad:
        raise DataLayoutError(f"{path}: expected lines like 'Abyssinian_100 1 1 1', found {bad[0]!r}.")
    return [(row[0], int(row[1])) for row in rows]


def flowers102(root: str | os.PathLike, split: str = "train") -> Split:
    """Oxford 102 Flowers: root/flowers-102. As in the paper, "train" is trnid + valid (2,040 images) and
    "test" is tstid (6,149), scored by mean per-class accuracy."""
    _check_split(split, ("train", "test"))
    base = _directory(_absolute(root) / "flowers-102", "102flowers.tgz's jpg/ and the files imagelabels.mat, setid.mat")
    labels_file, setid_file = base / "imagelabels.mat", base / "setid.mat"
    labels_of_image = _labels(
        np.ravel(_mat_entry(_load_mat(labels_file, "the label of every image"), "labels", labels_file)),
        len(FLOWERS102_CLASSES),
        labels_file,
        first=1,
    )
    setid = _load_mat(setid_file, "the split image ids (trnid, valid, tstid)")
    keys = ("trnid", "valid") if split == "train" else ("tstid",)
    ids = np.sort(np.concatenate([np.ravel(_mat_entry(setid, key, setid_file)).astype(np.int64) for key in keys]))
    outside = ids[(ids < 1) | (ids > len(labels_of_image))]
    if len(outside):
        raise DataLayoutError(
            f"{setid_file}: image ids {_examples(outside)} have no label in {labels_file} "
            f"({len(labels_of_image)} images)."
        )
    images_dir = _directory(base / "jpg", "the flower images, jpg/image_00001.jpg ...")
    images = [os.path.join(images_dir, f"image_{i:05d}.jpg") for i in ids]
    return Split(_existing(images, setid_file), labels_of_image[ids - 1], FLOWERS102_CLASSES, "mean_per_class")


def birdsnap(root: str | os.PathLike, split: str = "train") -> Split:
    """Birdsnap as image folders root/train/<class>/*, root/test/<class>/* (Table A.2: 47,386 / 2,443, 500
    classes). The two splits must have the same class folders, so their labels agree."""
    _check_split(split, ("train", "test"))
    root = _absolute(root)
    train_classes = _class_folders(_directory(root / "train", "the Birdsnap train images, train/<class>/*"))
    test_dir = _directory(root / "test", "the Birdsnap test images, test/<class>/*")
    _require_same_classes(_class_folders(test_dir), train_classes, test_dir, str(root / "train"))
    return image_folder(root / split)


TRANSFER_DATASETS: dict[str, Callable[[str, str], Split]] = {
    "food101": food101,
    "cifar10": cifar10,
    "cifar100": cifar100,
    "birdsnap": birdsnap,
    "sun397": sun397,
    "stanford_cars": stanford_cars,
    "oxford_pets": oxford_pets,
    "flowers102": flowers102,
}

# Label order of imagelabels.mat (1 -> "pink primrose"), the names torchvision's Flowers102 uses.
FLOWERS102_CLASSES = (
    'pink primrose', 'hard-leaved pocket orchid', 'canterbury bells', 'sweet pea', 'english marigold',
    'tiger lily', 'moon orchid', 'bird of paradise', 'monkshood', 'globe thistle', 'snapdragon',
    "colt's foot", 'king protea', 'spear thistle', 'yellow iris', 'globe-flower', 'purple coneflower',
    'peruvian lily', 'balloon flower', 'giant white arum lily', 'fire lily', 'pincushion flower',
    'fritillary', 'red ginger', 'grape hyacinth', 'corn poppy', 'prince of wales feathers',
    'stemless gentian', 'artichoke', 'sweet william', 'carnation', 'garden phlox', 'love in the mist',
    'mexican aster', 'alpine sea holly', 'ruby-lipped cattleya', 'cape flower', 'great masterwort',
    'siam tulip', 'lenten rose', 'barbeton daisy', 'daffodil', 'sword lily', 'poinsettia', 'bolero deep blue',
    'wallflower', 'marigold', 'buttercup', 'oxeye daisy', 'common dandelion', 'petunia', 'wild pansy',
    'primula', 'sunflower', 'pelargonium', 'bishop of llandaff', 'gaura', 'geranium', 'orange dahlia',
    'pink-yellow dahlia?', 'cautleya spicata', 'japanese anemone', 'black-eyed susan', 'silverbush',
    'californian poppy', 'osteospermum', 'spring crocus', 'bearded iris', 'windflower', 'tree poppy',
    'gazania', 'azalea', 'water lily', 'rose', 'thorn apple', 'morning glory', 'passion flower', 'lotus',
    'toad lily', 'anthurium', 'frangipani', 'clematis', 'hibiscus', 'columbine', 'desert-rose', 'tree mallow',
    'magnolia', 'cyclamen', 'watercress', 'canna lily', 'hippeastrum', 'bee balm', 'ball moss', 'foxglove',
    'bougainvillea', 'camellia', 'mallow', 'mexican petunia', 'bromelia', 'blanket flower', 'trumpet creeper',
    'blackberry lily',
)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Shared checks: every missing or inconsistent file becomes a DataLayoutError that names the path.


def _absolute(path: str | os.PathLike) -> Path:
    return Path(os.path.abspath(os.path.expanduser(path)))


def _check_split(split: str, allowed: tuple[str, ...]) -> None:
    if split not in allowed:
        raise ValueError(f"split must be one of {allowed}, got {split!r}")


def _found(path: Path) -> str:
    return "a file" if path.is_file() else "a folder" if path.is_dir() else "nothing"


def _directory(path: Path, expected: str) -> Path:
    if not path.is_dir():
        raise DataLayoutError(f"{path}: expected a folder with {expected}, found {_found(path)}; {LAYOUTS}.")
    return path


def _file(path: Path, expected: str) -> Path:
    if not path.is_file():
        raise DataLayoutError(f"{path}: expected a file with {expected}, found {_found(path)}; {LAYOUTS}.")
    return path


def _examples(items: Iterable, shown: int = 5) -> str:
    items = [str(item) for item in items]
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def _lines(path: Path) -> list[str]:
    """The non-blank lines of a text file, stripped."""
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def _class_folders(root: Path) -> tuple[str, ...]:
    """Sorted names of the sub-folders of ``root`` (ImageFolder's class order)."""
    _directory(root, "one sub-folder of images per class (<class>/<image>)")
    classes = tuple(sorted(entry.name for entry in os.scandir(root) if entry.is_dir()))
    if not classes:
        raise DataLayoutError(f"{root}: no class folders; put each class's images in {root}/<class>/.")
    return classes


def _images_under(folder: Path) -> list[str]:
    """Image files below ``folder`` in torchvision's make_dataset order (sorted walk, sorted names)."""
    return [
        os.path.join(directory, name)
        for directory, _, names in sorted(os.walk(folder, followlinks=True))
        for name in sorted(names)
        if name.lower().endswith(IMAGE_EXTENSIONS)
    ]


def _require_same_classes(found: Sequence[str], expected: Sequence[str], where: Path, reference: str) -> None:
    extra, missing = sorted(set(found) - set(expected)), sorted(set(expected) - set(found))
    if extra or missing:
        raise DataLayoutError(
            f"{where}: classes differ from those of {reference}: {len(extra)} not there "
            f"({_examples(extra) or '-'}), {len(missing)} absent here ({_examples(missing) or '-'}). "
            "Labels index one class list shared by both, so the class sets must be equal."
        )


def _labels(values: Iterable, n_classes: int, source: Path, first: int = 0) -> np.ndarray:
    """Labels numbered from ``first`` in ``source`` as int64 from 0, checked to lie in 0..n_classes-1."""
    labels = np.asarray(values).astype(np.int64) - first
    outside = labels[(labels < 0) | (labels >= n_classes)] + first
    if len(outside):
        raise DataLayoutError(
            f"{source}: labels should lie in {first}..{n_classes - 1 + first} ({n_classes} classes), found "
            f"{_examples(np.unique(outside))}; the label file does not match the class list."
        )
    return labels


def _existing(images: list[str], listed_in: Path) -> list[str]:
    missing = [path for path in images if not os.path.isfile(path)]
    if missing:
        raise DataLayoutError(
            f"{listed_in} lists {len(missing)} images that are not on disk, e.g. {_examples(missing, 3)}; "
            "the images are incomplete or in another folder."
        )
    return images


def _unpickle(path: Path) -> dict:
    with open(_file(path, "a CIFAR python batch"), "rb") as f:
        return pickle.load(f, encoding="bytes")


def _entry(mapping: dict, key, source: Path):
    if key not in mapping:
        raise DataLayoutError(f"{source}: expected the entry {key!r}, found {_examples(sorted(map(str, mapping)))}.")
    return mapping[key]


def _load_mat(path: Path, expected: str) -> dict:
    from scipy.io import loadmat

    return loadmat(_file(path, expected))


def _mat_entry(mat: dict, key: str, source: Path) -> np.ndarray:
    return _entry({k: v for k, v in mat.items() if not k.startswith("__")}, key, source)


def _struct_field(struct: np.ndarray, name: str, source: Path) -> np.ndarray:
    if struct.dtype.names is None or name not in struct.dtype.names:
        raise DataLayoutError(f"{source}: expected a struct array with field {name!r}, found {struct.dtype.names}.")
    return struct[name]


def _mat_values(array: np.ndarray) -> list:
    """The scalars of a MATLAB cell or struct-field array (each element a 1 x 1 array) as Python values."""
    return [np.asarray(value).item() for value in np.asarray(array).ravel()]
