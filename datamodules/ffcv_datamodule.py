"""FFCV image classification data: train with random-resized-crop and flip, validate on a centre crop.

The whole data path in one place: FFCV decodes and augments uint8 images in its own threads, in the
order ``epoch_shard`` gives this process; the batch is normalised in torch on the training device
(``ImageClassificationData.on_after_batch_transfer``), so no cupy is needed. Loaders are built inside
the ``*_dataloader`` hooks, where the DDP process group exists. A pipeline stage that raises in FFCV's
thread, or no batch within ``batch_timeout``, stops the run with an error naming the stage and the file
(``compat.ffcv_batches``); FFCV alone would wait for the batch for ever.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import numpy as np

from compat import compile_ffcv_once, ffcv_batches, install_ffcv_order, set_ffcv_epoch

from .beton import BetonError, beton_labels, recorded_measure
from .image_data import EpochAlignedLoader, ImageClassificationData
from .sources import DataError

__all__ = ["FFCVImageDataModule"]


class _EpochShards:
    """FFCV traversal order that reads ``shard(epoch)`` (installed by ``compat.install_ffcv_order``)."""

    def __init__(self, shard: Callable[[int], np.ndarray]):
        self.shard = shard
        self.skip = 0  # samples of the epoch already trained on (a mid-epoch resume)

    def sample_order(self, epoch: int) -> np.ndarray:
        return self.shard(epoch)[self.skip:]


class FFCVImageDataModule(ImageClassificationData):
    """Image classification from FFCV .beton files (fields ``image`` and ``label``).

    Args:
        train_path: training .beton.
        val_path: validation .beton (also used by ``test``).
        os_cache: True memory-maps the files and lets the OS page cache hold them, shared by the
            processes of a node (best when the data fits in RAM); False uses FFCV's own per-process
            cache, which reads large pages and suits data larger than RAM.
        make_hint: how to create the .beton files, shown when one is missing.
        batch_timeout: seconds to wait for a batch before the run stops with an error naming the file and the
            pipeline stage that is stuck (a stage that raises stops it at once). It must cover the first batch
            of a pass, which includes compiling the pipeline (seconds), and the slowest storage.
        **kwargs: the shared arguments of ``ImageClassificationData`` (batch size, augmentation, workers).
    """

    def __init__(
        self,
        train_path: str,
        val_path: str,
        os_cache: bool = True,
        make_hint: str = "Convert your data with `python -m datamodules.convert --help`.",
        batch_timeout: float = 600.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not batch_timeout > 0:
            raise ValueError(f"batch_timeout must be > 0 seconds, got {batch_timeout}.")
        self.train_path = train_path
        self.val_path = val_path
        self.os_cache = os_cache
        self.make_hint = make_hint
        self.batch_timeout = batch_timeout

    def _path(self, source: str) -> str:
        return {"train": self.train_path, "val": self.val_path}.get(source, source)

    def recorded_measure(self) -> Optional[str]:
        return recorded_measure(self.val_path) or recorded_measure(self.train_path)

    def source_labels(self, source: str) -> np.ndarray:
        return beton_labels(self._path(source), self.make_hint)

    def pipelines(self, train: bool, crop_ratio: Optional[float] = None) -> dict[str, list]:
        """FFCV's operations for each field of a pass: decode (and augment) to uint8, to torch, on a GPU to it."""
        from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder
        from ffcv.transforms import ToDevice, ToTensor, ToTorchImage

        from .seeded_augmentation import SeededHorizontalFlip, SeededRandomResizedCrop

        size = (self.image_size, self.image_size)
        if train and self.augment:  # crops and flips drawn from (seed, batch, image), not from FFCV's per-thread generators
            decoder = SeededRandomResizedCrop(size, scale=self.crop_scale, ratio=self.crop_ratio, seed=self.seed)
            decode = [decoder, SeededHorizontalFlip(self.seed)] if self.flip else [decoder]
        else:
            decode = [CenterCropRGBImageDecoder(size, ratio=crop_ratio or self.image_size / self.val_resize)]
        to_device = [ToDevice(self.device, non_blocking=True)] if self.on_cuda else []
        return {"image": [*decode, ToTensor(), *to_device, ToTorchImage(channels_last=self.uses_channels_last)],
                "label": [IntDecoder(), ToTensor(), *to_device]}  # (B, 1); flattened on the device

    def _loader(self, source: str, train: bool, subset: Optional[np.ndarray] = None,
                crop_ratio: Optional[float] = None, local: bool = False,
                batch_size: Optional[int] = None) -> EpochAlignedLoader:
        from ffcv.loader import Loader, OrderOption

        compile_ffcv_once()  # a pass's first batch would otherwise compile its whole pipeline again (seconds)
        pipelines = self.pipelines(train, crop_ratio)
        crop = pipelines["image"][0]  # the decoder, which crops (taken before FFCV's PipelineSpec pops it off the list)
        stored, indices = self.resolve(source)  # subset counts in the split, indices in the stored file
        subset = np.arange(len(self.labels(source))) if subset is None else np.asarray(subset)
        subset = subset if indices is None else indices[subset]
        path = self._path(stored)
        try:
            loader = Loader(
                path,
                batch_size=batch_size or self.batch_size_per_process,
                num_workers=self.num_workers,
                os_cache=self.os_cache,
                order=OrderOption.SEQUENTIAL,  # replaced by this process's shard below
                drop_last=train,
                pipelines=pipelines,
            )
        except Exception as err:
            raise BetonError(f"Could not open {path} with FFCV ({type(err).__name__}: {err}). {self.make_hint}") from err
        order = _EpochShards(lambda epoch: subset if local else subset[self.shard(len(subset), train, epoch)])
        install_ffcv_order(loader, order)

        def before_epoch(epoch: int, skip: int) -> None:
            set_ffcv_epoch(loader, epoch)
            order.skip = skip
            if train and self.augment:  # FFCV sizes its buffers at the start of every pass
                res = self.train_resolution(epoch)
                crop.output_size = (res, res)

        return EpochAlignedLoader(_Watched(loader, path, self), self, before_epoch, train)


class _Watched:
    """An FFCV loader whose passes stop with a ``DataError`` instead of hanging (``compat.ffcv_batches``)."""

    def __init__(self, loader, path: str, data: FFCVImageDataModule):
        self.loader, self.path, self.data = loader, path, data

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        return ffcv_batches(self.loader, self.data.batch_timeout, self._error)

    def _error(self, batch: int, failure: Optional[BaseException], where: Optional[tuple[str, object]]) -> DataError:
        stage = f"the {where[0]} pipeline's {type(where[1]).__name__}" if where else "an unknown stage"
        place = f"batch {batch} of this pass over {self.path} (epoch {self.data.current_epoch}, rank {self.data.rank})"
        if failure is not None:
            return DataError(
                f"FFCV's decoding stopped at {place}: {stage} raised {type(failure).__name__}. The run stops here instead "
                f"of waiting for the batch; checkpoints and logs written so far are kept. Fix that stage (or the file), then "
                f"resume with --ckpt_path=last. {type(failure).__name__}: {failure}")
        return DataError(
            f"No batch from FFCV within {self.data.batch_timeout:g} s at {place}: its decoding thread is still in "
            f"{stage}. The run stops here instead of waiting for ever; checkpoints and logs written so far are kept. If "
            f"batches are this slow (slow storage, a large first batch), raise data.init_args.batch_timeout.")
