"""Files that are either complete or absent: the one way this package writes a file.

A crash, a kill (SLURM preemption) or a full disk during a write must never leave half a file
under the final name, where the next run (a resume, a shard scan, a report) would read it. Every
writer goes through :func:`atomic_path`: write to a hidden name in the target's own folder (the
same filesystem, so the rename is atomic on POSIX), then ``os.replace`` it over the target; on any
error the partial file is removed. The hidden name (``.partial-<uuid>.tmp``) matches none of the
patterns readers look for (``last*.ckpt``, ``hpc_ckpt_*``, ``shard-*.safetensors``, ``*.json``).
"""

from __future__ import annotations

import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def partial_name(target: Path) -> Path:
    """Where ``target`` is written before the rename (same folder, hidden, unique per writer)."""
    return target.with_name(f".partial-{uuid.uuid4().hex}.tmp")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """``with atomic_path(p) as tmp: write(tmp)``: ``p`` appears complete when the block ends, or
    not at all (nor does ``tmp``) when it raises. Creates the parent folder."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_name(target)
    try:
        yield tmp
        os.replace(tmp, target)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.filename not in (None, str(tmp)):
            raise
        # a write error names no file (or the hidden one): name the file the reader would look for
        raise OSError(e.errno, e.strerror or str(e), str(target)) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, data: Any, indent: int = 2) -> None:
    write_text_atomic(path, json.dumps(data, indent=indent) + "\n")
