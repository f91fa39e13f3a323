"""The data side: where images come from, how they are written to FFCV .beton files, and the data
modules that load them (FFCV, or torchvision as a fallback), including the embedded shapes data set."""

from .beton import BetonError, WriterSettings, beton_info, beton_labels, write_split
from .distributed import cpus_per_process, epoch_shard
from .ffcv_datamodule import FFCVImageDataModule
from .folder_datamodule import ImageFolderDataModule
from .image_data import DataError, ImageClassificationData, ProgressiveResolution, block_permutation, shuffle_blocks
from .shapes import EmbeddedShapesDataModule

__all__ = [
    "BetonError", "DataError", "WriterSettings", "beton_info", "beton_labels", "write_split", "epoch_shard", "cpus_per_process",
    "ImageClassificationData", "ProgressiveResolution", "FFCVImageDataModule", "ImageFolderDataModule",
    "EmbeddedShapesDataModule", "block_permutation", "shuffle_blocks",
]
