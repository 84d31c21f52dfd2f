"""The exact Gaussian-mixture teacher: a testbed where mode dropping and blurring can be counted.

The data distribution of class ``c`` is a mixture of ``modes_per_class`` isotropic Gaussians
``N(mu_k, std^2 I)`` in ``d = C * H * W`` dimensions with weights ``w_k`` spanning
``weight_ratio`` (10x by default). On the flow-matching path ``x_t = (1 - t) x_0 + t eps`` the
posterior mean is closed-form, so the teacher is EXACT (no training, no approximation error):

- component ``k`` gives ``x_t ~ N((1 - t) mu_k, v_t I)`` with ``v_t = (1 - t)^2 std^2 + t^2``;
- responsibilities ``r_k(x_t) = softmax_k(log w_k - ||x_t - (1 - t) mu_k||^2 / (2 v_t))``;
- ``E[x_0 | x_t] = sum_k r_k (mu_k + (1 - t) std^2 / v_t (x_t - (1 - t) mu_k))``.

The empty prompt is the unconditional mixture (every class, uniform class prior), so CFG is real.

Roles with trainable parameters (:class:`MixtureDenoiser`): the exact posterior mean is
reparametrised as ``x0 = posterior(x_t, t; log w + delta) + rho`` where a small conv network on
``[x_t, exact x0]`` (the feature blocks the discriminator heads read) outputs ``delta``, one
logit offset per mode, and ``rho``, a residual in latent space. Both output layers start at zero,
so every role starts EQUAL to the exact teacher, and the one-step student starts collapsed: at
``t = 1`` the posterior mean is the class mean ``sum_k w_k mu_k`` for every noise, as a
teacher-initialised one-step student is in the paper. A constant ``delta`` re-weights the modes
(the fake score can represent any re-weighted mixture exactly); ``rho`` lets it represent samples
off the modes (blur). The student's capacity to map noise to a mode is the trunk's: it sees the
noise through 3x3 convolutions and 2x2 average pooling, so it cannot recompute the teacher's exact
ODE basins (a linear function of the whole noise), which is what makes regression on ODE pairs
(ablation A1) blur between modes while distribution matching may use any noise-to-mode map.

Metrics (:func:`mixture_metrics`) are exact: which mode each sample is nearest to, whether it lies
within ``std * (sqrt(d) + 3)`` of that mode's mean (precision), which modes hold at least a quarter
of their true weight among precise samples (coverage), and the total variation between the
student's mode weights (plus an "off every mode" bin) and the true ones.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmdx_lightning.schedules import FlowMatchSchedule
from dmdx_lightning.teachers.base import Conditioning, Teacher
from dmdx_lightning.teachers.blocks import ResBlock, timestep_embedding


def class_prompt(label: int) -> str:
    return f"mixture class {label}"


def prompt_to_class(prompt: str, num_classes: int) -> int:
    """``"mixture class 3"`` (or any text with one integer) -> 3; ``""`` -> the null class."""
    text = prompt.strip()
    if not text:
        return num_classes
    found = re.findall(r"\d+", text)
    if len(found) != 1 or not 0 <= int(found[0]) < num_classes:
        raise ValueError(f"mixture teacher cannot read prompt {prompt!r}: it must hold exactly one class "
                         f"number in 0..{num_classes - 1}, e.g. {class_prompt(0)!r}")
    return int(found[0])


class GaussianMixture(nn.Module):
    """The class-conditional mixture itself (buffers only) and its exact posterior on the flow path.

    Args:
        shape: latent shape ``(C, H, W)``.
        num_classes, modes_per_class: mixture size.
        std: per-dimension standard deviation of every mode.
        weight_ratio: largest / smallest mode weight within a class (geometric spacing, shuffled).
        seed: the means (``N(0, I)``) and weight order are drawn from this seed, so a config names
            the mixture completely.
    """

    def __init__(self, shape: Sequence[int] = (16, 8, 8), num_classes: int = 4, modes_per_class: int = 16,
                 std: float = 0.1, weight_ratio: float = 10.0, seed: int = 0) -> None:
        super().__init__()
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"shape must be (C, H, W), got {shape}")
        if std <= 0 or weight_ratio < 1:
            raise ValueError(f"need std > 0 and weight_ratio >= 1, got std={std}, weight_ratio={weight_ratio}")
        self.shape, self.std = tuple(shape), float(std)
        self.num_classes, self.modes_per_class = num_classes, modes_per_class
        g = torch.Generator().manual_seed(seed)
        d = math.prod(shape)
        means = torch.randn(num_classes, modes_per_class, d, generator=g)
        ladder = weight_ratio ** (-torch.arange(modes_per_class) / max(modes_per_class - 1, 1))
        weights = torch.stack([ladder[torch.randperm(modes_per_class, generator=g)] for _ in range(num_classes)])
        self.register_buffer("means", means)                                           # (K, M, d)
        self.register_buffer("log_weights", (weights / weights.sum(1, keepdim=True)).log())  # (K, M)
        # derived once (not saved): row k = log prior of all K * M modes for label k (see component_log_weights)
        self.register_buffer("log_weight_table", self._label_table(self.log_weights), persistent=False)

    @property
    def dim(self) -> int:
        return self.means.shape[-1]

    @staticmethod
    def _label_table(log_weights: Tensor) -> Tensor:
        """``(K + 1, K * M)``: a class label keeps its own ``M`` modes (``-inf`` elsewhere); the null
        label (``K``) keeps all modes with a uniform class prior."""
        K, M = log_weights.shape
        own = torch.full((K, K, M), -math.inf)
        own[torch.arange(K), torch.arange(K)] = log_weights
        return torch.cat([own.reshape(K, K * M), (log_weights - math.log(K)).reshape(1, K * M)])

    def component_log_weights(self, labels: Tensor) -> Tensor:
        """Log prior weight of every one of the ``K * M`` modes per sample, ``(B, K * M)``.

        One layout for class and null labels, so a CFG batch (conditional and null rows together)
        is one call.
        """
        K = self.num_classes
        if labels.min() < 0 or labels.max() > K:
            raise ValueError(f"labels must be in 0..{K} ({K} = the empty prompt), got {labels.tolist()}")
        return self.log_weight_table[labels]

    def _flow_terms(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x_t`` flattened, ``alpha_t = 1 - t`` and the per-mode variance ``v_t``, each ``(B, .)``."""
        a = (1.0 - t.float())[:, None]
        return x_t.flatten(1).float(), a, a ** 2 * self.std ** 2 + t.float()[:, None] ** 2

    def mode_logits(self, x_t: Tensor, t: Tensor, labels: Tensor, logit_offsets: Tensor | None = None) -> Tensor:
        """Unnormalised log posterior of every one of the ``K * M`` modes given ``x_t``, ``(B, K * M)``
        (``-inf`` for the modes of other classes): its softmax is the responsibilities ``r_k``."""
        x, a, v = self._flow_terms(x_t, t)
        means = self.means.reshape(-1, self.dim)                         # (K * M, d)
        logw = self.component_log_weights(labels)
        if logit_offsets is not None:
            logw = logw + logit_offsets.float()
        # ||x - a mu||^2 = ||x||^2 - 2a <x, mu> + a^2 ||mu||^2; ||x||^2 is the same for every mode
        return logw - (a ** 2 * (means ** 2).sum(-1) - 2 * a * (x @ means.T)) / (2 * v)

    def posterior_mean(self, x_t: Tensor, t: Tensor, labels: Tensor, logit_offsets: Tensor | None = None) -> Tensor:
        """``E[x_0 | x_t]`` under the (re-weighted) mixture of ``labels``; ``x_t`` is ``(B, C, H, W)``.

        ``logit_offsets`` (``(B, K * M)``) are added to the log weights (``None``: the exact teacher).
        """
        return self.posterior_from_logits(x_t, t, self.mode_logits(x_t, t, labels, logit_offsets))

    def posterior_from_logits(self, x_t: Tensor, t: Tensor, logits: Tensor) -> Tensor:
        """:meth:`posterior_mean` from already computed :meth:`mode_logits` (a caller that also
        reads the responsibilities computes them once)."""
        x, a, v = self._flow_terms(x_t, t)
        mean_mu = torch.softmax(logits, dim=-1) @ self.means.reshape(-1, self.dim)
        gain = a * self.std ** 2 / v                                     # (1 - t) std^2 / v_t
        x0 = mean_mu + gain * (x - a * mean_mu)
        return x0.reshape(x_t.shape).to(x_t.dtype)

    def sample(self, labels: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Exact samples of the data distribution and their mode indices (within the class)."""
        probs = self.log_weights[labels].exp()
        modes = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        mu = self.means[labels, modes]
        noise = torch.randn(mu.shape, generator=generator).to(mu)
        return (mu + self.std * noise).reshape(len(labels), *self.shape), modes


class MixtureDenoiser(nn.Module):
    """``(x_t, timestep, label) -> x0``: the exact posterior with trainable mode offsets and residual.

    Args:
        mixture: the :class:`GaussianMixture` (its buffers are the exact part).
        channels, num_blocks: trunk size (the student's capacity).
        emb_dim: timestep / label embedding width.
        num_train_timesteps: the network is fed ``t * num_train_timesteps``.
        offset_gain: the mode offsets are ``offset_gain * delta_out(h)``: a precise one-step sample
            needs a confident choice (logit gaps of ~5 among tens of modes), and Adam moves each
            weight by about the learning rate per step, so the gain sets how many updates a
            student needs to commit to modes (the same for every role and method).
        posterior_features: also expose the exact posterior's log mode responsibilities
            ``log r_k(x_t)`` (floored at ``-LOG_R_FLOOR``) as a ``(B, K * M)`` vector through
            :attr:`posterior_view`, a feature block for discriminator heads (see
            :class:`MixtureTeacher`). It changes no prediction.
    """

    LOG_R_FLOOR = 30.0

    def __init__(self, mixture: GaussianMixture, channels: int = 32, num_blocks: int = 2, emb_dim: int = 64,
                 num_train_timesteps: int = 1000, offset_gain: float = 1.0, posterior_features: bool = False) -> None:
        super().__init__()
        self.mixture = mixture
        self.offset_gain = offset_gain
        # a parameter-free block whose output a forward hook reads (Teacher.feature_maps)
        self.posterior_view = nn.Identity() if posterior_features else None
        self.emb_dim, self.num_train_timesteps = emb_dim, num_train_timesteps
        C, H, W = mixture.shape
        K, M = mixture.num_classes, mixture.modes_per_class
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(K + 1, emb_dim)
        self.conv_in = nn.Conv2d(2 * C, channels, 3, padding=1)
        self.blocks = nn.ModuleList(ResBlock(channels, emb_dim) for _ in range(num_blocks))
        self.norm_out = nn.GroupNorm(math.gcd(8, channels), channels)
        pooled = channels * max(H // 2, 1) * max(W // 2, 1)
        self.delta_out = nn.Linear(pooled, K * M)        # one logit offset per mode (all classes)
        self.rho_out = nn.Conv2d(channels, C, 3, padding=1)
        for layer in (self.delta_out, self.rho_out):     # every role starts equal to the exact teacher
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x_t: Tensor, timestep: Tensor, labels: Tensor) -> Tensor:
        mixture = self.mixture
        t = timestep / self.num_train_timesteps
        logits = mixture.mode_logits(x_t, t, labels)
        x0_exact = mixture.posterior_from_logits(x_t, t, logits)
        if self.posterior_view is not None:
            log_r = torch.log_softmax(logits, dim=-1).clamp_min(-self.LOG_R_FLOOR)
            self.posterior_view(log_r.to(x_t.dtype))
        emb = F.silu(self.time_mlp(timestep_embedding(timestep, self.emb_dim)) + self.label_emb(labels))
        h = self.conv_in(torch.cat([x_t, x0_exact], dim=1))
        for block in self.blocks:
            h = block(h, emb)
        h = F.silu(self.norm_out(h))
        # 2x2 average pooling before the linear read-out: the trunk cannot recompute the exact
        # ODE basins (a linear function of all d noise values), see the module docstring
        delta = self.offset_gain * self.delta_out(_pool(h).flatten(1))
        x0 = mixture.posterior_mean(x_t, t, labels, logit_offsets=delta)
        return x0 + self.rho_out(h)


def _pool(h: Tensor) -> Tensor:
    return F.avg_pool2d(h, 2) if min(h.shape[2:]) >= 2 else h


# -------------------------------------------------------------------------------- teacher
class MixtureTeacher(Teacher):
    """Built-in exact teacher: a class-conditional Gaussian mixture (see the module docstring).

    Args:
        shape: latent shape ``(C, H, W)``; ``d = C * H * W``.
        num_classes, modes_per_class, std, weight_ratio, mixture_seed: the mixture
            (:class:`GaussianMixture`).
        channels, num_blocks, offset_gain: the trainable trunk of every role (the student's
            capacity, :class:`MixtureDenoiser`).
        sample_steps: Euler steps of the teacher's own ODE sampler (ODE pairs, evaluation).
        cfg_scale: the teacher's default guidance scale (1: the exact mixture; > 1 guided).
        posterior_features: add one feature block after the trunk's ``num_blocks``: the exact
            posterior's log mode responsibilities at the discriminator's input (a ``(B, K * M)``
            vector, read by a vector head; ``LatentDiscriminator(layers=[num_blocks])`` reads it
            alone). The trunk's conv maps cannot tell the 64 random global mode means apart, while a
            large teacher's backbone does recognise content; this view gives a discriminator the
            teacher's own knowledge of which mode a point is near (what DMD's exact real score
            already uses). False: the trunk's blocks only (as before).
        **kwargs: :class:`~dmdx_lightning.teachers.base.Teacher` options (``mode``, LoRA size, ...).
    """

    family = "mixture"
    prediction_type = "x0"
    default_lora_targets = ("conv1", "conv2", "film", "delta_out", "rho_out")
    #: ``dmdx export`` writes the student's network (the mixture's buffers included) and this
    #: teacher's arguments (:meth:`student_config`), which rebuild it
    export_formats = ("safetensors",)

    def __init__(self, shape: Sequence[int] = (16, 8, 8), num_classes: int = 4, modes_per_class: int = 16,
                 std: float = 0.1, weight_ratio: float = 10.0, mixture_seed: int = 0, channels: int = 32,
                 num_blocks: int = 2, offset_gain: float = 1.0, sample_steps: int = 32, cfg_scale: float = 1.0,
                 posterior_features: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.schedule = FlowMatchSchedule(shift=1.0)
        self.sample_steps, self.cfg_scale = int(sample_steps), float(cfg_scale)
        self._student_config = {
            "shape": [int(s) for s in shape], "num_classes": num_classes, "modes_per_class": modes_per_class,
            "std": float(std), "weight_ratio": float(weight_ratio), "mixture_seed": mixture_seed,
            "channels": channels, "num_blocks": num_blocks, "offset_gain": float(offset_gain),
            "sample_steps": self.sample_steps, "cfg_scale": self.cfg_scale, "posterior_features": posterior_features}
        mixture = GaussianMixture(shape, num_classes, modes_per_class, std, weight_ratio, mixture_seed)
        self.example_prompts = tuple(class_prompt(k) for k in range(num_classes))
        # the exact real score depends on the mixture only (every role's trainable part starts at zero)
        self._identity = (f"mixture(shape={'x'.join(map(str, mixture.shape))}, classes={num_classes}, "
                          f"modes={modes_per_class}, std={float(std)}, weight_ratio={float(weight_ratio)}, "
                          f"seed={mixture_seed})")
        # the trunk's random init is part of the teacher: every run of this config sees the same roles
        with torch.random.fork_rng():
            torch.manual_seed(mixture_seed)
            denoiser = MixtureDenoiser(mixture, channels, num_blocks,
                                       num_train_timesteps=self.schedule.num_train_timesteps,
                                       offset_gain=offset_gain, posterior_features=posterior_features)
        self.setup_roles(denoiser)

    def identity(self) -> str:
        """The mixture's parameters (two mixtures of other seeds or sizes are other teachers)."""
        return self._identity

    def student_config(self) -> dict:
        """This teacher's arguments: they rebuild the mixture and the student's network around it."""
        return dict(self._student_config)

    @property
    def mixture(self) -> GaussianMixture:
        return self.denoiser.mixture

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        K = self.mixture.num_classes
        labels = torch.tensor([prompt_to_class(p, K) for p in prompts], dtype=torch.long, device=self.denoiser_device)
        return Conditioning(labels=labels, pooled=F.one_hot(labels, K + 1).float())

    def model_output(self, net: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        return net(x_t, self.schedule.model_timestep(t), cond.labels)

    def feature_blocks(self, net: nn.Module) -> Sequence[nn.Module]:
        view = [] if net.posterior_view is None else [net.posterior_view]
        return [*net.blocks, *view]

    def latent_shape(self, batch_size: int) -> tuple[int, ...]:
        return (batch_size, *self.mixture.shape)

    def decode(self, latents: Tensor) -> Tensor:
        """A picture of a latent: its first channel, scaled from ``N(0, 1)`` data into ``[-1, 1]``."""
        return (latents[:, :1] / 3.0).clamp(-1, 1)

    def encode(self, images: Tensor) -> Tensor:
        raise NotImplementedError("teacher family 'mixture' (MixtureTeacher) has no image encoder: "
                                  "it has no image space, its samples are latents")


# -------------------------------------------------------------------------------- exact metrics
def nearest_modes(x: Tensor, labels: Tensor, mixture: GaussianMixture) -> tuple[Tensor, Tensor]:
    """Index (within the class) of the nearest mode mean and the distance to it, per sample."""
    means = mixture.means[labels]                                            # (B, M, d)
    dist = torch.cdist(x.flatten(1).float()[:, None], means.float()).squeeze(1)  # (B, M)
    d, idx = dist.min(dim=1)
    return idx, d


@torch.no_grad()
def mixture_metrics(x: Tensor, labels: Tensor, mixture: GaussianMixture, radius_sigmas: float = 3.0) -> dict:
    """Exact quality of samples ``x`` of classes ``labels`` (the paper's claims made countable).

    - ``precision``: share of samples within ``r = std * (sqrt(d) + radius_sigmas)`` of their
      nearest mode mean of the prompted class (a true sample lies at ``std * sqrt(d)``, so ``r``
      is the mode's typical set; a sample between modes, i.e. a blur, is imprecise);
    - ``modes_covered`` / ``coverage``: modes whose share of the class's samples, counting precise
      samples only, is at least 1/4 of their true weight (count and fraction of all modes);
    - ``tv``: total variation between the student's distribution over (modes + "off every mode")
      and the true mode weights, averaged over classes (0 = exact, 1 = disjoint);
    - ``min_weight_covered``: share of the lightest third of modes that are covered;
    - the same three with ``_2r`` counted within ``2 r`` (near a mode though not in its typical
      set: tells a student that found the modes but lands a little off them from one lost
      between modes);
    - ``mode_mass``: per class, the student's precise share of each mode (for pictures).
    """
    labels = labels.to(x.device)
    idx, dist = nearest_modes(x, labels.to(mixture.means.device), mixture)
    radius = mixture.std * (math.sqrt(mixture.dim) + radius_sigmas)
    out = _mode_counts(idx.cpu(), dist.cpu() <= radius, labels.cpu(), mixture)
    near = _mode_counts(idx.cpu(), dist.cpu() <= 2 * radius, labels.cpu(), mixture)
    out.update({f"{k}_2r": near[k] for k in ("precision", "modes_covered", "tv")})
    return out


def _mode_counts(idx: Tensor, precise: Tensor, labels: Tensor, mixture: GaussianMixture) -> dict:
    weights = mixture.log_weights.exp().cpu()
    K, M = weights.shape
    covered, tvs, masses, light = 0, [], [], []
    for k in range(K):
        rows = labels == k
        if not rows.any():
            continue
        counts = torch.bincount(idx[rows & precise], minlength=M).float()
        share = counts / rows.sum()
        is_covered = share >= weights[k] / 4
        covered += int(is_covered.sum())
        off = 1.0 - float(share.sum())
        tvs.append(0.5 * (float((share - weights[k]).abs().sum()) + off))
        masses.append(share.tolist())
        lightest = weights[k].argsort()[: max(M // 3, 1)]
        light.append(float(is_covered[lightest].float().mean()))
    classes = len(tvs)
    return {"precision": float(precise.float().mean()), "modes_covered": covered,
            "modes_total": classes * M, "coverage": covered / max(classes * M, 1),
            "tv": sum(tvs) / max(classes, 1), "min_weight_covered": sum(light) / max(classes, 1),
            "mode_mass": masses}
