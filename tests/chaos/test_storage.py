"""Storage faults: a kill in the middle of a checkpoint write, a byte flipped on disk. The last good
checkpoint stays readable, a damaged one is an error naming the file (or, where configured, the run
falls back to the previous one), and the resumed run ends where the uninterrupted one ends."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import dmdx_fit

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

ATOMIC = ["--trainer.plugins+=dmdx_lightning.checkpoint_io.AtomicCheckpointIO"]


def fit(tmp_path, name, *args, ckpt=None, steps=4):
    out = tmp_path / name
    return out, dmdx_fit("--config", "tests/configs/adm_tiny.yaml", "--trainer.default_root_dir", str(out),
                         "--trainer.max_steps", str(steps),
                         "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                         f"--trainer.callbacks.dirpath={ckpt or out / 'ckpt'}",
                         "--trainer.callbacks.every_n_train_steps=1", "--trainer.callbacks.save_top_k=-1",
                         "--trainer.callbacks.filename={step}",
                         "--trainer.callbacks+=tests.helpers.RankReport", f"--trainer.callbacks.dir={out / 'report'}",
                         *args, timeout=300)


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the tensor data (the zip's headers are at both ends)
    path.write_bytes(bytes(data))


def fingerprint(out):
    return json.loads((out / "report" / "rank0.json").read_text())["fingerprint"]


def test_kill_during_a_checkpoint_write_keeps_the_last_good_one_and_resume_is_exact(tmp_path):
    killed, result = fit(tmp_path, "killed", *ATOMIC, "--trainer.callbacks+=tests.chaos.faults.KillDuringSave",
                         "--trainer.callbacks.iteration=2")
    assert result.returncode == -9  # SIGKILL, mid-write
    ckpts = killed / "ckpt"
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == ["step=1.ckpt"]  # no half-written step=2.ckpt
    reference, ok = fit(tmp_path, "reference", *ATOMIC)
    assert ok.returncode == 0, ok.stderr[-3000:]
    resumed, ok = fit(tmp_path, "resumed", *ATOMIC, "--ckpt_path", str(ckpts / "step=1.ckpt"))
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert fingerprint(resumed) == fingerprint(reference)


def test_flipped_byte_is_an_error_naming_the_file_or_falls_back_to_the_previous_checkpoint(tmp_path):
    first, ok = fit(tmp_path, "first", *ATOMIC, steps=3)
    assert ok.returncode == 0, ok.stderr[-3000:]
    damaged = first / "ckpt" / "step=3.ckpt"
    flip_a_byte(damaged)
    assert torch.load(damaged, weights_only=True)["global_step"] == 3  # torch itself does not notice

    _, result = fit(tmp_path, "refused", *ATOMIC, "--ckpt_path", str(damaged), steps=4)
    assert result.returncode != 0
    assert f"checkpoint {damaged} is damaged" in result.stderr, result.stderr[-3000:]

    fallback, result = fit(tmp_path, "fallback", "--trainer.plugins+=dmdx_lightning.checkpoint_io.AtomicCheckpointIO",
                           "--trainer.plugins.fallback_to_previous=true", "--ckpt_path", str(damaged), steps=4)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Loading the newest intact checkpoint beside it instead" in result.stderr
    report = json.loads((fallback / "report" / "rank0.json").read_text())
    assert report["global_step"] == 4 and len(report["indices"]) == 2  # resumed at step 2: iterations 3 and 4


def test_init_from_and_export_refuse_a_damaged_checkpoint(tmp_path):
    """The one-process readers (init_from, `dmdx export`, `dmdx sample`) check the same checksums."""
    from dmdx_lightning.checkpoint_io import AtomicCheckpointIO
    from dmdx_lightning.checksums import CorruptCheckpointError
    from dmdx_lightning.methods.base import _load_checkpoint

    path = tmp_path / "ckpt" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.arange(4096.0)}, "dmdx": {}}, path)
    assert torch.equal(_load_checkpoint(str(path))["state_dict"]["w"], torch.arange(4096.0))
    flip_a_byte(path)
    with pytest.raises(CorruptCheckpointError, match=f"checkpoint {path} is damaged"):
        _load_checkpoint(str(path))


@pytest.mark.multiprocess
def test_flipped_byte_in_a_sharded_checkpoint_stops_every_rank_naming_it(tmp_path):
    fsdp2 = ["--config", "configs/trainer/fsdp2.yaml", "--trainer.strategy.init_args.param_dtype", "null",
             "--trainer.strategy.init_args.reduce_dtype", "null", "--trainer.devices", "2"]
    first, ok = fit(tmp_path, "first", *fsdp2, steps=2)
    assert ok.returncode == 0, ok.stderr[-3000:]
    folder = first / "ckpt" / "step=2.ckpt"
    assert (folder / "checksums.json").is_file()
    flip_a_byte(folder / "__1_0.distcp")
    _, result = fit(tmp_path, "refused", *fsdp2, "--ckpt_path", str(folder), steps=3)  # no hang: fit's timeout
    assert result.returncode != 0
    assert f"checkpoint {folder} is damaged: __1_0.distcp does not match" in result.stderr, result.stderr[-3000:]


@pytest.mark.multiprocess
def test_kill_during_a_sharded_checkpoint_save_keeps_the_last_good_one_and_resume_is_exact(tmp_path):
    """FSDP2 on 2 ranks: rank 1 dies after writing its shards of step 2, before the folder is
    checksummed and renamed: the job stops naming it, no step=2 checkpoint appears (its hidden
    staging folder is never a resume candidate), and the run resumed from step 1 is exact."""
    fsdp2 = ["--config", "configs/trainer/fsdp2.yaml", "--trainer.strategy.init_args.param_dtype", "null",
             "--trainer.strategy.init_args.reduce_dtype", "null", "--trainer.devices", "2"]
    killed, result = fit(tmp_path, "killed", *fsdp2, "--trainer.callbacks+=tests.chaos.faults.KillDuringShardedSave",
                         "--trainer.callbacks.rank=1", "--trainer.callbacks.iteration=2")
    assert result.returncode != 0
    assert "rank 1 killed by SIGKILL" in result.stderr, result.stderr[-3000:]
    ckpts = killed / "ckpt"
    assert sorted(p.name for p in ckpts.iterdir() if not p.name.startswith(".")) == ["step=1.ckpt"]
    reference, ok = fit(tmp_path, "reference", *fsdp2)
    assert ok.returncode == 0, ok.stderr[-3000:]
    resumed, ok = fit(tmp_path, "resumed", *fsdp2, "--ckpt_path", str(ckpts / "step=1.ckpt"))
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert fingerprint(resumed) == fingerprint(reference)
