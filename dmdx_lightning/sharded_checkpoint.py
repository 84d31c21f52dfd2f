"""Reading a sharded checkpoint (a torch.distributed.checkpoint folder) in one process.

:class:`~dmdx_lightning.strategies.FSDP2Strategy` writes a checkpoint as a folder: one ``.distcp``
file per rank, the index ``.metadata``, and Lightning's ``meta.pt`` (everything that is not a
tensor of the model or an optimizer: loops, schedulers, our ``dmdx`` entry). ``init_from``,
``dmdx export`` and ``dmdx sample`` read the student from it here, without a process group and
without reading the fake score, the heads or the optimizer states.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

#: Lightning's name for the non-tensor part of a sharded checkpoint
METADATA_FILE = "meta.pt"


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a checkpoint folder (its index and Lightning's metadata both present)."""
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file() and (path / METADATA_FILE).is_file()


def is_checkpoint(path: str | Path) -> bool:
    """A single-file checkpoint or a checkpoint folder."""
    return Path(path).is_file() or is_sharded_checkpoint(path)


def read_sharded_checkpoint(path: str | Path, keys: Iterable[str]) -> dict:
    """The checkpoint folder ``path`` shaped like a single-file checkpoint: its metadata, and under
    ``"state_dict"`` the model tensors named in ``keys`` that it holds (whole, on the CPU)."""
    import torch
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    checkpoint = torch.load(path / METADATA_FILE, map_location="cpu", weights_only=True)
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    state = {}
    for key in keys:
        entry = saved.get(f"state_dict.{key}")
        if entry is not None:
            state[key] = torch.empty(entry.size, dtype=entry.properties.dtype)
    if state:
        dcp.load({"state_dict": state}, checkpoint_id=path, no_dist=True)
    checkpoint["state_dict"] = state
    return checkpoint
