"""Checkpoints that are never half-written.

Lightning writes through an fsspec transaction whose temporary file lives in the system temp folder;
committing it is a ``shutil.move``, which across file systems (node-local /tmp to a shared checkpoint
folder, the usual cluster layout) is a copy: a job killed, preempted or out of disk during that copy
leaves a truncated ``last.ckpt`` where a good one was. Here the temporary file sits beside the
target, is flushed to disk, and replaces it with one atomic ``os.replace``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

__all__ = ["AtomicCheckpointIO"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` for local paths, written to ``<name>.partial-<pid>`` then renamed."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if "://" in str(path):  # object stores have their own atomic uploads
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
        try:
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())  # on disk before it takes the real name
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
