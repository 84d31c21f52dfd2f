"""Signals that end a run early, handled at an iteration boundary: SLURM's preemption warning
(checkpoint, requeue, stop) and SIGTERM (checkpoint, stop), so the run resumes exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn


class RequeueOnSignal(pl.Callback):
    """On SLURM's warning signal, save an HPC checkpoint at the end of the current iteration,
    requeue the job and stop; the requeued job resumes from that checkpoint exactly.

    Lightning's own SLURM handler (``SLURMEnvironment(auto_requeue=True)``, the default) writes the
    checkpoint INSIDE the signal handler, i.e. wherever the signal lands: between two players'
    updates of one iteration (so the resumed run differs), with one player's optimizer toggled
    (other players' parameters then look frozen and are left out of our checkpoints), or while a
    rank waits in a DDP collective (ranks can deadlock). This callback replaces that handler (in
    ``on_train_start``, after Lightning registered its own) by one that only raises a flag. At
    the end of each batch the ranks agree whether any of them got the signal (one all-reduce of a
    boolean); if so every rank takes part in saving ``<default_root_dir>/hpc_ckpt_<n>.ckpt`` - the
    file Lightning resumes from by itself when the requeued job starts under SLURM - then global
    rank 0 runs ``scontrol requeue $SLURM_JOB_ID`` and training stops.

    The requeue is active only when Lightning's cluster environment is SLURM with ``auto_requeue``
    on (it is whenever the job runs under ``srun``); it listens for that environment's
    ``requeue_signal`` (``SIGUSR1``, sent by ``#SBATCH --signal=SIGUSR1@90``).

    SIGTERM (``scancel``, a preemption without warning, ``kill``, a container stopping) is handled
    the same way on every run, SLURM or not: Lightning's own SIGTERM handler runs a broadcast INSIDE
    the handler (a collective that can cross the one a rank is in) and ends the run wherever the
    signal landed; here the handler raises a flag, the ranks agree at the end of the iteration, every
    rank joins saving ``<default_root_dir>/hpc_ckpt_<n>.ckpt``, and the run stops, without a requeue;
    ``dmdx fit`` then exits with status 143 (128 + SIGTERM) so that scripts see the run did not
    finish. A signal that lands while a checkpoint is being written only sets the flag: that write
    completes. ``dmdx`` adds this callback to every run.

    Args:
        requeue: run ``scontrol requeue`` after saving on SLURM's signal (``False``: save and stop only).
    """

    def __init__(self, requeue: bool = True) -> None:
        self.requeue = requeue
        self.signal: int | None = None
        self._received: set[int] = set()
        self._previous: dict[int, object] = {}
        #: the signal that stopped the run (``None``: it was not stopped by one)
        self.stopped_by: int | None = None

    @staticmethod
    def _slurm_signal(trainer: pl.Trainer) -> int | None:
        env = trainer._accelerator_connector.cluster_environment
        if isinstance(env, SLURMEnvironment) and env.auto_requeue:
            return env.requeue_signal
        return None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.signal = self._slurm_signal(trainer)
        self._received, self.stopped_by = set(), None
        for signum in {self.signal, signal.SIGTERM} - {None}:
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        # only a flag: the state is saved where every player of the iteration has stepped
        self._received.add(signum)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        # one all-reduce a iteration tells every rank whether any rank got either signal
        received = torch.tensor([signal.SIGTERM in self._received, self.signal in self._received],
                                dtype=torch.float32, device=trainer.strategy.root_device)
        received = trainer.strategy.reduce(received, reduce_op="sum")
        terminate, requeue = bool(received[0] > 0), self.signal is not None and bool(received[1] > 0)
        if not (terminate or requeue):
            return
        signum = signal.SIGTERM if terminate else self.signal
        path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
        then = "then requeueing" if not terminate else "then stopping (no requeue)"
        rank_zero_info(f"Signal {signal.Signals(signum).name}: saving {path} at global step "
                       f"{trainer.global_step}, {then}")
        trainer.save_checkpoint(path)
        if not terminate and self.requeue and trainer.is_global_zero:
            self._requeue(path)
        if terminate and trainer.is_global_zero:
            print(f"dmdx: stopped by SIGTERM at iteration {trainer.global_step}; the state is saved in {path}. "
                  f"Resume with `--ckpt_path {path}` (under SLURM a requeued job finds it by itself).",
                  file=sys.stderr, flush=True)
        trainer.should_stop = True
        self.stopped_by = signum
        self._received.clear()

    @staticmethod
    def _requeue(path) -> None:
        job = os.environ.get("SLURM_JOB_ID")
        if array := os.environ.get("SLURM_ARRAY_JOB_ID"):
            job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        try:
            result = subprocess.run(["scontrol", "requeue", str(job)], capture_output=True, text=True)
        except FileNotFoundError:
            rank_zero_warn(f"no scontrol on this node: job {job} is not requeued; resubmit it to resume from {path}")
            return
        if result.returncode != 0:
            rank_zero_warn(f"scontrol requeue {job} failed ({result.returncode}): {result.stderr.strip()}; "
                           f"resubmit the job to resume from {path}")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for signum, previous in self._previous.items():
            if previous is not None:
                signal.signal(signum, previous)
        self._previous = {}
