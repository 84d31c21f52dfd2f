"""CogVideoXTeacher on a tiny random CogVideoX folder (real diffusers/transformers components, saved and
reloaded): what is particular to this family. The shared contract: tests/test_teacher_conformance.py."""

import pytest
import torch

from dmdx_lightning.discriminators.heads import Head2D, Head3D, head_for
from dmdx_lightning.discriminators.latent import LatentDiscriminator
from dmdx_lightning.schedules import VPSchedule, student_timesteps
from dmdx_lightning.teachers.cogvideox import CONFIG_KEY, CogVideoXTeacher, student_vp_scheduler
from tests.conftest import TINY_COGVIDEOX

PROMPTS = ["a cat playing piano", "waves on a beach", "", "a red bus"]


@pytest.fixture(scope="module")
def teacher(tiny_cogvideox_dir):
    torch.manual_seed(0)
    return CogVideoXTeacher(str(tiny_cogvideox_dir), mode="lora", **TINY_COGVIDEOX)


@pytest.fixture(scope="module")
def pipe(tiny_cogvideox_dir):
    from diffusers import CogVideoXPipeline

    pipe = CogVideoXPipeline.from_pretrained(tiny_cogvideox_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_defaults_come_from_the_transformer_config(teacher):
    # 9 frames of 32x32 px (sample_frames, sample size x 4) -> 3 latent frames of 8x8, pipeline layout
    assert (teacher.num_frames, teacher.height, teacher.width, teacher.max_sequence_length) == (9, 32, 32, 8)
    assert teacher.latent_shape(2) == (2, 3, 4, 8, 8)
    assert teacher.prediction_type == "v" and teacher.identity().endswith("tiny")


def test_prompt_encoding_matches_pipeline(teacher, pipe):
    cond = teacher.encode_prompts(PROMPTS)
    embeds, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, max_sequence_length=8)
    assert cond.prompt_embeds.shape == (4, 8, 16)
    torch.testing.assert_close(cond.prompt_embeds, embeds)
    # pooled: mean of the real tokens only (the empty prompt has just </s>)
    ids = pipe.tokenizer([""], padding="max_length", max_length=8, return_tensors="pt")
    n = int(ids.attention_mask.sum())
    torch.testing.assert_close(cond.pooled[2], embeds[2, :n].mean(0))
    assert not torch.allclose(cond.pooled[0], cond.pooled[1])


def test_schedule_is_the_scheduler_config(teacher, pipe):
    """Zero terminal SNR and the SNR shift as CogVideoXDDIMScheduler computes them; the student's
    8-step grid is the scheduler's trailing timesteps."""
    acp = pipe.scheduler.alphas_cumprod.float()
    assert teacher.schedule.snr_shift_scale == 3.0 and teacher.schedule.rescale_betas_zero_snr
    torch.testing.assert_close(teacher.schedule.alphas_cumprod.float(), acp, rtol=0, atol=1e-6)
    idx = torch.tensor([0, 124, 500, 999])
    torch.testing.assert_close(teacher.schedule.alpha(idx / 999.0) ** 2, acp[idx], rtol=0, atol=1e-6)
    assert float(teacher.schedule.alpha(torch.tensor(1.0))) == 0.0  # zero terminal SNR
    grid = student_timesteps(8, schedule=teacher.schedule)
    pipe.scheduler.set_timesteps(8)
    assert [teacher.schedule.train_index(t) for t in grid] == pipe.scheduler.timesteps.tolist()
    # without the shift and rescale the schedule differs (the check can fail)
    plain = VPSchedule(timestep_spacing="trailing")
    assert (plain.alphas_cumprod.float() - acp).abs().max() > 1e-2


def test_model_output_is_the_transformer_v_and_converts_once(teacher, pipe):
    cond = teacher.encode_prompts(PROMPTS[:2])
    g = torch.Generator().manual_seed(0)
    x_t, t = torch.randn(teacher.latent_shape(2), generator=g), torch.tensor([249 / 999, 874 / 999])
    rotary = pipe._prepare_rotary_positional_embeddings(32, 32, x_t.shape[1], torch.device("cpu"))
    v = pipe.transformer(hidden_states=x_t, encoder_hidden_states=cond.prompt_embeds,
                         timestep=torch.tensor([249, 874]), image_rotary_emb=rotary).sample
    torch.testing.assert_close(teacher.forward_role("real", x_t, t, cond), v, rtol=1e-4, atol=1e-4)
    x0, eps = teacher.predict("real", x_t, t, cond)
    a = pipe.scheduler.alphas_cumprod[[249, 874]].float().sqrt().view(2, 1, 1, 1, 1)
    s = (1 - a**2).sqrt()
    torch.testing.assert_close(x0, a * x_t - s * v, rtol=1e-4, atol=1e-4)  # v = a eps - s x0
    torch.testing.assert_close(eps, s * x_t + a * v, rtol=1e-4, atol=1e-4)


def test_teacher_sampler_is_the_pipeline_ddim_with_cfg(teacher, pipe):
    noise = torch.randn(teacher.latent_shape(2), generator=torch.Generator().manual_seed(1))
    ours = teacher.sample_ode(noise, teacher.encode_prompts(PROMPTS[:2]), num_steps=4, cfg_scale=3.0)
    theirs = pipe(PROMPTS[:2], latents=noise.clone(), num_inference_steps=4, guidance_scale=3.0,
                  max_sequence_length=8, output_type="latent").frames
    torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-3)
    other = teacher.sample_ode(noise, teacher.encode_prompts(PROMPTS[:2]), num_steps=4, cfg_scale=1.0)
    assert (other - theirs).abs().max() > 1e-2


def test_feature_maps_are_video_maps_with_gradients_and_early_stop(teacher):
    cond = teacher.encode_prompts(PROMPTS[:2])
    x_t = torch.randn(teacher.latent_shape(2), requires_grad=True)
    t = torch.tensor([0.5, 0.5])
    calls = []
    handle = teacher.denoiser.transformer_blocks[1].register_forward_hook(lambda *a: calls.append(1))
    try:
        (first,) = teacher.feature_maps("real", x_t, t, cond, [0])
        assert not calls, "the forward must stop after the last needed block"
    finally:
        handle.remove()
    maps = teacher.feature_maps("real", x_t, t, cond, [0, -1])
    assert [tuple(m.shape) for m in maps] == [(2, 32, 3, 4, 4)] * 2  # (B, heads x head_dim, F, 8/2, 8/2)
    torch.testing.assert_close(maps[0], first)
    maps[1].square().mean().backward()  # gradients reach the input through the video maps
    assert x_t.grad is not None and x_t.grad.abs().sum() > 0


def test_frames_follow_the_latent_grid(teacher):
    """A token of frame f lands in map frame f: with the shared frame content, zeroing input frame 2
    leaves the block-0 features of frames 0-1 closer to the original than frame 2's."""
    cond = teacher.encode_prompts(PROMPTS[:1])
    x = torch.randn(teacher.latent_shape(1), generator=torch.Generator().manual_seed(2))
    y = x.clone()
    y[:, 2] = 0
    with torch.no_grad():
        (a,) = teacher.feature_maps("real", x, torch.tensor([0.5]), cond, [0])
        (b,) = teacher.feature_maps("real", y, torch.tensor([0.5]), cond, [0])
    diff = (a - b).abs().mean(dim=(0, 1, 3, 4))
    assert diff[2] > 3 * diff[:2].max(), diff


def test_missing_component_names_the_config_key(tmp_path):
    (tmp_path / "vae").mkdir()
    with pytest.raises(FileNotFoundError, match=f"no scheduler/ folder: {CONFIG_KEY}"):
        CogVideoXTeacher(str(tmp_path))


def test_bad_frame_count_is_a_clear_error(tiny_cogvideox_dir):
    with pytest.raises(ValueError, match="num_frames 8 must be 4k \\+ 1"):
        CogVideoXTeacher(str(tiny_cogvideox_dir), num_frames=8)


# ------------------------------------------------------------------------------------ 3D heads
def test_heads_are_chosen_by_map_rank():
    assert isinstance(head_for(torch.zeros(1, 8, 4, 4), 6, channels=8), Head2D)
    head = head_for(torch.zeros(1, 8, 13, 16, 16), 6, channels=8)
    assert isinstance(head, Head3D)
    assert sum(isinstance(m, torch.nn.Conv3d) for m in head.body) == 4  # 3 stride-2 stages + last block
    logits = head(torch.randn(2, 8, 13, 16, 16), torch.tensor([0.2, 0.7]), torch.randn(2, 6))
    assert logits.shape == (2,) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="\\(B, C, F, H, W\\)"):
        head(torch.zeros(2, 8, 16, 16), torch.tensor([0.2, 0.7]), torch.randn(2, 6))


def test_head3d_pools_over_time_and_sees_every_frame():
    torch.manual_seed(0)
    head = Head3D(8, 6, spatial=8, frames=5, channels=8)
    pools = [m for m in head.body if isinstance(m, torch.nn.AvgPool3d)]
    assert len(pools) == 2  # 8x8 -> 4x4 -> 2x2: two stages, each halving time (5 -> 3 -> 2)
    x = torch.randn(1, 8, 5, 8, 8, requires_grad=True)
    head(x, torch.tensor([0.5]), torch.randn(1, 6)).sum().backward()
    assert (x.grad.abs().sum(dim=(0, 1, 3, 4)) > 0).all()  # every frame reaches the logit


def test_latent_discriminator_builds_3d_heads_on_video(teacher):
    disc = LatentDiscriminator(layers=[0, -1], head_channels=8).build(teacher)
    assert all(isinstance(h, Head3D) for h in disc.heads)
    cond = teacher.encode_prompts(PROMPTS[:2])
    x = torch.randn(teacher.latent_shape(2))
    real, fake = disc.pair(teacher, x, torch.tensor([0.3, 0.6]), x + 1, torch.tensor([0.3, 0.6]), cond)
    assert real.shape == fake.shape == (2,) and not torch.allclose(real, fake)


# ------------------------------------------------------------------------------------ export scheduler
def test_student_scheduler_replays_the_student_sampler(teacher):
    ts = student_timesteps(8, schedule=teacher.schedule)
    sched, indices, exact = student_vp_scheduler(teacher.schedule, ts)
    assert indices == [999, 874, 749, 624, 499, 374, 249, 124] and exact
    sched.set_timesteps(8)
    assert sched.timesteps.tolist() == indices
    torch.testing.assert_close(sched.alphas_cumprod, teacher.schedule.alphas_cumprod.float(), rtol=1e-4, atol=1e-7)
    # one step: predict x0 from v, re-noise with fresh noise to the next time (= sample_student)
    x, v = torch.randn(1, 3, 4, 2, 2), torch.randn(1, 3, 4, 2, 2)
    step = sched.step(v, sched.timesteps[1], x, generator=torch.Generator().manual_seed(0)).prev_sample
    t, s = torch.tensor([ts[1]]), torch.tensor([ts[2]])
    x0, _ = teacher.schedule.to_x0_eps(v, x, t, "v")
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(step, teacher.schedule.add_noise(x0, noise, s), rtol=1e-4, atol=1e-5)
    _, _, exact3 = student_vp_scheduler(teacher.schedule, student_timesteps(3, schedule=teacher.schedule))
    assert not exact3  # diffusers' LCM spacing differs from trailing for 3 steps: pass timesteps=
    with pytest.raises(ValueError, match="not an integer training index"):
        student_vp_scheduler(teacher.schedule, [0.5003])


def test_frozen_parts_stay_in_eval_mode_so_prompts_are_deterministic(teacher):
    """T5 ships with dropout 0.1: a teacher put in training mode must not train its text encoder."""
    teacher.train()
    try:
        assert not teacher.text_encoder.training and not teacher.vae.training
        assert teacher.denoiser.training  # lora mode: the adapters' host trains
        first, second = teacher.encode_prompts(PROMPTS[:2]), teacher.encode_prompts(PROMPTS[:2])
        torch.testing.assert_close(first.prompt_embeds, second.prompt_embeds, rtol=0, atol=0)
    finally:
        teacher.eval()
