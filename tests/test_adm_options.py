"""The ADM study's options (ADM issue): ODE moves of several steps, relative dt, R1/R2, fake-score
warm-up; ADP's student_t_min and renoise; the GeneratorBudget callback. Each is a config value
away from the paper's setting, which stays the default."""

from dataclasses import replace
from functools import partial

import lightning.pytorch as pl
import pytest
import torch

from dmdx_lightning.callbacks.budget import GeneratorBudget
from dmdx_lightning.discriminators.latent import LatentDiscriminator
from dmdx_lightning.losses import dmd_gradient, gradient_penalty, normalised_per_sample
from dmdx_lightning.methods.adm import ADMModule
from dmdx_lightning.methods.adm_variants import ADMVariants
from dmdx_lightning.methods.adp import ADPModule
from dmdx_lightning.teachers.digits import DIGIT_PROMPTS
from tests.conftest import prompt_loader
from tests.helpers import with_variants

OPT = partial(torch.optim.AdamW, lr=1e-3, betas=(0.0, 0.99))


def adm(teacher, **kw):
    return ADMModule(teacher, LatentDiscriminator(layers=[1, -1], head_channels=32), generator_optimizer=OPT,
                     fake_score_optimizer=OPT, discriminator_optimizer=OPT, **with_variants(kw))


def test_paper_setting_is_the_default(digits_teacher):
    m = adm(digits_teacher)
    assert m.variants == ADMVariants() and m.variants.is_paper
    v = m.variants
    assert (v.adm_steps, v.dt_scaling, v.r1_gamma, v.r2_gamma, v.fake_score_warmup) == (1, "absolute", 0.0, 0.0, 0)
    assert (v.adm_gradient, v.dmd_weight, v.regression_weight, v.adm_pairing) == ("raw", 0.0, 0.0, "independent")


def test_end_time_absolute_and_relative(digits_teacher):
    t = torch.tensor([0.8, 0.4, 0.01])
    assert torch.allclose(adm(digits_teacher, dt=0.25)._end_time(t), torch.tensor([0.55, 0.15, 0.0]))
    assert torch.allclose(adm(digits_teacher, dt=0.25, dt_scaling="relative")._end_time(t), 0.75 * t)


def test_multistep_move_is_the_teachers_own_euler_sampler(digits_teacher):
    """adm_steps=k with dt=1: the real move from x_t is k Euler steps of the CFG ODE down to t = 0."""
    m = adm(digits_teacher, dt=1.0, adm_steps=4)
    cond = digits_teacher.encode_prompts(list(DIGIT_PROMPTS[:3]))
    x_t = torch.randn(3, 1, 8, 8)
    t = torch.full((3,), 0.8)
    with torch.no_grad():
        x_end, _ = m._ode_step("real", x_t, t, cond, 2.0)
        x = x_t
        for a, b in [(0.8, 0.6), (0.6, 0.4), (0.4, 0.2), (0.2, 0.0)]:
            x0, eps = digits_teacher.predict("real", x, torch.full((3,), a), cond, 2.0)
            x = digits_teacher.schedule.ode_step(x0, eps, torch.full((3,), b))
    assert torch.allclose(x_end, x, atol=1e-5)


def test_gradient_penalty_is_mean_squared_input_gradient():
    grad = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    assert gradient_penalty(grad).item() == pytest.approx((25.0 + 1.0) / 2)


def test_r1_r2_add_a_penalty_that_reaches_the_heads(digits_teacher):
    cond = digits_teacher.encode_prompts(list(DIGIT_PROMPTS[:4]))
    ctx = {"x0_hat": torch.randn(4, 1, 8, 8)}
    torch.manual_seed(0)
    plain = adm(digits_teacher).adm_discriminator_step({}, cond, ctx)
    m = adm(digits_teacher, r1_gamma=10.0, r2_gamma=10.0)
    torch.manual_seed(0)
    out = m.adm_discriminator_step({}, cond, ctx)
    assert out["r1"] > 0 and out["r2"] > 0 and "r1" not in plain
    assert out["loss"].item() == pytest.approx((out["hinge"] + 5.0 * out["r1"] + 5.0 * out["r2"]).item(), rel=1e-5)
    out["loss"].backward()
    assert all(p.grad is not None for p in m.discriminator.heads.parameters())


def test_fake_score_warmup_holds_the_generator_back(digits_teacher):
    m = adm(digits_teacher, fake_score_warmup=3, update_ratio=2)
    assert [("generator" in m.players_for_step(i)) for i in range(8)] == [False, False, False, True, False, True,
                                                                            False, True]


def test_generator_budget_stops_at_equal_generator_updates(digits_teacher):
    m = adm(digits_teacher, loss="dmd", update_ratio=3)
    budget = GeneratorBudget(2)
    trainer = pl.Trainer(max_steps=100, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[budget])
    trainer.fit(m, prompt_loader(list(DIGIT_PROMPTS) * 4))
    # generator at iterations 0 and 3: the run stops after iteration 3 (4 iterations, 2 updates)
    assert int(m.iteration) == 4 and budget.generator_updates(m, 4) == 2 == int(m.generator_updates)


def test_adp_student_t_min_and_renoise(digits_teacher):
    m = ADPModule(digits_teacher, LatentDiscriminator(layers=[-1], head_channels=32), lambda2=0.0, lambda1=1.0,
                  student_t_min=1.0, renoise="pair", generator_optimizer=OPT, discriminator_optimizer=OPT)
    assert torch.all(m.student_t(16, "cpu") == 1.0)
    x0, x_T = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    x_tp, tp = m._renoised(x0, x_T)  # the pair's own noise: x_t' lies on the straight path x_T -> x0
    assert torch.allclose(x_tp, (1 - tp)[:, None, None, None] * x0 + tp[:, None, None, None] * x_T)
    with pytest.raises(ValueError, match="renoise"):
        ADPModule(digits_teacher, lambda2=0.0, renoise="other")


def test_regression_anchor_samples_the_pair_noise_and_adds_its_loss(digits_teacher):
    m = adm(digits_teacher, loss="dmd", regression_weight=2.0)
    prompts = list(DIGIT_PROMPTS[:4])
    cond = digits_teacher.encode_prompts(prompts)
    batch = {"prompt": prompts, "x_T": torch.randn(4, 1, 8, 8), "x0": torch.randn(4, 1, 8, 8)}
    ctx = m.prepare(batch, cond, ["generator"])
    expected, _ = digits_teacher.predict("student", batch["x_T"], torch.ones(4), cond)
    assert torch.allclose(ctx["x0_pair"], expected)  # the anchor: one-step student on the pair's own noise
    assert not torch.allclose(ctx["x0_hat"], expected)  # the distribution loss keeps fresh noise
    torch.manual_seed(0)
    out = m.players["generator"].step(batch, cond, ctx)
    assert out["regression"].item() == pytest.approx(torch.mean((expected - batch["x0"]) ** 2).item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx((out["dmd"] + 2.0 * out["regression"]).item(), rel=1e-5)
    assert "x0_pair" not in m.prepare(batch, cond, ["fake_score"])  # only the generator needs it
    with pytest.raises(KeyError, match="ODEPairDataModule"):
        m.prepare({"prompt": prompts}, cond, ["generator"])


def test_transition_discriminator_scores_the_move_not_its_start(digits_teacher):
    disc = LatentDiscriminator(layers=[1, -1], head_channels=32, transition=True).build(digits_teacher)
    cond = digits_teacher.encode_prompts(list(DIGIT_PROMPTS[:3]))
    t = torch.full((3,), 0.5)
    a, b = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    # a move of length zero says nothing, wherever it starts
    assert torch.allclose(disc(digits_teacher, a, t, cond, a, t), disc(digits_teacher, b, t, cond, b, t), atol=1e-5)
    assert not torch.allclose(disc(digits_teacher, a, t, cond, b, t), disc(digits_teacher, b, t, cond, b, t))
    with pytest.raises(ValueError, match="transition"):
        disc(digits_teacher, a, t, cond)
    m = ADMModule(digits_teacher, LatentDiscriminator(layers=[1, -1], head_channels=32, transition=True),
                  generator_optimizer=OPT, fake_score_optimizer=OPT, discriminator_optimizer=OPT,
                  variants=ADMVariants(r1_gamma=1.0))
    ctx = m.prepare({"prompt": list(DIGIT_PROMPTS[:3])}, cond, ["generator"])
    out = m.players["generator"].step({}, cond, ctx)
    out["loss"].backward()
    assert any(p.grad is not None for p in digits_teacher.trainable_parameters("student"))
    d = m.players["discriminator"].step({}, cond, {"x0_hat": ctx["x0_hat"].detach()})
    assert torch.isfinite(d["loss"]) and d["r1"] >= 0


def test_per_player_lr_warmup(digits_teacher):
    m = adm(digits_teacher, loss="dmd", lr_warmup={"generator": 4})
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(m, prompt_loader(list(DIGIT_PROMPTS) * 4))  # 2 iterations x (generator, fake score)
    gen, fake = trainer.optimizers
    assert gen.param_groups[0]["lr"] == pytest.approx(1e-3 * 3 / 4)  # after 2 of its 4 warm-up steps
    assert fake.param_groups[0]["lr"] == pytest.approx(1e-3)  # not named: full rate from the start
    with pytest.raises(ValueError, match="lr_warmup names players"):
        adm(digits_teacher, loss="dmd", lr_warmup={"discriminator": 10}).configure_optimizers()


def test_first_trained_step_skips_the_early_steps_of_the_backward_simulation(digits_teacher):
    """first_trained_step=k: the trained prediction is the student's own k-th step, after running
    its earlier steps without gradient (the same draws as its few-step sampler)."""
    m = adm(digits_teacher, student_steps=4, first_trained_step=3)
    cond = digits_teacher.encode_prompts(list(DIGIT_PROMPTS[:3]))
    noise = torch.randn(3, 1, 8, 8)
    torch.manual_seed(7)
    x0_hat = m.generate(cond, grad=False, noise=noise)
    torch.manual_seed(7)
    torch.randint(3, 4, ())  # the step draw (always 3 here)
    with torch.no_grad():
        full = digits_teacher.sample_student(noise, cond, m.student_timesteps)
    assert torch.allclose(x0_hat, full, atol=1e-6)
    for bad in (-1, 4):
        with pytest.raises(ValueError, match="first_trained_step"):
            adm(digits_teacher, student_steps=4, first_trained_step=bad)


def test_normalised_per_sample_keeps_direction_and_sets_one_latent_unit():
    grad = torch.tensor([[[3.0, -1.0]], [[0.0, 0.02]], [[0.0, 0.0]]])
    out = normalised_per_sample(grad)
    assert torch.allclose(out.abs().flatten(1).mean(1) * grad.numel(), torch.tensor([1.0, 1.0, 0.0]))
    assert torch.allclose(out[0] / out[0, 0, 0], grad[0] / 3.0)  # same direction, per sample
    assert torch.equal(out[2], grad[2])  # a sample the loss does not move stays put


def _x0_hat_gradient(m, cond, seed=0):
    """The generator loss's gradient at a leaf student sample (same draws for every call)."""
    x0_hat = torch.randn(len(cond), 1, 8, 8, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    torch.manual_seed(seed)
    out = m.players["generator"].step({}, cond, {"x0_hat": x0_hat})
    out["loss"].backward()
    return x0_hat.grad, out


@pytest.mark.parametrize("pairing", ["independent", "paired"])
def test_normalised_adm_gradient_rescales_each_sample_and_keeps_its_direction(digits_teacher, pairing):
    cond = digits_teacher.encode_prompts(list(DIGIT_PROMPTS[:4]))
    grads = {}
    for option in ("raw", "normalised"):
        torch.manual_seed(5)  # the same discriminator heads
        grads[option], _ = _x0_hat_gradient(adm(digits_teacher, adm_pairing=pairing, adm_gradient=option), cond)
    raw, normalised = grads["raw"], grads["normalised"]
    assert torch.allclose(normalised.abs().flatten(1).mean(1) * normalised.numel(), torch.ones(4), atol=1e-4)
    cosine = torch.nn.functional.cosine_similarity(raw.flatten(1), normalised.flatten(1))
    assert torch.allclose(cosine, torch.ones(4), atol=1e-4)
    with pytest.raises(ValueError, match="adm_gradient"):
        adm(digits_teacher, adm_gradient="clipped")


def _dmd_direction_at_the_same_x_t(m, cond):
    """:func:`_x0_hat_gradient`'s student sample and DMD's gradient at ADM's ``x_t`` (same draws)."""
    x0_hat = torch.randn(len(cond), 1, 8, 8, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    x_t, t, _ = m._noised(x0_hat)
    with torch.no_grad():
        x0_real, _ = m.teacher.predict("real", x_t, t, cond, m.real_cfg_scale)
        x0_fake, _ = m.teacher.predict("fake", x_t, t, cond)
    return x0_hat, dmd_gradient(x0_hat, x0_real, x0_fake)


def test_dmd_weight_adds_dmds_gradient_at_the_same_x_t(digits_teacher):
    cond = digits_teacher.encode_prompts(list(DIGIT_PROMPTS[:4]))
    m = adm(digits_teacher, adm_gradient="normalised")
    alone, _ = _x0_hat_gradient(m, cond)
    m.variants = replace(m.variants, dmd_weight=3.0)
    both, out = _x0_hat_gradient(m, cond)
    assert out["loss"].item() == pytest.approx((out["adm"] + 3.0 * out["dmd"]).item(), rel=1e-5)
    assert "dmd_diagnostic" not in out  # the DMD term is optimised now: logged as "dmd"
    x0_hat, direction = _dmd_direction_at_the_same_x_t(m, cond)
    expected = 3.0 * direction / x0_hat.numel()
    assert torch.allclose(both - alone, expected, atol=1e-6)
    with pytest.raises(ValueError, match="dmd_weight"):
        adm(digits_teacher, dmd_weight=-1.0)


def test_dmd_alignment_is_the_cosine_of_adms_and_dmds_gradients(digits_teacher):
    cond = digits_teacher.encode_prompts(list(DIGIT_PROMPTS[:4]))
    m = adm(digits_teacher, dmd_diagnostic_every=1)
    grad, out = _x0_hat_gradient(m, cond)
    _, direction = _dmd_direction_at_the_same_x_t(m, cond)
    expected = torch.nn.functional.cosine_similarity(grad.flatten(1), direction.flatten(1))
    assert out["dmd_alignment"].item() == pytest.approx(expected.mean().item(), abs=1e-5)
    assert -1.0 <= out["dmd_alignment"].item() <= 1.0
