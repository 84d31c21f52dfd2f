"""Randomness that does not depend on the run: seeded noise, and the states of exact resume.

:func:`fixed_noise`: noise that is a function of its seeds alone (evaluation grids and metrics,
ODE-pair start noise), identical on every machine, world size and batch split.
:func:`capture_rng` is what a checkpoint stores (``checkpoint["dmdx"]["rng"]``);
:func:`restore_rng` applies it just before the first resumed step, and gives every rank of a
multi-process run its own noise stream.
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor


def fixed_noise(shape: Sequence[int], seeds: Sequence[int]) -> Tensor:
    """``(len(seeds), *shape[1:])`` standard normal noise, row ``i`` drawn on the CPU from seed
    ``seeds[i]`` alone."""
    return torch.stack([torch.randn(tuple(shape[1:]), generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def capture_rng(all_gather: Callable[[Tensor], Tensor] | None = None, device: torch.device | None = None) -> dict:
    """torch, CUDA, numpy and Python states of this process.

    Args:
        all_gather: with several processes, their gather (``LightningModule.all_gather``; every
            rank must call this then): every rank draws its own noise (see :func:`restore_rng`), so
            every rank's torch (and CUDA) state is saved too, rows indexed by global rank.
        device: the device the gather runs on (this rank's).
    """
    rng = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": _numpy_state(),
        "python": random.getstate(),
    }
    if all_gather is not None:
        rng["torch_per_rank"] = all_gather(torch.get_rng_state().to(device)).cpu()
        if device.type == "cuda":
            rng["cuda_per_rank"] = all_gather(torch.cuda.get_rng_state(device).to(device)).cpu()
    return rng


def restore_rng(rng: dict | None, rank: int, world: int, device: torch.device) -> None:
    """Apply a :func:`capture_rng` state (``None``: a fresh run), then split noise streams by rank.

    ``seed_everything`` gives every rank the same seed, so all ranks would draw the same noise and
    timesteps for their different prompts: on a fresh run (or a resume without this world size's
    per-rank states) rank ``r > 0`` reseeds torch from the global seed and ``r``.
    """
    if rng:
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        _set_numpy_state(rng["numpy"])
        random.setstate(rng["python"])
        per_rank = rng.get("torch_per_rank")
        if per_rank is not None and len(per_rank) == world:
            torch.set_rng_state(per_rank[rank].clone())  # clone: a row view segfaults set_rng_state
            if "cuda_per_rank" in rng and device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda_per_rank"][rank].clone(), device)
            return
        if world > 1:
            rank_zero_warn(f"the checkpoint holds RNG states for {len(per_rank) if per_rank is not None else 1} "
                           f"rank(s), this run has {world}: per-rank noise streams restart (resume not exact)")
    if world > 1 and rank > 0:
        torch.manual_seed(torch.initial_seed() + 1_000_003 * rank)


def _numpy_state() -> dict:
    # tensors and plain types only: checkpoints are read with weights_only=True
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def _set_numpy_state(state: dict) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["pos"], state["has_gauss"], state["gauss"]))
