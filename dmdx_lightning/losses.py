"""Pure loss functions (tensors in, scalar out). No module state, no randomness.

Equation references are to the DMDX paper (Lu et al., 2025, arXiv 2507.18569) and DMD2 (Yin et al., 2024).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def hinge_d(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Discriminator hinge loss ``E[max(0, 1 - D(real))] + E[max(0, 1 + D(fake))]`` (ADM step 4)."""
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def hinge_g(fake_logits: Tensor) -> Tensor:
    """Generator hinge loss ``-E[D(fake)]`` (ADM step 5)."""
    return -fake_logits.mean()


def paired_hinge_d(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Relativistic hinge ``E[max(0, 1 - (D(real) - D(fake)))]`` over PAIRED samples (same ``x_t``).

    ADM's real and fake moves start from one ``x_t``; scoring the pair's logit gap instead of each
    logit alone cancels whatever the discriminator says about ``x_t``'s content (RpGAN,
    Jolicoeur-Martineau 2019). An option, not the paper's loss.
    """
    return F.relu(1.0 - (real_logits - fake_logits)).mean()


def paired_hinge_g(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Generator side of :func:`paired_hinge_d`: ``E[D(real) - D(fake)]`` (gradient through both)."""
    return (real_logits - fake_logits).mean()


def gradient_penalty(grad: Tensor) -> Tensor:
    """``E||grad||^2`` over the batch: R1 when ``grad`` is the discriminator's input gradient at real
    samples, R2 at fake ones (Mescheder et al. 2018; R3GAN, Huang et al. 2024). The caller scales
    it by ``gamma / 2``."""
    return grad.float().pow(2).flatten(1).sum(1).mean()


def nonsaturating_d(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Non-saturating GAN discriminator loss ``E[softplus(-D(real))] + E[softplus(D(fake))]`` (DMD2)."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def nonsaturating_g(fake_logits: Tensor) -> Tensor:
    """Non-saturating GAN generator loss ``E[softplus(-D(fake))]`` (DMD2)."""
    return F.softplus(-fake_logits).mean()


def dmd_gradient(x0_hat: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
    """DMD2's normalised distribution-matching gradient at ``x0_hat``.

    ``grad = (x0_fake - x0_real) / mean|x0_hat - x0_real|`` with the mean taken per sample; a
    step against ``grad`` moves the sample from where the fake score points to where the real
    score points (the reverse-KL gradient in x0 space).
    """
    dims = tuple(range(1, x0_hat.ndim))
    weight = (x0_hat - x0_real).abs().mean(dim=dims, keepdim=True).clamp_min(1e-8)
    return torch.nan_to_num((x0_fake - x0_real) / weight)


def gradient_surrogate(x: Tensor, grad: Tensor) -> Tensor:
    """``0.5 ||x - sg(x - grad)||^2`` (mean): a loss whose gradient w.r.t. ``x`` is ``grad / numel``."""
    return 0.5 * F.mse_loss(x, (x - grad).detach())


def dmd_loss(x0_hat: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
    """:func:`gradient_surrogate` of :func:`dmd_gradient`: the generator receives exactly the DMD gradient."""
    return gradient_surrogate(x0_hat, dmd_gradient(x0_hat.detach(), x0_real.detach(), x0_fake.detach()))


def normalised_per_sample(grad: Tensor) -> Tensor:
    """``grad`` rescaled so that each sample's mean absolute entry is ``1 / numel``: the gradient
    :func:`gradient_surrogate` gives for a step of mean size one latent unit, DMD's scale when its
    real and fake predictions disagree by as much as the sample is off the real one. Keeps the
    direction a loss asks each sample to move in and drops how loudly it asks."""
    dims = tuple(range(1, grad.ndim))
    scale = grad.abs().mean(dim=dims, keepdim=True).clamp_min(1e-12) * grad.numel()
    return torch.nan_to_num(grad / scale)


def denoising_loss(prediction: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Mean squared error between a network's prediction and its training target.

    ``weight`` (per sample, shape ``(B,)``) rescales each sample's error (e.g. SNR weighting).
    """
    err = (prediction.float() - target.float()) ** 2
    err = err.flatten(1).mean(dim=1)
    if weight is not None:
        err = err * weight
    return err.mean()
