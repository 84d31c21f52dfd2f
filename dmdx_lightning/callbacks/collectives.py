"""Say which rank died when a collective fails, instead of a transport error that names none.

When one rank of a multi-process run dies (the kernel's OOM killer, a node failure, a crash) or
hangs, the others fail inside their next collective with the transport's error: gloo's
"Connection reset by peer" or "Timed out", NCCL's watchdog timeout. Those name a socket, not a
rank, and not what to do. On such an error this callback prints one paragraph on the rank that
saw it: the ranks it launched that have exited and how (Lightning's launcher starts local ranks
1..N-1 as children of rank 0, and its observer then stops the whole job, so nothing hangs), or,
where the ranks were started by SLURM or torchrun, that another rank died or stopped answering;
and how to resume. A rank that hangs without dying is caught by the collective timeout
(``trainer.strategy.init_args.timeout``; Lightning's default is 30 minutes).
"""

from __future__ import annotations

import signal
import sys
import time

import lightning.pytorch as pl

#: what the transports say when a peer is gone or silent (gloo, NCCL, torch.distributed)
_PEER_FAILURES = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Timed out",
                  "timed out", "NCCL error", "Watchdog caught collective operation timeout",
                  "DistBackendError", "ProcessGroupGloo", "ProcessGroupNCCL")


def _is_peer_failure(exception: BaseException) -> bool:
    text = f"{type(exception).__name__}: {exception}"
    return any(marker in text for marker in _PEER_FAILURES)


def _how(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


class CollectiveFailureReport(pl.Callback):
    """On a failed collective, name the rank that died (where this process launched it) and how to
    resume. ``dmdx`` adds it to every run; it does nothing on one process."""

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if trainer.world_size < 2 or not _is_peer_failure(exception):
            return
        children = getattr(trainer.strategy.launcher, "procs", None) or []
        # the peer's sockets close while it is being torn down, a moment before it has exited
        deadline = time.monotonic() + 3.0
        while children and not any(proc.poll() is not None for proc in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        dead = {rank: proc.returncode for rank, proc in enumerate(children, start=1) if proc.returncode is not None}
        if dead:
            cause = "; ".join(f"rank {rank} {_how(code)}" for rank, code in dead.items())
        else:
            cause = ("another rank died or stopped answering (read the other ranks' output; a rank that hangs is "
                     "caught after trainer.strategy.init_args.timeout)")
        first_line = str(exception).strip().splitlines()[0][:200] if str(exception).strip() else ""
        print(f"dmdx: rank {trainer.global_rank}: a collective failed at iteration {trainer.global_step}: {cause}. "
              f"The whole job stops. Resume from the last checkpoint with `--ckpt_path last` (under SLURM, the "
              f"requeued job does so itself). Transport error: {type(exception).__name__}: {first_line}",
              file=sys.stderr, flush=True)
