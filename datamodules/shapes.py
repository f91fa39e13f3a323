"""The embedded default data set: procedurally drawn shapes, generated deterministically from a seed.

Every image shows one main object on a textured, shaded background, with nuisance variation that the
pre-training labels must see through: position, size, rotation, colour jitter, a smaller distractor
object, an occluding patch and pixel noise.

- Pre-training task (``train``/``val``): class = shape x colour family (10 x 6 = 60 classes). Nearby
  hues and similar shapes (square/pentagon/hexagon, circle/flower) make it hard at 32 px.
- Transfer task ``texture`` (``texture_train``/``texture_test``): the same kind of images labelled by the
  texture painted on the object (6 classes). Texture varies inside every pre-training class and is
  never needed to solve it, so how much of it survives in the features is what a transfer probe
  measures (the invariance the paper links to poor transfer).

The images are written to FFCV .beton files by the same writer as real data (``write_split``).
Run ``python -m datamodules.shapes --root data/shapes`` to generate them by hand.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .beton import WriterSettings, write_split
from .ffcv_datamodule import FFCVImageDataModule
from .sources import Split

__all__ = ["SHAPES", "TEXTURES", "render_shapes", "generate_shapes_dataset", "EmbeddedShapesDataModule"]

SHAPES = ("circle", "triangle", "square", "pentagon", "hexagon", "flower", "star", "ellipse", "ring", "half_disk")
TEXTURES = ("plain", "horizontal_stripes", "vertical_stripes", "diagonal_stripes", "checker", "dots")
NUM_COLOURS = 6
SPLITS = {"train": 0, "val": 1, "texture_train": 2, "texture_test": 3}
CLASSES = tuple(f"{shape}/colour{c}" for shape in SHAPES for c in range(NUM_COLOURS))  # label = shape * 6 + colour
RAW_PIXELS = WriterSettings(max_resolution=None, write_mode="raw", num_workers=1, chunksize=1000)


def _polygon(theta: np.ndarray, sides: int) -> np.ndarray:
    """Radius of a regular polygon with unit circumradius, in the direction theta."""
    sector = 2 * math.pi / sides
    return math.cos(math.pi / sides) / np.cos(np.mod(theta, sector) - math.pi / sides)


_PROFILES = (
    lambda t: np.ones_like(t),  # circle
    lambda t: _polygon(t, 3),
    lambda t: _polygon(t, 4),
    lambda t: _polygon(t, 5),
    lambda t: _polygon(t, 6),
    lambda t: 0.7 + 0.3 * np.cos(5 * t),  # flower
    lambda t: 0.45 + 0.55 * np.abs(np.cos(2 * t)) ** 4,  # four-pointed star
    lambda t: 1.0 / np.sqrt(np.cos(t) ** 2 + (np.sin(t) / 0.55) ** 2),  # ellipse, aspect 0.55
    lambda t: np.ones_like(t),  # ring: the hole is cut below
    lambda t: np.ones_like(t),  # half disk: cut below
)


def _shape_alpha(shape: np.ndarray, dx: np.ndarray, dy: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of each image's shape; dx, dy are rotated offsets (N, H, W)."""
    dist = np.hypot(dx, dy)
    theta = np.arctan2(dy, dx)
    profile = np.empty_like(theta)
    for k, radius_of in enumerate(_PROFILES):  # each image evaluates only its own shape's profile
        rows = shape == k
        profile[rows] = radius_of(theta[rows])
    r = radius[:, None, None]
    alpha = np.clip(r * profile - dist + 0.5, 0.0, 1.0)
    ring = (shape == SHAPES.index("ring"))[:, None, None]
    alpha = np.where(ring, alpha * np.clip(dist - 0.5 * r + 0.5, 0.0, 1.0), alpha)
    half = (shape == SHAPES.index("half_disk"))[:, None, None]
    return np.where(half, alpha * np.clip(dy + 0.5, 0.0, 1.0), alpha)


_PATTERNS = (
    lambda u, v: np.zeros_like(u),  # plain
    lambda u, v: np.sin(v) > 0,  # horizontal stripes
    lambda u, v: np.sin(u) > 0,  # vertical stripes
    lambda u, v: np.sin((u + v) / math.sqrt(2)) > 0,  # diagonal stripes
    lambda u, v: (np.sin(u) > 0) ^ (np.sin(v) > 0),  # checker
    lambda u, v: (np.cos(u) + np.cos(v)) > 1.0,  # dots
)


def _texture(texture: np.ndarray, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Pattern intensity in {0, 1} per pixel (0 = object colour, 1 = darkened), in object coordinates."""
    n = texture.shape[0]
    period = rng.uniform(3.0, 5.0, n).astype(np.float32)[:, None, None]
    phase = rng.uniform(0.0, 2 * math.pi, (n, 2)).astype(np.float32)
    u = 2 * math.pi * x / period + phase[:, 0, None, None]
    v = 2 * math.pi * y / period + phase[:, 1, None, None]
    pattern = np.zeros_like(u)
    for k, draw in enumerate(_PATTERNS):
        rows = texture == k
        pattern[rows] = draw(u[rows], v[rows])
    return pattern


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB, all inputs in [0, 1]; returns (N, 3)."""
    k = np.mod(np.array([5.0, 3.0, 1.0])[None, :] + h[:, None] * 6.0, 6.0)
    return v[:, None] - v[:, None] * s[:, None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def render_shapes(n: int, rng: np.random.Generator, size: int = 32) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Draw ``n`` images (uint8, N x size x size x 3) and their factors of variation."""
    shape = rng.integers(0, len(SHAPES), n)
    colour = rng.integers(0, NUM_COLOURS, n)
    texture = rng.integers(0, len(TEXTURES), n)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5

    # Background: a desaturated base colour with a linear shading gradient.
    base = rng.uniform(0.15, 0.85, (n, 3)) * 0.5 + rng.uniform(0.15, 0.85, (n, 1)) * 0.5
    angle = rng.uniform(0, 2 * math.pi, n)
    ramp = (np.cos(angle)[:, None, None] * xx + np.sin(angle)[:, None, None] * yy) / size - 0.5
    img = (base[:, None, None, :] + rng.uniform(0.1, 0.35, n)[:, None, None, None] * ramp[..., None]).astype(np.float32)

    def paint(img, which_shape, rgb, radius, tex, pattern_strength):
        radius = radius.astype(np.float32)
        cx = rng.uniform(radius, size - radius).astype(np.float32)
        cy = rng.uniform(radius, size - radius).astype(np.float32)
        rot = rng.uniform(0, 2 * math.pi, len(radius)).astype(np.float32)
        ox, oy = xx[None] - cx[:, None, None], yy[None] - cy[:, None, None]
        c, s = np.cos(rot)[:, None, None], np.sin(rot)[:, None, None]
        dx, dy = c * ox + s * oy, -s * ox + c * oy
        alpha = _shape_alpha(which_shape, dx, dy, radius)[..., None]
        shade = 1.0 - np.reshape(pattern_strength, (-1, 1, 1, 1)).astype(np.float32) * _texture(tex, dx, dy, rng)[..., None]
        return img * (1 - alpha) + alpha * rgb[:, None, None, :] * shade

    # Distractor: a smaller plain object of any shape and colour, behind the main object, in half the images.
    has_distractor = rng.random(n) < 0.5
    d_rgb = _hsv_to_rgb(rng.random(n), rng.uniform(0.3, 1.0, n), rng.uniform(0.4, 1.0, n))
    d_img = paint(img, rng.integers(0, len(SHAPES), n), d_rgb, rng.uniform(3.0, 6.0, n), np.zeros(n, int), 0.0)
    img = np.where(has_distractor[:, None, None, None], d_img, img)

    # Main object: hue of its colour family with jitter wide enough that neighbouring families nearly meet.
    hue = (colour + rng.normal(0.0, 0.16, n)) / NUM_COLOURS
    rgb = _hsv_to_rgb(np.mod(hue, 1.0), rng.uniform(0.45, 1.0, n), rng.uniform(0.55, 1.0, n))
    img = paint(img, shape, rgb, rng.uniform(5.5, 11.0, n), texture, rng.uniform(0.35, 0.6, n))

    # Occluder: a grey-ish rectangle over part of the scene in a third of the images.
    occlude = rng.random(n) < 0.35
    x0, y0 = rng.uniform(0, size, (2, n))
    w, h = rng.uniform(0.2, 0.45, (2, n)) * size
    inside = (
        (xx[None] >= x0[:, None, None]) & (xx[None] < (x0 + w)[:, None, None])
        & (yy[None] >= y0[:, None, None]) & (yy[None] < (y0 + h)[:, None, None])
        & occlude[:, None, None]
    )
    img = np.where(inside[..., None], rng.uniform(0.2, 0.8, (n, 1, 1, 1)), img)

    noise = rng.standard_normal(img.shape, dtype=np.float32) * rng.uniform(0.02, 0.08, n).astype(np.float32)[:, None, None, None]
    img = img + noise
    pixels = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
    return pixels, {"shape": shape, "colour": colour, "texture": texture}


def generate_shapes_dataset(
    root: str | Path, sizes: dict[str, int], seed: int = 0, image_size: int = 32, chunk: int = 2000
) -> Path:
    """Render every split of ``sizes`` (keys of SPLITS) and write ``<root>/<split>.beton``.

    Deterministic: the same (sizes, seed, image_size) gives the same files. A ``spec.json`` records the
    parameters; it is written last, so its presence means the files are complete.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for split, count in sizes.items():
        rng = np.random.default_rng([seed, SPLITS[split]])
        images, labels = [], []
        for start in tqdm(range(0, count, chunk), desc=f"shapes/{split}", unit="chunk", leave=False):
            pixels, factors = render_shapes(min(chunk, count - start), rng, image_size)
            label = factors["texture"] if split.startswith("texture") else factors["shape"] * NUM_COLOURS + factors["colour"]
            images.append(pixels)
            labels.append(label)
        classes = TEXTURES if split.startswith("texture") else CLASSES
        data = Split(np.concatenate(images), np.concatenate(labels).astype(np.int64), classes)
        write_split(data, root / f"{split}.beton", RAW_PIXELS, source=f"embedded shapes, seed {seed}")
    spec = {"sizes": sizes, "seed": seed, "image_size": image_size, "shapes": SHAPES, "textures": TEXTURES}
    (root / "spec.json").write_text(json.dumps(spec, indent=2))
    return root


class EmbeddedShapesDataModule(FFCVImageDataModule):
    """The embedded default data set (see module docstring), generated on first use.

    Args:
        root: folder of the generated .beton files; generated there when missing or made with other
            parameters.
        num_train: pre-training images.
        num_val: validation images.
        num_transfer_train: training images of the texture transfer task.
        num_transfer_test: test images of the texture transfer task.
        data_seed: seed of the generator (the data set is a function of it).
        global_batch_size: images per optimiser step over all processes.
        image_size: side of the drawn images and of the training crop.
        crop_scale: range of the random crop's area (the paper's 10 % lower bound erases 32 px objects).
        crop_ratio: range of the random crop's aspect ratio.
        flip: random horizontal flips in training.
        num_workers: FFCV decoding threads per process.
        seed: seed of the training order and augmentation; by default the run's (``seed_everything``).
        holdout_path: a .beton of held-out images of the same classes, for calibration's temperature.
    """

    def __init__(
        self,
        root: str = "data/shapes",
        num_train: int = 20000,
        num_val: int = 2000,
        num_transfer_train: int = 2000,
        num_transfer_test: int = 2000,
        data_seed: int = 0,
        global_batch_size: int = 256,
        image_size: int = 32,
        crop_scale: tuple[float, float] = (0.35, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: bool = True,
        num_workers: int | None = None,
        seed: int | None = None,
        holdout_path: str | None = None,
    ):
        super().__init__(
            train_path=str(Path(root) / "train.beton"),
            val_path=str(Path(root) / "val.beton"),
            global_batch_size=global_batch_size,
            num_classes=len(SHAPES) * NUM_COLOURS,
            image_size=image_size,
            val_resize=image_size,
            crop_scale=crop_scale,
            crop_ratio=crop_ratio,
            flip=flip,
            num_workers=num_workers,
            seed=seed,
            holdout_path=holdout_path,
            make_hint=f"Generate it with `python -m datamodules.shapes --root {root}`.",
        )
        self.root = Path(root)
        self.sizes = {
            "train": num_train,
            "val": num_val,
            "texture_train": num_transfer_train,
            "texture_test": num_transfer_test,
        }
        self.data_seed = data_seed

    def transfer_paths(self) -> dict[str, tuple[str, str]]:
        return {"texture": (str(self.root / "texture_train.beton"), str(self.root / "texture_test.beton"))}

    def prepare_data(self) -> None:
        """Generate the data set unless ``root`` already holds it with the same parameters (rank 0 only)."""
        spec_file = self.root / "spec.json"
        if spec_file.is_file():
            spec = json.loads(spec_file.read_text())
            if spec.get("sizes") == self.sizes and spec.get("seed") == self.data_seed and spec.get("image_size") == self.image_size:
                return
        generate_shapes_dataset(self.root, self.sizes, self.data_seed, self.image_size)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Generate the embedded shapes data set as FFCV .beton files.")
    parser.add_argument("--root", default="data/shapes")
    parser.add_argument("--num-train", type=int, default=20000)
    parser.add_argument("--num-val", type=int, default=2000)
    parser.add_argument("--num-transfer", type=int, default=2000, help="images per transfer split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=32)
    args = parser.parse_args()
    module = EmbeddedShapesDataModule(
        args.root, args.num_train, args.num_val, args.num_transfer, args.num_transfer, args.seed, image_size=args.image_size
    )
    module.prepare_data()
    print(f"wrote {', '.join(f'{k}.beton ({v})' for k, v in module.sizes.items())} to {args.root}")


if __name__ == "__main__":
    main()
