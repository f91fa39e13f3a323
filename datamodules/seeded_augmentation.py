"""FFCV's random-resized crop and horizontal flip, drawn reproducibly.

FFCV draws its crops and flips from numba's generators, one per decoding thread, seeded from the
operating system's entropy: two runs of the same config and seed trained on different crops (texture
probe 0.2385 vs 0.214 on the quickstart). Here every image's draws come from its own key,

    key = splitmix64(seed, the batch's sample indices, the image's index, which draw),

so they do not depend on threads or their scheduling. The batch enters the key because FFCV's compiled
pipeline sees the batch's sample indices but not the epoch; each epoch deals the samples into batches by
a fresh permutation of (seed, epoch) (``distributed.epoch_shard``), so an image is cropped differently in
every epoch, identically in two runs of the same seed, and identically after a mid-epoch resume (the
resumed epoch is cut into the same batches). The crop itself is FFCV's (torchvision's algorithm: ten
tries of scale and log-aspect, then the centre), drawn after seeding numba's generator of the thread that
decodes the image.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import numpy as np
from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation

from compat import ffcv_decode_primitives

__all__ = ["SeededRandomResizedCrop", "SeededHorizontalFlip", "image_keys"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_CROP, _FLIP = np.uint64(1), np.uint64(2)


def _splitmix64(x):
    """Steele et al.'s SplitMix64 finaliser: a well-mixed 64-bit hash of a 64-bit integer."""
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


splitmix64 = Compiler.compile(_splitmix64)


def _batch_key(seed, indices):
    key = splitmix64(np.uint64(seed))
    for index in indices:
        key = splitmix64(key ^ np.uint64(index))
    return key


def _image_seed(batch_key, index, draw):
    """A 32-bit seed (what numba's np.random.seed takes) for one draw of one image of one batch."""
    return np.uint32(splitmix64(batch_key ^ splitmix64(np.uint64(index) * np.uint64(4) + draw)) >> np.uint64(32))


# Compiled in the pipeline's own nopython mode, each calling the compiled versions of the ones above.
batch_key = Compiler.compile(_batch_key)
image_seed = Compiler.compile(_image_seed)


def image_keys(seed: int, indices: np.ndarray, draw: int) -> np.ndarray:
    """The seeds the pipeline uses for the images ``indices`` of one batch (for tests and inspection)."""
    key = batch_key(seed, np.asarray(indices, dtype=np.uint64))
    return np.array([image_seed(key, np.uint64(i), np.uint64(draw)) for i in indices], dtype=np.uint32)


class SeededRandomResizedCrop(RandomResizedCropRGBImageDecoder):
    """``RandomResizedCropRGBImageDecoder`` whose crops are drawn from per-image keys (module docstring).

    Args:
        output_size: (height, width) of the crops; may change between epochs (progressive resolution).
        scale: range of the crop's area as a fraction of the image.
        ratio: range of the crop's aspect ratio.
        seed: the data seed; with the batch and the image index it fixes every crop.
    """

    def __init__(self, output_size, scale, ratio, seed: int):
        super().__init__(output_size, scale=scale, ratio=ratio)
        self.seed = seed

    def generate_code(self) -> Callable:
        imdecode, resize_crop, jpg = ffcv_decode_primitives()
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c, resize_crop_c = Compiler.compile(imdecode), Compiler.compile(resize_crop)
        get_crop_c = Compiler.compile(self.get_crop_generator)
        scale, ratio, seed = np.array(self.scale), np.array(self.ratio), np.uint64(self.seed)

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            key = batch_key(seed, batch_indices)
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                if field["mode"] == jpg:
                    image = temp_storage[dst_ix]
                    imdecode_c(image_data, image, height, width, height, width, 0, 0, 1, 1, False, False)
                    image = image.reshape(-1)[: 3 * height * width].reshape(height, width, 3)
                else:
                    image = image_data.reshape(height, width, 3)
                np.random.seed(image_seed(key, np.uint64(source_ix), _CROP))  # this thread's generator
                i, j, h, w = get_crop_c(height, width, scale, ratio)
                resize_crop_c(image, i, i + h, j, j + w, destination[dst_ix])
            return destination[: len(batch_indices)]

        decode.is_parallel = True
        return decode


class SeededHorizontalFlip(Operation):
    """Flips each image left-right with probability ``flip_prob``, drawn from its per-image key.

    Args:
        seed: the data seed (as for the crop; the flip uses another draw of the same key).
        flip_prob: probability of a flip.
    """

    def __init__(self, seed: int, flip_prob: float = 0.5):
        super().__init__()
        self.seed, self.flip_prob = seed, flip_prob

    def generate_code(self) -> Callable:
        my_range = Compiler.get_iterator()
        seed, flip_prob = np.uint64(self.seed), self.flip_prob

        def flip(images, dst, indices):
            key = batch_key(seed, indices)
            for i in my_range(images.shape[0]):
                np.random.seed(image_seed(key, np.uint64(indices[i]), _FLIP))
                if np.random.random() < flip_prob:
                    dst[i] = images[i, :, ::-1]
                else:
                    dst[i] = images[i]
            return dst

        flip.is_parallel = True
        flip.with_indices = True
        return flip

    def declare_state_and_memory(self, previous_state):
        return replace(previous_state, jit_mode=True), AllocationQuery(previous_state.shape, previous_state.dtype)
