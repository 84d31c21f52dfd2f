"""Faults the chaos tests inject into real runs (callbacks named on the `dmdx fit` command line)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch


class InjectNaN(pl.Callback):
    """Make ``player``'s loss NaN on global rank ``rank`` at iterations ``from_iteration`` ..
    ``to_iteration`` (inclusive; ``-1``: to the end of the run).

    Args:
        player: the player whose loss turns NaN (``generator``, ``fake_score``, ``discriminator``).
        rank: the global rank it happens on.
        from_iteration, to_iteration: the iterations (``trainer.global_step`` when they start).
    """

    def __init__(self, player: str = "fake_score", rank: int = 1, from_iteration: int = 2,
                 to_iteration: int = 2) -> None:
        self.player, self.rank = player, rank
        self.first, self.last = from_iteration, to_iteration

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_rank != self.rank:
            return
        player = pl_module.players[self.player]
        step = player.step

        def poisoned(batch, cond, ctx):
            out = step(batch, cond, ctx)
            iteration = int(pl_module.iteration)
            if iteration >= self.first and (self.last < 0 or iteration <= self.last):
                out["loss"] = out["loss"] * torch.tensor(float("nan"), device=out["loss"].device)
            return out

        player.step = poisoned


class KillRank(pl.Callback):
    """SIGKILL global rank ``rank`` (no cleanup, as the kernel's OOM killer or a node failure) when
    iteration ``iteration`` starts.

    Args:
        rank: the global rank killed.
        iteration: the iteration (``trainer.global_step``) at whose start it dies.
    """

    def __init__(self, rank: int = 1, iteration: int = 3) -> None:
        self.rank, self.iteration = rank, iteration

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.iteration:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
