"""Two DDP processes on CPU (gloo), launched through the real ``dmdx fit`` CLI: the ranks train on
disjoint prompts and stay bitwise identical.

``MODULE_CONFIGS`` lists the configs under test (ADP joins after the ``adp`` branch lands).
"""

from __future__ import annotations

import json

import pytest

from tests.helpers import ROOT, dmdx_fit

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
    # ...although each rank trained on its own share of every epoch (no prompt on both ranks)
    prompts = 20  # configs/prompts/digits.txt
    per_epoch = prompts // (2 * 4)  # batches per rank and epoch (batch_size 4, drop_last)
    for epoch in range(len(ranks[0]["indices"]) // per_epoch):
        shares = [{i for b in r["indices"][epoch * per_epoch:(epoch + 1) * per_epoch] for i in b} for r in ranks]
        assert not shares[0] & shares[1], f"epoch {epoch}: both ranks saw {shares[0] & shares[1]}"
        assert len(shares[0]) == len(shares[1]) == per_epoch * 4
