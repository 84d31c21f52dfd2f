"""Loss functions against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from dmdx_lightning.losses import (
    denoising_loss,
    dmd_gradient,
    dmd_loss,
    hinge_d,
    hinge_g,
    nonsaturating_d,
    nonsaturating_g,
    paired_hinge_d,
    paired_hinge_g,
)

LN3 = math.log(3.0)
LN7 = math.log(7.0)


def test_hinge_d_hand_value():
    # relu(1 - real) = relu([-1, 0.5, 2])  = [0, 0.5, 2] -> mean 2.5 / 3
    # relu(1 + fake) = relu([-0.5, 1, 3])  = [0, 1, 3]   -> mean 4 / 3
    # total 6.5 / 3 = 13 / 6
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-1.5, 0.0, 2.0])
    assert hinge_d(real, fake).item() == pytest.approx(13 / 6)
    # Swapping the roles gives a different value, so the test sees a sign mix-up:
    # relu(1 - fake) = [2.5, 1, 0] -> 3.5 / 3;  relu(1 + real) = [3, 1.5, 0] -> 4.5 / 3.
    assert hinge_d(fake, real).item() == pytest.approx(8 / 3)


def test_hinge_d_is_zero_beyond_the_margin():
    assert hinge_d(torch.tensor([1.0, 5.0]), torch.tensor([-1.0, -7.0])).item() == 0.0


def test_paired_hinge_hand_values():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([0.0, 1.0, -1.5])
    # gaps 2, -0.5, 0.5 -> relu(1 - gap) = 0, 1.5, 0.5
    assert paired_hinge_d(real, fake).item() == pytest.approx(2 / 3)
    assert paired_hinge_g(real, fake).item() == pytest.approx(2 / 3)  # mean gap
    # a shift common to both logits (the discriminator's opinion of the shared x_t) changes nothing
    assert paired_hinge_d(real + 5.0, fake + 5.0).item() == pytest.approx(2 / 3)
    assert paired_hinge_g(real - 3.0, fake - 3.0).item() == pytest.approx(2 / 3)


def test_hinge_g_hand_value():
    # -mean([-1.5, 0, 2]) = -0.5 / 3 = -1 / 6
    assert hinge_g(torch.tensor([-1.5, 0.0, 2.0])).item() == pytest.approx(-1 / 6)


def test_nonsaturating_d_hand_value():
    # softplus(x) = ln(1 + e^x).
    # real = [ln 3, ln 7]: softplus(-ln 3) = ln(4/3), softplus(-ln 7) = ln(8/7) -> ln(32/21) / 2
    # fake = [0, -ln 3]:   softplus(0) = ln 2, softplus(-ln 3) = ln(4/3)        -> ln(8/3) / 2
    # total = ln(32/21 * 8/3) / 2 = ln(256/63) / 2
    real = torch.tensor([LN3, LN7], dtype=torch.float64)
    fake = torch.tensor([0.0, -LN3], dtype=torch.float64)
    assert nonsaturating_d(real, fake).item() == pytest.approx(math.log(256 / 63) / 2)
    # Roles swapped: softplus(-fake) = [ln 2, ln 4] -> ln 8 / 2; softplus(real) = [ln 4, ln 8]
    # -> ln 32 / 2; total ln 256 / 2 = 4 ln 2.
    assert nonsaturating_d(fake, real).item() == pytest.approx(4 * math.log(2))


def test_nonsaturating_g_hand_value():
    # softplus(-[0, ln 3]) = [ln 2, ln(4/3)] -> mean ln(8/3) / 2
    fake = torch.tensor([0.0, LN3], dtype=torch.float64)
    assert nonsaturating_g(fake).item() == pytest.approx(math.log(8 / 3) / 2)


def test_generator_losses_decrease_as_the_discriminator_is_fooled():
    # The generator wants D(fake) large: both losses must have a negative derivative.
    fake = torch.tensor([0.3, -0.2], requires_grad=True)
    for loss_fn in (hinge_g, nonsaturating_g):
        (grad,) = torch.autograd.grad(loss_fn(fake), fake)
        assert (grad < 0).all(), loss_fn.__name__


# Batch of 2 samples with 2 values each.
#   sample 0: |x0_hat - x0_real| = |[1, 2]| -> mean 1.5;  x0_fake - x0_real = [2, -1]
#             grad = [2, -1] / 1.5 = [4/3, -2/3]
#   sample 1: |x0_hat - x0_real| = |[-2, 2]| -> mean 2;   x0_fake - x0_real = [-1, 2]
#             grad = [-1, 2] / 2 = [-1/2, 1]
X0_HAT = [[1.0, 3.0], [0.0, 0.0]]
X0_REAL = [[0.0, 1.0], [2.0, -2.0]]
X0_FAKE = [[2.0, 0.0], [1.0, 0.0]]
GRAD = [[4 / 3, -2 / 3], [-1 / 2, 1.0]]


def _dmd_inputs(dtype=torch.float64):
    return (torch.tensor(X0_HAT, dtype=dtype), torch.tensor(X0_REAL, dtype=dtype),
            torch.tensor(X0_FAKE, dtype=dtype))


def test_dmd_gradient_hand_value_per_sample_normalisation():
    grad = dmd_gradient(*_dmd_inputs())
    assert torch.allclose(grad, torch.tensor(GRAD, dtype=torch.float64))


def test_dmd_gradient_normalises_over_all_non_batch_dims():
    # Same numbers laid out as (B, C, H, W) = (2, 1, 1, 2): the mean runs over C, H and W.
    x0_hat, x0_real, x0_fake = (x.view(2, 1, 1, 2) for x in _dmd_inputs())
    grad = dmd_gradient(x0_hat, x0_real, x0_fake)
    assert torch.allclose(grad, torch.tensor(GRAD, dtype=torch.float64).view(2, 1, 1, 2))


def test_dmd_gradient_is_finite_when_the_sample_equals_the_real_prediction():
    # x0_hat == x0_real makes the normaliser 0; where real == fake too the gradient is 0.
    x = torch.tensor([[1.0, 2.0]])
    grad = dmd_gradient(x, x, x)
    assert torch.equal(grad, torch.zeros_like(x))
    grad = dmd_gradient(x, x, x + 1)
    assert torch.isfinite(grad).all()


def test_dmd_loss_hand_value_and_gradient_equals_dmd_gradient_over_numel():
    x0_hat, x0_real, x0_fake = _dmd_inputs()
    x0_hat.requires_grad_(True)
    x0_real.requires_grad_(True)
    x0_fake.requires_grad_(True)
    loss = dmd_loss(x0_hat, x0_real, x0_fake)
    # 0.5 mean(grad^2) = 0.5 * (16/9 + 4/9 + 1/4 + 1) / 4 = 0.5 * (125/36) / 4 = 125/288
    assert loss.item() == pytest.approx(125 / 288)
    loss.backward()
    expected = dmd_gradient(*_dmd_inputs()) / x0_hat.numel()
    assert torch.allclose(x0_hat.grad, expected)
    assert torch.allclose(x0_hat.grad, torch.tensor(GRAD, dtype=torch.float64) / 4)
    # The teacher and fake-score predictions are targets only: no gradient reaches them.
    assert x0_real.grad is None and x0_fake.grad is None


def test_denoising_loss_hand_value():
    # err^2 per sample: [(1 + 4) / 2, (9 + 1) / 2] = [2.5, 5] -> mean 3.75
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    target = torch.tensor([[0.0, 0.0], [3.0, 1.0]])
    assert denoising_loss(pred, target).item() == pytest.approx(3.75)
    # Per-sample weight [1, 3]: [2.5, 15] -> mean 8.75
    assert denoising_loss(pred, target, torch.tensor([1.0, 3.0])).item() == pytest.approx(8.75)
    # Weight [2, 0] drops sample 1: [5, 0] -> mean 2.5
    assert denoising_loss(pred, target, torch.tensor([2.0, 0.0])).item() == pytest.approx(2.5)


def test_denoising_loss_averages_over_all_non_batch_dims():
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0]]).view(2, 1, 1, 2)
    target = torch.tensor([[0.0, 0.0], [3.0, 1.0]]).view(2, 1, 1, 2)
    assert denoising_loss(pred, target, torch.tensor([1.0, 3.0])).item() == pytest.approx(8.75)


def test_denoising_loss_computes_in_float32_for_half_inputs():
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=torch.bfloat16)
    target = torch.tensor([[0.0, 0.0], [3.0, 1.0]], dtype=torch.bfloat16)
    loss = denoising_loss(pred, target)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(3.75)
