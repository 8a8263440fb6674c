"""Lightning layer: drives the pure-PyTorch model and data components."""

from .datamodule import MultiTaskDataModule

__all__ = ["MultiTaskDataModule"]
