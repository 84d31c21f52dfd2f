"""A NaN on one rank: every rank skips the same step (no hang, weights stay equal), and a run that
keeps failing stops with a message that names the player, the iteration and the rank."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import dmdx_fit

pytestmark = [pytest.mark.chaos, pytest.mark.multiprocess, pytest.mark.slow]

TINY = "tests/configs/adm_tiny.yaml"
STRATEGIES = {"ddp": ["--config", "configs/trainer/ddp_cpu.yaml"],
              "fsdp2": ["--config", "configs/trainer/fsdp2.yaml", "--trainer.strategy.init_args.param_dtype", "null",
                        "--trainer.strategy.init_args.reduce_dtype", "null"]}


def fit(tmp_path, name, *args, timeout=300):
    out = tmp_path / name
    result = dmdx_fit("--config", TINY, *args, "--trainer.devices", "2", "--trainer.max_steps", "4",
                      "--trainer.default_root_dir", str(out),
                      "--trainer.callbacks+=tests.helpers.TrainedState", f"--trainer.callbacks.dir={out / 'report'}",
                      timeout=timeout)  # a hang fails the test here
    return out, result


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_nan_on_one_rank_is_skipped_on_every_rank(strategy, tmp_path):
    out, result = fit(tmp_path, "nan", *STRATEGIES[strategy], "--trainer.callbacks+=tests.chaos.faults.InjectNaN",
                      "--trainer.callbacks.player=fake_score", "--trainer.callbacks.rank=1",
                      "--trainer.callbacks.from_iteration=2", "--trainer.callbacks.to_iteration=2")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "iteration 2: non-finite fake_score loss on rank(s) [1]: the fake_score step is skipped on every rank" \
        in result.stderr
    ranks = [torch.load(out / "report" / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 4
    # both ranks skipped it: the fake score's weights agree (DDP: each rank's own copy; FSDP2: gathered)
    for key, value in ranks[0]["state"].items():
        torch.testing.assert_close(ranks[1]["state"][key], value, rtol=0, atol=0, msg=key)
    assert int(ranks[0]["state"]["nonfinite_streak"]) == 0  # the next finite step reset the streak


@pytest.mark.parametrize("strategy", ["fsdp2"])  # the stop is the same code under DDP (test_bad_input.py: one process)
def test_nan_that_persists_stops_every_rank_with_the_last_checkpoint_intact(strategy, tmp_path):
    out, result = fit(tmp_path, "persistent", *STRATEGIES[strategy], "--model.init_args.max_nonfinite_steps", "2",
                      "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                      f"--trainer.callbacks.dirpath={tmp_path / 'ckpt'}", "--trainer.callbacks.every_n_train_steps=1",
                      "--trainer.callbacks.save_top_k=-1", "--trainer.callbacks.filename={step}",
                      "--trainer.callbacks+=tests.chaos.faults.InjectNaN", "--trainer.callbacks.player=generator",
                      "--trainer.callbacks.rank=1", "--trainer.callbacks.from_iteration=1",
                      "--trainer.callbacks.to_iteration=-1")
    assert result.returncode != 0
    assert "2 consecutive non-finite losses or gradients of the generator (the last at iteration 2, on rank(s) [1])" \
        in result.stderr, result.stderr[-3000:]
    # iteration 1 skipped the generator only (the other players stepped): its checkpoint and the one
    # before are there and readable; nothing was written for the failed iteration
    saved = sorted(p.name for p in (tmp_path / "ckpt").iterdir() if not p.name.startswith("."))
    assert saved == ["step=1.ckpt", "step=2.ckpt"], saved
