"""SLURM preemption that resumes exactly: checkpoint at a step boundary, requeue, stop."""

from __future__ import annotations

import os
import signal
import subprocess

import lightning.pytorch as pl
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

    Active only when Lightning's cluster environment is SLURM with ``auto_requeue`` on (it is
    whenever the job runs under ``srun``); it listens for that environment's ``requeue_signal``
    (``SIGUSR1``, sent by ``#SBATCH --signal=SIGUSR1@90``). ``dmdx`` adds it to every run.

    Args:
        requeue: run ``scontrol requeue`` after saving (``False``: save and stop only).
    """

    def __init__(self, requeue: bool = True) -> None:
        self.requeue = requeue
        self.signal: int | None = None
        self._received = False
        self._previous = None

    @staticmethod
    def _slurm_signal(trainer: pl.Trainer) -> int | None:
        env = trainer._accelerator_connector.cluster_environment
        if isinstance(env, SLURMEnvironment) and env.auto_requeue:
            return env.requeue_signal
        return None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.signal = self._slurm_signal(trainer)
        if self.signal is None:
            return
        self._received = False
        self._previous = signal.signal(self.signal, self._handle)

    def _handle(self, signum, frame) -> None:
        # only a flag: the state is saved where every player of the iteration has stepped
        self._received = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.signal is None:
            return
        if not trainer.strategy.reduce_boolean_decision(self._received, all=False):
            return
        path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
        rank_zero_info(f"Signal {signal.Signals(self.signal).name}: saving {path} at global step "
                       f"{trainer.global_step}, then requeueing")
        trainer.save_checkpoint(path)
        if self.requeue and trainer.is_global_zero:
            job = os.environ.get("SLURM_JOB_ID")
            if array := os.environ.get("SLURM_ARRAY_JOB_ID"):
                job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
            result = subprocess.run(["scontrol", "requeue", str(job)], capture_output=True, text=True)
            if result.returncode != 0:
                rank_zero_warn(f"scontrol requeue {job} failed ({result.returncode}): {result.stderr.strip()}; "
                               f"resubmit the job to resume from {path}")
        trainer.should_stop = True
        self._received = False

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.signal is not None and self._previous is not None:
            signal.signal(self.signal, self._previous)
            self._previous = None
