"""Signals that end a run early: SIGTERM (``scancel``, a container stopping, ``kill``) and SLURM's
preemption warning (SIGUSR1). Each one, landing in the middle of a checkpoint write or on one rank
only, lets that write complete, stops every rank at the end of the iteration with the state saved,
and the resumed run ends at the uninterrupted run's weights."""

from __future__ import annotations

import json
import os

import pytest
import torch

from dmdx_lightning.checksums import verify_file
from tests.helpers import dmdx_fit

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

ATOMIC = ["--trainer.plugins+=dmdx_lightning.checkpoint_io.AtomicCheckpointIO"]
SIGTERM_EXIT = 128 + 15


def fit(tmp_path, name, *args, steps=5, root=None):
    out = tmp_path / name
    return out, dmdx_fit("--config", "tests/configs/adm_tiny.yaml", *ATOMIC,
                         "--trainer.default_root_dir", str(root or out), "--trainer.max_steps", str(steps),
                         "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                         f"--trainer.callbacks.dirpath={out / 'ckpt'}", "--trainer.callbacks.every_n_train_steps=1",
                         "--trainer.callbacks.save_top_k=-1", "--trainer.callbacks.filename={step}",
                         "--trainer.callbacks+=tests.helpers.RankReport", f"--trainer.callbacks.dir={out / 'report'}",
                         *args, timeout=300)


def fingerprints(out, ranks=1):
    return [json.loads((out / "report" / f"rank{r}.json").read_text())["fingerprint"] for r in range(ranks)]


def test_sigterm_during_a_checkpoint_write_completes_it_saves_and_stops_and_the_run_resumes_exactly(tmp_path):
    stopped, result = fit(tmp_path, "stopped", "--trainer.callbacks+=tests.chaos.faults.SignalDuringSave",
                          "--trainer.callbacks.signal=SIGTERM", "--trainer.callbacks.iteration=2")
    assert result.returncode == SIGTERM_EXIT, result.stderr[-3000:]
    hpc = stopped / "hpc_ckpt_1.ckpt"
    assert f"dmdx: stopped by SIGTERM at iteration 3; the state is saved in {hpc}" in result.stderr, \
        result.stderr[-3000:]
    verify_file(stopped / "ckpt" / "step=2.ckpt")  # the write the signal landed in completed, checksum and all
    assert torch.load(hpc, weights_only=True)["global_step"] == 3
    assert not (stopped / "ckpt" / "step=4.ckpt").exists()

    reference, ok = fit(tmp_path, "reference")
    assert ok.returncode == 0, ok.stderr[-3000:]
    resumed, ok = fit(tmp_path, "resumed", "--ckpt_path", str(hpc))
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert fingerprints(resumed) == fingerprints(reference)


#: the variables srun sets that make Lightning's cluster environment SLURM (one task)
SLURM_ONE_TASK = {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "chaos", "SLURM_JOB_ID": "4242",
                  "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}


def test_slurm_preemption_signal_during_a_checkpoint_write_saves_at_the_iteration_end(tmp_path, monkeypatch):
    """SIGUSR1 (``#SBATCH --signal=SIGUSR1@90``) mid-write: the write completes, the state is saved
    at the end of the next iteration and the run stops for its requeue (no scontrol here: a warning
    says to resubmit); the resumed run is exact."""
    import tests.helpers as helpers

    environment = helpers.dmdx_env

    def with_slurm():
        env = environment()
        env.update(SLURM_ONE_TASK, PATH=f"{tmp_path / 'bin'}{os.pathsep}{env['PATH']}")
        return env

    (tmp_path / "bin").mkdir()
    scontrol = tmp_path / "bin" / "scontrol"  # records the requeue it is asked for
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'requeued'}\n")
    scontrol.chmod(0o755)
    monkeypatch.setattr(helpers, "dmdx_env", with_slurm)
    stopped, result = fit(tmp_path, "stopped", "--trainer.callbacks+=tests.chaos.faults.SignalDuringSave",
                          "--trainer.callbacks.signal=SIGUSR1", "--trainer.callbacks.iteration=2")
    monkeypatch.setattr(helpers, "dmdx_env", environment)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "requeued").read_text().split() == ["requeue", "4242"]
    verify_file(stopped / "ckpt" / "step=2.ckpt")
    hpc = stopped / "hpc_ckpt_1.ckpt"
    assert torch.load(hpc, weights_only=True)["global_step"] == 3

    reference, ok = fit(tmp_path, "reference")
    assert ok.returncode == 0, ok.stderr[-3000:]
    resumed, ok = fit(tmp_path, "resumed", "--ckpt_path", str(hpc))
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert fingerprints(resumed) == fingerprints(reference)


@pytest.mark.multiprocess
def test_sigterm_on_one_rank_stops_every_rank_at_the_iteration_end_and_the_run_resumes_exactly(tmp_path):
    ddp = ["--config", "configs/trainer/ddp_cpu.yaml"]
    stopped, result = fit(tmp_path, "stopped", *ddp, "--trainer.callbacks+=tests.chaos.faults.SignalRank",
                          "--trainer.callbacks.signal=SIGTERM", "--trainer.callbacks.rank=1",
                          "--trainer.callbacks.iteration=2")
    assert result.returncode == SIGTERM_EXIT, result.stderr[-3000:]
    hpc = stopped / "hpc_ckpt_1.ckpt"
    assert f"dmdx: stopped by SIGTERM at iteration 3; the state is saved in {hpc}" in result.stderr
    reference, ok = fit(tmp_path, "reference", *ddp)
    assert ok.returncode == 0, ok.stderr[-3000:]
    resumed, ok = fit(tmp_path, "resumed", *ddp, "--ckpt_path", str(hpc))
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert fingerprints(resumed, 2) == fingerprints(reference, 2)
