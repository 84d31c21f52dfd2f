"""Checkpoints carry sha256 checksums, verified when they are read: a flipped byte is an error
that names the file, never weights that load silently wrong.

A bit flip on disk or in transfer, or a file truncated by a copy tool, can leave a checkpoint that
``torch.load`` still reads (its zip reader does not check CRCs of tensor data) and that trains on
from wrong weights. Writers record the sha256 of what they wrote (computed while writing, no
second read) in a manifest beside it; readers verify a file against its manifest entry before
loading it. The manifest of a folder of single-file checkpoints is ``.checksums.json`` in that
folder (hidden, and without ``hpc_ckpt_`` in its name, which Lightning's SLURM resume would parse
as a version); a sharded checkpoint folder holds its own ``checksums.json``. A file without an
entry (written before this existed, or by another tool) loads unverified.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import BinaryIO

from dmdx_lightning.atomic import write_json_atomic

#: the manifest of a folder of single-file checkpoints
FOLDER_MANIFEST = ".checksums.json"
#: the manifest inside a sharded checkpoint folder
SHARDED_MANIFEST = "checksums.json"


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file whose bytes are not the ones written."""


class HashingWriter:
    """A binary file wrapper that hashes what is written through it (``torch.save`` writes here)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.sha256 = f, hashlib.sha256()
        #: the first error of the file system (torch's zip writer replaces it with its own "unexpected
        #: pos" error, which says nothing of a full disk): the saver raises this one instead
        self.error: OSError | None = None

    def write(self, data) -> int:
        self.sha256.update(data)
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()


def sha256_file(path: str | Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(path: Path) -> dict[str, str]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: the files load unverified, as before checksums


def record(manifest: Path, name: str, digest: str | None) -> None:
    """Set (``digest``) or drop (``None``) ``name``'s entry in ``manifest``, atomically."""
    entries = read_manifest(manifest)
    if digest is None:
        entries.pop(name, None)
    else:
        entries[name] = digest
    write_json_atomic(manifest, entries)


def verify_file(path: str | Path, manifest: Path | None = None) -> None:
    """Raise :class:`CorruptCheckpointError` if ``path`` has a manifest entry its bytes do not match."""
    path = Path(path)
    manifest = manifest or path.parent / FOLDER_MANIFEST
    expected = read_manifest(manifest).get(path.name)
    if expected is None:
        return
    found = sha256_file(path)
    if found != expected:
        raise CorruptCheckpointError(
            f"checkpoint {path} is damaged: its sha256 is {found[:16]}..., {manifest.name} recorded {expected[:16]}... "
            f"when it was written (a flipped or lost byte on disk or in a copy). Resume from an earlier checkpoint "
            f"(--ckpt_path), or set trainer.plugins' AtomicCheckpointIO fallback_to_previous: true to do so by itself")


def verify_sharded(folder: Path, rank: int = 0, world: int = 1) -> None:
    """Verify this rank's share (every ``world``-th file) of a sharded checkpoint folder's files."""
    entries = read_manifest(folder / SHARDED_MANIFEST)
    for i, name in enumerate(sorted(entries)):
        if i % world == rank and sha256_file(folder / name) != entries[name]:
            raise CorruptCheckpointError(
                f"checkpoint {folder} is damaged: {name} does not match its sha256 in {SHARDED_MANIFEST} (a flipped "
                f"or lost byte on disk or in a copy). Resume from an earlier checkpoint (--ckpt_path)")
