"""A rank that stops answering without dying: the collective timeout ends the job (no wait for the
scheduler's limit), the message names the silent rank, and the last checkpoint is intact."""

from __future__ import annotations

import time

import pytest
import torch

from tests.helpers import dmdx_fit

pytestmark = [pytest.mark.chaos, pytest.mark.multiprocess, pytest.mark.slow]

#: DDP as configs/trainer/ddp_cpu.yaml, with a collective timeout short enough for a test
DDP_WITH_TIMEOUT = ["--trainer.devices", "2", "--trainer.strategy", "lightning.pytorch.strategies.DDPStrategy",
                    "--trainer.strategy.init_args.find_unused_parameters", "true",
                    "--trainer.strategy.init_args.timeout", "0:00:15"]


@pytest.mark.parametrize("hung", [1, 0], ids=["launched_rank", "launching_rank"])
def test_hung_rank_is_named_after_the_collective_timeout_and_the_job_ends(hung, tmp_path):
    out = tmp_path / "hung"
    start = time.monotonic()
    result = dmdx_fit("--config", "tests/configs/adm_tiny.yaml", *DDP_WITH_TIMEOUT,
                      "--trainer.default_root_dir", str(out), "--trainer.max_steps", "5",
                      "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                      f"--trainer.callbacks.dirpath={out / 'ckpt'}", "--trainer.callbacks.every_n_train_steps=1",
                      "--trainer.callbacks.save_top_k=-1", "--trainer.callbacks.filename={step}",
                      "--trainer.callbacks+=tests.chaos.faults.HangRank", f"--trainer.callbacks.rank={hung}",
                      "--trainer.callbacks.iteration=3", timeout=240)  # a hang fails the test here
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    other = 1 - hung
    assert (f"dmdx: rank {other}: a collective failed at iteration 3: rank {hung} stopped answering (it started "
            "iteration 3" in result.stderr), result.stderr[-4000:]
    assert "trainer.strategy.init_args.timeout" not in result.stderr.split(f"rank {hung} stopped answering")[1][:200]
    assert elapsed < 200, elapsed  # the 15 s timeout, not the hour the rank sleeps
    step2 = out / "ckpt" / "step=2.ckpt"
    assert torch.load(step2, weights_only=True)["global_step"] == 2
