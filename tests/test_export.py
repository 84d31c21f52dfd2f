"""Round trip: a few ADM steps on a tiny SD3 -> `dmdx export` -> diffusers loads it and samples like us."""

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from dmdx_lightning.cli import main as dmdx
from dmdx_lightning.export import EXPORT_INFO, build_module, build_teacher, export, export_checkpoint
from dmdx_lightning.teachers.sd3 import student_flow_scheduler
from tests.conftest import TINY_SD3, prompt_loader

PROMPTS = ["a photo of a cat", "a red bus", "a bowl of soup", "a lighthouse"]


def run_config(tiny_sd3_dir, mode):
    adamw = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-2, "betas": [0.0, 0.99]}}
    return {"model": {"class_path": "dmdx_lightning.methods.adm.ADMModule", "init_args": {
        "teacher": {"class_path": "dmdx_lightning.teachers.sd3.SD3Teacher",
                    "init_args": {"pretrained_model_name_or_path": str(tiny_sd3_dir), "mode": mode, **TINY_SD3}},
        "discriminator": {"class_path": "dmdx_lightning.discriminators.latent.LatentDiscriminator",
                          "init_args": {"layers": [0, -1], "head_channels": 16}},
        "student_steps": 4, "real_cfg_scale": 3.0,
        "generator_optimizer": adamw, "fake_score_optimizer": adamw, "discriminator_optimizer": adamw}}}


@pytest.fixture(scope="module", params=["lora", "full"])
def trained(request, tiny_sd3_dir, tmp_path_factory):
    """A run directory as `dmdx fit` leaves it: config.yaml + checkpoints/last.ckpt after 2 ADM iterations."""
    module, ckpt = train_run(tmp_path_factory.mktemp(f"run_{request.param}"), tiny_sd3_dir, request.param, 2)
    return request.param, module, ckpt


def train_run(run: Path, tiny_sd3_dir, mode: str, iterations: int):
    """``(module, checkpoint)`` of a run folder as `dmdx fit` leaves it: config.yaml +
    checkpoints/last.ckpt after ``iterations`` ADM iterations on the tiny SD3 (seed 0)."""
    (run / "config.yaml").write_text(yaml.safe_dump(run_config(tiny_sd3_dir, mode)))
    torch.manual_seed(0)
    module = build_module(run / "config.yaml")
    trainer = pl.Trainer(max_steps=iterations, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=run)
    trainer.fit(module, prompt_loader(PROMPTS, batch_size=2))
    ckpt = run / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    return module, ckpt


def load_export(fmt, out, tiny_sd3_dir):
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    if fmt == "pipeline":
        pipe = DiffusionPipeline.from_pretrained(out)
    else:
        pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir)
        pipe.load_lora_weights(out)
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(out, subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, noise, info, seed, **kw):
    torch.manual_seed(seed)  # the stochastic Euler scheduler draws its re-noising from the global generator
    return pipe(PROMPTS[:2], latents=noise.clone(), height=16, width=16, guidance_scale=1.0,
                num_inference_steps=info["num_inference_steps"], sigmas=info["sigmas"],
                max_sequence_length=16, **kw).images


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["lora", "pipeline"])
def test_export_round_trip_matches_our_sampler(trained, fmt, tmp_path, tiny_sd3_dir, capsys):
    mode, module, ckpt = trained
    out = tmp_path / fmt
    if fmt == "lora" and mode == "full":
        with pytest.raises(SystemExit) as stop:
            dmdx(["export", "--ckpt_path", str(ckpt), "--output", str(out), "--format", fmt])
        assert stop.value.code == 2 and "--format pipeline" in capsys.readouterr().err
        return
    dmdx(["export", "--ckpt_path", str(ckpt), "--output", str(out), "--format", fmt])  # config found near ckpt
    info = json.loads((out / EXPORT_INFO).read_text())
    assert info["student_timesteps"] == module.student_timesteps and info["num_inference_steps"] == 4
    pipe = load_export(fmt, out, tiny_sd3_dir)

    teacher = module.teacher
    noise = torch.randn(teacher.latent_shape(2), generator=torch.Generator().manual_seed(3))
    latents = generate(pipe, noise, info, seed=11, output_type="latent")
    torch.manual_seed(11)
    ours = teacher.sample_student(noise, teacher.encode_prompts(PROMPTS[:2]), module.student_timesteps)
    print(f"{mode}/{fmt}: max |pipeline - sample_student| = {(latents - ours).abs().max().item():.2e}")
    assert (latents - ours).abs().max() < 1e-4

    images = generate(pipe, noise, info, seed=11, output_type="pt")
    assert (images - (teacher.decode(ours) * 0.5 + 0.5)).abs().max() < 1e-4
    # the comparison can fail: other noise, or the teacher instead of the student, gives other latents
    assert (generate(pipe, noise, info, seed=12, output_type="latent") - ours).abs().max() > 1e-3
    torch.manual_seed(11)
    untrained = teacher.sample_student(noise, teacher.encode_prompts(PROMPTS[:2]), module.student_timesteps,
                                       role="real")
    assert (latents - untrained).abs().max() > 1e-3


@pytest.mark.slow
def test_export_builds_the_student_alone(trained, tmp_path):
    """`dmdx export` builds the teacher's frozen parts and the student, nothing else: no fake score,
    no discriminator, no method module, and in full mode no second transformer."""
    mode, module, ckpt = trained
    built = []  # every module given a submodule while the export runs (torch's global registration hook)
    handle = torch.nn.modules.module.register_module_module_registration_hook(
        lambda parent, name, child: built.append((type(parent).__name__, name, type(child).__name__)))
    try:
        export_checkpoint(ckpt, tmp_path / "out", "pipeline")
    finally:
        handle.remove()
    parents = {p for p, _, _ in built}
    assert "SD3Teacher" in parents and ("SD3Teacher", "denoiser", "SD3Transformer2DModel") in built  # it sees
    assert not parents & {"ADMModule", "LatentDiscriminator", "Head2D", "GeneratorEMA"}, parents
    assert not [b for b in built if b[1] == "fake"], "a fake-score role or adapter was built"
    # full mode: the roles dict holds one transformer, the student (the loaded one, see below)
    assert [name for p, name, c in built if p == "ModuleDict" and c == "SD3Transformer2DModel"] == \
        (["student"] if mode == "full" else [])

    teacher, timesteps = build_teacher(ckpt.parent.parent / "config.yaml")
    assert teacher.build_roles == ("student",) and timesteps == module.student_timesteps
    if mode == "full":  # the loaded transformer IS the student: one copy, no real score
        assert list(teacher.roles) == ["student"] and teacher.roles["student"] is teacher.denoiser
    else:  # one base with the student's adapter only
        assert not teacher.roles
        adapters = {n.split(".lora_A.")[1].split(".")[0] for n, _ in teacher.denoiser.named_parameters() if ".lora_A." in n}
        assert adapters == {"student"}
    for role in ("fake", "real"):
        with pytest.raises(ValueError, match=f"no '{role}' role"):
            teacher.network(role)
    # a training teacher is refused: the export would merge into (and cast) its live student
    with pytest.raises(ValueError, match="build_roles"):
        export(module.teacher, module.student_timesteps, tmp_path / "refused")


def test_student_scheduler_replays_student_times():
    from diffusers import FlowMatchEulerDiscreteScheduler

    base = dict(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    for ts, exact in (([1.0, 0.75, 0.5, 0.25], True), ([1.0], True), ([1.0, 0.9, 0.75, 0.5], False)):
        sched, is_exact = student_flow_scheduler(base, ts)
        assert is_exact == exact
        assert sched.config.stochastic_sampling and sched.config.shift == 1.0
        sched.set_timesteps(sigmas=ts)  # passing the times always reproduces them
        torch.testing.assert_close(sched.sigmas[:-1], torch.tensor(ts))
        if exact:
            sched.set_timesteps(len(ts))
            torch.testing.assert_close(sched.sigmas[:-1], torch.tensor(ts))
        # the stochastic step is our re-noising: x_s = (1 - s) x0 + s * noise with x0 = x_t - t v
        sched.set_timesteps(sigmas=ts)
        x, v = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
        torch.manual_seed(0)
        step = sched.step(v, sched.timesteps[0], x).prev_sample
        torch.manual_seed(0)
        s = sched.sigmas[1]
        torch.testing.assert_close(step, (1 - s) * (x - ts[0] * v) + s * torch.randn(x.shape))


def test_export_without_config_is_a_clear_error(tmp_path, capsys):
    ckpt = tmp_path / "a" / "b.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"")
    with pytest.raises(SystemExit) as stop:
        dmdx(["export", "--ckpt_path", str(ckpt), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "no config.yaml found" in err and "--config" in err and "Traceback" not in err
    # the checkpoint itself missing is said as such (not as a missing config.yaml)
    with pytest.raises(SystemExit):
        dmdx(["export", "--ckpt_path", str(tmp_path / "a" / "gone.ckpt"), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert f"{tmp_path / 'a' / 'gone.ckpt'} does not exist" in err and "config.yaml" not in err


def test_training_refuses_a_teacher_built_for_export():
    from dmdx_lightning.methods.adm import ADMModule
    from dmdx_lightning.teachers.digits import DigitsTeacher

    with pytest.raises(ValueError, match="build_roles"):
        ADMModule(DigitsTeacher(build_roles=["student"]))
