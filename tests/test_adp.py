"""ADPModule: each player step on its own, the losses' options, the student's times, and DMDX
chaining (ADM started from an ADP checkpoint)."""

from functools import partial

import lightning.pytorch as pl
import pytest
import torch

from dmdx_lightning.callbacks.summary import arm_name
from dmdx_lightning.discriminators.latent import LatentDiscriminator
from dmdx_lightning.discriminators.pixel import PixelDiscriminator
from dmdx_lightning.evaluation.digits import DigitsClassifierBackbone
from dmdx_lightning.methods.adm import ADMModule
from dmdx_lightning.methods.adp import ADPModule
from dmdx_lightning.teachers.digits import DIGIT_PROMPTS, DigitsTeacher

OPT = partial(torch.optim.AdamW, lr=1e-3, betas=(0.0, 0.99))


def make_module(teacher, **kw):
    return ADPModule(teacher, LatentDiscriminator(layers=[1, -1], head_channels=32),
                     PixelDiscriminator(DigitsClassifierBackbone(), layers=[1, 2], head_channels=32),
                     generator_optimizer=OPT, discriminator_optimizer=OPT, **kw)


def pair_loader(teacher, n_batches=3, batch_size=4):
    """Pair batches as ODEPairDataModule yields them (x0 from a 2-step teacher ODE)."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for b in range(n_batches):
        prompts = [DIGIT_PROMPTS[(b * batch_size + i) % 10] for i in range(batch_size)]
        x_T = torch.randn(batch_size, 1, 8, 8, generator=g)
        x0 = teacher.sample_ode(x_T, teacher.encode_prompts(prompts), 2, 2.0)
        batches.append({"prompt": prompts, "index": torch.arange(b * batch_size, (b + 1) * batch_size),
                        "x0": x0, "x_T": x_T})
    return torch.utils.data.DataLoader(batches, batch_size=None)


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def changed(before, module):
    return {n for n, p in module.named_parameters() if not torch.equal(before[n], p.detach())}


def fit(module, steps, teacher, **trainer_kw):
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, **trainer_kw)
    trainer.fit(module, pair_loader(teacher))
    return trainer


def only(module, player):
    module.players_for_step = lambda iteration: [player]
    return module


def test_players_and_arm_names(digits_teacher):
    m = make_module(digits_teacher)
    assert m.players_for_step(0) == ["generator", "discriminator"] and arm_name(m) == "adp_1step"
    assert (m.lambda1, m.lambda2, m.mse_weight) == (0.85, 0.15, 0.0)
    mse = ADPModule(digits_teacher, lambda1=0.0, lambda2=0.0, mse_weight=1.0)
    assert mse.players_for_step(0) == ["generator"] and arm_name(mse) == "mse_1step"
    assert mse.discriminator is None and mse.pixel_discriminator is None


def test_discriminator_step_changes_only_both_discriminators_heads(digits_teacher):
    m = only(make_module(digits_teacher), "discriminator")
    before = snapshot(m)
    fit(m, 2, digits_teacher)
    diff = changed(before, m)
    assert any(n.startswith("discriminator.heads.") for n in diff)
    assert any(n.startswith("pixel_discriminator.heads.") for n in diff)
    assert all(n.startswith(("discriminator.heads.", "pixel_discriminator.heads.")) for n in diff), sorted(diff)


def test_generator_step_changes_only_student(digits_teacher):
    m = only(make_module(digits_teacher), "generator")
    before = snapshot(m)
    fit(m, 2, digits_teacher)
    diff = changed(before, m)
    assert diff and all(n.startswith("teacher.roles.student.") for n in diff), sorted(diff)[:5]


def test_teacher_and_pixel_backbone_never_change(digits_teacher):
    m = make_module(digits_teacher)
    frozen = {n: p.clone() for n, p in m.named_parameters() if not p.requires_grad}
    assert any(n.startswith("teacher.denoiser.") for n in frozen)
    assert any(n.startswith("pixel_discriminator.backbone.") for n in frozen)
    fit(m, 2, digits_teacher)
    assert all(torch.equal(frozen[n], p) for n, p in m.named_parameters() if n in frozen)


@pytest.mark.parametrize("lambdas", [(0.85, 0.15), (0.0, 1.0), (1.0, 0.0)])
def test_each_discriminator_alone_gives_the_generator_a_gradient(digits_teacher, lambdas):
    kw = dict(lambda1=lambdas[0], lambda2=lambdas[1])
    m = make_module(digits_teacher, **kw)
    assert (m.discriminator is None) == (lambdas[0] == 0) and (m.pixel_discriminator is None) == (lambdas[1] == 0)
    batch = next(iter(pair_loader(digits_teacher)))
    cond = digits_teacher.encode_prompts(batch["prompt"])
    losses = m.players["generator"].step(batch, cond, m.prepare(batch, cond, ["generator"]))
    losses["loss"].backward()
    grads = [p.grad for p in digits_teacher.trainable_parameters("student")]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    assert ("latent" in losses) == (lambdas[0] > 0) and ("pixel" in losses) == (lambdas[1] > 0)


def test_generator_loss_is_the_weighted_sum(digits_teacher):
    m = make_module(digits_teacher, mse_weight=0.5)
    batch = next(iter(pair_loader(digits_teacher)))
    cond = digits_teacher.encode_prompts(batch["prompt"])
    losses = m.players["generator"].step(batch, cond, m.prepare(batch, cond, ["generator"]))
    expected = 0.85 * losses["latent"] + 0.15 * losses["pixel"] + 0.5 * losses["mse"]
    torch.testing.assert_close(losses["loss"], expected)


def test_student_input_is_the_pair_interpolant(digits_teacher):
    m = make_module(digits_teacher)
    batch = next(iter(pair_loader(digits_teacher)))
    cond = digits_teacher.encode_prompts(batch["prompt"])
    seen = {}
    predict = digits_teacher.predict

    def spy(role, x_t, t, cond_, cfg_scale=1.0):
        seen.update(role=role, x_t=x_t, t=t)
        return predict(role, x_t, t, cond_, cfg_scale)

    digits_teacher.predict = spy
    torch.manual_seed(1)
    m.prepare(batch, cond, ["generator"])
    t = seen["t"].view(-1, 1, 1, 1)
    assert seen["role"] == "student"
    torch.testing.assert_close(seen["x_t"], (1 - t) * batch["x0"] + t * batch["x_T"])


def test_student_times(digits_teacher):
    torch.manual_seed(0)
    one = make_module(digits_teacher)
    t = one.student_t(4000, "cpu")
    assert 0.0 <= float(t.min()) and float(t.max()) <= 1.0
    assert abs(float((t > 0.5).float().mean()) - 0.5 ** (1 / 3)) < 0.03  # cubic 1 - u^3: P(t > 0.5) = 0.5^(1/3)
    multi = make_module(digits_teacher, student_steps=4)
    assert set(multi.student_t(200, "cpu").tolist()) == {1.0, 0.75, 0.5, 0.25}


def test_bad_options_are_refused(digits_teacher):
    with pytest.raises(ValueError, match="all 0"):
        ADPModule(digits_teacher, lambda1=0.0, lambda2=0.0)
    with pytest.raises(ValueError, match="pixel_discriminator"):
        ADPModule(digits_teacher)
    with pytest.raises(ValueError, match="backbone_role"):
        ADPModule(digits_teacher, LatentDiscriminator(backbone_role="fake"), lambda2=0.0)
    with pytest.raises(ValueError, match="student_t_sampler"):
        make_module(digits_teacher, student_t_sampler="cubicle")


def test_wrong_latent_shape_in_batch_is_named(digits_teacher):
    m = make_module(digits_teacher)
    batch = {"prompt": ["the digit 1"], "x0": torch.zeros(1, 4, 8, 8), "x_T": torch.zeros(1, 4, 8, 8)}
    with pytest.raises(ValueError, match=r"\(1, 8, 8\)"):
        m.prepare(batch, digits_teacher.encode_prompts(batch["prompt"]), ["generator"])


def test_dmdx_chain_starts_adm_from_the_adp_student(digits_teacher, tmp_path):
    adp = make_module(digits_teacher)
    trainer = fit(adp, 1, digits_teacher)
    ckpt = tmp_path / "adp.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    assert not any(k.startswith(("teacher.denoiser.", "pixel_discriminator.backbone.")) for k in saved)
    student = {n: p.detach().clone() for n, p in digits_teacher.named_trainable_parameters("student")}

    torch.manual_seed(0)
    fresh = DigitsTeacher()
    adm = ADMModule(fresh, LatentDiscriminator(layers=[1], head_channels=16), init_from=str(ckpt))
    assert arm_name(adm) == "dmdx_1step"
    # nothing is read at construction (a config may name a checkpoint not written yet) ...
    assert not all(torch.equal(student[n], p) for n, p in fresh.named_trainable_parameters("student"))
    adm.setup("fit")  # ... but at the start of the run
    assert all(torch.equal(student[n], p) for n, p in fresh.named_trainable_parameters("student"))

    missing = ADMModule(fresh, LatentDiscriminator(layers=[1], head_channels=16), init_from=str(tmp_path / "no.ckpt"))
    with pytest.raises(FileNotFoundError, match="no.ckpt"):
        missing.setup("fit")
