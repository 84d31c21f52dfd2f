"""WanTeacher on a tiny random Wan folder (real diffusers/transformers components, saved and reloaded):
what is particular to this family. The shared contract: tests/test_teacher_conformance.py."""

from __future__ import annotations

import json

import pytest
import torch

from dmdx_lightning.errors import ConfigError
from dmdx_lightning.preflight import run_checks
from dmdx_lightning.schedules import FlowMatchSchedule, euler_grid, student_timesteps
from dmdx_lightning.teachers.wan import WanTeacher, wan_flow_scheduler
from tests.conftest import TINY_WAN

KEY = "model.init_args.teacher.init_args"
PROMPTS = ["a cat playing piano", "waves  on a beach &amp; rocks ", "", "a red bus"]
LENGTH = TINY_WAN["max_sequence_length"]


@pytest.fixture(scope="module")
def teacher(tiny_wan_dir):
    torch.manual_seed(0)
    return WanTeacher(str(tiny_wan_dir), mode="lora", **TINY_WAN)


def wan_pipeline(folder):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(tiny_wan_dir):
    return wan_pipeline(tiny_wan_dir)


def test_layout_and_shift_come_from_the_pipeline(teacher, pipe):
    # 9 frames of 32x32 px -> 3 latent frames of 4x4, diffusers' Wan layout (B, C, F, H, W)
    assert teacher.latent_shape(2) == (2, 4, 3, 4, 4)
    assert teacher.prediction_type == "flow" and teacher.identity().endswith("tiny")
    assert teacher.schedule.shift == pipe.scheduler.config.flow_shift == 3.0
    assert not teacher.expand_timesteps


def test_prompt_encoding_matches_pipeline(teacher, pipe):
    cond = teacher.encode_prompts(PROMPTS)
    embeds, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, max_sequence_length=LENGTH)
    assert cond.prompt_embeds.shape == (4, LENGTH, 16)
    torch.testing.assert_close(cond.prompt_embeds, embeds)
    # the pipeline's clean-up (html entities, runs of spaces) is applied: the same as the clean prompt
    clean = teacher.encode_prompts(["waves on a beach & rocks"])
    torch.testing.assert_close(clean.prompt_embeds[0], cond.prompt_embeds[1], rtol=0, atol=0)
    # real tokens then zeros; pooled = the mean of the real tokens only
    n = int(pipe.tokenizer(["a red bus"], return_tensors="pt").attention_mask.sum())
    assert (cond.prompt_embeds[3, n:] == 0).all() and (cond.prompt_embeds[3, :n].abs().sum(-1) > 0).all()
    torch.testing.assert_close(cond.pooled[3], embeds[3, :n].mean(0))
    assert not torch.allclose(cond.pooled[0], cond.pooled[3])


def test_schedule_is_the_schedulers_flow_shift(teacher, pipe):
    """UniPC's flow sigmas are its evenly spaced times through the teacher's shift_time (flow_shift 3),
    starting where the teacher's own grid starts (1, less UniPC's 1e-6 guard)."""
    pipe.scheduler.set_timesteps(8)
    uniform = torch.linspace(1, 1 / 1000, 9, dtype=torch.float64)[:-1]
    shifted = teacher.schedule.shift_time(uniform)
    torch.testing.assert_close(pipe.scheduler.sigmas[:-1].double(), shifted, rtol=0, atol=2e-6)
    assert abs(float(pipe.scheduler.sigmas[0]) - euler_grid(8, teacher.schedule)[0]) < 2e-6
    assert (shifted - uniform).abs().max() > 0.1  # the shift matters (the check can fail)


def test_teacher_sampler_is_the_pipeline_loop_with_cfg(teacher, pipe):
    """The teacher's Euler sampler with CFG and the pipeline's denoising loop (its empty negative prompt,
    guidance, transformer calls) agree when the pipeline's scheduler is the Euler scheduler whose
    default call visits the teacher's grid (wan_flow_scheduler, deterministic)."""
    grid = euler_grid(4, teacher.schedule)
    euler, exact = wan_flow_scheduler(teacher.schedule, grid[:-1], stochastic=False)
    assert exact
    original, pipe.scheduler = pipe.scheduler, euler
    try:
        noise = torch.randn(teacher.latent_shape(2), generator=torch.Generator().manual_seed(1))
        ours = teacher.sample_ode(noise, teacher.encode_prompts(PROMPTS[:2]), num_steps=4, cfg_scale=3.0)
        theirs = pipe(PROMPTS[:2], latents=noise.clone(), num_inference_steps=4, guidance_scale=3.0, num_frames=9,
                      height=32, width=32, max_sequence_length=LENGTH, output_type="latent").frames
    finally:
        pipe.scheduler = original
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    other = teacher.sample_ode(noise, teacher.encode_prompts(PROMPTS[:2]), num_steps=4, cfg_scale=1.0)
    assert (other - theirs).abs().max() > 1e-3


def test_decode_is_the_pipelines_vae_normalisation(teacher, pipe):
    """decode = WanPipeline's output (latents / (1 / std) + mean through the VAE), with mean / std far
    from 0 / 1 in the tiny VAE so that leaving them out would show."""
    cfg = pipe.vae.config
    assert max(abs(m) for m in cfg.latents_mean) > 0.1 and min(cfg.latents_std) > 1.4
    captured = {}

    def keep(_pipe, _i, _t, kwargs):
        captured["latents"] = kwargs["latents"]
        return kwargs

    noise = torch.randn(teacher.latent_shape(1), generator=torch.Generator().manual_seed(2))
    frames = pipe(PROMPTS[:1], latents=noise, num_inference_steps=2, guidance_scale=1.0, num_frames=9, height=32,
                  width=32, max_sequence_length=LENGTH, output_type="pt", callback_on_step_end=keep).frames
    video = teacher.decode(captured["latents"])  # (B, 3, F, H, W) in [-1, 1]
    assert video.shape == (1, 3, 9, 32, 32)
    torch.testing.assert_close((video * 0.5 + 0.5).transpose(1, 2), frames, rtol=0, atol=1e-5)
    raw = teacher.vae.decode(captured["latents"], return_dict=False)[0].clamp(-1, 1)
    assert (raw - video).abs().max() > 1e-2


def test_feature_maps_follow_the_latent_grid(teacher):
    """(B, heads x head_dim, F, h, w) maps; a token of frame f lands in map frame f (zeroing input frame
    2 moves block 0's frame-2 features most), and gradients reach the input."""
    cond = teacher.encode_prompts(PROMPTS[:1])
    x = torch.randn(teacher.latent_shape(1), generator=torch.Generator().manual_seed(2))
    y = x.clone()
    y[:, :, 2] = 0
    with torch.no_grad():
        (a,) = teacher.feature_maps("real", x, torch.tensor([0.5]), cond, [0])
        (b,) = teacher.feature_maps("real", y, torch.tensor([0.5]), cond, [0])
    assert a.shape == (1, 16, 3, 2, 2)
    diff = (a - b).abs().mean(dim=(0, 1, 3, 4))
    assert diff[2] > 3 * diff[:2].max(), diff
    x.requires_grad_()
    teacher.feature_maps("real", x, torch.tensor([0.5]), cond, [-1])[0].square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_expanded_timesteps_give_the_same_prediction(teacher):
    """Wan 2.2 TI2V's per-token timesteps (expand_timesteps), equal for text-to-video, run the same
    network to the same output as one timestep per sample."""
    cond = teacher.encode_prompts(PROMPTS[:2])
    x, t = torch.randn(teacher.latent_shape(2), generator=torch.Generator().manual_seed(3)), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        plain = teacher.forward_role("real", x, t, cond)
        teacher.expand_timesteps = True
        try:
            expanded = teacher.forward_role("real", x, t, cond)
        finally:
            teacher.expand_timesteps = False
    torch.testing.assert_close(expanded, plain, rtol=1e-5, atol=1e-5)


def test_wan22_ti2v_layout_runs_the_same_path_as_its_pipeline(tmp_path):
    """Wan 2.2 TI2V-5B's layout (residual VAE with 2x2 pixel patches and 16x compression, per-token
    timesteps): the teacher's latent size comes from the VAE's own factors, its sampler (CFG) and
    decode equal WanPipeline's."""
    from dmdx_lightning.teachers.wan_random import save_random_wan

    folder = save_random_wan(tmp_path / "ti2v", ti2v=True, flow_shift=5.0)
    ti2v = WanTeacher(str(folder), **{**TINY_WAN, "height": 64, "width": 64})
    assert ti2v.expand_timesteps and ti2v.vae_scale_factor == 16 and ti2v.latent_shape(1) == (1, 4, 3, 4, 4)
    pipe = wan_pipeline(folder)
    pipe.scheduler, exact = wan_flow_scheduler(ti2v.schedule, euler_grid(2, ti2v.schedule)[:-1], stochastic=False)
    assert exact and pipe.config.expand_timesteps
    noise = torch.randn(ti2v.latent_shape(1), generator=torch.Generator().manual_seed(4))
    captured = {}

    def keep(_pipe, _i, _t, kwargs):
        captured["latents"] = kwargs["latents"]
        return kwargs

    frames = pipe(PROMPTS[:1], latents=noise.clone(), num_inference_steps=2, guidance_scale=3.0, num_frames=9,
                  height=64, width=64, max_sequence_length=LENGTH, output_type="pt", callback_on_step_end=keep).frames
    ours = ti2v.sample_ode(noise, ti2v.encode_prompts(PROMPTS[:1]), num_steps=2, cfg_scale=3.0)
    torch.testing.assert_close(ours, captured["latents"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close((ti2v.decode(ours) * 0.5 + 0.5).transpose(1, 2), frames, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------ Wan 2.2 A14B
@pytest.fixture(scope="module")
def a14b(tiny_wan_a14b_dir):
    torch.manual_seed(0)
    return WanTeacher(str(tiny_wan_a14b_dir), mode="lora", **TINY_WAN)


@pytest.fixture(scope="module")
def a14b_pipe(tiny_wan_a14b_dir):
    return wan_pipeline(tiny_wan_a14b_dir)


def test_each_sample_is_denoised_by_the_expert_of_its_time(a14b, a14b_pipe):
    """Boundary 600 (the tiny folder's ratio 0.6): t >= 0.6 goes to `transformer`, below to
    `transformer_2`, as WanPipeline chooses; a mixed batch gives each sample its expert's output, in
    every role, and the feature maps are each sample's expert's block output."""
    from dmdx_lightning.teachers.wan import WanExperts

    net = a14b.denoiser
    assert isinstance(net, WanExperts) and net.boundary_timestep == 600.0 == a14b_pipe.config.boundary_ratio * 1000
    cond = a14b.encode_prompts(PROMPTS)
    x = torch.randn(a14b.latent_shape(4), generator=torch.Generator().manual_seed(5))
    t = torch.tensor([0.9, 0.2, 0.6, 0.59])  # high, low, high (at the boundary), low
    experts = {0: net.transformer, 1: net.transformer_2, 2: net.transformer, 3: net.transformer_2}
    with torch.no_grad():
        for role in ("real", "student"):
            with a14b.as_role(role):
                mixed = a14b.model_output(net, x, t, cond)
                alone = torch.cat([a14b.model_output(experts[i], x[i:i + 1], t[i:i + 1], cond[i:i + 1])
                                   for i in range(4)])
            torch.testing.assert_close(mixed, alone, rtol=1e-5, atol=1e-5)
        other = a14b.model_output(net.transformer_2, x[:1], t[:1], cond[:1])
        assert (other - alone[:1]).abs().max() > 1e-3  # the experts differ: the routing can be wrong
        maps = a14b.feature_maps("real", x, t, cond, [0, -1])
        for i in range(4):
            expected = a14b.feature_maps("real", x[i:i + 1], t[i:i + 1], cond[i:i + 1], [0, -1])
            for got, want in zip(maps, expected):
                torch.testing.assert_close(got[i:i + 1], want, rtol=1e-5, atol=1e-5)
    assert len(a14b.feature_blocks(net)) == 2 and len(a14b.network_blocks(net)) == 4


def test_an_expert_no_sample_needs_still_runs_and_gets_zero_gradients(tiny_wan_a14b_dir):
    """A batch all above the boundary runs `transformer_2` on one token, so every rank gathers and
    reduces every block (FSDP2) and every parameter has a gradient (DDP): zero for the idle expert."""
    torch.manual_seed(0)
    teacher = WanTeacher(str(tiny_wan_a14b_dir), mode="full", **TINY_WAN)
    student = teacher.network("student")
    calls = []
    handle = student.transformer_2.blocks[1].register_forward_hook(lambda m, i, o: calls.append(tuple(o.shape)))
    x = torch.randn(teacher.latent_shape(2), generator=torch.Generator().manual_seed(6))
    out = teacher.forward_role("student", x, torch.tensor([0.9, 0.7]), teacher.encode_prompts(PROMPTS[:2]))
    out.square().mean().backward()
    handle.remove()
    assert calls == [(1, 1, 16)]  # one sample, one video token
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad.abs().max() == 0 for p in student.transformer_2.parameters())
    assert any(p.grad.abs().max() > 0 for p in student.transformer.parameters())


def test_two_expert_sampler_with_cfg_scale_2_is_the_pipeline_loop(a14b, a14b_pipe, tiny_wan_a14b_dir):
    """The teacher's Euler sampler with cfg_scale 4 above the boundary and cfg_scale_2 3 below equals
    WanPipeline's loop with guidance_scale 4 and guidance_scale_2 3 (its 4 Euler times, 1 to 0.5 with
    flow shift 3, are on both sides of the boundary)."""
    grid = euler_grid(4, a14b.schedule)
    assert grid[2] >= 0.6 > grid[3]
    teacher = WanTeacher(str(tiny_wan_a14b_dir), mode="lora", cfg_scale_2=3.0, **TINY_WAN)
    euler, _ = wan_flow_scheduler(teacher.schedule, grid[:-1], stochastic=False)
    original, a14b_pipe.scheduler = a14b_pipe.scheduler, euler
    try:
        noise = torch.randn(teacher.latent_shape(2), generator=torch.Generator().manual_seed(1))
        theirs = a14b_pipe(PROMPTS[:2], latents=noise.clone(), num_inference_steps=4, guidance_scale=4.0,
                           guidance_scale_2=3.0, num_frames=9, height=32, width=32, max_sequence_length=LENGTH,
                           output_type="latent").frames
    finally:
        a14b_pipe.scheduler = original
    cond = teacher.encode_prompts(PROMPTS[:2])
    ours = teacher.sample_ode(noise, cond, num_steps=4, cfg_scale=4.0)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert (a14b.sample_ode(noise, cond, num_steps=4, cfg_scale=4.0) - theirs).abs().max() > 1e-4  # 4 throughout


# ------------------------------------------------------------------------------------ refusals
def test_cfg_scale_2_on_a_one_transformer_pipeline_is_refused(tiny_wan_dir, tiny_wan_a14b_dir):
    with pytest.raises(ConfigError, match="cfg_scale_2.*one transformer"):
        run_checks(WanTeacher, {"pretrained_model_name_or_path": str(tiny_wan_dir), "cfg_scale_2": 3.0}, KEY)
    with pytest.raises(ValueError, match="cfg_scale_2 3.0.*one transformer"):
        WanTeacher(str(tiny_wan_dir), cfg_scale_2=3.0, **TINY_WAN)
    run_checks(WanTeacher, {"pretrained_model_name_or_path": str(tiny_wan_a14b_dir), "cfg_scale_2": 3.0}, KEY)


def test_a_half_two_expert_folder_is_refused(tiny_wan_dir, tmp_path):
    """boundary_ratio without transformer_2 (or the reverse) is no Wan pipeline WanTeacher can read."""
    import shutil

    folder = tmp_path / "half"
    shutil.copytree(tiny_wan_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "boundary_ratio": 0.875}))
    with pytest.raises(ConfigError, match="no transformer_2 but boundary_ratio 0.875"):
        run_checks(WanTeacher, {"pretrained_model_name_or_path": str(folder)}, KEY)
    with pytest.raises(ValueError, match="no transformer_2 but boundary_ratio 0.875"):
        WanTeacher(str(folder), **TINY_WAN)


def test_schedulers_that_cannot_work_are_refused():
    assert WanTeacher.check_scheduler({"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": True,
                                       "prediction_type": "flow_prediction", "flow_shift": 5.0}) is None
    assert WanTeacher.check_scheduler({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 5.0}) is None
    assert "DDIMScheduler" in WanTeacher.check_scheduler({"_class_name": "DDIMScheduler"})
    assert "use_flow_sigmas" in WanTeacher.check_scheduler({"_class_name": "UniPCMultistepScheduler",
                                                            "prediction_type": "epsilon"})
    assert "dynamic" in WanTeacher.check_scheduler({"_class_name": "FlowMatchEulerDiscreteScheduler",
                                                    "use_dynamic_shifting": True})


def test_bad_video_size_is_a_clear_error(tiny_wan_dir):
    with pytest.raises(ValueError, match="num_frames 8 must be 4k \\+ 1"):
        WanTeacher(str(tiny_wan_dir), **{**TINY_WAN, "num_frames": 8})
    with pytest.raises(ValueError, match="height 40 must be a multiple of 16"):
        WanTeacher(str(tiny_wan_dir), **{**TINY_WAN, "height": 40})


# ------------------------------------------------------------------------------------ export
@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
def test_student_scheduler_replays_the_student_times_in_the_default_call(shift):
    """WanPipeline.__call__ takes no sigmas: set_timesteps(n) alone must give the student's times; each
    step predicts x0 and re-noises it with fresh noise (sample_student's step)."""
    schedule = FlowMatchSchedule(shift=shift)
    for n in (1, 2, 3, 4, 8):
        ts = student_timesteps(n, schedule=schedule)
        scheduler, exact = wan_flow_scheduler(schedule, ts)
        assert exact, (shift, n)
        scheduler.set_timesteps(n)
        torch.testing.assert_close(scheduler.sigmas[:-1].double(), torch.tensor(ts, dtype=torch.float64),
                                   rtol=0, atol=1e-6)
    x, v = torch.randn(1, 4, 3, 2, 2), torch.randn(1, 4, 3, 2, 2)
    torch.manual_seed(0)  # WanPipeline passes no generator to step: the global one draws the noise
    step = scheduler.step(v, scheduler.timesteps[1], x).prev_sample
    t, s = torch.tensor([ts[1]]), torch.tensor([ts[2]])
    x0, _ = schedule.to_x0_eps(v, x, t, "flow")
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(step, schedule.add_noise(x0, noise, s), rtol=1e-5, atol=1e-5)


def test_times_a_wan_pipeline_cannot_replay_are_refused_at_export(teacher, tmp_path):
    _, exact = wan_flow_scheduler(teacher.schedule, [1.0, 0.7, 0.2])
    assert not exact
    with pytest.raises(ValueError, match="cannot be replayed by a WanPipeline.*student_steps"):
        teacher.export_lora(tmp_path, [1.0, 0.7, 0.2])


@pytest.fixture(scope="module", params=["wan", "wan_a14b"])
def trained(request, tmp_path_factory):
    """A LoRA student that differs from the teacher (its adapters moved), saved as a checkpoint the way
    `dmdx fit` saves one, with the run's config; on the Wan 2.1 folder and on the two-expert one
    (guided with cfg_scale_2 below the boundary). Returns ``(run, module, teacher folder)``."""
    import lightning.pytorch as pl
    import yaml

    from dmdx_lightning.data.prompts import PromptDataModule
    from dmdx_lightning.export import build_module

    folder = request.getfixturevalue(f"tiny_{request.param}_dir")
    run = tmp_path_factory.mktemp(f"{request.param}_run")
    adamw = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-2, "betas": [0.0, 0.99]}}
    two = {"cfg_scale_2": 2.0} if request.param == "wan_a14b" else {}
    config = {"model": {"class_path": "dmdx_lightning.methods.adm.ADMModule", "init_args": {
        "teacher": {"class_path": "dmdx_lightning.teachers.wan.WanTeacher",
                    "init_args": {"pretrained_model_name_or_path": str(folder), "mode": "lora", **TINY_WAN, **two}},
        "discriminator": {"class_path": "dmdx_lightning.discriminators.latent.LatentDiscriminator",
                          "init_args": {"layers": [0, -1], "head_channels": 8}},
        "student_steps": 4, "real_cfg_scale": 3.0,
        "generator_optimizer": adamw, "fake_score_optimizer": adamw, "discriminator_optimizer": adamw}}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "prompts.txt").write_text("\n".join(p for p in PROMPTS if p) + "\n")
    pl.seed_everything(0)
    module = build_module(run / "config.yaml")
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, PromptDataModule(str(run / "prompts.txt"), batch_size=2))
    trainer.save_checkpoint(run / "last.ckpt")
    return run, module, folder


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["lora", "pipeline"])
def test_export_generates_the_students_video_through_wanpipeline(trained, fmt, tmp_path, capsys):
    """`dmdx export` of the checkpoint, loaded by diffusers (a WanPipeline folder, or the teacher's
    pipeline + load_lora_weights + the exported scheduler), generates the student's video from the
    default call: the student's sampler to < 1e-4. Two experts: a folder with both and the teacher's
    boundary, or one LoRA file per expert (the second loaded into transformer_2)."""
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, WanPipeline

    from dmdx_lightning.export import EXPORT_INFO, export_checkpoint

    run, module, folder = trained
    teacher = module.teacher
    moved = [float(p.abs().sum()) for n, p in teacher.named_trainable_parameters("student") if "lora_B" in n]
    assert max(moved) > 0  # LoRA B starts at 0: the student differs from the teacher
    info = export_checkpoint(run / "last.ckpt", tmp_path, fmt, config=run / "config.yaml")
    assert info["default_call_exact"] and json.loads((tmp_path / EXPORT_INFO).read_text())["sigmas"] == \
        module.student_timesteps
    if fmt == "pipeline":
        pipe = DiffusionPipeline.from_pretrained(tmp_path)
    else:  # as the export's info file says (dmdx sample does the same)
        pipe = WanPipeline.from_pretrained(folder)
        for kwargs in info.get("load_lora_weights") or [{}]:
            pipe.load_lora_weights(tmp_path, **kwargs)
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert isinstance(pipe, WanPipeline) and isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    two_experts = teacher.boundary_ratio is not None
    assert (pipe.transformer_2 is not None) == two_experts
    if two_experts:  # the student's 4 times are on both sides of the boundary
        assert pipe.config.boundary_ratio == teacher.boundary_ratio
        assert max(module.student_timesteps) >= teacher.boundary_ratio > min(module.student_timesteps)
        assert (fmt == "lora") == (len(sorted(tmp_path.glob("pytorch_lora_weights*.safetensors"))) == 2)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(teacher.latent_shape(2), generator=torch.Generator().manual_seed(3))

    def generate(seed, **kw):  # the export's recorded call: 4 steps, no CFG, the video's size
        torch.manual_seed(seed)  # WanPipeline's scheduler draws the re-noising from the global generator
        return pipe(PROMPTS[:2], latents=noise.clone(), **info["call"], **kw).frames

    with torch.no_grad():
        ours = teacher.sample_student(noise, teacher.encode_prompts(PROMPTS[:2]), module.student_timesteps,
                                      generator=torch.Generator().manual_seed(11))
        untrained = teacher.sample_student(noise, teacher.encode_prompts(PROMPTS[:2]), module.student_timesteps,
                                           generator=torch.Generator().manual_seed(11), role="real")
    latents = generate(11, output_type="latent")
    print(f"{fmt}: max |pipeline - sample_student| = {(latents - ours).abs().max().item():.2e}")
    assert (latents - ours).abs().max() < 1e-4
    assert (latents - untrained).abs().max() > 1e-3  # the exported network is the student, not the teacher
    assert (generate(12, output_type="latent") - ours).abs().max() > 1e-3  # other re-noising differs
    frames = generate(11, output_type="pt")  # (B, F, 3, H, W) in [0, 1]: a video, decoded by the pipeline
    assert frames.shape == (2, 9, 3, 32, 32)
    with torch.no_grad():
        decoded = (teacher.decode(ours) * 0.5 + 0.5).transpose(1, 2)
    assert (frames - decoded).abs().max() < 1e-4
    if fmt == "lora":  # `dmdx sample` loads the export as its info file says (two experts: both files)
        from dmdx_lightning.cli import main as dmdx
        from dmdx_lightning.sample import SAMPLE_INFO

        if two_experts:  # `dmdx export` says how: one load_lora_weights call per file
            dmdx(["export", "--ckpt_path", str(run / "last.ckpt"), "--config", str(run / "config.yaml"), "--output",
                  str(tmp_path / "cli"), "--format", "lora"])
            assert "load_into_transformer_2=True); `dmdx sample" in capsys.readouterr().out

        dmdx(["sample", str(tmp_path), "--output", str(tmp_path / "samples"), "--prompt", PROMPTS[0], "-n", "1",
              "--no-progress"])
        record = json.loads((tmp_path / "samples" / SAMPLE_INFO).read_text())
        assert record["source"]["kind"] == "lora export" and record["videos"]


@pytest.mark.slow
def test_dmdx_fit_with_the_adm_config_writes_mp4_samples(tiny_wan_dir, tmp_path):
    """`dmdx fit --config configs/wan/adm_1_3b_4step.yaml` with the tiny folder in place of the hub id: it
    trains and its SampleGrid writes one MP4 per example prompt (GIF where PyAV is missing)."""
    import importlib.util

    from tests.helpers import dmdx_fit
    from tests.test_configs import TINY_HEADS, WAN_TINY

    extra = [a.replace("{tiny_wan}", str(tiny_wan_dir)) for a in WAN_TINY + TINY_HEADS]
    result = dmdx_fit("--config", "configs/wan/adm_1_3b_4step.yaml", *extra,
                      "--model.init_args.teacher.init_args.sample_steps", "2",
                      "--model.init_args.teacher.init_args.lora_rank", "4",
                      "--model.init_args.discriminator.init_args.head_channels", "8",
                      "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
                      "--trainer.precision", "32-true", "--trainer.max_steps", "1", "--trainer.log_every_n_steps", "1",
                      "--trainer.num_sanity_val_steps", "0", "--trainer.limit_val_batches", "0",
                      "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    samples = tmp_path / "version_0" / "samples"
    suffix = "mp4" if importlib.util.find_spec("av") else "gif"
    for name in ("student_step0000001", "teacher_step0000001"):
        videos = sorted(samples.glob(f"{name}_p*.{suffix}"))
        assert len(videos) == 4, sorted(samples.iterdir())  # one per example prompt of the teacher
        assert (samples / f"{name}.png").is_file()  # the frame grid
    if suffix == "mp4":
        import av

        with av.open(str(videos[0])) as container:
            assert sum(1 for _ in container.decode(video=0)) == 9
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_a_bf16_export_keeps_the_modules_diffusers_keeps_in_fp32(tiny_wan_dir, tmp_path):
    """Wan's norms, time embedder and scale_shift_table stay float32 in a bf16 pipeline folder, as
    ``from_pretrained(torch_dtype=bfloat16)`` holds them (a plain cast rounded them to bf16)."""
    from safetensors import safe_open

    torch.manual_seed(0)
    teacher = WanTeacher(str(tiny_wan_dir), mode="full", torch_dtype="bfloat16", build_roles=["student"],
                         **TINY_WAN)
    exact = teacher.network("student").scale_shift_table.detach().clone()
    assert exact.dtype == torch.float32
    teacher.export_pipeline(tmp_path, student_timesteps(2, schedule=teacher.schedule))
    with safe_open(str(next((tmp_path / "transformer").glob("*.safetensors"))), "pt") as f:
        dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}
        assert torch.equal(f.get_tensor("scale_shift_table"), exact)
    assert dtypes["scale_shift_table"] == "F32" and dtypes["blocks.0.norm2.weight"] == "F32"
    assert dtypes["blocks.0.attn1.to_q.weight"] == "BF16"
