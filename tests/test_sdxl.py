"""SDXLTeacher on a tiny random SDXL folder (real diffusers/transformers components, saved and reloaded).

What the conformance suite does not check: prompt encoding and CFG's unconditional branch against
``StableDiffusionXLPipeline`` itself, the epsilon parametrisation and the time mapping against
diffusers' schedulers, feature blocks, LoRA targets, loading errors, and the whole chain through
the shipped configs (ODE pairs -> ADP -> ADM = DMDX, DMD2, 4-step ADM) with exact resume and the
export round trip.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dmdx_lightning.schedules import VPSchedule
from dmdx_lightning.teachers.sdxl import (CONFIG_KEY, VAE_KEY, SDXLTeacher, student_lcm_scheduler,
                                          student_timestep_indices)
from tests.conftest import TINY_SDXL

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a photo of a cat", "a red bus", "", "an astronaut riding a horse"]


@pytest.fixture(scope="module")
def lora_teacher(tiny_sdxl_dir):
    torch.manual_seed(0)
    return SDXLTeacher(str(tiny_sdxl_dir), mode="lora", **TINY_SDXL)


@pytest.fixture(scope="module")
def pipe(tiny_sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def perturb_adapter(teacher, role, scale=0.5, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in teacher.trainable_parameters(role):
            p.add_(scale * torch.randn(p.shape, generator=gen))


# -------------------------------------------------------------------------------- prompts and CFG
def test_prompt_encoding_and_cfg_branch_match_the_pipeline(lora_teacher, pipe):
    cond = lora_teacher.encode_prompts(PROMPTS)
    # 77 tokens of both CLIPs' penultimate states side by side; pooled = text_encoder_2's projection
    assert cond.prompt_embeds.shape == (4, 77, 32) and cond.pooled.shape == (4, 16)
    embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=True)
    torch.testing.assert_close(cond.prompt_embeds, embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond.pooled, pooled, rtol=0, atol=0)
    assert not torch.allclose(cond.pooled[0], cond.pooled[1])
    # SDXL base zeroes the unconditional branch (force_zeros_for_empty_prompt), which is NOT the
    # encoded empty prompt
    null = lora_teacher.null_conditioning(4)
    torch.testing.assert_close(null.prompt_embeds, neg_embeds, rtol=0, atol=0)
    torch.testing.assert_close(null.pooled, neg_pooled, rtol=0, atol=0)
    assert cond.prompt_embeds[2].abs().max() > 0 and null.prompt_embeds.abs().max() == 0
    # micro-conditioning = the pipeline's add_time_ids at its default size (16 px here)
    expected = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), torch.float32,
                                      pipe.text_encoder_2.config.projection_dim)
    torch.testing.assert_close(cond.time_ids, expected.repeat(4, 1))
    torch.testing.assert_close(null.time_ids, cond.time_ids)


def test_without_force_zeros_the_unconditional_branch_is_the_encoded_empty_prompt(tiny_sdxl_dir, pipe):
    teacher = SDXLTeacher(str(tiny_sdxl_dir), mode="lora", force_zeros_for_empty_prompt=False, **TINY_SDXL)
    no_zeros = type(pipe)(**pipe.components, force_zeros_for_empty_prompt=False)
    _, neg_embeds, _, neg_pooled = no_zeros.encode_prompt(PROMPTS[:2], do_classifier_free_guidance=True)
    null = teacher.null_conditioning(2)  # encoded once as a batch of 1: float32 summation order differs
    torch.testing.assert_close(null.prompt_embeds, neg_embeds)
    torch.testing.assert_close(null.pooled, neg_pooled)
    assert null.prompt_embeds.abs().max() > 0


# -------------------------------------------------------------------------------- parametrisation
def test_model_output_is_the_unet_epsilon_at_timestep_1000t_minus_1(lora_teacher, tiny_sdxl_dir):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    fresh = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    cond = lora_teacher.encode_prompts(PROMPTS[:2])
    x_t, t = torch.randn(lora_teacher.latent_shape(2)), torch.tensor([1.0, 0.75])
    eps = fresh(x_t, torch.tensor([999, 749]), encoder_hidden_states=cond.prompt_embeds,
                added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": cond.time_ids}).sample
    torch.testing.assert_close(lora_teacher.forward_role("real", x_t, t, cond), eps)
    x0, eps_pred = lora_teacher.predict("real", x_t, t, cond)
    acp = DDPMScheduler.from_pretrained(tiny_sdxl_dir, subfolder="scheduler").alphas_cumprod[[999, 749]]
    a, s = acp.sqrt().view(2, 1, 1, 1), (1 - acp).sqrt().view(2, 1, 1, 1)
    torch.testing.assert_close(x0, (x_t - s * eps) / a, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(eps_pred, eps)


def test_schedule_is_scaled_linear_vp_with_trailing_times(lora_teacher):
    sched = lora_teacher.schedule
    assert isinstance(sched, VPSchedule) and sched.time_mapping == "trailing" and sched.beta_schedule == "scaled_linear"
    assert lora_teacher.prediction_type == "eps"
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    assert sched.model_timestep(t).tolist() == [-1.0, 249.0, 499.0, 749.0, 999.0]
    assert float(sched.alpha(torch.tensor(0.0))) == 1.0 and float(sched.sigma(torch.tensor(0.0))) == 0.0


def test_teacher_sampler_is_diffusers_ddim_trailing_with_cfg(lora_teacher, pipe):
    """``sample_ode`` (CFG in eps space, DDIM moves on the 'trailing' grid, ending at the data) is
    the pipeline with DDIMScheduler(timestep_spacing='trailing', set_alpha_to_one=True)."""
    from diffusers import DDIMScheduler

    ddim = type(pipe)(**{**pipe.components, "scheduler": DDIMScheduler.from_config(
        pipe.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True, steps_offset=0,
        clip_sample=False)})
    ddim.set_progress_bar_config(disable=True)
    noise = torch.randn(lora_teacher.latent_shape(2), generator=torch.Generator().manual_seed(0))
    theirs = ddim(PROMPTS[:2], latents=noise.clone(), num_inference_steps=4, guidance_scale=3.0,
                  output_type="latent").images
    ours = lora_teacher.sample_ode(noise, lora_teacher.encode_prompts(PROMPTS[:2]), 4, 3.0)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    other = lora_teacher.sample_ode(noise, lora_teacher.encode_prompts(PROMPTS[:2]), 4, 1.0)
    assert (other - theirs).abs().max() > 1e-3  # guidance matters, so the comparison can fail


# -------------------------------------------------------------------------------- features and roles
def test_feature_blocks_are_down_mid_up_and_the_forward_stops_early(lora_teacher):
    net = lora_teacher.denoiser
    blocks = lora_teacher.feature_blocks(net)
    assert blocks == [*net.down_blocks, net.mid_block, *net.up_blocks]
    cond = lora_teacher.encode_prompts(PROMPTS[:2])
    x_t = torch.randn(lora_teacher.latent_shape(2), requires_grad=True)
    t = torch.tensor([0.5, 0.9])
    calls = []
    handle = net.up_blocks[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        first = lora_teacher.feature_maps("real", x_t, t, cond, [1, 2])
        assert not calls, "the forward must stop after the mid block"
        maps = lora_teacher.feature_maps("real", x_t, t, cond, [0, 1, 2, 3, 4])
    finally:
        handle.remove()
    # (B, C, H, W): down 0 (16 ch, downsampled to 4x4), down 1 (32, 4x4), mid (32, 4x4), up 0 (32, upsampled
    # to 8x8), up 1 (16, 8x8)
    assert [tuple(m.shape) for m in maps] == [(2, 16, 4, 4), (2, 32, 4, 4), (2, 32, 4, 4), (2, 32, 8, 8),
                                              (2, 16, 8, 8)]
    torch.testing.assert_close(maps[1:3], first)
    maps[2].square().mean().backward()
    assert x_t.grad is not None and x_t.grad.abs().sum() > 0


def test_lora_targets_every_attention_projection_with_fp32_adapters_on_bf16(tiny_sdxl_dir):
    teacher = SDXLTeacher(str(tiny_sdxl_dir), mode="lora", torch_dtype="bfloat16", **TINY_SDXL)
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in teacher.named_trainable_parameters("student") if ".lora_A." in n}
    attention = {n for n, m in teacher.denoiser.named_modules()
                 if n.endswith(("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                                "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"))}
    assert attention and {n.removeprefix("denoiser.") for n in wrapped} == attention
    trainable = [p for p in teacher.parameters() if p.requires_grad]
    assert trainable and {p.dtype for p in trainable} == {torch.float32}
    assert {p.dtype for n, p in teacher.denoiser.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    perturb_adapter(teacher, "student", 0.1)
    cond = teacher.encode_prompts(PROMPTS[:2])
    x_t, t = torch.randn(teacher.latent_shape(2)), torch.tensor([0.4, 1.0])
    x0, _ = teacher.predict("student", x_t, t, cond)
    real, _ = teacher.predict("real", x_t, t, cond)
    assert x0.dtype == torch.float32 and not torch.allclose(x0, real)
    x0.square().mean().backward()
    grads = [p.grad for p in teacher.trainable_parameters("student")]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in teacher.trainable_parameters("fake"))


@pytest.mark.slow
def test_lora_checkpointing_recomputes_blocks_in_their_role(tiny_sdxl_dir):
    """ADM's generator loss crosses roles (student sample, fake score, real-score features); with
    gradient checkpointing the UNet's blocks are recomputed in backward in the role they ran in."""
    from functools import partial

    from dmdx_lightning.discriminators.latent import LatentDiscriminator
    from dmdx_lightning.methods.adm import ADMModule

    def grads(checkpointing):
        torch.manual_seed(0)
        teacher = SDXLTeacher(str(tiny_sdxl_dir), mode="lora", gradient_checkpointing=checkpointing, **TINY_SDXL)
        perturb_adapter(teacher, "student", 0.3)
        perturb_adapter(teacher, "fake", 0.3, seed=2)
        opt = partial(torch.optim.AdamW, lr=1e-3)
        module = ADMModule(teacher, LatentDiscriminator(layers=[1, 2], head_channels=16), real_cfg_scale=3.0,
                           generator_optimizer=opt, fake_score_optimizer=opt, discriminator_optimizer=opt)
        teacher.denoiser.train()
        cond = teacher.encode_prompts(PROMPTS[:2])
        torch.manual_seed(1)
        module.players["generator"].step({}, cond, module.prepare({}, cond, ["generator"]))["loss"].backward()
        return torch.cat([p.grad.flatten() for p in teacher.trainable_parameters("student")])

    plain, checkpointed = grads(False), grads(True)
    assert plain.abs().sum() > 0
    torch.testing.assert_close(checkpointed, plain, atol=1e-6, rtol=1e-4)


# -------------------------------------------------------------------------------- VAE and loading
def test_decode_is_the_pipelines_and_differentiable(lora_teacher, pipe):
    lat = torch.randn(lora_teacher.latent_shape(2), requires_grad=True)
    img = lora_teacher.decode(lat)
    assert img.shape == (2, 3, 16, 16) and img.min() >= -1 and img.max() <= 1
    expect = pipe.vae.decode(lat.detach() / pipe.vae.config.scaling_factor).sample.clamp(-1, 1)
    torch.testing.assert_close(img.detach(), expect)
    img.mean().backward()  # the pixel discriminator's generator loss goes through the decoder
    assert lat.grad is not None and lat.grad.abs().sum() > 0
    assert lora_teacher.encode(img.detach()).shape == lat.shape


def test_a_separate_vae_replaces_the_pipelines(tiny_sdxl_dir, tmp_path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_sdxl_dir, subfolder="vae")
    AutoencoderKL.from_config({**vae.config, "scaling_factor": 0.5}).save_pretrained(tmp_path / "vae")
    teacher = SDXLTeacher(str(tiny_sdxl_dir), vae=str(tmp_path / "vae"), mode="lora", **TINY_SDXL)
    assert teacher.vae.config.scaling_factor == 0.5
    with pytest.raises(OSError, match=VAE_KEY.replace(".", r"\.")):
        SDXLTeacher(str(tiny_sdxl_dir), vae=str(tmp_path / "no_such_vae"), mode="lora", **TINY_SDXL)


def test_missing_weights_name_the_config_key(tmp_path, tiny_sdxl_dir):
    with pytest.raises(OSError, match=CONFIG_KEY.replace(".", r"\.")):
        SDXLTeacher("no-such-org/no-such-sdxl-model", **TINY_SDXL)
    broken = tmp_path / "no_unet"
    broken.mkdir()
    for sub in tiny_sdxl_dir.iterdir():
        if sub.name != "unet":
            (broken / sub.name).symlink_to(sub)
    with pytest.raises(FileNotFoundError, match=r"no unet/ folder.*SDXL pipeline folder"):
        SDXLTeacher(str(broken), **TINY_SDXL)
    with pytest.raises(ValueError, match="torch_dtype"):
        SDXLTeacher(str(tiny_sdxl_dir), torch_dtype="fp8", **TINY_SDXL)


def test_a_non_sdxl_unet_is_refused(tiny_sdxl_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    folder = tmp_path / "sd15_like"
    folder.mkdir()
    for sub in tiny_sdxl_dir.iterdir():
        if sub.name != "unet":
            (folder / sub.name).symlink_to(sub)
    config = dict(UNet2DConditionModel.load_config(tiny_sdxl_dir, subfolder="unet"))
    config.update(addition_embed_type=None, projection_class_embeddings_input_dim=None)
    UNet2DConditionModel.from_config(config).save_pretrained(folder / "unet")
    with pytest.raises(ValueError, match="not SDXL's 'text_time'"):
        SDXLTeacher(str(folder), **TINY_SDXL)


# -------------------------------------------------------------------------------- the student's scheduler
def test_student_times_map_to_integer_timesteps_or_fail_clearly():
    sched = VPSchedule(time_mapping="trailing")
    assert student_timestep_indices(sched, [1.0, 0.75, 0.5, 0.25]) == [999, 749, 499, 249]
    assert student_timestep_indices(sched, [1.0]) == [999]
    with pytest.raises(ValueError, match="student_timesteps"):
        student_timestep_indices(sched, [1.0, 2 / 3, 1 / 3])  # 665.67, 332.33: not on the grid


@pytest.mark.parametrize("times,exact", [([1.0], True), ([1.0, 0.75, 0.5, 0.25], True), ([1.0, 0.6], False)])
def test_lcm_scheduler_replays_the_student_sampler(times, exact):
    sched = VPSchedule(time_mapping="trailing")
    scheduler, indices, is_exact = student_lcm_scheduler(sched, "epsilon", times)
    assert is_exact == exact
    scheduler.set_timesteps(timesteps=indices)
    assert scheduler.timesteps.tolist() == indices
    if exact:
        scheduler.set_timesteps(len(times))
        assert scheduler.timesteps.tolist() == indices
    # one step = predict x0 from eps at t, re-noise with fresh noise to the next time (x0 at the end)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    t = torch.full((2,), times[0])
    x0 = (x - sched.sigma(t).view(2, 1, 1, 1) * eps) / sched.alpha(t).view(2, 1, 1, 1)
    step = scheduler.step(eps, scheduler.timesteps[0], x, generator=torch.Generator().manual_seed(5)).prev_sample
    if len(times) == 1:
        torch.testing.assert_close(step, x0, rtol=1e-5, atol=1e-5)
    else:
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
        expect = sched.add_noise(x0, noise, torch.full((2,), times[1]))
        torch.testing.assert_close(step, expect, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------- the chain, via the configs
TINY_RUN = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
            "--trainer.precision", "32-true", "--trainer.num_sanity_val_steps", "0",
            "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false"]
TEACHER = "--model.init_args.teacher.init_args."
SMALL_HEADS = ["--model.init_args.discriminator.init_args.head_channels", "16"]


def cli(config: str, tiny: Path, root: Path, *extra: str, verb: str = "fit"):
    """Run a shipped config with the tiny folder in place of the hub id (in this process)."""
    from dmdx_lightning.training_cli import DMDXCLI

    torch.manual_seed(0)
    args = [verb, "--config", str(ROOT / "configs" / config), TEACHER + "pretrained_model_name_or_path", str(tiny),
            TEACHER + "torch_dtype", "float32", "--trainer.default_root_dir", str(root), *TINY_RUN, *extra]
    return DMDXCLI(args=args)


def round_trip(ckpt: Path, out: Path, fmt: str, tiny: Path):
    """`dmdx export`, then diffusers samples from the export as the student does (same noise)."""
    from diffusers import DiffusionPipeline, LCMScheduler, StableDiffusionXLPipeline

    from dmdx_lightning.cli import main as dmdx
    from dmdx_lightning.export import EXPORT_INFO, build_module, find_run_config

    dmdx(["export", "--ckpt_path", str(ckpt), "--output", str(out), "--format", fmt])
    info = json.loads((out / EXPORT_INFO).read_text())
    if fmt == "pipeline":
        pipe = DiffusionPipeline.from_pretrained(out)
        assert isinstance(pipe, StableDiffusionXLPipeline) and isinstance(pipe.scheduler, LCMScheduler)
    else:
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny)
        pipe.load_lora_weights(out)
        pipe.scheduler = LCMScheduler.from_pretrained(out, subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
    module = build_module(find_run_config(ckpt))
    module.load_student_from(str(ckpt))
    teacher = module.teacher
    noise = torch.randn(teacher.latent_shape(2), generator=torch.Generator().manual_seed(3))
    prompts = [PROMPTS[0], PROMPTS[3]]
    theirs = pipe(prompts, latents=noise.clone(), generator=torch.Generator().manual_seed(11), output_type="latent",
                  **info["call"]).images
    with torch.no_grad():
        ours = teacher.sample_student(noise, teacher.encode_prompts(prompts), module.student_timesteps,
                                      generator=torch.Generator().manual_seed(11))
        real = teacher.sample_student(noise, teacher.encode_prompts(prompts), module.student_timesteps,
                                      generator=torch.Generator().manual_seed(11), role="real")
    return info, theirs, ours, real


@pytest.fixture(scope="module")
def chain(tiny_sdxl_dir, tiny_sam_path, tmp_path_factory):
    """The README's chain on the tiny teacher: ODE pairs -> ADP -> ADM (DMDX) via the shipped configs."""
    root = tmp_path_factory.mktemp("sdxl_chain")
    pairs = root / "pairs"
    cli("sdxl/ode_pairs.yaml", tiny_sdxl_dir, root / "pairs_run", verb="predict", *[
        "--model.init_args.num_steps", "2", "--data.init_args.output_dir", str(pairs),
        "--data.init_args.num_pairs", "8", "--data.init_args.shard_size", "4", "--data.init_args.batch_size", "4"])
    cli("sdxl/adp_1step.yaml", tiny_sdxl_dir, root / "adp", *SMALL_HEADS, *[
        "--data.init_args.path", str(pairs), "--trainer.max_steps", "2",
        # a large lr, so that ADM's start from these weights is visible after its own small step
        "--model.init_args.generator_optimizer.init_args.lr", "1e-2",
        "--model.init_args.pixel_discriminator.init_args.backbone.init_args.pretrained", tiny_sam_path,
        "--model.init_args.pixel_discriminator.init_args.backbone.init_args.dtype", "float32",
        "--model.init_args.pixel_discriminator.init_args.layers", "[1, 2]",
        "--model.init_args.pixel_discriminator.init_args.head_channels", "16"])
    adm = cli("sdxl/dmdx_1step.yaml", tiny_sdxl_dir, root / "adm", *SMALL_HEADS, *[
        "--model.init_args.init_from", str(root / "adp" / "checkpoints" / "last.ckpt"),
        "--trainer.max_steps", "1"])
    return root, pairs, adm


@pytest.mark.slow
def test_chain_writes_pairs_trains_adp_then_adm_from_it(chain):
    from dmdx_lightning.data.ode_pairs import read_manifest

    root, pairs, adm = chain
    manifest = read_manifest(pairs)
    assert manifest["teacher_family"] == "sdxl" and manifest["num_pairs"] == 8
    assert list(manifest["latent_shape"]) == [4, 8, 8]
    adp_ckpt = torch.load(root / "adp" / "checkpoints" / "last.ckpt", weights_only=True)
    assert adp_ckpt["global_step"] == 2 and adp_ckpt["dmdx"]["teacher_family"] == "sdxl"
    # ADM started from ADP's student: its first generator update moved the ADP weights, not the teacher's
    module = adm.model
    assert module.init_from.endswith("adp/checkpoints/last.ckpt") and module.student_timesteps == [1.0]
    adm_ckpt = torch.load(root / "adm" / "checkpoints" / "last.ckpt", weights_only=True)
    assert adm_ckpt["global_step"] == 1
    names = [n for n in adp_ckpt["state_dict"] if "lora_B.student" in n]
    adp_b = torch.cat([adp_ckpt["state_dict"][n].flatten() for n in names])
    adm_b = torch.cat([adm_ckpt["state_dict"][n].flatten() for n in names])
    assert adp_b.abs().max() > 1e-3  # ADP (lr 1e-2) trained the zero-initialised LoRA B
    # ADM's student = ADP's + one AdamW step of lr 1e-5
    assert 0 < (adp_b - adm_b).abs().max() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["lora", "pipeline"])
def test_one_step_export_round_trip_matches_our_sampler(chain, fmt, tiny_sdxl_dir):
    root, _, _ = chain
    info, theirs, ours, real = round_trip(root / "adm" / "checkpoints" / "last.ckpt", root / f"export_{fmt}", fmt,
                                          tiny_sdxl_dir)
    assert info["timesteps"] == [999] and info["default_call_exact"]
    assert info["call"] == {"num_inference_steps": 1, "guidance_scale": 1.0}
    print(f"one step/{fmt}: max |pipeline - sample_student| = {(theirs - ours).abs().max().item():.2e}")
    assert (theirs - ours).abs().max() < 1e-4
    assert (theirs - real).abs().max() > 1e-3  # the export holds the trained student, not the teacher


@pytest.mark.slow
def test_dmd2_config_trains_on_the_pairs(chain, tiny_sdxl_dir):
    root, pairs, _ = chain
    run = cli("sdxl/dmd2_1step_full.yaml", tiny_sdxl_dir, root / "dmd2", *SMALL_HEADS,
              "--data.init_args.path", str(pairs), "--trainer.max_steps", "1")
    module = run.model
    assert module.loss == "dmd2" and module.update_ratio == 5 and module.teacher.mode == "full"
    assert module.discriminator.backbone_role == "fake"
    assert run.trainer.global_step == 1  # iteration 0: generator, fake score, discriminator
    assert int(module.generator_updates) == 1
    ckpt = torch.load(root / "dmd2" / "checkpoints" / "last.ckpt", weights_only=True)
    assert any(k.startswith("teacher.roles.student.") for k in ckpt["state_dict"])


@pytest.fixture(scope="module")
def four_step(tiny_sdxl_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl_4step")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(p for p in PROMPTS if p) + "\na bowl of soup\n")
    data = ["--data.init_args.train_file", str(prompts), "--data.init_args.batch_size", "2", "--data.init_args.repeat", "1"]

    def fit(folder, max_steps, *extra):
        return cli("sdxl/adm_4step.yaml", tiny_sdxl_dir, root / folder, *SMALL_HEADS, *data,
                   "--trainer.max_steps", str(max_steps), *extra)

    return root, fit


def _trainable_state(ckpt_path: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(ckpt_path, weights_only=True)
    state = {f"model.{k}": v for k, v in ckpt["state_dict"].items()}
    for i, opt in enumerate(ckpt["optimizer_states"]):
        for pid, s in opt["state"].items():
            state.update({f"opt{i}.{pid}.{k}": torch.as_tensor(v) for k, v in s.items()})
    return state


@pytest.mark.slow
def test_four_step_resume_is_exact_and_the_export_replays_four_steps(four_step, tiny_sdxl_dir):
    """3 iterations straight (2 prompts batches an epoch, so the run crosses an epoch) vs. resumed
    from the checkpoint written after iteration 1 (mid-epoch): bitwise the same trainable state
    and optimizer states. The checkpoint is one written during the run, as after a preemption."""
    root, fit = four_step
    steps = root / "steps"
    fit("straight", 3, "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.dirpath", str(steps), "--trainer.callbacks.every_n_train_steps", "1",
        "--trainer.callbacks.save_top_k", "-1", "--trainer.callbacks.filename", "{step}")
    first = steps / "step=1.ckpt"
    after_one = _trainable_state(first)
    fit("resumed", 3, "--ckpt_path", str(first))
    straight, resumed = (_trainable_state(root / f / "checkpoints" / "last.ckpt") for f in ("straight", "resumed"))
    assert straight.keys() == resumed.keys()
    different = [k for k in straight if not torch.equal(straight[k], resumed[k])]
    assert not different, different[:5]
    assert any(not torch.equal(straight[k], after_one[k]) for k in after_one)  # the later iterations trained

    info, theirs, ours, real = round_trip(root / "straight" / "checkpoints" / "last.ckpt", root / "export", "pipeline",
                                          tiny_sdxl_dir)
    assert info["timesteps"] == [999, 749, 499, 249] and info["call"]["num_inference_steps"] == 4
    assert "timesteps" not in info["call"]  # the default call reproduces DMD2's 4-step schedule
    print(f"four steps: max |pipeline - sample_student| = {(theirs - ours).abs().max().item():.2e}")
    assert (theirs - ours).abs().max() < 1e-4
    assert (theirs - real).abs().max() > 1e-3


def test_cli_without_the_hub_weights_is_one_paragraph_naming_the_key(tmp_path):
    """`dmdx fit --config configs/sdxl/dmdx_1step.yaml` offline: exit 2 with the key and the fix, no traceback."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "dmdx_lightning.cli", "fit", "--config", "configs/sdxl/dmdx_1step.yaml",
                        "--trainer.default_root_dir", str(tmp_path / "run")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    assert len(out.splitlines()) < 30 and "Traceback" not in out, out
    assert CONFIG_KEY in out and "hf download" in out and "stabilityai/stable-diffusion-xl-base-1.0" in out
