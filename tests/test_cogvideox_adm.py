"""8-step ADM on the tiny CogVideoX: `dmdx fit` with configs/cogvideox/adm_2b_8step.yaml, exact resume, and
`dmdx export` loaded back by diffusers' CogVideoXPipeline, which must generate our student's frames."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image

from dmdx_lightning.data.prompts import PromptDataModule
from dmdx_lightning.export import EXPORT_INFO, build_module, export_checkpoint
from tests.helpers import dmdx_fit, state_fingerprint
from tests.test_configs import COGVIDEOX_TINY, TINY_HEADS
from tests.test_resume import full_state

PROMPTS = ["a cat playing piano", "waves on a beach", "a red bus", "a panda eating bamboo"]


def run_config(tiny_dir, mode="lora") -> dict:
    adamw = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-2, "betas": [0.0, 0.99]}}
    return {"model": {"class_path": "dmdx_lightning.methods.adm.ADMModule", "init_args": {
        "teacher": {"class_path": "dmdx_lightning.teachers.cogvideox.CogVideoXTeacher",
                    "init_args": {"pretrained_model_name_or_path": str(tiny_dir), "mode": mode, "lora_rank": 4}},
        "discriminator": {"class_path": "dmdx_lightning.discriminators.latent.LatentDiscriminator",
                          "init_args": {"layers": [0, -1], "head_channels": 8}},
        "student_steps": 8, "real_cfg_scale": 3.0,
        "generator_optimizer": adamw, "fake_score_optimizer": adamw, "discriminator_optimizer": adamw}}}


def fit(config_path, tmp_path, iterations, ckpt_path=None, save_every=None):
    pl.seed_everything(0)
    module = build_module(config_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    data = PromptDataModule(str(tmp_path / "prompts.txt"), batch_size=2)
    callbacks = [ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=save_every, save_top_k=-1,
                                 filename="{step}")] if save_every else []
    trainer = pl.Trainer(max_steps=iterations, accelerator="cpu", devices=1, logger=False, callbacks=callbacks,
                         enable_checkpointing=bool(save_every), enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return module, trainer


@pytest.fixture(scope="module")
def trained(tiny_cogvideox_dir, tmp_path_factory):
    """2 ADM iterations in lora mode, a checkpoint after each."""
    run = tmp_path_factory.mktemp("cogvideox_run")
    (run / "config.yaml").write_text(yaml.safe_dump(run_config(tiny_cogvideox_dir)))
    module, trainer = fit(run / "config.yaml", run, 2, save_every=1)
    return run, module, trainer


@pytest.mark.slow
def test_adm_steps_change_the_student_and_resume_exactly(trained):
    run, module, trainer = trained
    assert module.student_timesteps == [i / 999 for i in (999, 874, 749, 624, 499, 374, 249, 124)]
    resumed_module, resumed_trainer = fit(run / "config.yaml", run / "resumed", 2,
                                          ckpt_path=str(run / "ckpt" / "step=1.ckpt"))
    assert state_fingerprint(resumed_module) == state_fingerprint(module)
    ref, got = full_state(module, trainer), full_state(resumed_module, resumed_trainer)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    teacher = module.teacher
    moved = [float(p.abs().sum()) for n, p in teacher.named_trainable_parameters("student") if "lora_B" in n]
    assert max(moved) > 0  # LoRA B starts at 0: the student trained


def load_export(fmt, out, tiny_dir):
    from diffusers import CogVideoXPipeline, DiffusionPipeline, LCMScheduler

    if fmt == "pipeline":
        pipe = DiffusionPipeline.from_pretrained(out)
    else:
        pipe = CogVideoXPipeline.from_pretrained(tiny_dir)
        pipe.load_lora_weights(out)
        pipe.scheduler = LCMScheduler.from_pretrained(out, subfolder="scheduler")
    assert isinstance(pipe, CogVideoXPipeline) and isinstance(pipe.scheduler, LCMScheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["lora", "pipeline"])
def test_export_generates_the_students_frames_in_8_steps(trained, fmt, tmp_path, tiny_cogvideox_dir):
    run, module, _ = trained
    # `dmdx export`'s path: only the student is built, from the run's config and final checkpoint
    info = export_checkpoint(run / "ckpt" / "step=2.ckpt", tmp_path, fmt, config=run / "config.yaml")
    assert json.loads((tmp_path / EXPORT_INFO).read_text())["timesteps"] == [999, 874, 749, 624, 499, 374, 249, 124]
    assert info["default_call_exact"] and info["num_inference_steps"] == 8
    pipe = load_export(fmt, tmp_path, tiny_cogvideox_dir)
    teacher = module.teacher
    noise = torch.randn(teacher.latent_shape(2), generator=torch.Generator().manual_seed(3))

    def generate(seed, **kw):  # the default call: 8 steps, no CFG (the student is guidance-free)
        return pipe(PROMPTS[:2], latents=noise.clone(), num_inference_steps=8, guidance_scale=1.0,
                    max_sequence_length=8, generator=torch.Generator().manual_seed(seed), **kw).frames

    latents = generate(11, output_type="latent")
    ours = teacher.sample_student(noise, teacher.encode_prompts(PROMPTS[:2]), module.student_timesteps,
                                  generator=torch.Generator().manual_seed(11))
    print(f"{fmt}: max |pipeline - sample_student| = {(latents - ours).abs().max().item():.2e}")
    assert (latents - ours).abs().max() < 1e-4
    frames = generate(11, output_type="pt")  # (B, F, 3, H, W) in [0, 1]
    assert frames.shape == (2, 9, 3, 32, 32)
    decoded = (teacher.decode(ours) * 0.5 + 0.5).transpose(1, 2)
    assert (frames - decoded).abs().max() < 1e-4
    # the comparison can fail: other re-noising, or the teacher instead of the student, differs
    assert (generate(12, output_type="latent") - ours).abs().max() > 1e-3
    untrained = teacher.sample_student(noise, teacher.encode_prompts(PROMPTS[:2]), module.student_timesteps,
                                       generator=torch.Generator().manual_seed(11), role="real")
    assert (latents - untrained).abs().max() > 1e-3


@pytest.mark.slow
def test_dmdx_fit_with_the_2b_config_trains_and_logs_videos(tiny_cogvideox_dir, tmp_path):
    """`dmdx fit --config configs/cogvideox/adm_2b_8step.yaml` with the tiny folder in place of the hub id."""
    extra = [a.replace("{tiny_cogvideox}", str(tiny_cogvideox_dir)) for a in COGVIDEOX_TINY + TINY_HEADS]
    result = dmdx_fit("--config", "configs/cogvideox/adm_2b_8step.yaml", *extra,
                      "--model.init_args.teacher.init_args.sample_steps", "4",
                      "--model.init_args.discriminator.init_args.head_channels", "8",
                      "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
                      "--trainer.precision", "32-true", "--trainer.max_steps", "2", "--trainer.log_every_n_steps", "1",
                      "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
                      "--trainer.default_root_dir", str(tmp_path), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    samples = tmp_path / "version_0" / "samples"
    # the first draw is at the first iteration (the teacher's only one), the last at fit end
    for name in ("student_step0000001", "teacher_step0000001", "student_step0000002"):
        gifs = sorted(samples.glob(f"{name}_p*.gif"))
        assert len(gifs) == 4, sorted(samples.iterdir())  # one per example prompt of the teacher
        for gif in gifs:
            with Image.open(gif) as video:
                assert video.n_frames == 9 and video.size == (32, 32)
        assert (samples / f"{name}.png").is_file()  # the frame grid
    events = list((tmp_path / "version_0").glob("events.out.tfevents.*"))
    assert events and b"samples/student" in events[0].read_bytes() and b"train/gen" in events[0].read_bytes()
