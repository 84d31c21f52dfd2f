"""SD3Teacher on a tiny random SD3 folder (real diffusers/transformers components, saved and reloaded)."""

from functools import partial

import pytest
import torch

from dmdx_lightning.teachers.sd3 import CONFIG_KEY, SD3Teacher
from tests.conftest import TINY_SD3

PROMPTS = ["a photo of a cat", "a red bus", "", "an astronaut riding a horse"]


@pytest.fixture(scope="module")
def lora_teacher(tiny_sd3_dir):
    torch.manual_seed(0)
    return SD3Teacher(str(tiny_sd3_dir), mode="lora", **TINY_SD3)


@pytest.fixture(scope="module")
def pipe(tiny_sd3_dir):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir)


def perturb_adapter(teacher, role, scale=0.5):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in teacher.trainable_parameters(role):
            p.add_(scale * torch.randn(p.shape, generator=gen))


def test_prompt_encoding_matches_pipeline(lora_teacher, pipe):
    cond = lora_teacher.encode_prompts(PROMPTS)
    # 77 CLIP tokens + 16 T5 tokens, T5 width; pooled = both CLIP projections
    assert cond.prompt_embeds.shape == (4, 77 + 16, 32)
    assert cond.pooled.shape == (4, 32)
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False,
                                              max_sequence_length=16)
    torch.testing.assert_close(cond.prompt_embeds, embeds)
    torch.testing.assert_close(cond.pooled, pooled)
    assert not torch.allclose(cond.pooled[0], cond.pooled[1])


def test_drop_t5_gives_zero_t5_tokens_like_diffusers(tiny_sd3_dir, pipe):
    teacher = SD3Teacher(str(tiny_sd3_dir), drop_t5=True, mode="lora", **TINY_SD3)
    assert teacher.text_encoder_3 is None
    cond = teacher.encode_prompts(PROMPTS[:2])
    assert torch.count_nonzero(cond.prompt_embeds[:, 77:]) == 0
    no_t5 = type(pipe)(**{**pipe.components, "text_encoder_3": None, "tokenizer_3": None})
    embeds, _, _, _ = no_t5.encode_prompt(PROMPTS[:2], None, None, do_classifier_free_guidance=False,
                                          max_sequence_length=16)
    torch.testing.assert_close(cond.prompt_embeds, embeds)


def test_cfg_combines_cond_and_empty_prompt(lora_teacher):
    cond = lora_teacher.encode_prompts(PROMPTS[:2])
    x_t = torch.randn(lora_teacher.latent_shape(2))
    t = torch.tensor([0.3, 0.8])
    x0_c, eps_c = lora_teacher.predict("real", x_t, t, cond)
    x0_u, eps_u = lora_teacher.predict("real", x_t, t, lora_teacher.encode_prompts(["", ""]))
    x0, eps = lora_teacher.predict("real", x_t, t, cond, cfg_scale=4.0)
    torch.testing.assert_close(x0, x0_u + 4.0 * (x0_c - x0_u), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(eps, eps_u + 4.0 * (eps_c - eps_u), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(x0_c, x0_u)


def test_model_output_is_the_transformer_velocity(lora_teacher, tiny_sd3_dir):
    from diffusers import SD3Transformer2DModel

    fresh = SD3Transformer2DModel.from_pretrained(tiny_sd3_dir, subfolder="transformer")
    cond = lora_teacher.encode_prompts(PROMPTS[:2])
    x_t, t = torch.randn(lora_teacher.latent_shape(2)), torch.tensor([0.25, 0.75])
    v = fresh(hidden_states=x_t, timestep=1000 * t, encoder_hidden_states=cond.prompt_embeds,
              pooled_projections=cond.pooled).sample
    torch.testing.assert_close(lora_teacher.forward_role("real", x_t, t, cond), v)
    x0, eps = lora_teacher.predict("real", x_t, t, cond)
    torch.testing.assert_close(x0, x_t - t[:, None, None, None] * v, atol=1e-5, rtol=1e-5)  # flow: x0 = x_t - t v


def test_feature_maps_shapes_gradients_and_early_stop(lora_teacher):
    cond = lora_teacher.encode_prompts(PROMPTS[:2])
    x_t = torch.randn(lora_teacher.latent_shape(2), requires_grad=True)
    t = torch.tensor([0.5, 0.5])
    calls = []
    handle = lora_teacher.denoiser.transformer_blocks[1].register_forward_hook(lambda *a: calls.append(1))
    try:
        (first,) = lora_teacher.feature_maps("real", x_t, t, cond, [0])
        assert not calls, "the forward must stop after the last needed block"
        maps = lora_teacher.feature_maps("real", x_t, t, cond, [0, -1])
    finally:
        handle.remove()
    assert [m.shape for m in maps] == [(2, 16, 4, 4)] * 2  # (B, heads x head_dim, 8/2, 8/2)
    torch.testing.assert_close(maps[0], first)
    maps[1].square().mean().backward()
    assert x_t.grad is not None and x_t.grad.abs().sum() > 0


@pytest.mark.slow
def test_gradient_checkpointing_keeps_gradients(tiny_sd3_dir):
    teacher = SD3Teacher(str(tiny_sd3_dir), mode="lora", gradient_checkpointing=True, **TINY_SD3)
    assert teacher.denoiser.gradient_checkpointing
    perturb_adapter(teacher, "student")
    cond = teacher.encode_prompts(PROMPTS[:2])
    with torch.enable_grad():
        teacher.denoiser.train()
        (m,) = teacher.feature_maps("student", torch.randn(teacher.latent_shape(2)), torch.tensor([0.5, 0.6]),
                                    cond, [-1])
        m.mean().backward()
    grads = [p.grad for p in teacher.trainable_parameters("student")]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for p in teacher.trainable_parameters("fake"))


def storages(module):
    return {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in module.parameters()}


def test_lora_mode_holds_one_copy_of_the_base(lora_teacher, tiny_sd3_dir):
    full = SD3Teacher(str(tiny_sd3_dir), mode="full", **TINY_SD3)
    base_bytes = sum(p.numel() * p.element_size() for n, p in full.denoiser.named_parameters())
    nets = lambda t: [t.network(r) for r in ("real", "fake", "student")]  # noqa: E731
    lora_ptrs = {k: v for net in nets(lora_teacher) for k, v in storages(net).items()}
    full_ptrs = {k: v for net in nets(full) for k, v in storages(net).items()}
    lora_base = [p for n, p in lora_teacher.denoiser.named_parameters() if "lora_" not in n]
    assert {p.untyped_storage().data_ptr() for p in lora_base} <= set(lora_ptrs)
    assert len(full_ptrs) >= 3 * len(lora_base)  # three distinct storages per base tensor
    adapter_bytes = sum(p.numel() * p.element_size() for n, p in lora_teacher.denoiser.named_parameters()
                        if "lora_" in n)
    # every base tensor is resident once, plus the adapters (the 1.1x bound on a mid-size model
    # is measured by benchmarks/lora_memory.py: at this tiny width the adapters are as big as the base)
    assert sum(lora_ptrs.values()) == base_bytes + adapter_bytes
    assert sum(full_ptrs.values()) == 3 * base_bytes
    assert all(not p.requires_grad for p in lora_base)


def test_roles_in_lora_mode(tiny_sd3_dir):
    teacher = SD3Teacher(str(tiny_sd3_dir), mode="lora", **TINY_SD3)
    cond = teacher.encode_prompts(PROMPTS[:2])
    x_t, t = torch.randn(teacher.latent_shape(2)), torch.tensor([0.4, 0.9])
    real = teacher.forward_role("real", x_t, t, cond)
    torch.testing.assert_close(teacher.forward_role("student", x_t, t, cond), real)  # LoRA B starts at 0
    perturb_adapter(teacher, "student")
    student = teacher.forward_role("student", x_t, t, cond)
    assert not torch.allclose(student, real)
    torch.testing.assert_close(teacher.forward_role("real", x_t, t, cond), real)  # adapters disabled
    torch.testing.assert_close(teacher.forward_role("fake", x_t, t, cond), real)  # untouched adapter


def test_bf16_lora_keeps_fp32_adapters_and_trains(tiny_sd3_dir):
    """``torch_dtype: bfloat16`` + lora (configs/sd3/adm_4step.yaml): the frozen base is bf16, the adapters
    are fp32 master weights (peft alone makes them bf16), and forward + backward run through both."""
    teacher = SD3Teacher(str(tiny_sd3_dir), mode="lora", torch_dtype="bfloat16", **TINY_SD3)
    trainable = [p for p in teacher.parameters() if p.requires_grad]
    assert trainable and {p.dtype for p in trainable} == {torch.float32}
    assert {p.dtype for n, p in teacher.denoiser.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    perturb_adapter(teacher, "student", 0.1)  # LoRA B starts at 0: make the adapter count
    cond = teacher.encode_prompts(PROMPTS[:2])
    x_t, t = torch.randn(teacher.latent_shape(2)), torch.tensor([0.4, 0.9])
    x0, _ = teacher.predict("student", x_t, t, cond)
    real, _ = teacher.predict("real", x_t, t, cond)
    assert x0.dtype == torch.float32 and not torch.allclose(x0, real)
    x0.square().mean().backward()
    grads = [p.grad for p in teacher.trainable_parameters("student")]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in teacher.trainable_parameters("fake"))


def test_decode_encode_use_scaling_and_shift(lora_teacher):
    lat = torch.randn(lora_teacher.latent_shape(2))
    img = lora_teacher.decode(lat)
    assert img.shape == (2, 3, 16, 16) and img.min() >= -1 and img.max() <= 1
    cfg = lora_teacher.vae.config
    expect = lora_teacher.vae.decode(lat / cfg.scaling_factor + cfg.shift_factor).sample.clamp(-1, 1)
    torch.testing.assert_close(img, expect)
    assert lora_teacher.encode(img).shape == lat.shape


def test_missing_weights_name_the_config_key(tmp_path, tiny_sd3_dir):
    with pytest.raises(OSError, match=CONFIG_KEY.replace(".", r"\.")):
        SD3Teacher("no-such-org/no-such-sd3-model", **TINY_SD3)
    broken = tmp_path / "no_t5"
    broken.mkdir()
    for sub in tiny_sd3_dir.iterdir():
        if sub.name not in ("text_encoder_3", "tokenizer_3"):
            (broken / sub.name).symlink_to(sub)
    with pytest.raises(FileNotFoundError, match="drop_t5"):
        SD3Teacher(str(broken), **TINY_SD3)
    assert SD3Teacher(str(broken), drop_t5=True, mode="lora", **TINY_SD3).text_encoder_3 is None
    with pytest.raises(ValueError, match="torch_dtype"):
        SD3Teacher(str(tiny_sd3_dir), torch_dtype="fp8", **TINY_SD3)


# -------------------------------------------------------------------------------- method steps on SD3
OPT = partial(torch.optim.AdamW, lr=1e-3, betas=(0.0, 0.99))


def make_module(teacher, loss="adm", **kw):
    from dmdx_lightning.discriminators.latent import LatentDiscriminator
    from dmdx_lightning.methods.adm import ADMModule

    disc = LatentDiscriminator(layers=[0, -1], head_channels=16,
                               backbone_role="fake" if loss == "dmd2" else "real")
    return ADMModule(teacher, disc, loss=loss, generator_optimizer=OPT, fake_score_optimizer=OPT,
                     discriminator_optimizer=OPT, real_cfg_scale=3.0, **kw)


def run_player(module, player, steps=1):
    import lightning.pytorch as pl

    from tests.conftest import prompt_loader

    module.players_for_step = lambda iteration: [player]
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, prompt_loader(PROMPTS * 2, batch_size=2))
    return {n for n, p in module.named_parameters() if not torch.equal(before[n], p.detach())}


@pytest.mark.slow
@pytest.mark.parametrize("loss,player,prefix", [
    ("adm", "generator", ".student."),
    ("adm", "fake_score", ".fake."),
    ("adm", "discriminator", "discriminator.heads."),
    ("dmd", "generator", ".student."),
    ("dmd", "fake_score", ".fake."),
])
def test_player_steps_on_sd3_lora(tiny_sd3_dir, loss, player, prefix):
    teacher = SD3Teacher(str(tiny_sd3_dir), mode="lora", **TINY_SD3)
    perturb_adapter(teacher, "fake", 0.1)  # fake != real, so the ADM/DMD signals are not zero
    module = make_module(teacher, loss, student_steps=2)
    diff = run_player(module, player)
    assert diff and all(prefix in n if prefix.startswith(".") else n.startswith(prefix) for n in diff), sorted(diff)[:4]
    assert all("lora_" in n for n in diff if n.startswith("teacher."))


@pytest.mark.slow
def test_full_mode_generator_step_on_sd3(tiny_sd3_dir):
    teacher = SD3Teacher(str(tiny_sd3_dir), mode="full", **TINY_SD3)
    diff = run_player(make_module(teacher, "adm"), "generator")
    assert diff and all(n.startswith("teacher.roles.student.") for n in diff)


def generator_grads(tiny_sd3_dir, checkpointing):
    torch.manual_seed(0)
    teacher = SD3Teacher(str(tiny_sd3_dir), mode="lora", gradient_checkpointing=checkpointing, **TINY_SD3)
    perturb_adapter(teacher, "student", 0.3)
    perturb_adapter(teacher, "fake", 0.3)
    torch.manual_seed(0)
    module = make_module(teacher, "adm")
    cond = teacher.encode_prompts(PROMPTS[:2])
    torch.manual_seed(1)
    module.players["generator"].step({}, cond, module.prepare({}, cond, ["generator"]))["loss"].backward()
    return torch.cat([p.grad.flatten() for p in teacher.trainable_parameters("student")])


@pytest.mark.slow
def test_lora_checkpointing_recomputes_blocks_in_their_role(tiny_sd3_dir):
    """ADM's generator loss runs the fake score (student adapters off, fake on), then the real score's
    features (adapters off); backward recomputes checkpointed blocks after those switches. The
    gradients must equal those without checkpointing."""
    plain = generator_grads(tiny_sd3_dir, False)
    checkpointed = generator_grads(tiny_sd3_dir, True)
    assert plain.abs().sum() > 0
    torch.testing.assert_close(checkpointed, plain, atol=1e-6, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("player,prefixes", [
    ("generator", ("teacher.",)),
    ("discriminator", ("discriminator.heads.", "pixel_discriminator.heads.")),
])
def test_adp_player_steps_on_sd3_with_tiny_sam(tiny_sd3_dir, tiny_sam_path, player, prefixes):
    """ADP on the real SD3 classes: latent heads on the transformer, pixel heads on a tiny SAM
    reading VAE-decoded samples; each player changes only its own parameters."""
    import lightning.pytorch as pl

    from dmdx_lightning.discriminators.latent import LatentDiscriminator
    from dmdx_lightning.discriminators.pixel import PixelDiscriminator, SamBackbone
    from dmdx_lightning.methods.adp import ADPModule

    teacher = SD3Teacher(str(tiny_sd3_dir), mode="lora", **TINY_SD3)
    module = ADPModule(teacher, LatentDiscriminator(layers=[0, -1], head_channels=16),
                       PixelDiscriminator(SamBackbone(tiny_sam_path), layers=[1, 2], head_channels=16),
                       generator_optimizer=OPT, discriminator_optimizer=OPT)
    module.players_for_step = lambda iteration: [player]
    shape = teacher.latent_shape(2)
    g = torch.Generator().manual_seed(0)
    batches = [{"prompt": PROMPTS[:2], "index": torch.arange(2), "x0": torch.randn(shape, generator=g),
                "x_T": torch.randn(shape, generator=g)}]
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    diff = {n for n, p in module.named_parameters() if not torch.equal(before[n], p.detach())}
    assert diff and all(n.startswith(prefixes) for n in diff), sorted(diff)[:4]
    if player == "generator":
        assert all(".student." in n and "lora_" in n for n in diff)
    else:
        assert {p for p in prefixes if any(n.startswith(p) for n in diff)} == set(prefixes)
