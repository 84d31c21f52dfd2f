"""What can fail late, checked at setup: before the first step, on every rank, with ranks agreeing.

:mod:`dmdx_lightning.preflight` checks what a config alone shows, before anything is built. Some
failures need the built run to be foreseen, and would otherwise stop it after it has trained: at
the first sample grid, the first validation or the first checkpoint. :class:`SetupChecks` (on in
every ``dmdx`` Trainer verb: ``training_cli.DMDXCLI``'s ``trainer_defaults``) runs them in its
``setup`` hook, once the teacher is built and before any step:

- the teacher's :meth:`~dmdx_lightning.teachers.base.Teacher.check_setup` (e.g. CogVideoX's VAE
  tiling against the video size, read from the loaded VAE);
- each callback's ``check_setup(trainer, module, stage)`` where it has one (the validation metrics:
  a scoring network the run will load but cannot, offline);
- ``fit``: free disk for at least one checkpoint in every checkpoint folder (:func:`checkpoint_bytes`).

Nothing is loaded twice: the checks read what is built. Under DDP / FSDP every rank checks (a disk,
a cache may be node-local) and the outcomes are gathered, so that all ranks stop with the same
message or none does (a rank stopping alone would leave the others waiting in a collective).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn

from dmdx_lightning.errors import SetupError

__all__ = ["SetupChecks", "checkpoint_bytes"]

GiB = 1024 ** 3


def checkpoint_bytes(module: torch.nn.Module, optimizer_states: int = 2) -> int:
    """Bytes one checkpoint of ``module`` takes, estimated from its trainable state: the parameters
    that require grad, once as weights and ``optimizer_states`` times more (AdamW's two moments, of
    the parameter's dtype), plus every persistent buffer (EMA shadows, counters; what
    ``DistillationModule.checkpoint_keys`` saves). Counted by dtype (``numel * element_size``); a
    parameter that is an FSDP2 shard (a DTensor) counts its whole size (``numel`` is the global one),
    a meta tensor (FSDP2's role copies before they are filled) its size too."""
    trainable = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    buffers = 0
    for sub in module.modules():
        for name, buf in sub._buffers.items():
            if buf is not None and name not in sub._non_persistent_buffers_set:
                buffers += buf.numel() * buf.element_size()
    return trainable * (1 + optimizer_states) + buffers


class SetupChecks(pl.Callback):
    """Checks at setup that need the built module and trainer (see the module docstring).

    Args:
        min_checkpoints: refuse a ``fit`` whose checkpoint folder has room for fewer checkpoints.
        warn_checkpoints: warn below this many (an atomic save holds the previous checkpoint while it
            writes the next, and ``save_top_k`` keeps several).
    """

    def __init__(self, min_checkpoints: int = 1, warn_checkpoints: int = 3) -> None:
        self.min_checkpoints, self.warn_checkpoints = min_checkpoints, warn_checkpoints

    def setup(self, trainer: pl.Trainer, module: pl.LightningModule, stage: str) -> None:
        error, warnings = None, []
        try:
            teacher = getattr(module, "teacher", None)
            if hasattr(teacher, "check_setup"):
                teacher.check_setup()
            for callback in trainer.callbacks:
                if callback is not self and callable(getattr(callback, "check_setup", None)):
                    callback.check_setup(trainer, module, stage)
            if stage == "fit":
                warnings = self.check_disk(trainer, module)
        except Exception as e:  # any failure, ours or a bug, must reach every rank (see _agree)
            error = e
        error, warnings = _agree(trainer, error, warnings)
        for text in warnings:
            rank_zero_warn(text, category=UserWarning)
        if error is not None:
            raise error

    def check_disk(self, trainer: pl.Trainer, module: pl.LightningModule) -> list[str]:
        """Room for checkpoints in every checkpoint callback's folder: a :class:`SetupError` below
        ``min_checkpoints``, a warning (returned) below ``warn_checkpoints``."""
        warnings, seen = [], set()
        for callback in trainer.checkpoint_callbacks:
            if not isinstance(callback, ModelCheckpoint):
                continue
            # dirpath None: Lightning puts it under the root's log folder at its own setup, later
            folder = Path(callback.dirpath or trainer.default_root_dir).expanduser().absolute()
            if folder in seen:
                continue
            seen.add(folder)
            weights_only = getattr(callback, "save_weights_only", False)
            needed = checkpoint_bytes(module, optimizer_states=0 if weights_only else 2)
            free = shutil.disk_usage(_existing(folder)).free
            what = ("the trainable state" if weights_only else
                    "the trainable weights and AdamW's two moments of each, plus the persistent buffers")
            where = (f"checkpoint folder {folder} (the ModelCheckpoint's dirpath in trainer.callbacks; unset, it is "
                     "<trainer.default_root_dir>/checkpoints)")
            if free < self.min_checkpoints * needed:
                raise SetupError(f"{where}: {size(free)} free on its disk, but one checkpoint of this run takes "
                                 f"about {size(needed)} ({what}). Free space there, or set the ModelCheckpoint's "
                                 "dirpath (or trainer.default_root_dir) to a disk with room.")
            if free < self.warn_checkpoints * needed:
                warnings.append(f"{where}: {size(free)} free, room for {int(free // max(needed, 1))} "
                                f"checkpoint(s) of about {size(needed)}: a save writes the next one beside "
                                "the last (and save_top_k keeps several), so the run may stop at a later save. "
                                "Free space there or move the folder to a larger disk.")
        return warnings


def size(nbytes: float) -> str:
    """Bytes in GiB, or in a smaller unit below a tenth of one (a small model's checkpoint would
    read 0.00 GiB)."""
    for unit, scale in (("GiB", GiB), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if nbytes >= scale / 10:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{int(nbytes)} bytes"


def _existing(folder: Path) -> Path:
    """``folder`` or its nearest existing parent (the run creates the folder at its first save)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _agree(trainer: pl.Trainer, error: Exception | None, warnings: list[str]) -> tuple[Exception | None, list[str]]:
    """Every rank's outcome, so that all ranks stop (with their own error, or the first failing
    rank's message) or none does: a rank that raised alone would leave the others waiting in the
    next collective. Warnings: each distinct one once."""
    if trainer.world_size <= 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return error, warnings
    outcomes: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(outcomes, (None if error is None else str(error), warnings))
    if error is None:
        failed = next(((rank, text) for rank, (text, _) in enumerate(outcomes) if text is not None), None)
        if failed is not None:
            error = SetupError(f"rank {failed[0]}: {failed[1]}")
    return error, list(dict.fromkeys(w for _, ws in outcomes for w in ws))
