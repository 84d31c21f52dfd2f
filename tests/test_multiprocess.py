"""Two DDP processes on CPU (gloo), launched through the real ``dmdx fit`` CLI: the ranks train on
disjoint prompts and stay bitwise identical.

``MODULE_CONFIGS`` lists the configs under test (ADP joins after the ``adp`` branch lands).
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import dmdx_fit
from tests.test_configs import SD3_TINY, TINY_HEADS

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
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 6  # iterations
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

    # 3 iterations: mid-way through the second epoch (2 batches per rank and epoch)
    reference = fit("reference", "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                    f"--trainer.callbacks.dirpath={tmp_path / 'ckpt'}", "--trainer.callbacks.every_n_train_steps=3",
                    "--trainer.callbacks.save_top_k=-1", "--trainer.callbacks.filename={step}")
    resumed = fit("resumed", "--ckpt_path", str(tmp_path / "ckpt" / "step=3.ckpt"))
    for r in range(2):
        assert resumed[r]["ckpt_path"].endswith("step=3.ckpt")
        assert resumed[r]["fingerprint"] == reference[r]["fingerprint"]
        assert resumed[r]["torch_rng"] == reference[r]["torch_rng"]
        assert resumed[r]["indices"] == reference[r]["indices"][3:]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_shipped_adm_sd3_config_trains_on_two_processes(tiny_sd3_dir, tmp_path):
    """configs/sd3/adm_4step.yaml as shipped (its strategy, callbacks and checkpointing) on 2 CPU processes;
    only the weights (the tiny SD3 folder), the device and the length change.

    It used to hang: SampleGrid drew its first grid on rank 0 alone and asked ``trainer.log_dir``
    there, a broadcast under DDP, while rank 1 waited in the next step's gradient all-reduce.
    """
    tiny = [a.replace("{tiny_sd3}", str(tiny_sd3_dir)) for a in SD3_TINY]
    out = tmp_path / "report"
    # 2 iterations; fp32 on CPU (bf16-mixed on CPU is slow, not what is tested)
    result = dmdx_fit("--config", "configs/sd3/adm_4step.yaml", *tiny, *TINY_HEADS,
                      "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.precision", "32-true",
                      "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false",
                      "--trainer.default_root_dir", str(tmp_path / "run"),
                      "--trainer.callbacks+=tests.helpers.RankReport", f"--trainer.callbacks.dir={out}",
                      timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 2
    # DDP kept the players identical on both ranks (LoRA adapters of both roles, heads)
    assert ranks[0]["fingerprint"] == ranks[1]["fingerprint"]
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    samples = {p.name for p in (tmp_path / "run").rglob("samples/*.png")}
    assert {"student_step0000001.png", "teacher_step0000001.png", "student_step0000002.png"} <= samples


@pytest.mark.multiprocess
@pytest.mark.slow
def test_fsdp_full_shard_two_processes_saves_trainable_state_and_resumes(tiny_sd3_dir, tmp_path, monkeypatch):
    """configs/trainer/fsdp.yaml (FULL_SHARD) on 2 CPU processes, full-mode SD3 ADM: trains, writes
    a consolidated checkpoint that holds exactly the trainable state, and a resumed run goes on
    from the checkpoint's iteration to the same weights as the uninterrupted run."""
    from dmdx_lightning.methods.distributed import clean_name
    from tests.test_fsdp import ROOT, fsdp_cli

    tiny = [a.replace("{tiny_sd3}", str(tiny_sd3_dir)) for a in SD3_TINY]

    def fit(name, *extra):
        out = tmp_path / name
        result = dmdx_fit("--config", "configs/sd3/adm_sd35_large_4step.yaml", "--config", "configs/trainer/fsdp.yaml",
                          "--trainer.strategy.class_path", "tests.helpers.CPUFSDPStrategy", *tiny, *TINY_HEADS,
                          "--data.init_args.batch_size", "1", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
                          "--trainer.precision", "32-true", "--trainer.max_steps", "2", "--trainer.logger", "false",
                          "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
                          "--trainer.default_root_dir", str(out), "--trainer.callbacks", "[]",
                          "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                          f"--trainer.callbacks.dirpath={out / 'ckpt'}", "--trainer.callbacks.every_n_train_steps=1",
                          "--trainer.callbacks.save_top_k=-1", "--trainer.callbacks.filename={step}",
                          "--trainer.callbacks+=tests.helpers.RankReport", f"--trainer.callbacks.dir={out / 'report'}",
                          *extra, timeout=900)
        assert result.returncode == 0, result.stderr[-4000:]
        return out, [json.loads((out / "report" / f"rank{r}.json").read_text()) for r in range(2)]

    def state(path):
        return torch.load(path, map_location="cpu", weights_only=True)

    reference, ranks = fit("reference")
    assert [r["world_size"] for r in ranks] == [2, 2] and ranks[0]["global_step"] == ranks[1]["global_step"] == 2
    # the trained state agrees on both ranks (the frozen "teacher" group is left out: the parameters of
    # the root FSDP unit, the VAE among them, are this rank's own shard outside a forward)
    trained = [{k: v for k, v in r["fingerprint"].items() if k != "teacher"} for r in ranks]
    assert trained[0] == trained[1] and len(trained[0]) >= 3
    saved = state(reference / "ckpt" / "step=2.ckpt")
    weights = saved["state_dict"]

    # exactly the trainable state (student, fake score, heads) and the buffers, at full (unsharded) size
    monkeypatch.chdir(ROOT)
    model = fsdp_cli(tiny_sd3_dir, tmp_path / "unwrapped", 2).model  # the same config, built in-process
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    persistent = set(model.state_dict())  # non-persistent buffers (CLIP's position_ids) are never saved
    expected = {**{clean_name(n): tuple(p.shape) for n, p in trainable.items()},
                **{n: tuple(b.shape) for n, b in model.named_buffers() if n in persistent}}
    assert {k: tuple(v.shape) for k, v in weights.items()} == expected
    assert int(weights["iteration"]) == 2
    # the student trained (it starts as the loaded teacher, as the in-process build's does)
    assert any(not torch.equal(weights[n], p) for n, p in trainable.items() if n.startswith("teacher.roles.student."))
    frozen = {clean_name(n) for n, p in model.named_parameters() if not p.requires_grad}
    assert any(k.startswith("teacher.denoiser.") for k in frozen) and not frozen & set(weights)  # no frozen weight

    # resume from iteration 1: one more iteration per rank, the same end state
    resumed, ranks = fit("resumed", "--ckpt_path", str(reference / "ckpt" / "step=1.ckpt"))
    for r in ranks:
        assert r["ckpt_path"].endswith("step=1.ckpt") and r["global_step"] == 2
        assert len(r["indices"]) == 1  # it started at the second iteration, not from scratch
    again = state(resumed / "ckpt" / "step=2.ckpt")
    assert int(again["state_dict"]["iteration"]) == 2
    for key, value in weights.items():
        torch.testing.assert_close(again["state_dict"][key], value, rtol=0, atol=0, msg=key)

    # sample grids: under FULL_SHARD every forward is a collective and the VAE's parameters are
    # shards outside a training step, so SampleGrid samples on every rank inside
    # outside_training_step (drawn on rank 0 alone it deadlocked; before that, decode read 1-D shards)
    grids, _ = fit("grids", "--trainer.callbacks+=dmdx_lightning.callbacks.samples.SampleGrid",
                   "--trainer.callbacks.samples_per_prompt=1", "--trainer.callbacks.every_n_steps=1",
                   "--trainer.callbacks.log_teacher=false")
    assert len(list(grids.glob("**/samples/student_step*.png"))) >= 2  # at iterations 1 and 2
    # and drawing them does not change training (own generators, no gradient, no writeback)
    drawn = state(grids / "ckpt" / "step=2.ckpt")["state_dict"]
    for key, value in weights.items():
        torch.testing.assert_close(drawn[key], value, rtol=0, atol=0, msg=key)
