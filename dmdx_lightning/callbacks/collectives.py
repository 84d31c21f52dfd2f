"""Say which rank died when a collective fails, instead of a transport error that names none.

When one rank of a multi-process run dies (the kernel's OOM killer, a node failure, a crash) or
hangs, the others fail inside their next collective with the transport's error: gloo's
"Connection reset by peer" or "Timed out", NCCL's watchdog timeout. Those name a socket, not a
rank, and not what to do. On such an error this callback prints one paragraph on the rank that
saw it: the ranks it launched that have exited and how (Lightning's launcher starts local ranks
1..N-1 as children of rank 0, and its observer then stops the whole job, so nothing hangs), or,
where the ranks were started by SLURM or torchrun, that another rank died or stopped answering;
and how to resume.

A rank that hangs without dying (a deadlock, a stuck filesystem, a GPU that stopped answering) is
caught by the collective timeout (``trainer.strategy.init_args.timeout``; Lightning's default is 30
minutes): its peers' collective raises a timeout. To name the silent rank, every rank records the
iteration it started in the job's key-value store (torch.distributed's TCPStore, served by rank 0's
process from its own thread, so it answers even while rank 0's Python is stuck), and each rank whose
collective timed out says so there; after a short grace the ranks that never said so are the ones
that stopped answering. Ranks this process launched that are still running are then stopped, so the
job ends instead of waiting on a rank that will never come back (under SLURM, ``srun
--kill-on-bad-exit`` does the same; under torchrun, its agent).
"""

from __future__ import annotations

import signal
import sys
import time
from datetime import timedelta

import lightning.pytorch as pl
import torch.distributed as dist

#: what the transports say when a collective waited longer than the timeout (gloo says "Timed out" from
#: the waiting side, "Application timeout caused pair closure" where the timeout closed a pair mid-transfer)
_TIMEOUTS = ("Timed out", "timed out", "Watchdog caught collective operation timeout",
             "Application timeout caused pair closure")

#: what the transports say when a peer is gone or silent (gloo, NCCL, torch.distributed)
_PEER_FAILURES = _TIMEOUTS + ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL error",
                              "DistBackendError", "ProcessGroupGloo", "ProcessGroupNCCL")

#: the store keys: the iteration each rank last started, and the ranks whose collective timed out
_STARTED, _TIMED_OUT = "dmdx/started/{rank}", "dmdx/timed_out/{rank}"


def _store():
    """The job's key-value store (``None`` outside a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError):
        return None


def _is_peer_failure(exception: BaseException) -> bool:
    text = f"{type(exception).__name__}: {exception}"
    return any(marker in text for marker in _PEER_FAILURES)


def _is_timeout(exception: BaseException) -> bool:
    return any(marker in str(exception) for marker in _TIMEOUTS)


def _how(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


class CollectiveFailureReport(pl.Callback):
    """On a failed collective, name the rank that died (where this process launched it) or stopped
    answering, and how to resume. ``dmdx`` adds it to every run; it does nothing on one process.

    Args:
        grace: seconds a rank whose collective timed out waits for its peers to say the same before
            naming the ones that did not.
    """

    def __init__(self, grace: float = 10.0) -> None:
        self.grace = grace

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module, batch, batch_idx) -> None:
        store = _store() if trainer.world_size > 1 else None
        if store is not None:  # one small message to rank 0's store per iteration
            store.set(_STARTED.format(rank=trainer.global_rank), str(trainer.global_step))

    def _silent_ranks(self, trainer: pl.Trainer) -> dict[int, str]:
        """The ranks that did not report a timed-out collective within ``grace`` seconds, with the
        iteration each last started (``?`` where unknown)."""
        store = _store()
        if store is None:
            return {}
        try:
            store.set(_TIMED_OUT.format(rank=trainer.global_rank), "1")
            others = [r for r in range(trainer.world_size) if r != trainer.global_rank]
            deadline = time.monotonic() + self.grace
            while time.monotonic() < deadline and not all(store.check([_TIMED_OUT.format(rank=r)]) for r in others):
                time.sleep(0.2)
            store.set_timeout(timedelta(seconds=2))
            silent = {}
            for r in others:
                if not store.check([_TIMED_OUT.format(rank=r)]):
                    key = _STARTED.format(rank=r)
                    silent[r] = store.get(key).decode() if store.check([key]) else "?"
            return silent
        except (RuntimeError, dist.DistStoreError):  # the store went with rank 0's process
            return {}

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if trainer.world_size < 2 or not _is_peer_failure(exception):
            return
        children = getattr(trainer.strategy.launcher, "procs", None) or []
        # the peer's sockets close while it is being torn down, a moment before it has exited
        deadline = time.monotonic() + 3.0
        while children and not any(proc.poll() is not None for proc in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        dead = {rank: proc.returncode for rank, proc in enumerate(children, start=1) if proc.returncode is not None}
        silent = {} if dead or not _is_timeout(exception) else self._silent_ranks(trainer)
        if dead:
            cause = "; ".join(f"rank {rank} {_how(code)}" for rank, code in dead.items())
        elif silent:
            cause = "; ".join(f"rank {rank} stopped answering (it started iteration {it} and never reached the "
                              f"collective its peers timed out in)" for rank, it in silent.items())
        else:
            cause = ("another rank died or stopped answering (read the other ranks' output; a rank that hangs is "
                     "caught after trainer.strategy.init_args.timeout)")
        first_line = str(exception).strip().splitlines()[0][:200] if str(exception).strip() else ""
        print(f"dmdx: rank {trainer.global_rank}: a collective failed at iteration {trainer.global_step}: {cause}. "
              f"The whole job stops. Resume from the last checkpoint with `--ckpt_path last` (under SLURM, the "
              f"requeued job does so itself). Transport error: {type(exception).__name__}: {first_line}",
              file=sys.stderr, flush=True)
        running = [proc for proc in children if proc.poll() is None]
        if running:  # a hung rank this process launched would keep the job (and its output pipes) alive
            for proc in running:
                proc.kill()
            print(f"dmdx: rank {trainer.global_rank}: stopped the {len(running)} rank(s) still running.",
                  file=sys.stderr, flush=True)
