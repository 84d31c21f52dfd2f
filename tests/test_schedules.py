"""Schedules: hand-computed values and exact identities of the common (x0, eps) language."""

from __future__ import annotations

import math

import pytest
import torch

from dmdx_lightning.schedules import (
    PREDICTION_TYPES,
    FlowMatchSchedule,
    NoiseSchedule,
    VPSchedule,
    euler_grid,
    expand_like,
    sample_discrete,
    sample_t,
    student_timesteps,
)

SCHEDULES = {
    "flow_match": FlowMatchSchedule(),
    "flow_match_shift3": FlowMatchSchedule(shift=3.0),
    "vp": VPSchedule(),
}


class ConstSchedule(NoiseSchedule):
    """alpha = 0.6, sigma = 0.8 at every t (a 3-4-5 triangle), so hand values stay exact."""

    def alpha(self, t):
        return torch.full_like(torch.as_tensor(t, dtype=torch.float64), 0.6)

    def sigma(self, t):
        return torch.full_like(torch.as_tensor(t, dtype=torch.float64), 0.8)


def _x0_eps_t(batch: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, 2, 3, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(batch, 2, 3, 3, generator=g, dtype=torch.float64)
    # Interior times: the eps/x0 conversions divide by alpha/sigma, which vanish at the ends.
    t = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)[:batch]
    return x0, eps, t


# ----------------------------------------------------------------------------------------------
# expand_like
# ----------------------------------------------------------------------------------------------


def test_expand_like_shapes_and_batch_mismatch():
    x = torch.zeros(3, 2, 4, 4)
    assert expand_like(torch.tensor([1.0, 2.0, 3.0]), x).shape == (3, 1, 1, 1)
    assert expand_like(0.5, x).shape == ()
    with pytest.raises(ValueError, match="batch 2 but x has batch 3"):
        expand_like(torch.tensor([1.0, 2.0]), x)


# ----------------------------------------------------------------------------------------------
# Hand-computed conversions
# ----------------------------------------------------------------------------------------------


def test_const_schedule_hand_values_every_prediction_type():
    # alpha = 0.6, sigma = 0.8, x0 = 1, eps = 2:
    #   x_t  = 0.6 * 1 + 0.8 * 2             = 2.2
    #   flow = eps - x0                      = 1.0
    #   v    = alpha eps - sigma x0 = 1.2-0.8 = 0.4
    sched = ConstSchedule()
    x0 = torch.tensor([[1.0]], dtype=torch.float64)
    eps = torch.tensor([[2.0]], dtype=torch.float64)
    t = torch.tensor([0.3], dtype=torch.float64)
    x_t = sched.add_noise(x0, eps, t)
    assert x_t.item() == pytest.approx(2.2)
    assert sched.training_target(x0, eps, t, "flow").item() == pytest.approx(1.0)
    assert sched.training_target(x0, eps, t, "v").item() == pytest.approx(0.4)
    assert sched.training_target(x0, eps, t, "eps").item() == pytest.approx(2.0)
    assert sched.training_target(x0, eps, t, "x0").item() == pytest.approx(1.0)
    # Back again:
    #   flow: x0 = (2.2 - 0.8 * 1) / (0.6 + 0.8) = 1.4 / 1.4 = 1;  eps = 1 + 1 = 2
    #   v:    x0 = 0.6 * 2.2 - 0.8 * 0.4 = 1.32 - 0.32 = 1;  eps = 0.8 * 2.2 + 0.6 * 0.4 = 2
    #   eps:  x0 = (2.2 - 0.8 * 2) / 0.6 = 1
    #   x0:   eps = (2.2 - 0.6 * 1) / 0.8 = 2
    outputs = {"flow": 1.0, "v": 0.4, "eps": 2.0, "x0": 1.0}
    for pred, out in outputs.items():
        x0_p, eps_p = sched.to_x0_eps(torch.tensor([[out]], dtype=torch.float64), x_t, t, pred)
        assert x0_p.item() == pytest.approx(1.0), pred
        assert eps_p.item() == pytest.approx(2.0), pred


def test_flow_match_hand_values():
    # t = 0.25, x0 = 1, eps = 3:  x_t = 0.75 * 1 + 0.25 * 3 = 1.5, v = eps - x0 = 2.
    # x0 = (x_t - t v) / (alpha + sigma) = (1.5 - 0.5) / 1 = 1; eps = v + x0 = 3.
    sched = FlowMatchSchedule()
    t = torch.tensor([0.25])
    x_t = sched.add_noise(torch.tensor([[1.0]]), torch.tensor([[3.0]]), t)
    assert x_t.item() == pytest.approx(1.5)
    x0_p, eps_p = sched.to_x0_eps(torch.tensor([[2.0]]), x_t, t, "flow")
    assert (x0_p.item(), eps_p.item()) == pytest.approx((1.0, 3.0))
    # The network sees t * 1000.
    assert sched.model_timestep(t).item() == pytest.approx(250.0)


def test_flow_conversion_exact_at_pure_noise():
    # At t = 1 alpha = 0 but alpha + sigma = 1: x_1 = eps, so x0 = eps - v with no blow-up.
    sched = FlowMatchSchedule()
    x_1 = torch.tensor([[3.0, -1.0]])
    v = torch.tensor([[2.0, 4.0]])
    x0_p, eps_p = sched.to_x0_eps(v, x_1, torch.tensor([1.0]), "flow")
    assert torch.allclose(x0_p, torch.tensor([[1.0, -5.0]]))
    assert torch.allclose(eps_p, x_1)


def test_divisions_stay_finite_at_schedule_ends():
    sched = FlowMatchSchedule()
    x = torch.ones(2, 3)
    ends = torch.tensor([0.0, 1.0])
    for pred in ("eps", "x0"):
        x0_p, eps_p = sched.to_x0_eps(x, x, ends, pred)
        assert torch.isfinite(x0_p).all() and torch.isfinite(eps_p).all(), pred


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_unknown_prediction_type_raises(name):
    sched = SCHEDULES[name]
    x = torch.zeros(1, 2)
    t = torch.tensor([0.5])
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        sched.to_x0_eps(x, x, t, "sample")
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        sched.training_target(x, x, t, "sample")


# ----------------------------------------------------------------------------------------------
# Exact identities for every schedule x prediction type
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pred", PREDICTION_TYPES)
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_exact_prediction_recovers_x0_and_eps(name, pred):
    sched = SCHEDULES[name]
    x0, eps, t = _x0_eps_t()
    x_t = sched.add_noise(x0, eps, t)
    target = sched.training_target(x0, eps, t, pred)
    x0_p, eps_p = sched.to_x0_eps(target, x_t, t, pred)
    assert torch.allclose(x0_p, x0, atol=1e-10)
    assert torch.allclose(eps_p, eps, atol=1e-10)


@pytest.mark.parametrize("pred", PREDICTION_TYPES)
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_arbitrary_output_round_trips_through_x0_eps(name, pred):
    # Any network output (not only an exact one) must survive output -> (x0, eps) -> target,
    # and the pair must reproduce x_t: otherwise the DDIM step would not start from x_t.
    sched = SCHEDULES[name]
    x_t, out, t = _x0_eps_t(seed=1)
    x0_p, eps_p = sched.to_x0_eps(out, x_t, t, pred)
    assert torch.allclose(sched.training_target(x0_p, eps_p, t, pred), out, atol=1e-10)
    assert torch.allclose(sched.add_noise(x0_p, eps_p, t), x_t, atol=1e-10)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_ode_step_with_exact_prediction_lands_on_x_s(name):
    sched = SCHEDULES[name]
    x0, eps, t = _x0_eps_t()
    s = t - 0.15
    x_t = sched.add_noise(x0, eps, t)
    x0_p, eps_p = sched.to_x0_eps(sched.training_target(x0, eps, t, "eps"), x_t, t, "eps")
    assert torch.allclose(sched.ode_step(x0_p, eps_p, s), sched.add_noise(x0, eps, s), atol=1e-10)


def test_flow_ode_step_along_straight_path_is_exact():
    # x_t = (1 - t) x0 + t eps with constant (x0, eps) is a straight line; its velocity is
    # eps - x0 everywhere, so one step from t = 1 to s = 0 must land exactly on x0.
    sched = FlowMatchSchedule()
    x0 = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    eps = torch.tensor([[0.5, 3.0]], dtype=torch.float64)
    v = eps - x0
    for t, s in [(1.0, 0.0), (0.75, 0.25), (0.5, 0.4)]:
        tt = torch.tensor([t], dtype=torch.float64)
        x_t = (1 - t) * x0 + t * eps
        x0_p, eps_p = sched.to_x0_eps(v, x_t, tt, "flow")
        x_s = sched.ode_step(x0_p, eps_p, torch.tensor([s], dtype=torch.float64))
        assert torch.allclose(x_s, (1 - s) * x0 + s * eps, atol=1e-12), (t, s)
    # Hand value, last pair t = 0.5 -> s = 0.4: x_s = 0.6 x0 + 0.4 eps
    #   = (0.6 + 0.2, -1.2 + 1.2) = (0.8, 0.0).
    assert torch.allclose(x_s, torch.tensor([[0.8, 0.0]], dtype=torch.float64), atol=1e-12)


def test_flow_ode_step_equals_euler_step_for_any_velocity():
    # x0 = x_t - t v, eps = x_t + (1 - t) v  =>  (1 - s) x0 + s eps = x_t + (s - t) v.
    sched = FlowMatchSchedule(shift=3.0)
    g = torch.Generator().manual_seed(2)
    x_t = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    v = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([1.0, 0.9, 0.5, 0.3], dtype=torch.float64)
    s = torch.tensor([0.75, 0.0, 0.25, 0.29], dtype=torch.float64)
    x0_p, eps_p = sched.to_x0_eps(v, x_t, t, "flow")
    euler = x_t + (s - t).view(4, 1, 1) * v
    assert torch.allclose(sched.ode_step(x0_p, eps_p, s), euler, atol=1e-12)


def test_flow_euler_step_hand_value():
    # x_t = 2, v = -4, t = 0.5 -> s = 0.25: x_s = 2 + (0.25 - 0.5) * (-4) = 3.
    sched = FlowMatchSchedule()
    v, x_t, t = torch.tensor([[-4.0]]), torch.tensor([[2.0]]), torch.tensor([0.5])
    x0_p, eps_p = sched.to_x0_eps(v, x_t, t, "flow")
    assert sched.ode_step(x0_p, eps_p, torch.tensor([0.25])).item() == pytest.approx(3.0)


# ----------------------------------------------------------------------------------------------
# FlowMatchSchedule
# ----------------------------------------------------------------------------------------------


def test_flow_match_alpha_sigma_and_shift_time_hand_values():
    sched = FlowMatchSchedule(shift=3.0)
    t = torch.tensor([0.0, 0.25, 1.0])
    assert torch.allclose(sched.alpha(t), torch.tensor([1.0, 0.75, 0.0]))
    assert torch.allclose(sched.sigma(t), t)
    # shift u / (1 + (shift - 1) u): 3 * 0.5 / 2 = 0.75; 3 * 0.25 / 1.5 = 0.5; ends are fixed.
    u = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.allclose(sched.shift_time(u), torch.tensor([0.0, 0.5, 0.75, 1.0]))
    # shift = 1 is the identity.
    assert torch.allclose(FlowMatchSchedule(shift=1.0).shift_time(u), u)


@pytest.mark.parametrize("shift", [0.0, -1.0])
def test_flow_match_rejects_non_positive_shift(shift):
    with pytest.raises(ValueError, match="shift must be positive"):
        FlowMatchSchedule(shift=shift)


# ----------------------------------------------------------------------------------------------
# VPSchedule
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
def test_vp_alpha_sigma_unit_norm(beta_schedule):
    sched = VPSchedule(beta_schedule=beta_schedule)
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert torch.allclose(sched.alpha(t) ** 2 + sched.sigma(t) ** 2, torch.ones_like(t), atol=1e-12)
    # Noise must grow with t (0 = data, 1 = noise).
    assert (sched.sigma(t).diff() > 0).all()


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
def test_vp_matches_diffusers_ddpm_at_integer_indices(beta_schedule):
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule=beta_schedule
    ).alphas_cumprod.double()
    sched = VPSchedule(beta_start=0.00085, beta_end=0.012, beta_schedule=beta_schedule)
    idx = torch.tensor([0, 1, 249, 499, 500, 749, 998, 999])
    t = idx.double() / 999
    # diffusers builds betas in float32, hence the tolerance.
    assert torch.allclose(sched.alpha(t) ** 2, ref[idx], rtol=0, atol=1e-6)
    assert torch.allclose(sched.model_timestep(t), idx.double())


def test_vp_tiny_schedule_hand_values_and_interpolation():
    # 3 linear betas 0.1, 0.2, 0.3: alphas_cumprod = 0.9, 0.9 * 0.8 = 0.72, 0.72 * 0.7 = 0.504.
    # t in [0, 1] maps to position 2 t: t = 0.25 is halfway between 0.9 and 0.72 -> 0.81.
    sched = VPSchedule(beta_start=0.1, beta_end=0.3, beta_schedule="linear", num_train_timesteps=3)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    expected = torch.tensor([0.9, 0.81, 0.72, 0.504], dtype=torch.float64)
    assert torch.allclose(sched.alpha(t) ** 2, expected, atol=1e-12)
    assert torch.allclose(sched.sigma(t) ** 2, 1 - expected, atol=1e-12)
    positions = torch.tensor([0.0, 0.5, 1.0, 2.0], dtype=torch.float64)
    assert torch.allclose(sched.model_timestep(t), positions)


def test_vp_keeps_input_dtype():
    sched = VPSchedule()
    assert sched.alpha(torch.tensor([0.5], dtype=torch.float32)).dtype == torch.float32


def test_vp_rejects_unknown_beta_schedule():
    with pytest.raises(ValueError, match="beta_schedule must be"):
        VPSchedule(beta_schedule="cosine")


# ----------------------------------------------------------------------------------------------
# Timestep samplers and grids
# ----------------------------------------------------------------------------------------------

N_SAMPLES = 20000


@pytest.mark.parametrize("kind", ["uniform", "shifted", "cubic", "logit_normal"])
@pytest.mark.parametrize("t_min,t_max", [(0.0, 1.0), (0.2, 0.6), (0.02, 0.98)])
def test_sample_t_stays_in_range(kind, t_min, t_max):
    g = torch.Generator().manual_seed(0)
    t = sample_t(kind, N_SAMPLES, t_min=t_min, t_max=t_max, shift=3.0, generator=g)
    assert t.shape == (N_SAMPLES,)
    assert t.min() >= t_min and t.max() <= t_max
    # The samples must actually cover the range, not collapse onto one end.
    assert t.max() - t.min() > 0.5 * (t_max - t_min)


@pytest.mark.parametrize(
    "kind,mean",
    [
        ("uniform", 0.5),
        # E[1 - u^3] = 1 - 1/4 = 0.75: the cubic sampler favours high noise.
        ("cubic", 0.75),
        # E[3u / (1 + 2u)] = 1.5 (1 - ln(3) / 2) = 1.5 - 0.75 ln 3 ~= 0.676.
        ("shifted", 1.5 - 0.75 * math.log(3.0)),
        # sigmoid(N(0, 1)) is symmetric about 0.5.
        ("logit_normal", 0.5),
    ],
)
def test_sample_t_means(kind, mean):
    # Standard errors are <= 0.3 / sqrt(20000) ~= 0.002, so 0.01 is five of them.
    g = torch.Generator().manual_seed(1)
    t = sample_t(kind, N_SAMPLES, shift=3.0, generator=g)
    assert t.mean().item() == pytest.approx(mean, abs=0.01)


def test_sample_t_cubic_mean_above_half_and_affine_map():
    g = torch.Generator().manual_seed(2)
    assert sample_t("cubic", N_SAMPLES, generator=g).mean() > 0.5
    # Mapped into [0.2, 0.6]: 0.2 + 0.4 * 0.75 = 0.5.
    t = sample_t("cubic", N_SAMPLES, t_min=0.2, t_max=0.6, generator=g)
    assert t.mean().item() == pytest.approx(0.5, abs=0.01)


def test_sample_t_degenerate_range_is_constant():
    t = sample_t("uniform", 5, t_min=0.3, t_max=0.3)
    assert torch.allclose(t, torch.full((5,), 0.3))


def test_sample_t_is_reproducible_with_a_generator():
    a = sample_t("logit_normal", 8, generator=torch.Generator().manual_seed(5))
    b = sample_t("logit_normal", 8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_sample_t_rejects_unknown_kind():
    with pytest.raises(ValueError, match="time sampler must be"):
        sample_t("beta", 4)


@pytest.mark.parametrize("t_min,t_max", [(0.6, 0.4), (-0.1, 0.5), (0.5, 1.1)])
def test_sample_t_rejects_bad_range(t_min, t_max):
    with pytest.raises(ValueError, match="t_min <= t_max"):
        sample_t("uniform", 4, t_min=t_min, t_max=t_max)


def test_student_timesteps():
    assert student_timesteps(4) == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert student_timesteps(1) == pytest.approx([1.0])
    assert student_timesteps(2, t_max=0.8) == pytest.approx([0.8, 0.4])
    # shift = 3: 0.75 -> 2.25 / 2.5 = 0.9, 0.5 -> 0.75, 0.25 -> 0.5.
    assert student_timesteps(4, shift=3.0) == pytest.approx([1.0, 0.9, 0.75, 0.5])
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        student_timesteps(0)


def test_student_timesteps_through_the_schedule_equal_the_shift_formula():
    # the modules pass their teacher's schedule: bitwise the times of the old `shift=` call
    assert student_timesteps(4, schedule=FlowMatchSchedule(shift=3.0)) == student_timesteps(4, shift=3.0)
    assert student_timesteps(3, schedule=FlowMatchSchedule()) == student_timesteps(3)
    assert student_timesteps(4, schedule=VPSchedule()) == student_timesteps(4)  # VP does not shift


def test_shift_time_is_the_identity_except_for_flow_matching():
    u = torch.linspace(0, 1, 5)
    assert torch.equal(VPSchedule().shift_time(u), u)
    assert torch.equal(FlowMatchSchedule().shift_time(u), u)
    assert FlowMatchSchedule(shift=3.0).shift_time(0.5) == pytest.approx(0.75)


def test_sample_discrete_picks_from_the_given_times():
    times = [1.0, 0.75, 0.5, 0.25]
    idx, t = sample_discrete(times, 64, generator=torch.Generator().manual_seed(0))
    assert idx.shape == t.shape == (64,)
    assert ((idx >= 0) & (idx < 4)).all()
    assert torch.allclose(t, torch.tensor(times)[idx])
    # 64 draws from 4 values: all of them show up.
    assert set(idx.tolist()) == {0, 1, 2, 3}


def test_euler_grid():
    assert euler_grid(4, FlowMatchSchedule()) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    # Flow matching grids are shifted (3 * 0.75 / 2.5 = 0.9, ...); the ends stay at 1 and 0.
    assert euler_grid(4, FlowMatchSchedule(shift=3.0)) == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0])
    # VP grids are not shifted.
    assert euler_grid(2, VPSchedule()) == pytest.approx([1.0, 0.5, 0.0])
    assert euler_grid(2, FlowMatchSchedule(), t_max=0.5) == pytest.approx([0.5, 0.25, 0.0])


def test_vp_trailing_mapping_puts_data_at_zero_and_dmd2_timesteps_on_the_even_grid():
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod.double()
    sched = VPSchedule(time_mapping="trailing")
    t = torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64)
    idx = torch.tensor([999, 749, 499, 249])
    assert torch.equal(sched.model_timestep(t), idx.double())  # DMD2's 4-step SDXL schedule
    assert torch.allclose(sched.alpha(t) ** 2, ref[idx], rtol=0, atol=1e-6)
    zero = torch.tensor([0.0], dtype=torch.float64)
    assert sched.alpha(zero).item() == 1.0 and sched.sigma(zero).item() == 0.0  # t = 0 is the data
    # between the data (index -1) and the first training step, alphas_cumprod is interpolated
    half = torch.tensor([0.0005], dtype=torch.float64)
    assert sched.alpha(half).item() ** 2 == pytest.approx((1.0 + ref[0].item()) / 2, abs=1e-7)
    assert sched.timestep_to_t(999) == 1.0 and sched.timestep_to_t(749) == 0.75
    assert VPSchedule().timestep_to_t(999) == 1.0  # "endpoints": index t (N - 1)
    with pytest.raises(ValueError, match="time_mapping"):
        VPSchedule(time_mapping="leading")
