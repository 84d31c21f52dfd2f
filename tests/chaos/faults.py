"""Faults the chaos tests inject into real runs (callbacks named on the `dmdx fit` command line)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch


def wrap_player_step(pl_module, player: str, wrapper) -> None:
    """Replace ``player``'s step by ``wrapper(step, batch, cond, ctx)`` in this process."""
    step = pl_module.players[player].step
    pl_module.players[player].step = lambda batch, cond, ctx: wrapper(step, batch, cond, ctx)


def on_checkpoint_write(trainer, iteration: int, after_bytes: int, act) -> None:
    """Call ``act()`` once the checkpoint write of ``iteration`` (AtomicCheckpointIO's writer) has
    passed ``after_bytes``; the write goes on unless ``act`` ends the process."""
    from dmdx_lightning import checksums

    write = checksums.HashingWriter.write

    def counted(writer, data):
        before = getattr(writer, "written", 0)
        writer.written = before + len(data)
        if trainer.global_step == iteration and before <= after_bytes < writer.written:
            act()
        return write(writer, data)

    checksums.HashingWriter.write = counted


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

        def poisoned(step, batch, cond, ctx):
            out = step(batch, cond, ctx)
            iteration = int(pl_module.iteration)
            if iteration >= self.first and (self.last < 0 or iteration <= self.last):
                out["loss"] = out["loss"] * torch.tensor(float("nan"), device=out["loss"].device)
            return out

        wrap_player_step(pl_module, self.player, poisoned)


class KillRank(pl.Callback):
    """SIGKILL global rank ``rank`` (no cleanup, as the kernel's OOM killer or a node failure) when
    iteration ``iteration`` starts.

    Args:
        rank: the global rank killed.
        iteration: the iteration (``trainer.global_step``) at whose start it dies.
        first_attempt_only: only in a job's first attempt (not once SLURM has requeued it).
    """

    def __init__(self, rank: int = 1, iteration: int = 3, first_attempt_only: bool = False) -> None:
        self.rank, self.iteration, self.first_attempt_only = rank, iteration, first_attempt_only

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import os

        if self.first_attempt_only and int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0:
            return  # a requeued SLURM job runs on
        if trainer.global_rank == self.rank and trainer.global_step == self.iteration:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)


class KillDuringSave(pl.Callback):
    """SIGKILL this process half-way through writing the checkpoint of iteration ``iteration``
    (AtomicCheckpointIO's writer), as a preemption without warning or a power loss would.

    Args:
        iteration: the ``trainer.global_step`` whose checkpoint is cut.
        after_bytes: how far the write gets.
    """

    def __init__(self, iteration: int = 2, after_bytes: int = 4096) -> None:
        self.iteration, self.after_bytes = iteration, after_bytes

    def on_train_start(self, trainer, pl_module) -> None:
        import os
        import signal

        on_checkpoint_write(trainer, self.iteration, self.after_bytes, lambda: os.kill(os.getpid(), signal.SIGKILL))


class HangRank(pl.Callback):
    """Make global rank ``rank`` stop answering (alive, but never reaching its next collective: a
    deadlock, a stuck filesystem) inside ``player``'s step of iteration ``iteration``.

    Args:
        rank: the global rank that hangs.
        iteration: the iteration (``trainer.global_step`` when it starts) in which it hangs.
        player: the player whose step never returns.
    """

    def __init__(self, rank: int = 1, iteration: int = 3, player: str = "generator") -> None:
        self.rank, self.iteration, self.player = rank, iteration, player

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_rank != self.rank:
            return

        def stuck(step, batch, cond, ctx):
            if int(pl_module.iteration) == self.iteration:
                import time

                time.sleep(3600)
            return step(batch, cond, ctx)

        wrap_player_step(pl_module, self.player, stuck)


class SignalDuringSave(pl.Callback):
    """Send ``signal`` to this process half-way through writing the checkpoint of iteration
    ``iteration`` (AtomicCheckpointIO's writer), as ``scancel`` or SLURM's preemption warning
    landing mid-save would; the write goes on.

    Args:
        signal: the signal's name (``SIGTERM``, ``SIGUSR1``).
        iteration: the ``trainer.global_step`` whose checkpoint write it lands in.
        after_bytes: how far the write has got.
    """

    def __init__(self, signal: str = "SIGTERM", iteration: int = 2, after_bytes: int = 4096) -> None:
        self.signal, self.iteration, self.after_bytes = signal, iteration, after_bytes

    def on_train_start(self, trainer, pl_module) -> None:
        import os
        import signal

        signum = signal.Signals[self.signal]
        on_checkpoint_write(trainer, self.iteration, self.after_bytes, lambda: os.kill(os.getpid(), signum))


class SignalRank(pl.Callback):
    """Send ``signal`` to global rank ``rank`` alone, inside ``player``'s step of iteration
    ``iteration`` (the other ranks learn of it only through the run).

    Args:
        signal: the signal's name (``SIGTERM``, ``SIGUSR1``).
        rank: the global rank that gets it.
        iteration: the iteration (``trainer.global_step`` when it starts).
        player: the player in whose step it lands.
    """

    def __init__(self, signal: str = "SIGTERM", rank: int = 1, iteration: int = 2, player: str = "generator") -> None:
        self.signal, self.rank, self.iteration, self.player = signal, rank, iteration, player

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_rank != self.rank:
            return
        import os
        import signal

        signum = signal.Signals[self.signal]

        def signalled(step, batch, cond, ctx):
            if int(pl_module.iteration) == self.iteration:
                os.kill(os.getpid(), signum)
            return step(batch, cond, ctx)

        wrap_player_step(pl_module, self.player, signalled)


class KillDuringShardedSave(pl.Callback):
    """SIGKILL global rank ``rank`` once it has written its shards of the FSDP2 checkpoint of
    iteration ``iteration``, before the checkpoint is checksummed and renamed into place (the other
    ranks are still in the save).

    Args:
        rank: the global rank killed.
        iteration: the ``trainer.global_step`` whose checkpoint is cut.
    """

    def __init__(self, rank: int = 1, iteration: int = 2) -> None:
        self.rank, self.iteration = rank, iteration

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_rank != self.rank:
            return
        import os
        import signal

        import torch.distributed.checkpoint as dcp

        save, callback = dcp.save, self

        def cut(*args, **kwargs):
            result = save(*args, **kwargs)
            if trainer.global_step == callback.iteration:
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        dcp.save = cut
