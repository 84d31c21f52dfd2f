"""What is particular to FLUX.1 (the contract itself: tests/test_teacher_conformance.py): prompt
encoding, packing, the resolution shift, the guidance options against ``FluxPipeline``, the export."""

from __future__ import annotations

import json

import pytest
import torch

from dmdx_lightning.errors import ConfigError
from dmdx_lightning.preflight import run_checks
from dmdx_lightning.schedules import euler_grid, student_timesteps
from dmdx_lightning.teachers.flux import FluxTeacher, latent_image_ids, pack_latents, unpack_latents
from tests.conftest import TINY_FLUX

PROMPTS = ["a photo of a cat", "a red bicycle"]
KEY = "model.init_args.teacher.init_args"


@pytest.fixture(scope="module")
def lora_teacher(tiny_flux_dir):
    torch.manual_seed(0)
    return FluxTeacher(str(tiny_flux_dir), mode="lora", **TINY_FLUX)


@pytest.fixture(scope="module")
def pipe(tiny_flux_dir):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_latents(pipe, noise, **kw):
    """``FluxPipeline`` from our ``(B, 16, h, w)`` noise, its final latents unpacked to that shape."""
    h, w = noise.shape[-2:]
    out = pipe(PROMPTS, latents=pack_latents(noise), height=2 * h, width=2 * w, max_sequence_length=16,
               output_type="latent", **kw).images
    return unpack_latents(out, h, w)


# ------------------------------------------------------------------------------------ conditioning
def test_prompt_encoding_matches_the_pipeline(lora_teacher, pipe):
    cond = lora_teacher.encode_prompts(PROMPTS)
    embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, max_sequence_length=16)
    torch.testing.assert_close(cond.prompt_embeds, embeds)
    torch.testing.assert_close(cond.pooled, pooled)
    assert text_ids.abs().sum() == 0 and text_ids.shape == (16, 3)  # model_output's zeros


def test_packing_and_ids_are_the_pipelines(pipe):
    from diffusers import FluxPipeline

    latents = torch.randn(2, 16, 8, 6)
    packed = pack_latents(latents)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(latents, 2, 16, 8, 6), rtol=0, atol=0)
    torch.testing.assert_close(unpack_latents(packed, 8, 6), latents, rtol=0, atol=0)
    # _unpack_latents takes the image size (latent size x vae_scale_factor, here 2)
    torch.testing.assert_close(FluxPipeline._unpack_latents(packed, 16, 12, 2), latents, rtol=0, atol=0)
    torch.testing.assert_close(latent_image_ids(8, 6), FluxPipeline._prepare_latent_image_ids(2, 4, 3, "cpu",
                                                                                               torch.float32))


def test_the_shift_is_the_pipelines_dynamic_shift_at_the_resolution(lora_teacher, pipe, tiny_flux_dir):
    """FLUX.1-dev's mu for 16 image tokens; the teacher's grid equals the pipeline's sigmas."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    c = pipe.scheduler.config
    mu = calculate_shift(16, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    assert lora_teacher.schedule.shift == pytest.approx(float(torch.tensor(mu).exp()))
    n = 6
    pipe.scheduler.set_timesteps(sigmas=torch.linspace(1.0, 1 / n, n).numpy(), mu=mu)
    torch.testing.assert_close(torch.tensor(euler_grid(n, lora_teacher.schedule)),
                               pipe.scheduler.sigmas.float(), rtol=0, atol=1e-6)
    big = FluxTeacher(str(tiny_flux_dir), mode="lora", **{**TINY_FLUX, "resolution": 64})  # 256 tokens: mu = 0.5
    assert big.schedule.shift == pytest.approx(float(torch.tensor(0.5).exp()))


def test_model_output_is_the_transformer_on_packed_latents(lora_teacher, pipe):
    x = torch.randn(lora_teacher.latent_shape(2), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.3, 0.8])
    cond = lora_teacher.encode_prompts(PROMPTS)
    with torch.no_grad():
        ours = lora_teacher.forward_role("real", x, t, cond)
        theirs = pipe.transformer(hidden_states=pack_latents(x), timestep=t, guidance=torch.full((2,), 3.5),
                                  pooled_projections=cond.pooled, encoder_hidden_states=cond.prompt_embeds,
                                  txt_ids=torch.zeros(16, 3), img_ids=latent_image_ids(8, 8), return_dict=False)[0]
    torch.testing.assert_close(ours, unpack_latents(theirs, 8, 8), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ guidance
def test_embedded_guidance_sampler_is_the_pipelines(lora_teacher, pipe):
    """The teacher's ODE at cfg_scale w = FluxPipeline at guidance_scale w: one pass per step."""
    noise = torch.randn(lora_teacher.latent_shape(2), generator=torch.Generator().manual_seed(1))
    ours = lora_teacher.sample_ode(noise, lora_teacher.encode_prompts(PROMPTS), 4, cfg_scale=5.0)
    theirs = pipeline_latents(pipe, noise, num_inference_steps=4, guidance_scale=5.0)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    other = pipeline_latents(pipe, noise, num_inference_steps=4, guidance_scale=1.0)
    assert (ours - other).abs().max() > 1e-3  # the guidance value matters


def test_true_cfg_sampler_is_the_pipelines(tiny_flux_dir, pipe):
    """guidance: true_cfg = FluxPipeline(true_cfg_scale=w, negative_prompt=...), the embedding at
    guidance_scale in both passes."""
    teacher = FluxTeacher(str(tiny_flux_dir), mode="lora", guidance="true_cfg", guidance_scale=2.0,
                          negative_prompt="blurry", **TINY_FLUX)
    noise = torch.randn(teacher.latent_shape(2), generator=torch.Generator().manual_seed(2))
    ours = teacher.sample_ode(noise, teacher.encode_prompts(PROMPTS), 3, cfg_scale=4.0)
    theirs = pipeline_latents(pipe, noise, num_inference_steps=3, guidance_scale=2.0, true_cfg_scale=4.0,
                              negative_prompt=["blurry"] * 2)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_unguided_roles_run_at_guidance_scale(tiny_flux_dir):
    """The student and the fake score (cfg_scale 1) see guidance_scale, which changes their prediction."""
    a = FluxTeacher(str(tiny_flux_dir), mode="lora", **TINY_FLUX)
    b = FluxTeacher(str(tiny_flux_dir), mode="lora", guidance_scale=1.0, **TINY_FLUX)
    x = torch.randn(a.latent_shape(2), generator=torch.Generator().manual_seed(3))
    t, cond = torch.tensor([0.4, 0.6]), a.encode_prompts(PROMPTS)
    with torch.no_grad():
        student_a, student_b = a.predict("student", x, t, cond)[0], b.predict("student", x, t, cond)[0]
        real_b_at_3_5 = b.predict("real", x, t, cond, cfg_scale=3.5)[0]
    assert (student_a - student_b).abs().max() > 1e-4
    torch.testing.assert_close(student_a, real_b_at_3_5)  # both run the embedding at 3.5


def test_schnell_has_no_guidance(tiny_flux_schnell_dir, pipe):
    from diffusers import FluxPipeline

    teacher = FluxTeacher(str(tiny_flux_schnell_dir), mode="lora", cfg_scale=1.0, **TINY_FLUX)
    assert teacher.guidance == "none" and teacher.schedule.shift == 1.0
    x = torch.randn(teacher.latent_shape(2))
    cond = teacher.encode_prompts(PROMPTS)
    with pytest.raises(ValueError, match="no guidance.*cfg_scale must be 1.*real_cfg_scale"):
        teacher.predict("real", x, torch.tensor([0.5, 0.5]), cond, cfg_scale=3.5)
    schnell = FluxPipeline.from_pretrained(tiny_flux_schnell_dir)
    schnell.set_progress_bar_config(disable=True)
    ours = teacher.sample_ode(x, cond, 2, cfg_scale=1.0)
    torch.testing.assert_close(ours, pipeline_latents(schnell, x, num_inference_steps=2), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("options, key, match", [
    ({"guidance": "embedded"}, "guidance", "no guidance embedding"),
    ({"guidance": "true_cfg"}, "guidance", "no guidance embedding"),
    ({}, "cfg_scale", "with guidance none .* no guidance scale"),  # schnell with the default cfg_scale 3.5
])
def test_schnell_refusals_name_the_key(tiny_flux_schnell_dir, options, key, match):
    with pytest.raises(ConfigError, match=match) as error:
        FluxTeacher(str(tiny_flux_schnell_dir), **{**TINY_FLUX, **options})
    assert error.value.key == f"{KEY}.{key}"
    # the same refusal before anything loads, from the folder's config files (dmdx's preflight)
    with pytest.raises(ConfigError, match=match):
        run_checks(FluxTeacher, {"pretrained_model_name_or_path": str(tiny_flux_schnell_dir), **options}, KEY)


def test_dev_refusals_name_the_key(tiny_flux_dir, tiny_sd3_dir):
    for options, key in (({"guidance": "cfg"}, "guidance"), ({"negative_prompt": "blurry"}, "negative_prompt"),
                         ({"guidance": "none"}, "cfg_scale")):
        with pytest.raises(ConfigError) as error:
            run_checks(FluxTeacher, {"pretrained_model_name_or_path": str(tiny_flux_dir), **options}, KEY)
        assert error.value.key == f"{KEY}.{key}", error.value
    with pytest.raises(ConfigError, match="StableDiffusion3Pipeline folder"):
        run_checks(FluxTeacher, {"pretrained_model_name_or_path": str(tiny_sd3_dir)}, KEY)
    run_checks(FluxTeacher, {"pretrained_model_name_or_path": str(tiny_flux_dir), "guidance": "none",
                             "cfg_scale": 1.0}, KEY)  # dev without guidance: the embedding at guidance_scale


# ------------------------------------------------------------------------------------ VAE
def test_decode_encode_use_scaling_and_shift(lora_teacher, pipe):
    """decode is the pipeline's last step: its images from our 1-step sample."""
    noise = torch.randn(lora_teacher.latent_shape(2), generator=torch.Generator().manual_seed(4))
    latents = pipeline_latents(pipe, noise, num_inference_steps=1)
    images = pipe(PROMPTS, latents=pack_latents(noise), height=16, width=16, max_sequence_length=16,
                  num_inference_steps=1, output_type="pt").images
    torch.testing.assert_close(lora_teacher.decode(latents) * 0.5 + 0.5, images, rtol=0, atol=1e-5)
    cfg = lora_teacher.vae.config
    assert (cfg.scaling_factor, cfg.shift_factor) == (0.3611, 0.1159)
    torch.manual_seed(0)
    z = lora_teacher.encode(images * 2 - 1)
    torch.manual_seed(0)
    raw = lora_teacher.vae.encode(images * 2 - 1).latent_dist.sample()
    torch.testing.assert_close(z, (raw - cfg.shift_factor) * cfg.scaling_factor)


# ------------------------------------------------------------------------------------ export
def perturbed(teacher):
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in teacher.trainable_parameters("student"):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return teacher


def replay_two_steps(teacher, noise, cond, ts, seed, role="student"):
    """The student's 2-step sampler (``sample_student``) with its re-noising drawn as the exported
    pipeline draws it (torch's global generator, in the packed token layout)."""
    x0 = teacher.predict(role, noise, torch.full((2,), ts[0]), cond)[0]
    torch.manual_seed(seed)
    eps = unpack_latents(torch.randn(pack_latents(noise).shape), *noise.shape[-2:])
    x = teacher.schedule.add_noise(x0, eps, torch.full((2,), ts[1]))
    return teacher.predict(role, x, torch.full((2,), ts[1]), cond)[0]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["pipeline", "lora"])
def test_export_generates_the_student_through_flux_pipeline(tiny_flux_dir, tmp_path, fmt):
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxPipeline

    torch.manual_seed(0)
    teacher = perturbed(FluxTeacher(str(tiny_flux_dir), mode="lora", **TINY_FLUX))
    ts = student_timesteps(2, schedule=teacher.schedule)
    noise = torch.randn(teacher.latent_shape(2), generator=torch.Generator().manual_seed(5))
    cond = teacher.encode_prompts(PROMPTS)
    with torch.no_grad():
        two_steps = replay_two_steps(teacher, noise, cond, ts, seed=11)
        untrained = replay_two_steps(teacher, noise, cond, ts, seed=11, role="real")
        torch.manual_seed(11)  # the replay's noise is the student sampler's, in another layout
        assert (teacher.sample_student(noise, cond, ts) - two_steps).abs().max() > 1e-3
        g = torch.Generator().manual_seed(11)
        direct = teacher.sample_student(noise, cond, ts, generator=g)
        g = torch.Generator().manual_seed(11)
        x_s = teacher.schedule.add_noise(teacher.predict("student", noise, torch.full((2,), ts[0]), cond)[0],
                                         torch.randn(noise.shape, generator=g), torch.full((2,), ts[1]))
        torch.testing.assert_close(direct, teacher.predict("student", x_s, torch.full((2,), ts[1]), cond)[0])
    info = (teacher.export_pipeline if fmt == "pipeline" else teacher.export_lora)(tmp_path, ts)
    # two times from 1 are evenly spaced: the default call reproduces them (shift_terminal), no sigmas
    assert info["call"] == {"num_inference_steps": 2, "guidance_scale": 3.5, "height": 16, "width": 16,
                            "max_sequence_length": 16}
    assert info["guidance"] == "embedded" and not info["scheduler"]["use_dynamic_shifting"]
    if fmt == "pipeline":
        pipe = DiffusionPipeline.from_pretrained(tmp_path)
        assert type(pipe) is FluxPipeline
    else:
        pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
        pipe.load_lora_weights(tmp_path)
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
    call = {k: v for k, v in info["call"].items() if k not in ("height", "width", "max_sequence_length")}
    torch.manual_seed(11)
    latents = pipeline_latents(pipe, noise, **call)
    print(f"{fmt}: max |pipeline - student| = {(latents - two_steps).abs().max().item():.2e}")
    assert (latents - two_steps).abs().max() < 1e-4
    assert (latents - untrained).abs().max() > 1e-3  # the student, not the teacher
    torch.manual_seed(11)
    images = pipe(PROMPTS, latents=pack_latents(noise), height=16, width=16, max_sequence_length=16,
                  output_type="pt", **call).images
    assert (images - (teacher.decode(two_steps) * 0.5 + 0.5)).abs().max() < 1e-4


@pytest.mark.slow
def test_dmdx_sample_draws_from_the_exported_pipeline(tiny_flux_dir, tmp_path):
    """`dmdx export` then `dmdx sample` on the folder: the recorded call and packed noise shape work."""
    from PIL import Image

    from dmdx_lightning.cli import main as dmdx
    from dmdx_lightning.export import export

    teacher = FluxTeacher(str(tiny_flux_dir), mode="lora", build_roles=["student"], **TINY_FLUX)
    info = export(teacher, [1.0, 0.5], tmp_path / "export", "pipeline")
    assert info["latent_shape"] == [16, 64] and info["guidance_scale"] == 3.5
    dmdx(["sample", str(tmp_path / "export"), "--output", str(tmp_path / "samples"), "--prompt", "a cat",
          "-n", "2", "--no-progress"])
    images = sorted((tmp_path / "samples").glob("000_*.png"))
    assert len(images) == 2 and Image.open(images[0]).size == (16, 16)


def test_schnell_export_records_no_guidance_scale(tiny_flux_schnell_dir, tmp_path):
    teacher = FluxTeacher(str(tiny_flux_schnell_dir), mode="lora", cfg_scale=1.0, build_roles=["student"],
                          **TINY_FLUX)
    info = teacher.export_lora(tmp_path, [1.0, 0.5])
    assert "guidance_scale" not in info["call"] and info["guidance"] == "none"
    assert info["call"]["num_inference_steps"] == 2 and "sigmas" not in info["call"]  # evenly spaced: exact
    assert json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())["shift_terminal"] == 0.5


# ------------------------------------------------------------------------------------ training
def test_dmdx_fit_of_the_flux_adm_config(tiny_flux_dir, tmp_path, monkeypatch):
    """Two iterations of configs/flux/adm_dev_4step.yaml on the tiny folder through the real CLI."""
    from pathlib import Path

    from dmdx_lightning.training_cli import DMDXCLI

    root = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(root)
    torch.manual_seed(0)
    teacher = "--model.init_args.teacher.init_args."
    cli = DMDXCLI(args=[
        "fit", "--config", str(root / "configs/flux/adm_dev_4step.yaml"),
        teacher + "pretrained_model_name_or_path", str(tiny_flux_dir), teacher + "resolution", "16",
        teacher + "max_sequence_length", "16", teacher + "torch_dtype", "float32", teacher + "lora_rank", "4",
        "--model.init_args.discriminator.init_args.layers", "[0, 2]",
        "--model.init_args.discriminator.init_args.head_channels", "8", "--data.init_args.batch_size", "2",
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
        "--trainer.precision", "32-true", "--trainer.num_sanity_val_steps", "0", "--trainer.limit_val_batches", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.logger", "false", "--trainer.max_steps", "2",
        "--trainer.default_root_dir", str(tmp_path)])
    module = cli.model
    assert module.teacher.guidance == "embedded" and int(module.generator_updates) == 2
    assert int(module.nonfinite_streak) == 0 and (tmp_path / "checkpoints" / "last.ckpt").is_file()
    student = [p for n, p in module.teacher.named_parameters() if "lora_B" in n and ".student" in n]
    assert any(p.abs().sum() > 0 for p in student)


@pytest.mark.slow
def test_flux_guidance_benchmark_quick(tmp_path):
    """benchmarks/flux_guidance.py end to end on a few steps: the guidance-distilled FLUX transformer
    trains, and every (x_t, t, w) row compares embedded guidance and true CFG to the exact direction."""
    import math

    from tests.helpers import load_benchmark

    bench = load_benchmark("flux_guidance")
    report = bench.main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "flux_guidance.md").read_text().startswith("# FLUX guidance")
    assert len(report["rows"]) == len(bench.TIMES) * 2 * len(bench.SCALES)  # conditional x_t, then each guided set
    assert all(math.isfinite(r["cos_embedded"]) and math.isfinite(r["cos_true_cfg"]) for r in report["rows"])
    assert report["train_log"][-1]["loss"] < report["train_log"][0]["loss"]


@pytest.mark.slow
def test_dmdx_fit_of_the_flux_adp_config(tiny_flux_dir, tiny_sam_path, tmp_path, monkeypatch):
    """Two iterations of configs/flux/adp_dev_4step.yaml (latent + SAM pixel discriminators, the
    generator's pixel loss through the FLUX VAE's decode) on tiny FLUX pairs."""
    from pathlib import Path

    from dmdx_lightning.training_cli import DMDXCLI
    from tests.test_configs import FLUX_TINY, TINY_HEADS, TINY_SAM, write_tiny_pairs

    root = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(root)
    pairs = write_tiny_pairs(tmp_path / "pairs", num_pairs=4, latent_shape=(16, 8, 8), teacher_family="flux",
                             prompt="a photo of a cat")
    tiny = [a.replace("{tiny_flux}", str(tiny_flux_dir)).replace("{tiny_sam}", str(tiny_sam_path))
            for a in FLUX_TINY + TINY_HEADS + TINY_SAM]
    torch.manual_seed(0)
    cli = DMDXCLI(args=[
        "fit", "--config", str(root / "configs/flux/adp_dev_4step.yaml"), *tiny,
        "--model.init_args.teacher.init_args.lora_rank", "4", "--data.init_args.path", str(pairs),
        "--data.init_args.batch_size", "2", "--model.init_args.discriminator.init_args.head_channels", "8",
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
        "--trainer.precision", "32-true", "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
        "--trainer.max_steps", "2", "--trainer.default_root_dir", str(tmp_path / "run")])
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    student = [p for n, p in cli.model.teacher.named_parameters() if "lora_B" in n and ".student" in n]
    assert any(p.abs().sum() > 0 for p in student)  # the generator stepped (lora_B starts at 0)


@pytest.mark.parametrize("option", ["real_cfg_scale", "cfg_scale"])
def test_a_guidance_scale_for_schnell_is_refused_before_anything_loads(tiny_flux_schnell_dir, tmp_path, option):
    """The method's guidance scale against a teacher without guidance, from the config files alone
    (before, the first real-score prediction stopped the run, after the weights had loaded)."""
    from dmdx_lightning.preflight import check_config

    teacher = {"class_path": "dmdx_lightning.teachers.flux.FluxTeacher",
               "init_args": {"pretrained_model_name_or_path": str(tiny_flux_schnell_dir), "cfg_scale": 1.0}}
    method = ("dmdx_lightning.methods.adm.ADMModule" if option == "real_cfg_scale"
              else "dmdx_lightning.methods.ode_pairs.ODEPairGenerator")
    config = {"model": {"class_path": method, "init_args": {"teacher": teacher, option: 4.0}},
              "trainer": {"default_root_dir": str(tmp_path)}}
    with pytest.raises(ConfigError, match=rf"model\.init_args\.{option}.*4\.0.*FluxTeacher.*has no guidance.*Set model"
                                          rf"\.init_args\.{option}: 1"):
        check_config(config, "fit")
    config["model"]["init_args"][option] = 1.0
    check_config(config, "fit")
    teacher["init_args"]["pretrained_model_name_or_path"] = str(tmp_path / "not-yet-downloaded")  # unknown: no check
    config["model"]["init_args"][option] = 4.0
    from dmdx_lightning.teachers.flux import FluxTeacher

    assert FluxTeacher.guidance_from_options(teacher["init_args"]) is None
