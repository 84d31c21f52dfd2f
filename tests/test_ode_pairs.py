"""ODE-pair shards: generation through Lightning's predict loop, resume, world-size invariance,
corruption / truncation / mismatch detection, and reading them back for training."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from dmdx_lightning.data.ode_pairs import (MANIFEST, ODEPairDataModule, ODEPairPromptsDataModule, PairDataError,
                                           pair_noise, sha256_file, shard_name, verify_pairs)
from dmdx_lightning.methods.ode_pairs import ODEPairGenerator, ODEPairWriter

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a handwritten digit three", "the digit 7", "a handwritten digit zero"]
# 10 pairs in shards of 4 (the last one has 2), batches of 3 that do not divide a shard
LAYOUT = dict(num_pairs=10, shard_size=4, batch_size=3)


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def generate(teacher, prompt_file, out, module_cls=ODEPairGenerator, **kw):
    module = module_cls(teacher, num_steps=2, cfg_scale=2.0, seed=5, **kw)
    data = ODEPairPromptsDataModule(str(prompt_file), str(out), **LAYOUT)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[ODEPairWriter(progress=False)])
    trainer.predict(module, datamodule=data)
    return module


def shard_paths(out):
    return sorted(Path(out).glob("shard-*.safetensors"))


def stamps(out):
    return {p.name: p.stat().st_mtime_ns for p in shard_paths(out)}


def assert_manifest_matches_files(out):
    manifest = json.loads((Path(out) / MANIFEST).read_text())
    assert manifest["complete"] and manifest["num_shards"] == 3
    assert [e["file"] for e in manifest["shards"]] == [shard_name(k) for k in range(3)]
    for entry in manifest["shards"]:
        assert sha256_file(Path(out) / entry["file"]) == entry["sha256"]
    return manifest


class CountingGenerator(ODEPairGenerator):
    """Records which pairs were computed (to tell skipped shards from rebuilt ones)."""

    computed: list[int] = []

    def predict_step(self, batch, batch_idx):
        CountingGenerator.computed += batch["index"].tolist()
        return super().predict_step(batch, batch_idx)


class FailingGenerator(ODEPairGenerator):
    """Dies at the first batch of shard 2, like a killed job."""

    def predict_step(self, batch, batch_idx):
        if batch["shard"] == 2:
            raise RuntimeError("simulated kill")
        return super().predict_step(batch, batch_idx)


def test_pairs_follow_the_seed_rule_and_the_teacher_sampler(digits_teacher, prompt_file, tmp_path):
    out = tmp_path / "pairs"
    generate(digits_teacher, prompt_file, out)
    manifest = assert_manifest_matches_files(out)
    assert manifest["latent_shape"] == [1, 8, 8] and manifest["teacher_family"] == "digits"
    assert (manifest["num_steps"], manifest["cfg_scale"], manifest["seed"]) == (2, 2.0, 5)
    assert [(e["start"], e["stop"], e["count"]) for e in manifest["shards"]] == [(0, 4, 4), (4, 8, 4), (8, 10, 2)]
    data = ODEPairDataModule(str(out), batch_size=10, shuffle=False)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["index"].tolist() == list(range(10))
    assert batch["prompt"] == [PROMPTS[i % 3] for i in range(10)]
    assert torch.equal(batch["x_T"], pair_noise((1, 8, 8), range(10), seed=5))
    expected = digits_teacher.sample_ode(batch["x_T"], digits_teacher.encode_prompts(batch["prompt"]), 2, 2.0)
    torch.testing.assert_close(batch["x0"], expected)


def test_resume_skips_finished_shards(digits_teacher, prompt_file, tmp_path):
    out = tmp_path / "pairs"
    with pytest.raises(RuntimeError, match="simulated kill"):
        generate(digits_teacher, prompt_file, out, FailingGenerator)
    assert [p.name for p in shard_paths(out)] == [shard_name(0), shard_name(1)]
    assert not list(out.glob(".*tmp*")), "a killed run must leave no half-written files"
    before = stamps(out)
    CountingGenerator.computed = []
    generate(digits_teacher, prompt_file, out, CountingGenerator)
    assert sorted(CountingGenerator.computed) == [8, 9]
    assert {k: v for k, v in stamps(out).items() if k in before} == before
    assert_manifest_matches_files(out)
    clean = tmp_path / "clean"
    generate(digits_teacher, prompt_file, clean)
    assert [sha256_file(p) for p in shard_paths(out)] == [sha256_file(p) for p in shard_paths(clean)]


def test_deleting_the_last_shard_rebuilds_only_it(digits_teacher, prompt_file, tmp_path):
    out = tmp_path / "pairs"
    generate(digits_teacher, prompt_file, out)
    old = assert_manifest_matches_files(out)
    (out / shard_name(2)).unlink()
    with pytest.raises(PairDataError, match=shard_name(2)):
        verify_pairs(out)
    before = stamps(out)
    CountingGenerator.computed = []
    generate(digits_teacher, prompt_file, out, CountingGenerator)
    assert sorted(CountingGenerator.computed) == [8, 9]
    assert {k: v for k, v in stamps(out).items() if k in before} == before
    assert assert_manifest_matches_files(out)["shards"] == old["shards"]


def test_rerun_with_other_settings_is_refused(digits_teacher, prompt_file, tmp_path):
    out = tmp_path / "pairs"
    generate(digits_teacher, prompt_file, out)
    module = ODEPairGenerator(digits_teacher, num_steps=2, cfg_scale=3.0, seed=5)
    data = ODEPairPromptsDataModule(str(prompt_file), str(out), **LAYOUT)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                         callbacks=[ODEPairWriter(progress=False)])
    with pytest.raises(PairDataError, match=r"cfg_scale: 2.0 on disk vs 3.0 now"):
        trainer.predict(module, datamodule=data)


@pytest.mark.parametrize("damage", ["flip_byte", "truncate"])
def test_corrupted_or_truncated_shard_is_named(digits_teacher, prompt_file, tmp_path, damage):
    out = tmp_path / "pairs"
    generate(digits_teacher, prompt_file, out)
    victim = out / shard_name(1)
    data = bytearray(victim.read_bytes())
    if damage == "flip_byte":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[: len(data) - 7]
    victim.write_bytes(bytes(data))
    with pytest.raises(PairDataError, match=rf"{victim}.*corrupted or truncated"):
        verify_pairs(out, teacher=digits_teacher)
    module = ODEPairDataModule(str(out))
    with pytest.raises(PairDataError, match=shard_name(1)):
        module.setup("fit")


def test_manifest_must_match_the_teacher(digits_teacher, prompt_file, tmp_path):
    out = tmp_path / "pairs"
    generate(digits_teacher, prompt_file, out)
    path = out / MANIFEST
    good = json.loads(path.read_text())
    verify_pairs(out, teacher=digits_teacher)
    for key, value, message in [("teacher_family", "sd3", "teacher family 'sd3'"),
                                ("latent_shape", [16, 8, 8], r"shape \[16, 8, 8\]")]:
        path.write_text(json.dumps({**good, key: value}))
        with pytest.raises(PairDataError, match=rf"{path}.*{message}"):
            verify_pairs(out, teacher=digits_teacher)
    path.write_text(json.dumps({**good, "complete": False, "shards": good["shards"][:1]}))
    with pytest.raises(PairDataError, match="1 of 3 shards"):
        verify_pairs(out)
    path.unlink()
    with pytest.raises(PairDataError, match=rf"{path} not found"):
        verify_pairs(out)


def test_shards_are_dealt_to_ranks_without_overlap(prompt_file, tmp_path):
    data = ODEPairPromptsDataModule(str(prompt_file), str(tmp_path / "none"), num_pairs=23, shard_size=4)
    data.setup("predict")
    dealt = [data.pending_shards(r, 3) for r in range(3)]
    assert sorted(k for d in dealt for k in d) == list(range(6))
    assert dealt[0] == [0, 3]


def test_reader_is_lazy_and_pickle_free(digits_teacher, prompt_file, tmp_path):
    out = tmp_path / "pairs"
    generate(digits_teacher, prompt_file, out)
    data = ODEPairDataModule(str(out), batch_size=2)
    data.setup("fit")
    assert not data.dataset._handles  # nothing opened before the first item
    item = data.dataset[9]
    assert list(data.dataset._handles) == [2] and item["index"] == 9
    import pickle

    clone = pickle.loads(pickle.dumps(data.dataset))  # what a DataLoader worker receives
    assert not clone._handles and torch.equal(clone[9]["x0"], item["x0"])


DDP_SCRIPT = textwrap.dedent("""
    import sys, torch, lightning.pytorch as pl
    torch.set_num_threads(1)
    from dmdx_lightning.teachers.digits import DigitsTeacher
    from dmdx_lightning.data.ode_pairs import ODEPairPromptsDataModule
    from dmdx_lightning.methods.ode_pairs import ODEPairGenerator, ODEPairWriter
    prompts, out, devices = sys.argv[1], sys.argv[2], int(sys.argv[3])
    module = ODEPairGenerator(DigitsTeacher(), num_steps=2, cfg_scale=2.0, seed=5)
    data = ODEPairPromptsDataModule(prompts, out, num_pairs=10, shard_size=4, batch_size=3)
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                         logger=False, enable_progress_bar=False, callbacks=[ODEPairWriter(progress=False)])
    trainer.predict(module, datamodule=data)
""")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_one_and_two_processes_write_identical_shards(prompt_file, tmp_path):
    script = tmp_path / "make_pairs.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    for devices in (1, 2):
        done = subprocess.run([sys.executable, str(script), str(prompt_file), str(tmp_path / f"w{devices}"),
                               str(devices)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = (assert_manifest_matches_files(tmp_path / f"w{d}") for d in (1, 2))
    assert one["shards"] == two["shards"]
    assert [p.read_bytes() for p in shard_paths(tmp_path / "w1")] == \
        [p.read_bytes() for p in shard_paths(tmp_path / "w2")]


def corrupt_one_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_fit_stops_on_a_corrupted_shard_before_any_training_step(digits_teacher, prompt_file, tmp_path):
    from dmdx_lightning.discriminators.pixel import PixelDiscriminator
    from dmdx_lightning.evaluation.digits import DigitsClassifierBackbone
    from dmdx_lightning.methods.adp import ADPModule

    out = tmp_path / "pairs"
    generate(digits_teacher, prompt_file, out)
    corrupt_one_byte(out / shard_name(2))
    steps = []

    class Recording(ADPModule):
        def training_step(self, batch, batch_idx):
            steps.append(batch_idx)
            return super().training_step(batch, batch_idx)

    module = Recording(digits_teacher, pixel_discriminator=PixelDiscriminator(DigitsClassifierBackbone()))
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(PairDataError, match=str(out / shard_name(2))):
        trainer.fit(module, datamodule=ODEPairDataModule(str(out), batch_size=2))
    assert steps == [] and trainer.global_step == 0


@pytest.mark.slow
def test_dmdx_fit_on_the_adp_config_exits_naming_the_corrupted_shard(digits_teacher, prompt_file, tmp_path):
    out = tmp_path / "pairs"
    generate(digits_teacher, prompt_file, out)
    corrupt_one_byte(out / shard_name(1))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "dmdx_lightning.cli", "fit", "--config", str(ROOT / "configs/quickstart/adp.yaml"),
         "--data.init_args.path", str(out), "--data.init_args.batch_size", "2"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert f"ODE-pair shard {out / shard_name(1)} fails its checksum" in done.stderr
    assert not (tmp_path / "runs/quickstart/adp/checkpoints").exists()  # no step was taken
