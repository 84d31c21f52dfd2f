"""ADP: adversarial distillation pre-training on teacher ODE pairs (the paper, Stage 1).

Per iteration, on a batch of pairs ``(x_T, x_0, prompt)`` from
:class:`~dmdx_lightning.data.ode_pairs.ODEPairDataModule`:

- the student sees the pair interpolant ``x_t = alpha_t x_0 + sigma_t x_T`` at one of its times
  ``t`` and predicts ``x0_tilde = G(x_t, t)`` (one-step students: ``t`` from the cubic sampler
  ``1 - u^3``, favouring high noise; multi-step students: one of their own times);
- ``generator_step``: ``L_G = -E[lambda1 D1(x~_t', t') + lambda2 D2(x0_tilde)]``
  (+ ``mse_weight * ||x0_tilde - x_0||^2``, off by default), where ``x~_t'`` re-noises
  ``x0_tilde`` with fresh noise at ``t' ~ U(t_min, t_max)``;
- ``discriminator_step``: ``L_D = lambda1 hinge(D1) + lambda2 hinge(D2)``, real = the teacher's
  ``x_0`` (re-noised the same way for ``D1``), fake = the detached ``x0_tilde``.

``D1`` is a :class:`~dmdx_lightning.discriminators.latent.LatentDiscriminator` on the frozen
teacher, ``D2`` a :class:`~dmdx_lightning.discriminators.pixel.PixelDiscriminator`. With both
``lambda`` at 0 and ``mse_weight > 0`` the module is plain rectified-flow regression on the pairs,
the paper's ablation A1 (arm ``mse_1step``); it then has only the generator player.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor

from dmdx_lightning.discriminators.latent import LatentDiscriminator
from dmdx_lightning.discriminators.pixel import PixelDiscriminator
from dmdx_lightning.errors import ConfigError
from dmdx_lightning.losses import hinge_d, hinge_g
from dmdx_lightning.methods.base import DistillationModule, Player, _default_optimizer
from dmdx_lightning.schedules import T_SAMPLERS, noised, sample_discrete, sample_t
from dmdx_lightning.teachers.base import Conditioning, Teacher


class ADPModule(DistillationModule):
    """ADP with hybrid (latent + pixel) discriminators and hinge losses, manual optimization.

    Args:
        teacher: the teacher family (the student starts from its weights).
        discriminator: latent discriminator ``D1`` (heads on the frozen teacher; ``backbone_role``
            must be ``"real"``). Built for the teacher here; ``None`` with ``lambda1 > 0`` uses
            the default (last block).
        pixel_discriminator: pixel discriminator ``D2`` (decode -> frozen vision backbone ->
            heads); required when ``lambda2 > 0``.
        lambda1, lambda2: weights of the latent and pixel terms (0.85, 0.15 in the paper; its
            ablations (0.7, 0.3) and (1.0, 0.0) are worse). A weight of 0 drops that discriminator.
        mse_weight: weight of the regression term ``||x0_tilde - x_0||^2`` (0 = off, as in the paper).
        student_t_sampler: density of the student's time ``t`` for one-step students
            (``cubic`` = ``1 - u^3``; any :func:`~dmdx_lightning.schedules.sample_t` kind).
            Multi-step students always draw one of their own ``student_timesteps``.
        student_t_min: lowest student time of a one-step student (``t`` lies in
            ``[student_t_min, 1]``). 0 = the paper's cubic draw over the whole range; 1 = always
            the time the one-step student is sampled at (pure noise, DMD2's ``t = 999``). Where a
            teacher's prediction at ``t < 1`` already holds the answer (the exact mixture
            teacher), only ``t`` near 1 trains what one-step sampling uses.
        t_min, t_max: range of the uniform re-noising time ``t'`` of ``D1``.
        renoise: the noise that re-noises real and fake samples for ``D1``: ``fresh`` (the paper:
            new noise per sample) or ``pair`` (the pair's own ``x_T``: ``D1`` then sees points on the
            straight path from the noise to the teacher's / the student's answer for that noise, so
            its verdict, and the generator's gradient, depends on the noise: a collapsed student's
            samples are no longer all judged alike).
        discriminator_optimizer: optimizer factory of both discriminators' heads (one player).
        **kwargs: :class:`~dmdx_lightning.methods.base.DistillationModule` options
            (``student_steps``, ``student_timesteps``, ``generator_optimizer``, ``ema_decay``, ...).
    """

    def __init__(
        self,
        teacher: Teacher,
        discriminator: LatentDiscriminator | None = None,
        pixel_discriminator: PixelDiscriminator | None = None,
        lambda1: float = 0.85,
        lambda2: float = 0.15,
        mse_weight: float = 0.0,
        student_t_sampler: str = "cubic",
        student_t_min: float = 0.0,
        t_min: float = 0.02,
        t_max: float = 0.98,
        renoise: str = "fresh",
        discriminator_optimizer: OptimizerCallable = _default_optimizer,
        **kwargs: Any,
    ) -> None:
        super().__init__(teacher, **kwargs)
        self.check_options(dict(lambda1=lambda1, lambda2=lambda2, mse_weight=mse_weight, renoise=renoise,
                                pixel_discriminator=pixel_discriminator, student_t_sampler=student_t_sampler,
                                student_t_min=student_t_min, t_min=t_min, t_max=t_max))
        sample_t(student_t_sampler, 1, t_min=student_t_min)  # fail now on an unknown sampler name or range
        self.student_t_min = student_t_min
        self.lambda1, self.lambda2, self.mse_weight = lambda1, lambda2, mse_weight
        self.student_t_sampler, self.t_min, self.t_max = student_t_sampler, t_min, t_max
        self.renoise = renoise
        self.discriminator_optimizer = discriminator_optimizer
        self.discriminator = None
        if lambda1 > 0:
            discriminator = discriminator or LatentDiscriminator()
            if discriminator.backbone_role != "real":
                raise ValueError("ADP's latent discriminator reads the frozen teacher: backbone_role must be 'real'")
            self.discriminator = discriminator.build(teacher)
        self.pixel_discriminator = pixel_discriminator.build(teacher) if lambda2 > 0 else None
        self.players = {"generator": Player(self.generator_step, lambda: teacher.trainable_parameters("student"),
                                            self.generator_optimizer)}
        if self.discriminator is not None or self.pixel_discriminator is not None:
            self.players["discriminator"] = Player(self.discriminator_step, self._head_parameters,
                                                   discriminator_optimizer)

    def sharding_units(self):
        """The base's units and the pixel discriminator's heads (its backbone is frozen, whole on every rank)."""
        yield from super().sharding_units()
        if self.pixel_discriminator is not None:
            yield from self.pixel_discriminator.heads

    # ------------------------------------------------------------------ who steps
    @classmethod
    def check_options(cls, options: Mapping[str, Any], key: str = "model.init_args") -> None:
        """Refuse a value or combination of ADP's own options (see DistillationModule.check_options)."""
        get = options.get
        weights = {name: get(name, default) for name, default in
                   (("lambda1", 0.85), ("lambda2", 0.15), ("mse_weight", 0.0))}
        for name, weight in weights.items():
            if weight < 0:
                raise ConfigError(f"{key}.{name}", weight, "a loss weight must be >= 0", "0 turns that term off.")
        if not any(weights.values()):
            raise ConfigError(f"{key}.lambda1 / lambda2 / mse_weight", tuple(weights.values()), "all 0: the "
                              "generator would have no loss", "The paper's weights are 0.85 and 0.15.")
        if weights["lambda2"] > 0 and get("pixel_discriminator") is None:
            raise ConfigError(f"{key}.pixel_discriminator", None, "lambda2 > 0 weights the pixel discriminator's "
                              "loss, and none is configured", "Add a pixel_discriminator (configs/sd3/adp_4step.yaml "
                              "shows one) or set lambda2: 0.")
        if get("renoise", "fresh") not in ("fresh", "pair"):
            raise ConfigError(f"{key}.renoise", get("renoise"), "unknown renoising", "Choose fresh or pair.")
        if get("student_t_sampler", "cubic") not in T_SAMPLERS:
            raise ConfigError(f"{key}.student_t_sampler", get("student_t_sampler"), "unknown density of t",
                              f"Choose one of {', '.join(T_SAMPLERS)}.")
        t_min, t_max = get("t_min", 0.02), get("t_max", 0.98)
        if not 0 <= t_min <= t_max <= 1 or not 0 <= get("student_t_min", 0.0) <= 1:
            raise ConfigError(f"{key}.t_min / t_max / student_t_min", (t_min, t_max, get("student_t_min")),
                              "noise levels must satisfy 0 <= t_min <= t_max <= 1", "The defaults are 0.02, 0.98, 0.")

    @classmethod
    def batch_keys(cls, options: Mapping[str, Any]) -> dict[str, str]:
        return {"x0": "ADP learns from the teacher's ODE pairs (x_T -> x0)", "x_T": "the pairs' noise x_T"}

    def players_for_step(self, iteration: int) -> list[str]:
        """Both players every iteration (1:1), generator first."""
        return list(self.players)

    def _head_parameters(self) -> list[torch.nn.Parameter]:
        heads = list(self.discriminator.heads.parameters()) if self.discriminator is not None else []
        if self.pixel_discriminator is not None:
            heads += self.pixel_discriminator.head_parameters()
        return heads

    # ------------------------------------------------------------------ shared tensors
    def student_t(self, n: int, device) -> Tensor:
        if len(self.student_timesteps) == 1:
            return sample_t(self.student_t_sampler, n, t_min=self.student_t_min, device=device)
        return sample_discrete(self.student_timesteps, n, device=device)[1]

    def prepare(self, batch: dict, cond: Conditioning, players) -> dict[str, Any]:
        x0, x_T = batch["x0"], batch["x_T"]
        if x0.shape != x_T.shape or x0.shape[1:] != self.teacher.latent_shape(1)[1:]:
            raise ValueError(f"pair batch has x0 {tuple(x0.shape)} and x_T {tuple(x_T.shape)}, but the teacher's "
                             f"latents are {tuple(self.teacher.latent_shape(1)[1:])}")
        t = self.student_t(x0.shape[0], x0.device).to(x0.dtype)
        x_t = self.teacher.schedule.add_noise(x0, x_T, t)  # the pair interpolant (x_T plays eps)
        with torch.set_grad_enabled("generator" in players):
            x0_tilde, _ = self.teacher.predict("student", x_t, t, cond)
        return {"x0_tilde": x0_tilde}

    def _renoised(self, x0: Tensor, x_T: Tensor) -> tuple[Tensor, Tensor]:
        x_t, t, _ = noised(self.teacher.schedule, x0, t_min=self.t_min, t_max=self.t_max,
                           eps=x_T if self.renoise == "pair" else None)
        return x_t, t

    # ------------------------------------------------------------------ players
    def generator_step(self, batch: dict, cond: Conditioning, ctx: dict) -> dict[str, Tensor]:
        x0_tilde = ctx["x0_tilde"]
        out: dict[str, Tensor] = {}
        loss = x0_tilde.new_zeros(())
        if self.discriminator is not None:
            x_tp, tp = self._renoised(x0_tilde, batch["x_T"])
            out["latent"] = hinge_g(self.discriminator(self.teacher, x_tp, tp, cond))
            loss = loss + self.lambda1 * out["latent"]
        if self.pixel_discriminator is not None:
            out["pixel"] = hinge_g(self.pixel_discriminator(self.teacher, x0_tilde, cond))
            loss = loss + self.lambda2 * out["pixel"]
        mse = F.mse_loss(x0_tilde.float(), batch["x0"].float())
        out["mse"] = mse.detach()  # always logged: how far the student is from its teacher's pair
        if self.mse_weight > 0:
            loss = loss + self.mse_weight * mse
        return {"loss": loss, **out}

    def discriminator_step(self, batch: dict, cond: Conditioning, ctx: dict) -> dict[str, Tensor]:
        fake, real = ctx["x0_tilde"].detach(), batch["x0"].to(ctx["x0_tilde"].dtype)
        out: dict[str, Tensor] = {}
        loss = fake.new_zeros(())
        if self.discriminator is not None:
            x_real, t_r = self._renoised(real, batch["x_T"])
            x_fake, t_f = self._renoised(fake, batch["x_T"])
            out["latent_hinge"] = hinge_d(*self.discriminator.pair(self.teacher, x_real, t_r, x_fake, t_f, cond))
            loss = loss + self.lambda1 * out["latent_hinge"]
        if self.pixel_discriminator is not None:
            with torch.no_grad():  # the decoder needs no gradient when only heads learn
                decode = self.pixel_discriminator.decode  # in its decode_batch chunks
                img_real, img_fake = decode(self.teacher, real), decode(self.teacher, fake)
            logits_real = self.pixel_discriminator.score_images(img_real, cond.pooled)
            logits_fake = self.pixel_discriminator.score_images(img_fake, cond.pooled)
            out["pixel_hinge"] = hinge_d(logits_real, logits_fake)
            out["pixel_logit_gap"] = (logits_real - logits_fake).mean().detach()
            loss = loss + self.lambda2 * out["pixel_hinge"]
        return {"loss": loss, **out}
