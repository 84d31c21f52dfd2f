"""StableDiffusionTeacher (SD 1.x / 2.x) on tiny random folders: epsilon (SD 1.5) and v-prediction (SD 2.1).

What the conformance suite does not check: prompt encoding and CFG's unconditional branch against
``StableDiffusionPipeline`` itself, both parametrisations against diffusers' schedulers and the
pipeline's own sampler, the exports (a ``StableDiffusionPipeline`` folder and a LoRA for its
``load_lora_weights``) replaying the student, the refusal of SDXL folders, and the shipped
configs/sd15 chains through ``dmdx fit`` / ``dmdx export``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dmdx_lightning.schedules import student_timesteps
from dmdx_lightning.teachers.sdxl import SDXLTeacher, StableDiffusionTeacher
from tests.conftest import TINY_SD, TINY_SDXL

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a photo of a cat", "a red bus", "", "an astronaut riding a horse"]
FOLDERS = {"eps": "tiny_sd15_dir", "v": "tiny_sd2v_dir"}


@pytest.fixture(params=list(FOLDERS), scope="module")
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def folder(kind, request):
    return request.getfixturevalue(FOLDERS[kind])


@pytest.fixture(scope="module")
def teacher(folder):
    torch.manual_seed(0)
    return StableDiffusionTeacher(str(folder), mode="lora", **TINY_SD)


@pytest.fixture(scope="module")
def pipe(folder):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def perturb(teacher, scale=0.05, seed=1):
    """A student that differs from the teacher, so the comparisons below can fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in teacher.trainable_parameters("student"):
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


# -------------------------------------------------------------------------------- prompts and CFG
def test_prompt_encoding_and_cfg_branch_match_the_pipeline(teacher, pipe):
    cond = teacher.encode_prompts(PROMPTS)
    # 77 tokens of the CLIP's last hidden state; pooled = its end-of-text token, for the heads
    assert set(cond.tensors) == {"prompt_embeds", "pooled"}
    assert cond.prompt_embeds.shape == (4, 77, 16) and cond.pooled.shape == (4, 16)
    embeds, neg_embeds = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    torch.testing.assert_close(cond.prompt_embeds, embeds, rtol=0, atol=0)
    # the unconditional branch is the encoded empty prompt (SD has no zeroed branch, unlike SDXL)
    null = teacher.null_conditioning(4)
    torch.testing.assert_close(null.prompt_embeds, neg_embeds)
    assert null.prompt_embeds.abs().max() > 0
    torch.testing.assert_close(null.prompt_embeds[0], cond.prompt_embeds[2])
    assert not torch.allclose(cond.pooled[0], cond.pooled[1])


# -------------------------------------------------------------------------------- parametrisation
def test_model_output_is_the_unet_at_timestep_1000t_minus_1_and_converts_once(teacher, folder, kind):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    assert teacher.prediction_type == kind and teacher.family == "sd"
    fresh = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    cond = teacher.encode_prompts(PROMPTS[:2])
    x_t, t = torch.randn(teacher.latent_shape(2)), torch.tensor([1.0, 0.75])
    out = fresh(x_t, torch.tensor([999, 749]), encoder_hidden_states=cond.prompt_embeds).sample
    torch.testing.assert_close(teacher.forward_role("real", x_t, t, cond), out)
    acp = DDPMScheduler.from_pretrained(folder, subfolder="scheduler").alphas_cumprod[[999, 749]]
    a, s = acp.sqrt().view(2, 1, 1, 1), (1 - acp).sqrt().view(2, 1, 1, 1)
    x0, eps = teacher.predict("real", x_t, t, cond)
    if kind == "eps":
        expect_x0, expect_eps = (x_t - s * out) / a, out
    else:  # v = alpha eps - sigma x0 (diffusers' get_velocity)
        expect_x0, expect_eps = a * x_t - s * out, s * x_t + a * out
    torch.testing.assert_close(x0, expect_x0, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(eps, expect_eps, rtol=1e-5, atol=1e-4)


def test_teacher_sampler_is_the_pipeline_with_ddim_trailing(teacher, pipe):
    """``sample_ode`` (CFG in eps space, DDIM on the 'trailing' grid ending at the data) is
    ``StableDiffusionPipeline`` with DDIMScheduler(timestep_spacing='trailing', set_alpha_to_one=True),
    for both prediction types (the scheduler reads the pipeline's own)."""
    from diffusers import DDIMScheduler

    ddim = type(pipe)(**{**pipe.components, "scheduler": DDIMScheduler.from_config(
        pipe.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False)})
    ddim.set_progress_bar_config(disable=True)
    noise = torch.randn(teacher.latent_shape(2), generator=torch.Generator().manual_seed(0))
    theirs = ddim(PROMPTS[:2], latents=noise.clone(), num_inference_steps=4, guidance_scale=3.0,
                  output_type="latent").images
    ours = teacher.sample_ode(noise, teacher.encode_prompts(PROMPTS[:2]), 4, 3.0)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    other = teacher.sample_ode(noise, teacher.encode_prompts(PROMPTS[:2]), 4, 1.0)
    assert (other - theirs).abs().max() > 1e-3  # guidance matters, so the comparison can fail


# -------------------------------------------------------------------------------- exports
def student_run(teacher, prompts, timesteps, seed=3):
    """The same noise through the pipeline's default student call and through our student sampler."""
    noise = torch.randn(teacher.latent_shape(len(prompts)), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ours = teacher.sample_student(noise, teacher.encode_prompts(prompts), timesteps,
                                      generator=torch.Generator().manual_seed(11))
    return noise, ours


@pytest.mark.slow
def test_pipeline_export_generates_and_its_unet_is_the_student(folder, kind, tmp_path):
    from diffusers import DiffusionPipeline, LCMScheduler, StableDiffusionPipeline

    torch.manual_seed(0)
    teacher = StableDiffusionTeacher(str(folder), mode="full", **TINY_SD)
    perturb(teacher)
    times = student_timesteps(2, schedule=teacher.schedule)
    x_t, t = torch.randn(teacher.latent_shape(2)), torch.tensor([0.9, 0.4])
    cond = teacher.encode_prompts(PROMPTS[:2])
    with torch.no_grad():
        student = teacher.forward_role("student", x_t, t, cond)
        real = teacher.forward_role("real", x_t, t, cond)
    noise, ours = student_run(teacher, PROMPTS[:2], times)
    info = teacher.export_pipeline(tmp_path, times)
    assert info["call"] == {"num_inference_steps": 2, "guidance_scale": 1.0} and info["default_call_exact"]
    pipe = DiffusionPipeline.from_pretrained(tmp_path)
    assert isinstance(pipe, StableDiffusionPipeline) and isinstance(pipe.scheduler, LCMScheduler)
    assert pipe.safety_checker is None and pipe.scheduler.config.prediction_type == pipe_prediction(kind)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        exported = teacher.model_output(pipe.unet, x_t, t, cond)
    assert (exported - student).abs().max() < 1e-4 and (exported - real).abs().max() > 1e-4
    # the pipeline's default call replays the student's sampler, and decodes an image
    latents = pipe(PROMPTS[:2], latents=noise.clone(), generator=torch.Generator().manual_seed(11),
                   output_type="latent", **info["call"]).images
    print(f"{kind} pipeline export: max |pipeline - sample_student| = {(latents - ours).abs().max().item():.2e}")
    assert (latents - ours).abs().max() < 1e-4
    image = pipe(PROMPTS[:1], generator=torch.Generator().manual_seed(0), output_type="pt", **info["call"]).images
    assert image.shape == (1, 3, 16, 16) and torch.isfinite(image).all()


def pipe_prediction(kind: str) -> str:
    return {"eps": "epsilon", "v": "v_prediction"}[kind]


@pytest.mark.slow
def test_lora_export_loads_with_load_lora_weights_and_reproduces_the_student(folder, kind, tmp_path):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    torch.manual_seed(0)
    teacher = StableDiffusionTeacher(str(folder), mode="lora", **TINY_SD)
    perturb(teacher, scale=0.3)
    times = [1.0]
    noise, ours = student_run(teacher, PROMPTS[:2], times)
    with torch.no_grad():
        real = teacher.sample_student(noise, teacher.encode_prompts(PROMPTS[:2]), times, role="real")
    info = teacher.export_lora(tmp_path, times)
    assert info["timesteps"] == [999] and info["lora"]
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.load_lora_weights(tmp_path)
    pipe.scheduler = LCMScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(PROMPTS[:2], latents=noise.clone(), generator=torch.Generator().manual_seed(11),
                  output_type="latent", **info["call"]).images
    print(f"{kind} LoRA export: max |pipeline - sample_student| = {(theirs - ours).abs().max().item():.2e}")
    assert (theirs - ours).abs().max() < 1e-4
    assert (theirs - real).abs().max() > 1e-3  # the adapter is in, not the teacher alone


# -------------------------------------------------------------------------------- loading
def test_sdxl_and_sd_folders_are_refused_by_the_other_class(tiny_sd15_dir, tiny_sdxl_dir):
    with pytest.raises(ValueError, match="addition_embed_type='text_time'.*SDXLTeacher"):
        StableDiffusionTeacher(str(tiny_sdxl_dir), **TINY_SD)
    with pytest.raises(FileNotFoundError, match="no tokenizer_2/ folder.*one text encoder.*StableDiffusionTeacher"):
        SDXLTeacher(str(tiny_sd15_dir), **TINY_SDXL)


def test_help_shows_the_sd_options_not_sdxls():
    """The config's --help prints this class's options: SDXL's micro-conditioning is not among them."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(StableDiffusionTeacher, "teacher")
    options = {a.dest.removeprefix("teacher.") for a in parser._actions if a.dest.startswith("teacher.")}
    assert {"pretrained_model_name_or_path", "resolution", "cfg_scale", "mode", "lora_rank"} <= options
    assert not {"original_size", "target_size", "force_zeros_for_empty_prompt"} & options


# -------------------------------------------------------------------------------- the shipped configs
TINY_RUN = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
            "--trainer.precision", "32-true", "--trainer.num_sanity_val_steps", "0",
            "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false"]
TEACHER = "--model.init_args.teacher.init_args."
SMALL_HEADS = ["--model.init_args.discriminator.init_args.head_channels", "16"]


def cli(config: str, tiny: Path, root: Path, *extra: str, verb: str = "fit"):
    from dmdx_lightning.training_cli import DMDXCLI

    torch.manual_seed(0)
    return DMDXCLI(args=[verb, "--config", str(ROOT / "configs" / config), TEACHER + "pretrained_model_name_or_path",
                         str(tiny), TEACHER + "torch_dtype", "float32", TEACHER + "sample_steps", "2",
                         "--trainer.default_root_dir", str(root), *TINY_RUN, *extra])


@pytest.fixture(scope="module")
def pairs(tiny_sd15_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("sd15_chain")
    cli("sd15/ode_pairs.yaml", tiny_sd15_dir, root / "pairs_run", verb="predict", *[
        "--model.init_args.num_steps", "2", "--data.init_args.output_dir", str(root / "sd15" / "pairs"),
        "--data.init_args.num_pairs", "8", "--data.init_args.shard_size", "4", "--data.init_args.batch_size", "4"])
    return root


@pytest.mark.slow
def test_dmd2_two_stages_train_and_the_export_replays_the_student(pairs, tiny_sd15_dir, monkeypatch):
    """DMD2's SD 1.5 recipe as shipped: stage 1 (DMD, TTUR 10), then stage 2 (DMD + GAN) from stage
    1's student found beside its root, on the teacher's pairs; `dmdx export` of stage 2 as a
    StableDiffusionPipeline folder that samples as the student does."""
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    from dmdx_lightning.cli import main as dmdx
    from dmdx_lightning.data.ode_pairs import read_manifest
    from dmdx_lightning.export import EXPORT_INFO, build_module, find_run_config

    root = pairs
    manifest = read_manifest(root / "sd15" / "pairs")
    assert manifest["teacher_family"] == "sd" and list(manifest["latent_shape"]) == [4, 8, 8]
    stage1 = cli("sd15/dmd_1step_full.yaml", tiny_sd15_dir, root / "dmd_sd15", "--data.init_args.batch_size", "2",
                 "--trainer.max_steps", "2",
                 "--model.init_args.generator_optimizer.init_args.lr", "1e-3").model
    assert stage1.loss == "dmd" and stage1.update_ratio == 10 and stage1.teacher.mode == "full"
    assert int(stage1.generator_updates) == 1
    stage2 = cli("sd15/dmd2_1step_full.yaml", tiny_sd15_dir, root / "dmd2_sd15", *SMALL_HEADS,
                 "--data.init_args.batch_size", "2", "--trainer.max_steps", "1").model
    assert stage2.loss == "dmd2" and stage2.discriminator.backbone_role == "fake"
    assert stage2.init_from == str(root / "dmd_sd15" / "checkpoints" / "last.ckpt")

    ckpt, out = root / "dmd2_sd15" / "checkpoints" / "last.ckpt", root / "export"
    dmdx(["export", "--ckpt_path", str(ckpt), "--output", str(out), "--format", "pipeline"])
    info = json.loads((out / EXPORT_INFO).read_text())
    assert info["timesteps"] == [999] and info["call"] == {"num_inference_steps": 1, "guidance_scale": 1.0}
    pipe = DiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe, StableDiffusionPipeline)
    pipe.set_progress_bar_config(disable=True)
    module = build_module(find_run_config(ckpt))
    module.load_student_from(str(ckpt))
    noise, ours = student_run(module.teacher, PROMPTS[:2], module.student_timesteps)
    theirs = pipe(PROMPTS[:2], latents=noise.clone(), generator=torch.Generator().manual_seed(11),
                  output_type="latent", **info["call"]).images
    with torch.no_grad():
        real = module.teacher.sample_student(noise, module.teacher.encode_prompts(PROMPTS[:2]), [1.0], role="real")
    assert (theirs - ours).abs().max() < 1e-4
    assert (theirs - real).abs().max() > 1e-4  # stage 1's lr 1e-3 moved the student off the teacher


@pytest.mark.slow
def test_dmdx_chain_adp_then_adm(pairs, tiny_sd15_dir, tiny_sam_path):
    root = pairs
    cli("sd15/adp_1step.yaml", tiny_sd15_dir, root / "adp_sd15", *SMALL_HEADS, *[
        "--data.init_args.batch_size", "2", "--trainer.max_steps", "1",
        "--model.init_args.pixel_discriminator.init_args.backbone.init_args.pretrained", tiny_sam_path,
        "--model.init_args.pixel_discriminator.init_args.backbone.init_args.dtype", "float32",
        "--model.init_args.pixel_discriminator.init_args.layers", "[1, 2]",
        "--model.init_args.pixel_discriminator.init_args.head_channels", "16"])
    adm = cli("sd15/dmdx_1step.yaml", tiny_sd15_dir, root / "adm_sd15", *SMALL_HEADS,
              "--data.init_args.batch_size", "2", "--trainer.max_steps", "1").model
    assert adm.init_from == str(root / "adp_sd15" / "checkpoints" / "last.ckpt")
    assert adm.loss == "adm" and adm.student_timesteps == [1.0] and adm.teacher.mode == "lora"
    assert (root / "adm_sd15" / "checkpoints" / "last.ckpt").is_file()
