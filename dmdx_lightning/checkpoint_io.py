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

from lightning.pytorch.utilities import rank_zero_warn

from dmdx_lightning.atomic import atomic_path
from dmdx_lightning.checksums import (FOLDER_MANIFEST, CorruptCheckpointError, HashingWriter, read_manifest, record,
                                      verify_file)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with atomic local writes, sha256 checksums and ``weights_only=True`` loads.

    Use it with ``trainer.plugins: dmdx_lightning.checkpoint_io.AtomicCheckpointIO``. Remote
    paths (``s3://`` ...) fall back to Lightning's writer, whose object stores are atomic per object.

    Args:
        fallback_to_previous: when the checkpoint asked for is damaged (its sha256 is not the one
            recorded when it was written, :mod:`dmdx_lightning.checksums`), load the newest intact
            checkpoint of the same folder instead, with a warning naming both; ``False`` stops with
            an error naming the file.
    """

    def __init__(self, fallback_to_previous: bool = False) -> None:
        super().__init__()
        self.fallback_to_previous = fallback_to_previous

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        target = Path(path)
        manifest = target.parent / FOLDER_MANIFEST
        previous = read_manifest(manifest).get(target.name)
        record(manifest, target.name, None)  # the entry of the file being replaced (last.ckpt) goes first
        hashing = None
        try:
            with atomic_path(target) as tmp, open(tmp, "wb") as f:
                hashing = HashingWriter(f)
                torch.save(checkpoint, hashing)
                f.flush()
                os.fsync(f.fileno())
        except BaseException as e:
            if previous is not None:  # the file it would have replaced is still there: keep checking it
                record(manifest, target.name, previous)
            error = hashing.error if hashing is not None and hashing.error is not None else e
            if isinstance(error, OSError):
                raise OSError(error.errno, f"could not write checkpoint {target}: {error.strerror or error}; nothing "
                              "of it was kept and the checkpoints written before it are intact (free space or "
                              "move the checkpoint folder, then resume from the last one)") from e
            raise
        # recorded after the rename: a crash in between leaves a file without an entry (loaded
        # unverified), never an entry that does not match its file
        record(manifest, target.name, hashing.sha256.hexdigest())
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
        if "://" not in str(path):
            path = self._intact(Path(path))
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)

    def _intact(self, path: Path) -> Path:
        """``path`` if it matches its checksum; else (``fallback_to_previous``) the newest intact
        checkpoint beside it, or the error naming the damaged file."""
        try:
            verify_file(path)
            return path
        except CorruptCheckpointError as damaged:
            if not self.fallback_to_previous:
                raise
            others = sorted((p for p in path.parent.glob("*.ckpt") if p != path and p.is_file()),
                            key=lambda p: p.stat().st_mtime, reverse=True)
            for other in others:
                try:
                    verify_file(other)
                except CorruptCheckpointError:
                    continue
                rank_zero_warn(f"{damaged} Loading the newest intact checkpoint beside it instead: {other}")
                return other
            raise

    def remove_checkpoint(self, path: _PATH) -> None:
        super().remove_checkpoint(path)
        if "://" not in str(path):
            record(Path(path).parent / FOLDER_MANIFEST, Path(path).name, None)
