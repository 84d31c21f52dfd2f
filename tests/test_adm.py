"""ADMModule: each player step on its own, the loss options, the player schedule, resume."""

from functools import partial

import lightning.pytorch as pl
import pytest
import torch

from dmdx_lightning.discriminators.latent import LatentDiscriminator
from dmdx_lightning.methods.adm import ADMModule
from dmdx_lightning.teachers.digits import DIGIT_PROMPTS
from tests.conftest import prompt_loader
from tests.helpers import with_variants

OPT = partial(torch.optim.AdamW, lr=1e-3, betas=(0.0, 0.99))


def make_module(teacher, loss="adm", **kw):
    disc = LatentDiscriminator(layers=[1, -1], head_channels=32,
                               backbone_role="fake" if loss == "dmd2" else "real")
    return ADMModule(teacher, disc, loss=loss, generator_optimizer=OPT, fake_score_optimizer=OPT,
                     discriminator_optimizer=OPT, **with_variants(kw))


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def changed(before, module):
    return {n for n, p in module.named_parameters() if not torch.equal(before[n], p.detach())}


def fit(module, steps, data=None, **trainer_kw):
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, **trainer_kw)
    trainer.fit(module, data or prompt_loader(list(DIGIT_PROMPTS) * 4))
    return trainer


def only(module, player):
    module.players_for_step = lambda iteration: [player]
    return module


def test_players_for_step_decides_ratio(digits_teacher):
    m = make_module(digits_teacher, update_ratio=3)
    assert m.players_for_step(0) == ["generator", "fake_score", "discriminator"]
    assert m.players_for_step(1) == ["fake_score", "discriminator"]
    assert m.players_for_step(3)[0] == "generator"
    dmd = make_module(digits_teacher, loss="dmd")
    assert dmd.players_for_step(0) == ["generator", "fake_score"]
    assert dmd.discriminator is None


@pytest.mark.parametrize("loss", ["adm", "dmd2"])
def test_discriminator_step_changes_only_heads(digits_teacher, loss):
    m = only(make_module(digits_teacher, loss), "discriminator")
    before = snapshot(m)
    batch_x0 = torch.zeros(4, 1, 8, 8)
    data = prompt_loader(list(DIGIT_PROMPTS) * 4)
    if loss == "dmd2":  # real latents come with the batch (ODE pairs)
        data = torch.utils.data.DataLoader([dict(b, x0=batch_x0) for b in data], batch_size=None)
    fit(m, 2, data=data)
    diff = changed(before, m)
    assert diff and all(n.startswith("discriminator.heads.") for n in diff), sorted(diff)[:5]


def test_fake_score_step_changes_only_fake_score(digits_teacher):
    m = only(make_module(digits_teacher), "fake_score")
    before = snapshot(m)
    fit(m, 2)
    diff = changed(before, m)
    assert diff and all(n.startswith("teacher.roles.fake.") for n in diff), sorted(diff)[:5]


@pytest.mark.parametrize("loss", ["adm", "dmd"])
def test_generator_step_changes_only_generator(digits_teacher, loss):
    m = only(make_module(digits_teacher, loss), "generator")
    before = snapshot(m)
    fit(m, 2)
    diff = changed(before, m)
    assert diff and all(n.startswith("teacher.roles.student.") for n in diff), sorted(diff)[:5]


def test_teacher_never_changes(digits_teacher):
    m = make_module(digits_teacher)
    before = {n: p.clone() for n, p in m.teacher.denoiser.named_parameters()}
    fit(m, 2)
    assert all(torch.equal(before[n], p) for n, p in m.teacher.denoiser.named_parameters())
    assert not any(p.requires_grad for p in m.teacher.denoiser.parameters())


@pytest.mark.parametrize("loss,fake_jacobian,pairing", [("adm", True, "independent"), ("adm", False, "independent"),
                                                        ("adm", True, "paired"), ("dmd", True, "independent"),
                                                        ("dmd2", True, "independent")])
def test_generator_loss_gradient_reaches_generator(digits_teacher, loss, fake_jacobian, pairing):
    m = make_module(digits_teacher, loss, fake_jacobian=fake_jacobian, adm_pairing=pairing)
    cond = digits_teacher.encode_prompts(list(DIGIT_PROMPTS[:4]))
    ctx = m.prepare({}, cond, ["generator"])
    losses = m.players["generator"].step({}, cond, ctx)
    losses["loss"].backward()
    grads = [p.grad for p in digits_teacher.trainable_parameters("student")]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    if loss == "adm":
        assert "dmd_diagnostic" in losses


def test_fake_jacobian_option_changes_gradient(digits_teacher):
    m = make_module(digits_teacher)
    cond = digits_teacher.encode_prompts(list(DIGIT_PROMPTS[:4]))
    grads = {}
    for flag in (True, False):
        m.fake_jacobian = flag
        torch.manual_seed(3)
        ctx = m.prepare({}, cond, ["generator"])
        m.teacher.zero_grad()
        m.players["generator"].step({}, cond, ctx)["loss"].backward()
        grads[flag] = torch.cat([p.grad.flatten() for p in digits_teacher.trainable_parameters("student")])
    assert not torch.allclose(grads[True], grads[False])


def test_paired_adm_generator_gradient_ignores_a_content_only_discriminator(digits_teacher):
    """With pairing, a discriminator that scores only what the real and fake moves share gives
    the generator no gradient; unpaired, the same discriminator pushes the generator."""
    cond = digits_teacher.encode_prompts(list(DIGIT_PROMPTS[:4]))
    norms = {}
    for pairing in ("independent", "paired"):
        m = make_module(digits_teacher, adm_pairing=pairing, dt=1e-6, log_dmd_diagnostic=False)
        # the moves differ by O(dt): a discriminator of the sample's content sees them as equal
        m.discriminator.forward = lambda teacher, x, t, c, *start: x.flatten(1).pow(2).sum(1)
        torch.manual_seed(0)
        m.teacher.zero_grad()
        m.players["generator"].step({}, cond, m.prepare({}, cond, ["generator"]))["loss"].backward()
        norms[pairing] = sum(float(p.grad.abs().sum()) for p in digits_teacher.trainable_parameters("student"))
    assert norms["independent"] > 1.0
    assert norms["paired"] < 1e-3 * norms["independent"]


@pytest.mark.parametrize("pairing", ["independent", "paired", "paired_discriminator"])
def test_adm_discriminator_loss_follows_pairing(digits_teacher, pairing):
    m = make_module(digits_teacher, adm_pairing=pairing)
    m.discriminator.forward = lambda teacher, x, t, c, *start: torch.full((x.shape[0],), 3.0)
    cond = digits_teacher.encode_prompts(list(DIGIT_PROMPTS[:4]))
    loss = m.players["discriminator"].step({}, cond, m.prepare({}, cond, ["discriminator"]))["loss"]
    # equal logits 3: unpaired hinge relu(1 - 3) + relu(1 + 3) = 4; paired relu(1 - 0) = 1
    assert loss.item() == pytest.approx(4.0 if pairing == "independent" else 1.0)
    # the generator climbs D(x_fake) alone unless the generator's loss is paired too: -3 vs 3 - 3
    out = m.players["generator"].step({}, cond, m.prepare({}, cond, ["generator"]))
    assert out["adm"].item() == pytest.approx(0.0 if pairing == "paired" else -3.0)


def test_multistep_backward_simulation(digits_teacher):
    m = make_module(digits_teacher, student_steps=4)
    assert m.student_timesteps == [1.0, 0.75, 0.5, 0.25]
    cond = digits_teacher.encode_prompts(list(DIGIT_PROMPTS[:3]))
    x0 = m.generate(cond, grad=True)
    assert x0.shape == (3, 1, 8, 8) and x0.requires_grad
    sample = m.sample(cond, torch.randn(3, 1, 8, 8))
    assert sample.shape == (3, 1, 8, 8) and torch.isfinite(sample).all()


def test_dmd2_without_real_latents_is_a_clear_error(digits_teacher):
    m = make_module(digits_teacher, "dmd2")
    cond = digits_teacher.encode_prompts(list(DIGIT_PROMPTS[:2]))
    with pytest.raises(KeyError, match="ODEPairDataModule"):
        m.players["discriminator"].step({}, cond, {"x0_hat": torch.zeros(2, 1, 8, 8)})


def test_bad_options_are_refused(digits_teacher):
    with pytest.raises(ValueError, match="loss"):
        make_module(digits_teacher, "gan")
    with pytest.raises(ValueError, match="dt"):
        make_module(digits_teacher, dt=0.0)
    with pytest.raises(ValueError, match="adm_pairing"):
        make_module(digits_teacher, adm_pairing="both")
    with pytest.raises(ValueError, match="student_timesteps"):
        make_module(digits_teacher, student_timesteps=[0.5, 0.9])


def test_ema_tracks_generator_only(digits_teacher):
    m = make_module(digits_teacher, ema_decay=0.5)
    fit(m, 2)
    student = digits_teacher.trainable_parameters("student")
    shadows = m.ema.shadows()
    assert len(shadows) == len(student)
    assert any(not torch.equal(s, p.detach()) for s, p in zip(shadows, student))
    with m.ema.swapped():
        assert all(torch.equal(s, p.detach()) for s, p in zip(shadows, student))


def test_nonfinite_loss_is_skipped_then_stops(digits_teacher):
    from dmdx_lightning.methods.base import NonFiniteLossError

    m = only(make_module(digits_teacher, max_nonfinite_steps=2), "fake_score")
    m.players["fake_score"].step = lambda batch, cond, ctx: {"loss": torch.tensor(float("nan"), requires_grad=True)}
    before = snapshot(m)
    with pytest.raises(NonFiniteLossError, match="2 consecutive non-finite"):
        fit(m, 10)
    assert not changed(before, m)


# -------------------------------------------------------------------------------- players table, passes
@pytest.mark.parametrize("loss,steps", [
    ("adm", ["adm_generator_step", "fake_score_step", "adm_discriminator_step"]),
    ("dmd", ["dmd_generator_step", "fake_score_step"]),
    ("dmd2", ["dmd2_generator_step", "fake_score_step", "dmd2_discriminator_step"])])
def test_players_table_names_each_step_and_optimizer(digits_teacher, loss, steps):
    m = make_module(digits_teacher, loss)
    assert list(m.players) == ["generator", "fake_score", "discriminator"][:len(steps)]
    assert [p.step.__name__ for p in m.players.values()] == steps  # the loss picked the steps once
    assert set(m.players_for_step(0)) == set(m.players)  # every player reachable from the one schedule
    # one optimizer per player, in table order, over exactly that player's parameters
    for player, opt in zip(m.players.values(), m.configure_optimizers()):
        assert [id(p) for g in opt.param_groups for p in g["params"]] == [id(p) for p in player.parameters()]
    cond = digits_teacher.encode_prompts(list(DIGIT_PROMPTS[:4]))
    batch = {"x0": torch.randn(4, 1, 8, 8)}
    for name, player in m.players.items():
        losses = player.step(batch, cond, m.prepare(batch, cond, [name]))
        assert losses["loss"].ndim == 0 and torch.isfinite(losses["loss"])


def count_real_predictions(m):
    calls = []
    predict = m.teacher.predict
    m.teacher.predict = lambda role, *a, **k: (calls.append(role), predict(role, *a, **k))[1]
    return calls


@pytest.mark.parametrize("pairing", ["independent", "paired"])
def test_dmd_diagnostic_cadence(digits_teacher, pairing):
    m = make_module(digits_teacher, adm_pairing=pairing, dmd_diagnostic_every=4)
    cond = digits_teacher.encode_prompts(list(DIGIT_PROMPTS[:4]))
    calls = count_real_predictions(m)
    logged = []
    for i in range(9):
        m.iteration.fill_(i)
        calls.clear()
        logged.append("dmd_diagnostic" in m.players["generator"].step({}, cond, m.prepare({}, cond, ["generator"])))
        # unpaired ADM's generator predicts with the real score only for the diagnostic
        assert calls.count("real") == (1 if pairing == "paired" or logged[-1] else 0)
    expected = [True] * 9 if pairing == "paired" else [i % 4 == 0 for i in range(9)]
    assert logged == expected


def test_dmd_diagnostic_comes_with_the_first_generator_step_of_each_block(digits_teacher):
    # warm-up 3, ratio 2: the generator steps at 3, 5, 7, 9, 11, ...; blocks of 4 iterations
    m = make_module(digits_teacher, update_ratio=2, fake_score_warmup=3, dmd_diagnostic_every=4)
    generator_steps = [i for i in range(16) if "generator" in m.players_for_step(i)]
    assert [i for i in generator_steps if m._dmd_diagnostic_due(i)] == [3, 5, 9, 13]
    assert all(make_module(digits_teacher, dmd_diagnostic_every=1)._dmd_diagnostic_due(i) for i in range(5))
    with pytest.raises(ValueError, match="dmd_diagnostic_every"):
        make_module(digits_teacher, dmd_diagnostic_every=0)


def test_batched_discriminator_pair_equals_two_calls(digits_teacher):
    m = make_module(digits_teacher)
    cond = digits_teacher.encode_prompts(list(DIGIT_PROMPTS[:4]))
    x_real, x_fake = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    t_real, t_fake = torch.rand(4), torch.rand(4)
    real, fake = m.discriminator.pair(digits_teacher, x_real, t_real, x_fake, t_fake, cond)
    assert torch.allclose(real, m.discriminator(digits_teacher, x_real, t_real, cond), atol=1e-5)
    assert torch.allclose(fake, m.discriminator(digits_teacher, x_fake, t_fake, cond), atol=1e-5)


@pytest.mark.parametrize("r1,r2", [(1.0, 0.0), (0.0, 2.0), (1.0, 2.0)])
def test_batched_gradient_penalties_equal_per_half_ones(digits_teacher, r1, r2):
    from dmdx_lightning.losses import gradient_penalty

    m = make_module(digits_teacher, r1_gamma=r1, r2_gamma=r2)
    cond = digits_teacher.encode_prompts(list(DIGIT_PROMPTS[:4]))
    x_real, x_fake, s = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8), torch.rand(4)
    logits_real, logits_fake, pen_real, pen_fake = m._logits_and_penalties(x_real, x_fake, s, cond)

    def alone(x):  # the penalty of one half computed on its own, as before batching
        x = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(m.discriminator(digits_teacher, x, s, cond).sum(), x)
        return gradient_penalty(grad)

    assert (pen_real is None) == (r1 == 0) and (pen_fake is None) == (r2 == 0)
    for pen, x in ((pen_real, x_real), (pen_fake, x_fake)):
        if pen is not None:
            assert pen.requires_grad and torch.allclose(pen, alone(x), rtol=1e-4)
    assert torch.allclose(logits_real, m.discriminator(digits_teacher, x_real, s, cond), atol=1e-5)


def test_ema_reads_its_own_shadows_from_a_state_dict(digits_teacher):
    from dmdx_lightning.ema import GeneratorEMA

    m = make_module(digits_teacher, ema_decay=0.5)
    n = len(m.ema.shadows())
    state = m.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(GeneratorEMA.stored_shadows(state, "ema.", n), m.ema.shadows()))
    assert GeneratorEMA.stored_shadows({}, "ema.", n) is None
    with torch.no_grad():
        digits_teacher.trainable_parameters("student")[0].add_(1.0)
    m.ema.restart()
    assert torch.equal(m.ema.shadows()[0], digits_teacher.trainable_parameters("student")[0].float())
