"""A rank killed mid-run (SIGKILL: the OOM killer, a lost node): the job stops without hanging, says
which rank died, and a resume from the last checkpoint ends at the uninterrupted run's weights."""

from __future__ import annotations

import json

import pytest

from tests.helpers import dmdx_fit

pytestmark = [pytest.mark.chaos, pytest.mark.multiprocess, pytest.mark.slow]


def test_killed_rank_stops_the_job_names_it_and_the_run_resumes_exactly(tmp_path):
    def fit(name, *args, timeout=300):
        out = tmp_path / name
        result = dmdx_fit("--config", "tests/configs/adm_tiny.yaml", "--config", "configs/trainer/ddp_cpu.yaml",
                          "--trainer.default_root_dir", str(out), "--trainer.max_steps", "5",
                          "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                          f"--trainer.callbacks.dirpath={tmp_path / name / 'ckpt'}",
                          "--trainer.callbacks.every_n_train_steps=1", "--trainer.callbacks.save_top_k=-1",
                          "--trainer.callbacks.filename={step}",
                          "--trainer.callbacks+=tests.helpers.RankReport", f"--trainer.callbacks.dir={out / 'report'}",
                          *args, timeout=timeout)  # a hang fails the test here
        return out, result

    killed, result = fit("killed", "--trainer.callbacks+=tests.chaos.faults.KillRank", "--trainer.callbacks.rank=1",
                         "--trainer.callbacks.iteration=3")
    assert result.returncode != 0
    assert "a collective failed at iteration 3: rank 1 killed by SIGKILL" in result.stderr, result.stderr[-3000:]
    assert (killed / "ckpt" / "step=3.ckpt").is_file() and not (killed / "ckpt" / "step=4.ckpt").exists()

    reference, ok = fit("reference")
    assert ok.returncode == 0, ok.stderr[-3000:]
    resumed, ok = fit("resumed", "--ckpt_path", str(killed / "ckpt" / "step=3.ckpt"))
    assert ok.returncode == 0, ok.stderr[-3000:]
    ref = [json.loads((reference / "report" / f"rank{r}.json").read_text()) for r in range(2)]
    again = [json.loads((resumed / "report" / f"rank{r}.json").read_text()) for r in range(2)]
    for r in range(2):
        assert again[r]["global_step"] == 5 and again[r]["fingerprint"] == ref[r]["fingerprint"]
