"""FSDP2 (configs/trainer/fsdp2.yaml, dmdx_lightning.strategies.FSDP2Strategy) on CPU processes (gloo).

The reference of a sharded run is the same run without sharding: N processes under FSDP2 train as
N DDP processes (the same prompts and noise on every rank; only the gradients' reduction differs:
reduce-scatter of shards vs all-reduce), to float tolerance; with one process DDP is the plain run
(both strategies reseed at setup, which a run without a strategy does not, so that is the reference). ADM and DMD2, full and LoRA mode, on the
digits teacher; a real diffusers family (tiny SD3) in full and LoRA mode.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT, dmdx_env, dmdx_fit
from tests.test_configs import COGVIDEOX_TINY, FLUX_TINY, SD3_TINY, SDXL_TINY, TINY_HEADS, WAN_A14B_TINY, WAN_TINY

TINY = "tests/configs/adm_tiny.yaml"
LR = 1e-3  # every player's in TINY
FSDP2 = "configs/trainer/fsdp2.yaml"
#: fp32 on CPU: no compute cast, so the sharded run is comparable with the plain one to float rounding
FP32 = ["--trainer.strategy.init_args.param_dtype", "null", "--trainer.strategy.init_args.reduce_dtype", "null"]
METHODS = {
    "adm": [],
    # DMD2: the GAN head on the fake score's features, TTUR 5 (iteration 0 steps every player,
    # iteration 1 the fake score and the discriminator)
    "dmd2": ["--model.init_args.loss", "dmd2", "--model.init_args.update_ratio", "5",
             "--model.init_args.discriminator.init_args.backbone_role", "fake"],
}
MODES = {"full": [], "lora": ["--model.init_args.teacher.init_args.mode", "lora"]}


@pytest.fixture(scope="module")
def digits_pairs(tmp_path_factory):
    """A config overlay that trains on 64 digits ODE pairs (DMD2's GAN head needs real latents)."""
    root = tmp_path_factory.mktemp("pairs")
    result = subprocess.run([sys.executable, "-m", "dmdx_lightning.cli", "predict", "--config",
                             "configs/quickstart/ode_pairs.yaml", "--model.init_args.num_steps", "2",
                             "--data.init_args.num_pairs", "64", "--data.init_args.shard_size", "32",
                             "--trainer.default_root_dir", str(root / "pairs")],
                            cwd=ROOT, env=dmdx_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    overlay = root / "pairs.yaml"
    overlay.write_text(f"data:\n  class_path: dmdx_lightning.data.ode_pairs.ODEPairDataModule\n"
                       f"  init_args: {{path: {root / 'pairs'}, batch_size: 4}}\n")
    return ["--config", str(overlay)]


def run(tmp_path, name: str, *args: str, devices: int = 1, timeout: float = 600, config: str = TINY) -> list[dict]:
    out = tmp_path / name
    result = dmdx_fit("--config", config, *args, "--trainer.devices", str(devices),
                      "--trainer.default_root_dir", str(out),
                      "--trainer.callbacks+=tests.helpers.TrainedState", f"--trainer.callbacks.dir={out / 'report'}",
                      timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return [torch.load(out / "report" / f"rank{r}.pt", weights_only=True) for r in range(devices)]


def assert_same_training(runs: list[dict], references: list[dict]) -> None:
    """Every loss to 0.1% (an iteration changes them by 1-60%); the weights to a few optimizer steps' size.

    The weights get the looser check because AdamW's first steps move each weight by about ``lr``
    whatever its gradient's size: where a gradient is near zero (the discriminator's last bias sees
    the real and fake halves cancel at the start), a rounding-level difference between all-reduce and
    reduce-scatter flips the step's sign. The losses of the later iterations are computed from the
    updated weights, so a wrong gradient (unreduced, reduced twice, on the wrong rank) shows there;
    the same sign flips make them differ by up to 1e-4 relative on four ranks.
    """
    for run_, ref in zip(runs, references, strict=True):
        assert run_["global_step"] == ref["global_step"] and run_["world_size"] == ref["world_size"]
        assert len(run_["losses"]) == len(ref["losses"]) and run_["losses"][0]
        for i, (a, b) in enumerate(zip(run_["losses"], ref["losses"])):
            assert a.keys() == b.keys()
            for k in a:
                assert a[k] == pytest.approx(b[k], rel=1e-3, abs=1e-6), f"rank {runs.index(run_)}, iteration {i}, {k}"
    state, ref = runs[0]["state"], references[0]["state"]
    assert state.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(state[k], ref[k], rtol=0, atol=5 * LR, msg=k)


#: (processes, method, mode): every method x mode on two processes, one on four (one process:
#: the checkpoint, bf16 and meta tests below)
CASES = [(2, "adm", "full"), (2, "adm", "lora"), (2, "dmd2", "full"), (2, "dmd2", "lora"), (4, "dmd2", "full")]


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("devices,method,mode", CASES)
def test_fsdp2_trains_as_ddp(devices, method, mode, tmp_path, request):
    """Every player's loss at every iteration on every rank, and the trained state, as under DDP."""
    data = request.getfixturevalue("digits_pairs") if method == "dmd2" else []
    args = [*data, *METHODS[method], *MODES[mode], "--trainer.max_steps", "3"]
    ddp = run(tmp_path, "ddp", "--config", "configs/trainer/ddp_cpu.yaml", *args, devices=devices)
    sharded = run(tmp_path, "fsdp2", "--config", FSDP2, *FP32, *args, devices=devices)
    assert_same_training(sharded, ddp)


def checkpoint_run(tmp_path, name: str, *args: str, devices: int) -> tuple:
    out = tmp_path / name
    ranks = run(tmp_path, name, "--config", FSDP2, *FP32, *args,
                "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                f"--trainer.callbacks.dirpath={out / 'ckpt'}", "--trainer.callbacks.every_n_train_steps=1",
                "--trainer.callbacks.save_top_k=-1", "--trainer.callbacks.filename={step}", devices=devices)
    return out, ranks


@pytest.mark.multiprocess
@pytest.mark.slow
def test_fsdp2_sharded_checkpoints_resume_exactly_reshard_and_export(tmp_path):
    """Full-mode ADM with EMA on 2 processes writes checkpoint folders of the trainable state alone;
    a resume on 2 processes ends bitwise where the uninterrupted run ends; 1 and 4 processes load
    them (resharded); `dmdx export` and init_from read them in one process."""
    from dmdx_lightning.methods.base import load_student
    from dmdx_lightning.sharded_checkpoint import is_sharded_checkpoint, read_sharded_checkpoint
    from dmdx_lightning.teachers.digits import DigitsTeacher

    reference, ref = checkpoint_run(tmp_path, "reference", "--trainer.max_steps", "3", devices=2)
    folder = reference / "ckpt" / "step=2.ckpt"
    assert is_sharded_checkpoint(folder) and len(list(folder.glob("*.distcp"))) == 2
    assert not list((reference / "ckpt").glob(".partial-*"))  # written aside, then renamed into place
    saved = read_sharded_checkpoint(folder, ref[0]["state"])
    # exactly the trainable state and the buffers: no frozen teacher weight
    assert saved["state_dict"].keys() == ref[0]["state"].keys()
    assert not any(k.startswith("teacher.denoiser.") for k in saved["state_dict"])
    assert saved["global_step"] == 2 and saved["dmdx"]["rng"]["torch_per_rank"].shape[0] == 2

    # the same world size: bitwise the uninterrupted run, every rank (weights, losses of iteration 3)
    _, resumed = checkpoint_run(tmp_path, "resumed", "--trainer.max_steps", "3", "--ckpt_path", str(folder), devices=2)
    for r in range(2):
        assert resumed[r]["ckpt_path"].endswith("step=2.ckpt") and resumed[r]["global_step"] == 3
        assert resumed[r]["losses"] == ref[r]["losses"][2:]
    for k, v in ref[0]["state"].items():
        torch.testing.assert_close(resumed[0]["state"][k], v, rtol=0, atol=0, msg=k)

    # another world size: the shards are redistributed (4 ranks load the state as saved; 1 rank trains on)
    _, four = checkpoint_run(tmp_path, "four", "--trainer.max_steps", "2", "--ckpt_path", str(folder), devices=4)
    for k, v in saved["state_dict"].items():
        torch.testing.assert_close(four[0]["state"][k], v, rtol=0, atol=0, msg=k)
    _, one = checkpoint_run(tmp_path, "one", "--trainer.max_steps", "3", "--ckpt_path", str(folder), devices=1)
    assert one[0]["global_step"] == 3 and len(one[0]["losses"]) == 1

    # one process reads the student (its EMA) from the folder: init_from, export
    last = reference / "ckpt" / "step=3.ckpt"
    teacher = DigitsTeacher(mode="full", sample_steps=4)
    assert load_student(teacher, str(last))
    shadows = [ref[0]["state"][f"ema.shadow_{i}"] for i in range(len(teacher.trainable_parameters("student")))]
    for p, shadow in zip(teacher.trainable_parameters("student"), shadows):
        torch.testing.assert_close(p.detach(), shadow, rtol=0, atol=0)
    result = subprocess.run([sys.executable, "-m", "dmdx_lightning.cli", "export", "--ckpt_path", str(last),
                             "--config", str(reference / "config.yaml"), "--output", str(tmp_path / "export")],
                            cwd=ROOT, env=dmdx_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "export" / "student.safetensors").is_file()


@pytest.mark.slow
def test_fsdp2_save_that_fails_midway_leaves_the_last_good_checkpoint(tmp_path, monkeypatch):
    """A full disk while the shards are written: the error reaches the caller, the checkpoint of
    that name is still the previous one, and no partial folder is left behind."""
    import errno

    import torch.distributed.checkpoint as dcp

    from dmdx_lightning.sharded_checkpoint import read_sharded_checkpoint
    from dmdx_lightning.training_cli import DMDXCLI

    monkeypatch.chdir(ROOT)
    try:
        cli = DMDXCLI(args=["--config", TINY, "--config", FSDP2, *FP32, "--trainer.max_steps", "1",
                            "--trainer.enable_checkpointing", "false", "--trainer.default_root_dir", str(tmp_path)],
                      run=False)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        target = tmp_path / "last.ckpt"
        cli.trainer.save_checkpoint(target)
        good = read_sharded_checkpoint(target, cli.model.checkpoint_keys())
        assert good["global_step"] == 1 and good["state_dict"]

        real_save = dcp.save

        def full_disk(state, checkpoint_id, **kwargs):
            real_save(state, checkpoint_id=checkpoint_id, **kwargs)  # the shards are on disk ...
            raise OSError(errno.ENOSPC, "No space left on device")  # ... and the last write fails

        monkeypatch.setattr(dcp, "save", full_disk)
        with pytest.raises(OSError, match="No space left"):
            cli.trainer.save_checkpoint(target)
        again = read_sharded_checkpoint(target, cli.model.checkpoint_keys())
        assert again["global_step"] == good["global_step"]
        for k, v in good["state_dict"].items():
            torch.testing.assert_close(again["state_dict"][k], v, rtol=0, atol=0)
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".partial-")) == []
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@pytest.mark.multiprocess
@pytest.mark.slow
def test_fsdp2_adp_trains_as_ddp(tmp_path, digits_pairs):
    """ADP (latent and pixel discriminators: the pixel heads are units of their own, the digits
    classifier standing in for SAM stays whole) on 2 processes, full mode."""
    args = ["--config", "configs/trainer/ddp_cpu.yaml", *digits_pairs, "--trainer.max_steps", "3",
            "--trainer.callbacks", "[]", "--trainer.logger", "false"]
    ddp = run(tmp_path, "ddp", *args, devices=2, config="configs/quickstart/adp.yaml")
    sharded = run(tmp_path, "fsdp2", *args, "--config", FSDP2, *FP32, devices=2, config="configs/quickstart/adp.yaml")
    assert_same_training(sharded, ddp)


#: shipped configs of the diffusers families under FSDP2 on 2 processes (tiny random weights):
#: SD3 in full mode (three copies), SDXL's UNet and CogVideoX's 3D transformer in LoRA mode (one
#: shared network); the student's step count
FAMILY_CONFIGS = {"sd3/adm_sd35_large_4step.yaml": ("tiny_sd3_dir", SD3_TINY + TINY_HEADS, 4),
                  "sdxl/adm_4step.yaml": ("tiny_sdxl_dir", SDXL_TINY, 4),
                  "cogvideox/adm_2b_8step.yaml": ("tiny_cogvideox_dir", COGVIDEOX_TINY + TINY_HEADS, 8)}
FAMILY_CONFIGS["wan/adm_14b_4step.yaml"] = ("tiny_wan_dir", WAN_TINY + TINY_HEADS, 4)  # LoRA on the 3D DiT's blocks
# two experts: with one sample per rank, a rank whose sample is above the boundary runs the other expert on
# one token, so both ranks gather and reduce every block of both experts (else FSDP2 hangs)
FAMILY_CONFIGS["wan/adm_a14b_4step.yaml"] = ("tiny_wan_a14b_dir", WAN_A14B_TINY + TINY_HEADS, 4)
FAMILY_CONFIGS["flux/adm_dev_4step.yaml"] = ("tiny_flux_dir", FLUX_TINY + TINY_HEADS, 4)  # LoRA; double + single blocks


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("config", list(FAMILY_CONFIGS))
def test_fsdp2_trains_every_family_as_ddp(config, tmp_path, request):
    """Each diffusers family's shipped config, sharded per transformer / UNet block, trains as DDP.

    The multi-step student's backward simulation runs its first steps without gradient, then trains
    one: under FSDP2 every rank runs rank 0's draw (every forward is a collective), under DDP each
    its own, so here the trained step is fixed at the last one (``first_trained_step``) and both
    strategies run all the student's steps on every rank.
    """
    fixture, tiny, steps = FAMILY_CONFIGS[config]
    folder = request.getfixturevalue(fixture)
    placeholder = "{" + fixture.removesuffix("_dir") + "}"
    args = ["--config", f"configs/{config}", *[a.replace(placeholder, str(folder)) for a in tiny],
            "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.max_steps", "2",
            "--trainer.logger", "false", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
            "--trainer.callbacks", "[]", "--data.init_args.batch_size", "1",
            "--model.init_args.first_trained_step", str(steps - 1)]

    def fit(name, *overlay):
        out = tmp_path / name
        result = dmdx_fit(*args, *overlay, "--trainer.devices", "2", "--trainer.default_root_dir", str(out),
                          "--trainer.callbacks+=tests.helpers.TrainedState", f"--trainer.callbacks.dir={out / 'report'}",
                          timeout=900)
        assert result.returncode == 0, result.stderr[-4000:]
        return [torch.load(out / "report" / f"rank{r}.pt", weights_only=True) for r in range(2)]

    ddp = fit("ddp", "--trainer.strategy", "ddp_find_unused_parameters_true")
    sharded = fit("fsdp2", "--config", FSDP2, *FP32)
    assert_same_training(sharded, ddp)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_fsdp2_single_file_checkpoint_resumes_exactly(tmp_path):
    """``sharded_checkpoint: false``: rank 0 writes one consolidated file (the trainable state only),
    which a 2-process run resumes to the uninterrupted run's weights and which export reads."""
    single = ["--trainer.strategy.init_args.sharded_checkpoint", "false"]
    reference, ref = checkpoint_run(tmp_path, "reference", *single, "--trainer.max_steps", "3", devices=2)
    path = reference / "ckpt" / "step=2.ckpt"
    assert path.is_file()
    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert saved["state_dict"].keys() == ref[0]["state"].keys()
    _, resumed = checkpoint_run(tmp_path, "resumed", *single, "--trainer.max_steps", "3", "--ckpt_path", str(path),
                                devices=2)
    for r in range(2):
        assert resumed[r]["global_step"] == 3 and resumed[r]["losses"] == ref[r]["losses"][2:]
    for k, v in ref[0]["state"].items():
        torch.testing.assert_close(resumed[0]["state"][k], v, rtol=0, atol=0, msg=k)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_fsdp2_with_compiled_blocks_trains_as_without(tmp_path):
    """``compile`` under FSDP2 (2 processes, LoRA): the blocks are compiled after sharding, FSDP2's
    gathers stay outside the graphs, and training is unchanged (aot_eager: the same kernels)."""
    args = ["--config", FSDP2, *FP32, *MODES["lora"], "--trainer.max_steps", "3"]
    plain = run(tmp_path, "plain", *args, devices=2)
    compiled = run(tmp_path, "compiled", *args, "--model.init_args.compile", "{backend: aot_eager}", devices=2)
    assert_same_training(compiled, plain)


def test_fsdp2_full_mode_builds_role_copies_on_meta_and_fills_them_from_the_real_score(tmp_path, monkeypatch):
    """`dmdx fit` under FSDP2 never holds three whole networks: the student's and fake score's copies
    are structure only until sharding, then get this rank's shards of the loaded real score."""
    from dmdx_lightning.training_cli import DMDXCLI

    monkeypatch.chdir(ROOT)

    def build(*overlay):
        return DMDXCLI(args=["--config", TINY, *overlay, "--trainer.default_root_dir", str(tmp_path)], run=False).model

    sharded, plain = build("--config", FSDP2, *FP32), build("--config", "configs/trainer/ddp_cpu.yaml")
    assert sharded.teacher.has_meta_roles and not plain.teacher.has_meta_roles

    def stored_bytes(module):
        return sum(p.numel() * p.element_size() for p in module.parameters() if not p.is_meta)

    # one network's parameters stored (plus heads), where the DDP build stores three
    assert stored_bytes(sharded.teacher) == stored_bytes(sharded.teacher.denoiser)
    assert stored_bytes(plain.teacher) == 3 * stored_bytes(plain.teacher.denoiser)
    # without sharding (no FSDP2 after all) the copies are filled whole, equal to the real score
    sharded.teacher.fill_role_copies(torch.device("cpu"))
    for role in ("student", "fake"):
        for (name, p), (_, q) in zip(sharded.teacher.roles[role].named_parameters(),
                                     plain.teacher.roles[role].named_parameters()):
            assert torch.equal(p, q), name


@pytest.mark.slow
def test_fsdp2_as_the_gpu_configs_run_it_bf16_mixed(tmp_path):
    """The overlay as shipped (``param_dtype: auto``) under ``trainer.precision: bf16-mixed``, as every
    GPU config: the units gather in bf16, autocast covers what they compute outside their
    parameters, and master weights stay fp32."""
    ranks = run(tmp_path, "bf16", "--config", FSDP2, "--trainer.precision", "bf16-mixed", "--trainer.max_steps", "2")
    assert ranks[0]["global_step"] == 2
    assert all(torch.isfinite(torch.tensor(v)) for step in ranks[0]["losses"] for v in step.values())
    assert all(v.dtype == torch.float32 for k, v in ranks[0]["state"].items() if k.startswith("teacher.roles."))


@pytest.mark.multiprocess
@pytest.mark.slow
def test_hsdp_two_groups_of_two_train_as_ddp(tmp_path):
    """HSDP (``replicate_size: 2`` on 4 processes: shards within each pair, replicas across the pairs)."""
    args = [*MODES["lora"], "--trainer.max_steps", "3"]
    ddp = run(tmp_path, "ddp", "--config", "configs/trainer/ddp_cpu.yaml", *args, devices=4)
    hsdp = run(tmp_path, "hsdp", "--config", FSDP2, *FP32, "--trainer.strategy.init_args.replicate_size", "2", *args,
               devices=4)
    assert_same_training(hsdp, ddp)
