"""Two DDP processes on CPU (gloo), launched through the real ``dmdx fit`` CLI: the ranks train on
disjoint prompts and stay bitwise identical.

``MODULE_CONFIGS`` lists the configs under test (ADP joins after the ``adp`` branch lands).
"""

from __future__ import annotations

import json

import pytest

from tests.helpers import dmdx_fit

MODULE_CONFIGS = {"adm": "tests/configs/adm_tiny.yaml"}


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("module_name", list(MODULE_CONFIGS))
def test_ddp_two_processes_stay_identical(module_name, tmp_path):
    out = tmp_path / "report"
    result = dmdx_fit("--config", MODULE_CONFIGS[module_name], "--config", "configs/trainer/ddp_cpu.yaml",
                      "--trainer.default_root_dir", str(tmp_path),
                      "--trainer.callbacks+=tests.helpers.RankReport", f"--trainer.callbacks.dir={out}")
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 18
    # every trainable group (student, fake score, heads, EMA) is bitwise the same on both ranks
    assert ranks[0]["fingerprint"] == ranks[1]["fingerprint"]
    assert {"teacher.roles.student", "teacher.roles.fake", "discriminator", "ema"} <= set(ranks[0]["fingerprint"])
    # ...although each rank drew its own noise (its own RNG stream)...
    assert ranks[0]["torch_rng"] != ranks[1]["torch_rng"]
    # ...and trained on its own share of every epoch (no prompt on both ranks)
    prompts = 20  # configs/prompts/digits.txt
    per_epoch = prompts // (2 * 4)  # batches per rank and epoch (batch_size 4, drop_last)
    for epoch in range(len(ranks[0]["indices"]) // per_epoch):
        shares = [{i for b in r["indices"][epoch * per_epoch:(epoch + 1) * per_epoch] for i in b} for r in ranks]
        assert not shares[0] & shares[1], f"epoch {epoch}: both ranks saw {shares[0] & shares[1]}"
        assert len(shares[0]) == len(shares[1]) == per_epoch * 4


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("module_name", list(MODULE_CONFIGS))
def test_ddp_resume_is_exact_with_per_rank_rng(module_name, tmp_path):
    """Stop-and-resume under DDP ends bitwise where the uninterrupted run ends: every rank gets
    back its own RNG stream and its own position in the epoch."""

    def fit(name, *extra):
        out = tmp_path / name
        result = dmdx_fit("--config", MODULE_CONFIGS[module_name], "--config", "configs/trainer/ddp_cpu.yaml",
                          "--trainer.default_root_dir", str(out), *extra,
                          "--trainer.callbacks+=tests.helpers.RankReport", f"--trainer.callbacks.dir={out / 'report'}")
        assert result.returncode == 0, result.stderr[-4000:]
        return [json.loads((out / "report" / f"rank{r}.json").read_text()) for r in range(2)]

    # 9 optimizer steps = 3 iterations: mid-way through the second epoch (2 batches per rank and epoch)
    reference = fit("reference", "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                    f"--trainer.callbacks.dirpath={tmp_path / 'ckpt'}", "--trainer.callbacks.every_n_train_steps=9",
                    "--trainer.callbacks.save_top_k=-1", "--trainer.callbacks.filename={step}")
    resumed = fit("resumed", "--ckpt_path", str(tmp_path / "ckpt" / "step=9.ckpt"))
    for r in range(2):
        assert resumed[r]["ckpt_path"].endswith("step=9.ckpt")
        assert resumed[r]["fingerprint"] == reference[r]["fingerprint"]
        assert resumed[r]["torch_rng"] == reference[r]["torch_rng"]
        assert resumed[r]["indices"] == reference[r]["indices"][3:]
