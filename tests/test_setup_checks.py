"""What can fail late is checked before the first training step (issue 26): the sample grid's and the
metrics' prompts and values, the metric networks' paths, the output folders and CogVideoX's VAE tiling
at parse time; the metric networks offline, the tiling on the built VAE and the free disk for a
checkpoint at setup (:class:`~dmdx_lightning.callbacks.setup_checks.SetupChecks`), on every rank."""

from __future__ import annotations

import shutil
import time
from collections import namedtuple
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from dmdx_lightning.callbacks.setup_checks import SetupChecks, checkpoint_bytes
from dmdx_lightning.cli import main as dmdx
from dmdx_lightning.errors import ConfigError, SetupError

ADM = "configs/quickstart/adm.yaml"
COGVIDEOX = "configs/cogvideox/adm_2b_8step.yaml"
_TEACHER = "--model.init_args.teacher.init_args."
#: the session's tiny CogVideoX (9 frames of 32x32 px) in place of the hub id, with the config's tiling on
COGVIDEOX_TINY_TILED = [_TEACHER + "pretrained_model_name_or_path", "{tiny_cogvideox}", _TEACHER + "num_frames", "9",
                        _TEACHER + "height", "32", _TEACHER + "width", "32", _TEACHER + "max_sequence_length", "8",
                        _TEACHER + "vae_tiling", "true"]


def callbacks(*lines: str) -> tuple[str, str]:
    """A config file (written into the test's folder, passed with ``--config``) whose
    ``trainer.callbacks`` are ``lines``, each ``{class_path: X, init_args: {...}}`` (YAML flow style)."""
    return ("file", "trainer:\n  callbacks:\n" + "".join(f"    - {line}\n" for line in lines))


def _args(extra, tmp_path, request=None) -> list[str]:
    args = []
    for i, arg in enumerate(extra):
        if isinstance(arg, tuple):  # a config file of the case's own, given with --config
            path = tmp_path / f"case_{i}.yaml"
            path.write_text(arg[1].replace("{tmp}", str(tmp_path)))
            args.append("--config")
            arg = str(path)
        if "{tiny_cogvideox}" in arg:
            arg = arg.replace("{tiny_cogvideox}", str(request.getfixturevalue("tiny_cogvideox_dir")))
        args.append(arg.replace("{tmp}", str(tmp_path)))
    return args


# (id, base config, extra arguments, what the message must say): refused at parse time, nothing built
PARSE_CASES = [
    ("sample grid without prompts", ADM, [callbacks("{class_path: SampleGrid, init_args: {prompts: []}}")],
     "trainer.callbacks[0].init_args.prompts = []: an empty list of prompts. Leave prompts out"),
    ("sample grid with an empty prompt", ADM, [callbacks("{class_path: SampleGrid, init_args: {prompts: [a cat, '']}}")],
     "prompt(s) [1] are empty or not text"),
    ("sample grid cadence negative", ADM, [callbacks("{class_path: SampleGrid, init_args: {every_n_steps: -5}}")],
     "trainer.callbacks[0].init_args.every_n_steps = -5: must be an integer >= 0"),
    ("sample grid zero samples", ADM, [callbacks("{class_path: SampleGrid, init_args: {samples_per_prompt: 0}}")],
     "trainer.callbacks[0].init_args.samples_per_prompt = 0: must be an integer >= 1"),
    ("metric prompt file missing", ADM,
     [callbacks("{class_path: CLIPScoreCallback, init_args: {prompt_file: '{tmp}/eval.txt'}}")],
     "prompt file {tmp}/eval.txt (trainer.callbacks[0].init_args.prompt_file) not found"),
    ("metric prompt file empty", ADM,
     [callbacks("{class_path: LPIPSDiversityCallback, init_args: {prompt_file: '{tmp}/empty.txt'}}")],
     "prompt file {tmp}/empty.txt contains no prompts"),
    ("metric prompts and prompt file", ADM,
     [callbacks("{class_path: CLIPScoreCallback, init_args: {prompts: [a], prompt_file: configs/prompts/eval.txt}}")],
     "trainer.callbacks[0].init_args.prompts / prompt_file = (['a'], 'configs/prompts/eval.txt'): give exactly one"),
    ("metric without prompts", ADM, [callbacks("{class_path: CLIPScoreCallback}")], "give exactly one"),
    ("metric max_prompts 0", ADM,
     [callbacks("{class_path: CLIPScoreCallback, init_args: {prompts: [a], max_prompts: 0}}")],
     "trainer.callbacks[0].init_args.max_prompts = 0: must be an integer >= 1"),
    ("CLIP folder missing", ADM,
     [callbacks("{class_path: CLIPScoreCallback, init_args: {prompts: [a], model_name_or_path: '{tmp}/clip'}}")],
     "trainer.callbacks[0].init_args.model_name_or_path = '{tmp}/clip': no such folder"),
    ("CLIP folder without a model", ADM,
     [callbacks("{class_path: CLIPScoreCallback, init_args: {prompts: [a], model_name_or_path: '{tmp}'}}")],
     "has no config.json: not a save_pretrained folder of a CLIPModel and its processor"),
    ("LPIPS backbone file missing", ADM,
     [callbacks("{class_path: LPIPSDiversityCallback, init_args: {prompts: [a], backbone_weights: '{tmp}/alex.pth'}}")],
     "trainer.callbacks[0].init_args.backbone_weights = '{tmp}/alex.pth': no such file"),
    ("LPIPS one sample per prompt", ADM,
     [callbacks("{class_path: LPIPSDiversityCallback, init_args: {prompts: [a], samples_per_prompt: 1}}")],
     "trainer.callbacks[0].init_args.samples_per_prompt = 1: diversity compares pairs"),
    ("checkpoint folder is a file", ADM,
     [callbacks("{class_path: ModelCheckpoint, init_args: {dirpath: '{tmp}/a_file/ckpt'}}")],
     "trainer.callbacks[0].init_args.dirpath = '{tmp}/a_file/ckpt': {tmp}/a_file is a file, not a folder"),
    ("CogVideoX VAE tiling on a video smaller than its tiles", COGVIDEOX, COGVIDEOX_TINY_TILED,
     "model.init_args.teacher.init_args.vae_tiling = True: diffusers' tiled VAE decode of a 32 px height gives 36 px "
     "(a 32x32 px video, height x width, in the VAE's 16x16 px tiles"),
]


@pytest.mark.parametrize("base, extra, expected", [c[1:] for c in PARSE_CASES], ids=[c[0] for c in PARSE_CASES])
def test_refused_at_parse_time(base, extra, expected, tmp_path, capsys, request):
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "empty.txt").write_text("# only a comment\n")
    args = _args(extra, tmp_path, request)
    capsys.readouterr()  # what building a session fixture printed
    before = sorted(tmp_path.rglob("*"))
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit:
        dmdx(["fit", "--config", base, "--trainer.default_root_dir", str(tmp_path / "run"), *args])
    err = capsys.readouterr().err
    assert exit.value.code == 2
    assert expected.replace("{tmp}", str(tmp_path)) in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 2
    assert sorted(tmp_path.rglob("*")) == before  # nothing written: no run folder, no config.yaml
    assert time.perf_counter() - start < 60  # parsed and refused: nothing loaded, no step


# ----------------------------------------------------------------------------- at setup, through `dmdx fit`
@pytest.fixture
def no_step(monkeypatch):
    """A training step fails the test: the checks must stop the run before the first one."""
    from dmdx_lightning.methods.adm import ADMModule

    def step(*args, **kwargs):
        raise AssertionError("a training step ran before the setup checks refused the run")

    monkeypatch.setattr(ADMModule, "training_step", step)


def fit_refused(tmp_path, capsys, *extra) -> str:
    """``dmdx fit`` of the quickstart (4 iterations, a checkpoint after each) that must be refused at
    setup: exit status 2, one paragraph, no checkpoint; returns the message."""
    root = tmp_path / "run"
    with pytest.raises(SystemExit) as exit:
        dmdx(["fit", "--config", ADM, "--trainer.default_root_dir", str(root), "--trainer.max_steps", "4",
              "--trainer.enable_progress_bar", "false", *_args(extra, tmp_path)])
    err = capsys.readouterr().err
    assert exit.value.code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 2, err
    assert not list(root.rglob("*.ckpt")) and not (root / "checkpoints").exists()
    assert not list(root.rglob("samples"))  # no sample grid either
    return err


CHECKPOINT_EVERY_STEP = callbacks("{class_path: ModelCheckpoint, init_args: {save_last: true, every_n_train_steps: 1}}")
_Usage = namedtuple("usage", "total used free")


def test_too_little_disk_for_one_checkpoint_is_refused_at_setup(tmp_path, capsys, monkeypatch, no_step):
    seen = []

    def disk_usage(path):
        seen.append(str(path))
        return _Usage(10 * 2 ** 30, 10 * 2 ** 30 - 1000, 1000)  # 1000 bytes free

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    start = time.perf_counter()
    err = fit_refused(tmp_path, capsys, CHECKPOINT_EVERY_STEP)
    assert f"checkpoint folder {tmp_path / 'run' / 'checkpoints'} (the ModelCheckpoint's dirpath" in err, err
    assert "0.98 KiB free on its disk, but one checkpoint of this run takes about" in err, err
    assert " MiB (the trainable weights and AdamW's two moments of each, plus the persistent buffers)" in err
    assert "Free space there, or set the ModelCheckpoint's dirpath (or trainer.default_root_dir)" in err
    assert seen and all(str(tmp_path) in p for p in seen)  # the folder's disk (its nearest existing parent)
    assert time.perf_counter() - start < 120  # the digits teacher builds, nothing trains


def test_clip_hub_id_offline_and_not_cached_is_refused_when_validation_runs(tmp_path, capsys, monkeypatch, no_step):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = ("file", "data:\n  init_args: {val_file: configs/prompts/digits.txt}\n"
                      "trainer:\n  val_check_interval: 2\n  callbacks:\n"
                      "    - {class_path: CLIPScoreCallback, init_args: {model_name_or_path: dmdx-tests/clip-never-downloaded,"
                      " prompts: [the digit 3]}}\n")
    err = fit_refused(tmp_path, capsys, config)
    assert ("trainer.callbacks[CLIPScoreCallback].init_args.model_name_or_path = 'dmdx-tests/clip-never-downloaded': is "
            "not in the local Hugging Face cache and the Hub is offline (HF_HUB_OFFLINE=1). Download it where there "
            "is network (`hf download dmdx-tests/clip-never-downloaded`)") in err, err


def test_lpips_backbone_offline_and_not_cached_is_refused_when_validation_runs(tmp_path, capsys, monkeypatch, no_step):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # torchvision's cache, empty
    config = ("file", "data:\n  init_args: {val_file: configs/prompts/digits.txt}\n"
                      "trainer:\n  val_check_interval: 2\n  callbacks:\n"
                      "    - {class_path: LPIPSDiversityCallback, init_args: {prompts: [the digit 3]}}\n")
    err = fit_refused(tmp_path, capsys, config)
    assert ("trainer.callbacks[LPIPSDiversityCallback].init_args.backbone_weights = None: LPIPS needs torchvision's "
            "ImageNet alex weights, which are not in its cache") in err, err
    assert "alexnet-owt-7be5be79.pth" in err


def test_metric_networks_are_not_checked_when_validation_never_runs(tmp_path):
    """A metric whose network would not load is no reason to stop a run that never validates (no
    validation prompts, or a first check beyond max_steps): the network loads on first use."""
    from dmdx_lightning.callbacks.metrics import CLIPScoreCallback, reaches_validation

    def trainer(loaders, interval=2, max_steps=4, limit=1.0):
        source = SimpleNamespace(is_defined=lambda: True, is_module=lambda: False, instance=loaders)
        loop = SimpleNamespace(_data_source=source)
        return SimpleNamespace(limit_val_batches=limit, validate_loop=loop,
                               fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(val_loop=loop)),
                               num_sanity_val_steps=2, val_check_interval=interval, max_steps=max_steps)

    assert reaches_validation(trainer(["loader"]), "fit")
    assert not reaches_validation(trainer([]), "fit")  # PromptDataModule without validation prompts
    assert not reaches_validation(trainer(["loader"], interval=500), "fit")  # the shipped configs' in a short test
    assert reaches_validation(trainer(["loader"], interval=500), "fit", on_sanity_check=True)
    assert reaches_validation(trainer(["loader"], interval=500), "validate")
    assert not reaches_validation(trainer(["loader"], limit=0), "validate")
    assert not reaches_validation(trainer(["loader"]), "predict")
    callback = CLIPScoreCallback(model_name_or_path=str(tmp_path / "nowhere"), prompts=["a"])
    callback.check_setup(trainer([]), None, "fit")  # never validates: nothing to refuse
    with pytest.raises(ConfigError, match="no such folder"):
        callback.check_setup(trainer(["loader"]), None, "fit")


# ----------------------------------------------------------------------------- CogVideoX: the built VAE
def test_cogvideox_tiling_is_refused_on_the_built_vae_before_any_step(tiny_cogvideox_dir, tmp_path, no_step):
    """A teacher built in Python skips the config check; SetupChecks asks the built teacher
    (``Teacher.check_setup``), which reads the VAE's own tile sizes, before the first step."""
    from dmdx_lightning.data.prompts import PromptDataModule
    from dmdx_lightning.discriminators.latent import LatentDiscriminator
    from dmdx_lightning.methods.adm import ADMModule
    from dmdx_lightning.teachers.cogvideox import CogVideoXTeacher

    options = dict(num_frames=9, height=32, width=32, max_sequence_length=8, mode="lora", lora_rank=4)
    CogVideoXTeacher(str(tiny_cogvideox_dir), vae_tiling=False, **options).check_setup()  # untiled: fine
    teacher = CogVideoXTeacher(str(tiny_cogvideox_dir), vae_tiling=True, **options)
    assert (teacher.vae.tile_sample_min_height, teacher.vae.tile_sample_min_width) == (16, 16)
    module = ADMModule(teacher, LatentDiscriminator(layers=[0, -1], head_channels=8), student_steps=2)
    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[SetupChecks(), ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1)])
    with pytest.raises(ConfigError, match=r"model\.init_args\.teacher\.init_args\.vae_tiling = True: diffusers' tiled "
                                          r"VAE decode of a 32 px height gives 36 px.*Set vae_tiling: false"):
        trainer.fit(module, PromptDataModule(str(tmp_path / "prompts.txt"), batch_size=2))
    assert trainer.global_step == 0 and not (tmp_path / "ckpt").exists()


# ----------------------------------------------------------------------------- the checkpoint size and the disk
class _Net(torch.nn.Module):
    def __init__(self, device=None):
        super().__init__()
        self.trained = torch.nn.Linear(10, 6, device=device)  # 66 fp32
        self.half = torch.nn.Linear(4, 4, device=device).to(torch.bfloat16)  # 20 bf16
        self.frozen = torch.nn.Linear(100, 100, device=device).requires_grad_(False)  # not saved
        self.register_buffer("shadow", torch.zeros(8, dtype=torch.float64, device=device))  # saved
        self.register_buffer("cache", torch.zeros(1000, device=device), persistent=False)  # not saved


def test_checkpoint_bytes_counts_trainable_state_by_dtype():
    expected = 3 * (66 * 4 + 20 * 2) + 8 * 8
    assert checkpoint_bytes(_Net()) == expected
    assert checkpoint_bytes(_Net(device="meta")) == expected  # FSDP2's role copies before they are filled
    assert checkpoint_bytes(_Net(), optimizer_states=0) == 66 * 4 + 20 * 2 + 8 * 8  # save_weights_only


def test_checkpoint_bytes_counts_whole_fsdp2_parameters():
    """Under FSDP2 each rank holds a shard; ``numel`` of the DTensor is the whole parameter's, so
    every rank estimates the whole checkpoint (a fake 4-rank group in this one process)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    whole = checkpoint_bytes(net)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=4)
    try:
        fully_shard(net, mesh=init_device_mesh("cpu", (4,)))
        assert sum(p.to_local().numel() for p in net.parameters()) < sum(p.numel() for p in net.parameters())
        assert checkpoint_bytes(net) == whole == 3 * 4 * (8 * 16 + 16 + 16 * 4 + 4)
    finally:
        dist.destroy_process_group()


def _trainer(tmp_path, **checkpoint):
    return SimpleNamespace(checkpoint_callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", **checkpoint)],
                           default_root_dir=str(tmp_path), world_size=1, callbacks=[])


@pytest.mark.parametrize("free_checkpoints, outcome", [(0.5, "refused"), (2.5, "warned"), (3.5, "fine")])
def test_free_disk_thresholds(free_checkpoints, outcome, tmp_path, monkeypatch):
    needed = checkpoint_bytes(_Net())
    monkeypatch.setattr(shutil, "disk_usage", lambda path: _Usage(2 ** 40, 0, int(free_checkpoints * needed)))
    checks = SetupChecks()
    if outcome == "refused":
        with pytest.raises(SetupError, match=r"checkpoint folder .*ckpt .* free on its disk, but one checkpoint"):
            checks.check_disk(_trainer(tmp_path), _Net())
        return
    warnings = checks.check_disk(_trainer(tmp_path), _Net())
    assert bool(warnings) == (outcome == "warned")
    if warnings:
        assert "room for 2 checkpoint(s)" in warnings[0]


def test_weights_only_checkpoints_need_no_optimizer_room(tmp_path, monkeypatch):
    needed = checkpoint_bytes(_Net(), optimizer_states=0)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: _Usage(2 ** 40, 0, 3 * needed))
    assert SetupChecks().check_disk(_trainer(tmp_path, save_weights_only=True), _Net()) == []


# ----------------------------------------------------------------------------- ranks agree
class FullDiskOnRank(pl.Callback):
    """Loaded by ``class_path`` in a DDP run: ``shutil.disk_usage`` reports a full disk on ``rank``
    alone, from this callback's setup on (a config's callbacks set up before SetupChecks)."""

    def __init__(self, rank: int = 1) -> None:
        self.rank = rank

    def setup(self, trainer, pl_module, stage):
        if trainer.global_rank == self.rank:
            shutil.disk_usage = lambda path: _Usage(2 ** 40, 2 ** 40, 0)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_check_failing_on_one_rank_stops_every_rank(tmp_path):
    """Rank 1's disk is full, rank 0's is not: both stop at setup with rank 1's message (rank 0 alone
    going on would wait forever in its first collective), nothing trains, nothing is saved."""
    from tests.helpers import dmdx_fit

    result = dmdx_fit("--config", "tests/configs/adm_tiny.yaml", "--config", "configs/trainer/ddp_cpu.yaml",
                      "--trainer.default_root_dir", str(tmp_path),
                      "--trainer.callbacks+=tests.test_setup_checks.FullDiskOnRank", timeout=300)
    assert result.returncode == 2, result.stderr[-4000:]
    assert f"dmdx: error: rank 1: checkpoint folder {tmp_path}" in result.stderr, result.stderr[-4000:]
    assert "0 bytes free on its disk, but one checkpoint of this run takes about" in result.stderr
    assert not list(tmp_path.rglob("*.ckpt"))
