"""A real two-node SLURM job (scripts/local_slurm.sh starts the cluster on this machine):
SIGUSR1 mid-run -> checkpoint at an iteration boundary -> requeue -> automatic resume -> final
weights bitwise equal to an uninterrupted 2-process run.

Skipped where SLURM is not installed (``scripts/local_slurm.sh install`` or ``.ci/run`` installs it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dmdx_lightning.sharded_checkpoint import is_sharded_checkpoint
from tests.helpers import ROOT, dmdx_env, dmdx_fit

pytestmark = [pytest.mark.slurm, pytest.mark.multiprocess, pytest.mark.slow]

SCRIPT = ROOT / "scripts" / "local_slurm.sh"
ITERATIONS = 12  # 3 optimizer steps each (ADM: generator, fake score, discriminator)
SIGNAL_AFTER_STEP = 9


def _missing() -> str | None:
    for tool in ("sbatch", "scontrol", "slurmctld", "slurmd", "munged"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return tool
    return None


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory):
    if missing := _missing():
        pytest.skip(f"SLURM not installed ({missing} not found); run `scripts/local_slurm.sh install`")
    state = tmp_path_factory.mktemp("slurm_cluster")
    env = dict(os.environ, DMDX_SLURM_DIR=str(state))
    started = subprocess.run(["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr
    env["SLURM_CONF"] = str(state / "slurm.conf")
    yield env
    subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, timeout=60)


def _job(job_id: str, env) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", out))


def _log(log: Path) -> str:
    return log.read_text()[-3000:] if log.exists() else ""


def _release_when_requeued(job_id: str, env, log: Path, seconds: float) -> None:
    """Wait for the job's first requeue, then release it: SLURM holds a requeued job ~2 min before it
    is eligible again, which tests nothing of ours."""
    deadline = time.time() + seconds
    while int(_job(job_id, env).get("Restarts", 0)) < 1:
        assert _job(job_id, env).get("JobState") != "COMPLETED", "job completed without a requeue:\n" + _log(log)
        assert time.time() < deadline, "job was not requeued:\n" + _log(log)
        time.sleep(0.5)
    while _job(job_id, env).get("JobState") not in ("PENDING", "RUNNING", "COMPLETED"):
        time.sleep(0.5)
    if _job(job_id, env).get("JobState") == "PENDING":
        # not in the second the previous attempt was killed: slurmd refuses a job credential created no
        # later than its job's last revocation ("Killing non-startable batch job: Job credential
        # revoked", and the job ends FAILED), which is what SLURM's own hold avoids
        time.sleep(2)
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=env, timeout=30)


def _finish_requeued(job_id: str, env, log: Path, tmp_path: Path, seconds: float, *strategy: str) -> None:
    """Release the job once requeued, run the uninterrupted 2-process reference meanwhile, and wait
    for the requeued job to complete."""
    _release_when_requeued(job_id, env, log, seconds)
    reference = dmdx_fit("--config", "configs/quickstart/adm.yaml", "--config", "configs/trainer/ddp_cpu.yaml",
                         *strategy, *_overrides(tmp_path, "reference"), timeout=600)
    assert reference.returncode == 0, reference.stderr[-4000:]
    _wait_until_completed(job_id, env, log, 300)


def _wait_until_completed(job_id: str, env, log: Path, seconds: float) -> None:
    deadline = time.time() + seconds
    while (state := _job(job_id, env).get("JobState")) != "COMPLETED":
        assert state in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED"), (state, _log(log))
        assert time.time() < deadline, "requeued job did not finish:\n" + _log(log)
        time.sleep(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(tmp: Path, name: str, sleep: float = 0.0) -> list[str]:
    # the quickstart, shortened: tiny batches, ITERATIONS iterations, no grids or summary
    return ["--trainer.max_steps", str(ITERATIONS), "--data.init_args.batch_size", "4",
            "--data.init_args.repeat", "1", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.callbacks=[]", "--trainer.callbacks+=tests.helpers.RankReport",
            f"--trainer.callbacks.dir={tmp / name / 'report'}", f"--trainer.callbacks.sleep={sleep}",
            "--trainer.default_root_dir", str(tmp / name / "root")]


#: the strategy overlays a 2-node job runs under (its config's DDP, and FSDP2 in fp32 on CPU)
STRATEGIES = {"ddp": [], "fsdp2": ["--config", "configs/trainer/fsdp2.yaml", "--trainer.strategy.init_args.param_dtype",
                                   "null", "--trainer.strategy.init_args.reduce_dtype", "null"]}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_two_node_job_survives_sigusr1_requeue_and_resumes_exactly(strategy, slurm_env, tmp_path):
    # submit first; the uninterrupted reference runs while the cluster job queues and starts
    env = dict(slurm_env, **{k: v for k, v in dmdx_env().items() if k == "PYTHONPATH"},
               HF_HUB_OFFLINE="1", DMDX_PYTHON=sys.executable,
               # the emulated nodes n1/n2 are not resolvable host names: DDP meets on localhost
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--chdir", str(ROOT), "--output", str(tmp_path / "slurm-%j.out"),
         str(ROOT / "configs/slurm/digits_cpu.sbatch"), *STRATEGIES[strategy], *_overrides(tmp_path, "job", sleep=0.3)],
        env=env, capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    log = tmp_path / f"slurm-{job_id}.out"
    report, root = tmp_path / "job" / "report", tmp_path / "job" / "root"

    try:
        # SIGUSR1 mid-run (what --signal=SIGUSR1@90 sends before the time limit)
        deadline = time.time() + 240
        while True:
            progress = report / "progress"
            step = int(progress.read_text() or 0) if progress.is_file() else 0
            if step >= SIGNAL_AFTER_STEP:
                break
            state = _job(job_id, env).get("JobState")
            assert state in ("PENDING", "RUNNING", "CONFIGURING"), (state, log.read_text() if log.exists() else "")
            assert time.time() < deadline, "job did not start training in time"
            time.sleep(0.5)
        assert step < 3 * ITERATIONS, "job finished before it could be signalled"
        subprocess.run(["scancel", "--signal=USR1", job_id], env=env, check=True, timeout=30)

        # the job requeues itself; SLURM holds a requeued job ~2 min before it is eligible
        # again, which tests nothing of ours, so release it at once
        _finish_requeued(job_id, env, log, tmp_path, 120, *STRATEGIES[strategy])
    finally:
        subprocess.run(["scancel", job_id], env=env, capture_output=True, timeout=30)

    text = log.read_text()
    # Lightning saved the checkpoint on the signal, SLURM requeued the job, the job resumed from it
    assert re.search(r"Signal SIGUSR1: saving .*hpc_ckpt_1\.ckpt at global step \d+", text), text[-3000:]
    # one file under DDP, a checkpoint folder (one file per rank) under FSDP2
    assert (root / "hpc_ckpt_1.ckpt").is_file() if strategy == "ddp" else is_sharded_checkpoint(root / "hpc_ckpt_1.ckpt")
    assert "restart 0 on" in text and "restart 1 on" in text
    ranks = [json.loads((report / f"rank{r}_restart1.json").read_text()) for r in range(2)]
    assert all(r["ckpt_path"] == str(root / "hpc_ckpt_1.ckpt") for r in ranks)
    assert all(r["global_step"] == ITERATIONS and r["world_size"] == 2 for r in ranks)
    assert not list(root.glob(".partial-*"))
    # ... and ended bitwise where the uninterrupted run ended
    ref = [json.loads((tmp_path / "reference" / "report" / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["fingerprint"] == ranks[1]["fingerprint"] == ref[0]["fingerprint"] == ref[1]["fingerprint"]
    resumed_batches = ranks[0]["indices"]
    assert resumed_batches == ref[0]["indices"][-len(resumed_batches):]


def test_a_killed_rank_requeues_the_job_which_resumes_from_last_ckpt_exactly(slurm_env, tmp_path):
    """A rank SIGKILLed mid-run (the OOM killer, a lost node): srun stops the step, the batch script
    requeues the job (no preemption checkpoint exists), the requeued job resumes from the newest
    ``last.ckpt`` by itself and ends bitwise where an uninterrupted run ends."""
    env = dict(slurm_env, **{k: v for k, v in dmdx_env().items() if k == "PYTHONPATH"},
               HF_HUB_OFFLINE="1", DMDX_PYTHON=sys.executable, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    checkpoints = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                   f"--trainer.callbacks.dirpath={tmp_path / 'job' / 'root' / 'checkpoints'}",
                   "--trainer.callbacks.every_n_train_steps=1", "--trainer.callbacks.save_last=true"]
    kill = ["--trainer.callbacks+=tests.chaos.faults.KillRank", "--trainer.callbacks.rank=1",
            "--trainer.callbacks.iteration=6", "--trainer.callbacks.first_attempt_only=true"]
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--chdir", str(ROOT), "--output", str(tmp_path / "slurm-%j.out"),
         str(ROOT / "configs/slurm/digits_cpu.sbatch"), *_overrides(tmp_path, "job"), *checkpoints, *kill],
        env=env, capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    log = tmp_path / f"slurm-{job_id}.out"
    report = tmp_path / "job" / "report"
    try:
        _finish_requeued(job_id, env, log, tmp_path, 240)
    finally:
        subprocess.run(["scancel", job_id], env=env, capture_output=True, timeout=30)

    text = log.read_text()
    assert "dmdx: job step failed" in text and "requeueing job" in text, text[-3000:]
    last = tmp_path / "job" / "root" / "checkpoints" / "last.ckpt"
    assert f"dmdx: SLURM restart 1: resuming from {last}" in text, text[-3000:]
    ranks = [json.loads((report / f"rank{r}_restart1.json").read_text()) for r in range(2)]
    assert all(r["ckpt_path"] == str(last) and r["global_step"] == ITERATIONS for r in ranks)
    ref = [json.loads((tmp_path / "reference" / "report" / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["fingerprint"] == ranks[1]["fingerprint"] == ref[0]["fingerprint"]
