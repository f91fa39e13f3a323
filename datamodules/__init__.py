"""The data side: FFCV .beton writing and loading, and the embedded shapes data set."""

from .beton import BetonError, beton_labels, write_beton
from .ffcv_datamodule import FFCVImageDataModule
from .shapes import EmbeddedShapesDataModule

__all__ = ["BetonError", "beton_labels", "write_beton", "FFCVImageDataModule", "EmbeddedShapesDataModule"]
