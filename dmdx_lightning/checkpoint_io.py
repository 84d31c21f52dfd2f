"""Checkpoint files that are either complete or absent, and that load without unpickling code.

Lightning's ``TorchCheckpointIO`` serialises to memory, then writes through an fsspec transaction
whose local temporary file lives in the SYSTEM temp folder (``tempfile.mkstemp()``), and moves it
into place with ``shutil.move``. On a cluster the checkpoint folder (Lustre, NFS, GPFS) is
another filesystem than the node's ``/tmp``, so that move is a copy: a job killed during it
leaves a truncated ``last.ckpt`` / ``hpc_ckpt_<n>.ckpt`` that the next resume picks up. It also
needs a second full copy of the checkpoint in RAM and in ``/tmp``.

:class:`AtomicCheckpointIO` writes next to the target under a hidden name that neither
``ModelCheckpoint`` (``last*.ckpt``), Lightning's SLURM resume (any name containing
``hpc_ckpt_``) nor ``--ckpt_path last`` can match, flushes it to disk and renames it over the
target with ``os.replace`` (atomic within one filesystem, POSIX). Loading always uses
``torch.load(weights_only=True)``: a checkpoint can hold tensors and plain Python types only,
never pickled objects that would run code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from dmdx_lightning.atomic import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with atomic local writes and ``weights_only=True`` loads.

    Use it with ``trainer.plugins: dmdx_lightning.checkpoint_io.AtomicCheckpointIO``. Remote
    paths (``s3://`` ...) fall back to Lightning's writer, whose object stores are atomic per object.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        target = Path(path)
        with atomic_path(target) as tmp, open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        # make the rename itself durable (a power loss must not bring the old file back)
        try:
            fd = os.open(target.parent, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def load_checkpoint(self, path: _PATH, map_location: Callable | None = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        if weights_only is False:
            raise ValueError(f"{type(self).__name__} never unpickles objects (weights_only=False was asked "
                             f"for {path}); checkpoints of dmdx_lightning hold tensors and plain types only")
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)
