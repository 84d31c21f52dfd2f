"""ADM (adversarial distribution matching, the paper's Stage 2) and the DMD / DMD2 baselines.

One module, three losses (``loss=adm | dmd | dmd2``), so the paper's ablations differ only by
one config value; the loss picks the players' steps once, in ``__init__`` (:attr:`players`). Per
iteration:

- generator: ``adm_generator_step``: ``x_t`` from the student sample;
  ``x_fake = step(f_psi, x_t, t -> t - dt)``; ``L_G = -E[D(x_fake, t - dt)]`` (gradient through
  ``x_fake``; the DMD gradient is not used, it is only logged as a diagnostic, paper Fig. 3).
  ``dmd_generator_step``: DMD2's normalised distribution-matching loss on ``(x0_real, x0_fake)``
  at ``x_t``. ``dmd2_generator_step``: that + a non-saturating GAN term from a head on the fake
  score's features.
- ``fake_score_step``: the teacher's own denoising / flow-matching loss on detached student samples.
- discriminator: ``adm_discriminator_step``: hinge loss between one real-score ODE step (with CFG)
  and one fake-score ODE step from the SAME ``x_t``; ``dmd2_discriminator_step``: non-saturating
  loss, real = teacher ODE latents from the batch (``batch["x0"]``, e.g. ODE pairs).

No network pass is run twice in an iteration: the discriminator scores its real and fake inputs in
one batched backbone pass (:meth:`LatentDiscriminator.pair`), and ADM's DMD diagnostic, which
needs a real-score prediction (with CFG) that ADM's generator step does not otherwise make, is
computed on one generator step in ``dmd_diagnostic_every`` iterations (every generator step with
the ``paired`` variant, whose generator step makes that prediction anyway).

The ADM study's variants of the loss (paired discriminators, R1/R2, normalised gradient, ADM + DMD,
regression anchor) are one option group, ``variants``
(:class:`~dmdx_lightning.methods.adm_variants.ADMVariants`), apart from what a user sets; its
defaults are the paper's.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor

from dmdx_lightning.discriminators.latent import LatentDiscriminator
from dmdx_lightning.errors import ConfigError
from dmdx_lightning.losses import (denoising_loss, dmd_gradient, dmd_loss, gradient_penalty, gradient_surrogate,
                                   hinge_d, hinge_g, nonsaturating_d, nonsaturating_g, normalised_per_sample,
                                   paired_hinge_d, paired_hinge_g)
from dmdx_lightning.methods.adm_variants import ADMVariants
from dmdx_lightning.methods.base import DistillationModule, Player, _default_optimizer
from dmdx_lightning.schedules import T_SAMPLERS, noised
from dmdx_lightning.teachers.base import Conditioning, Teacher


class ADMModule(DistillationModule):
    """ADM / DMD / DMD2 score distillation with manual optimization.

    Args:
        teacher: the teacher family (roles: real score, fake score, student).
        discriminator: latent discriminator (heads on the teacher backbone); built for the teacher
            here. Unused for ``loss=dmd``. For ``dmd2`` its ``backbone_role`` should be ``"fake"``.
        loss: ``adm`` (the paper), ``dmd`` or ``dmd2`` (baselines for ablations B2/B3).
        dt: size of the one-step PF-ODE move of the real and fake scores (``1/64`` = ``T/64``).
        real_cfg_scale: CFG scale of the real score (the fake score never uses CFG).
        update_ratio: fake-score and discriminator updates per generator update (TTUR); 1 = 1:1.
        t_min, t_max: range of the noise level ``t`` at which the scores are compared.
        t_sampler: ``uniform | shifted | cubic | logit_normal`` density of ``t`` (see schedules).
        t_shift: the shift of ``t_sampler: shifted`` (``shift u / (1 + (shift - 1) u)``). Modes
            a distance ``~sqrt(2 d)`` apart are only bridged by noise for ``1 - t`` of order
            ``1 / sqrt(d)``: the coverage signal of a score comparison (DMD's and ADM's) lives in a
            window near ``t = 1`` that shrinks with ``d`` (the ADM study, docs/reports/adm_study.md).
        fake_jacobian: ADM only: let the generator gradient flow through the fake score's Jacobian
            (``True``) or only through ``x_t`` (``False``: straight-through ODE step). An open
            question of the paper, kept as an option.
        variants: the ADM study's variants of the loss (paired discriminators, R1/R2, normalised
            gradient, ADM + DMD, regression anchor, ...), one group whose defaults are the paper's;
            each option says its measured outcome (:class:`~dmdx_lightning.methods.adm_variants.ADMVariants`).
        gan_generator_weight, gan_discriminator_weight: DMD2's GAN weights (5e-3, 1e-2).
        log_dmd_diagnostic: ``adm``: compute and log the (unoptimised) DMD loss
            (``train/generator/dmd_diagnostic``), at the generator's ``x_t`` before the fake score's
            update of the iteration, and ``train/generator/dmd_alignment``: the cosine between the
            directions ADM and DMD move each student sample (does the discriminator point where DMD
            does?). With ``dmd_weight > 0`` both come every generator step (DMD's term is ``dmd``).
        dmd_diagnostic_every: ``adm``, unpaired: compute the DMD diagnostic on the first generator
            step of each block of this many iterations (it costs one real-score prediction with CFG
            the ADM loss does not need); Lightning logs the latest value at each logging step.
            1 = every generator step (the behaviour before this option: one extra real-score pass
            per generator step). Paired ADM computes it on every generator step
            (free: its generator step predicts with the real score anyway).
        fake_score_optimizer, discriminator_optimizer: optimizer factories of those players.
        **kwargs: :class:`~dmdx_lightning.methods.base.DistillationModule` options
            (``student_steps``, ``generator_optimizer``, ``ema_decay``, ``init_from``, ...).
    """

    def __init__(
        self,
        teacher: Teacher,
        discriminator: LatentDiscriminator | None = None,
        loss: Literal["adm", "dmd", "dmd2"] = "adm",
        dt: float = 1.0 / 64,
        real_cfg_scale: float = 2.0,
        update_ratio: int = 1,
        t_min: float = 0.02,
        t_max: float = 0.98,
        t_sampler: str = "uniform",
        t_shift: float = 1.0,
        fake_jacobian: bool = True,
        gan_generator_weight: float = 5e-3,
        gan_discriminator_weight: float = 1e-2,
        log_dmd_diagnostic: bool = True,
        dmd_diagnostic_every: int = 10,
        variants: ADMVariants = ADMVariants(),
        fake_score_optimizer: OptimizerCallable = _default_optimizer,
        discriminator_optimizer: OptimizerCallable = _default_optimizer,
        **kwargs: Any,
    ) -> None:
        super().__init__(teacher, **kwargs)
        self.check_options(dict(loss=loss, dt=dt, update_ratio=update_ratio, t_min=t_min, t_max=t_max,
                                t_sampler=t_sampler, t_shift=t_shift, dmd_diagnostic_every=dmd_diagnostic_every,
                                real_cfg_scale=real_cfg_scale))
        self.loss = loss
        self.dt, self.real_cfg_scale, self.update_ratio = dt, real_cfg_scale, update_ratio
        self.t_min, self.t_max, self.t_sampler, self.t_shift = t_min, t_max, t_sampler, t_shift
        self.fake_jacobian = fake_jacobian
        self.variants = variants
        self.gan_generator_weight, self.gan_discriminator_weight = gan_generator_weight, gan_discriminator_weight
        self.log_dmd_diagnostic, self.dmd_diagnostic_every = log_dmd_diagnostic, dmd_diagnostic_every
        self.fake_score_optimizer, self.discriminator_optimizer = fake_score_optimizer, discriminator_optimizer
        generator_step = {"adm": self.adm_generator_step, "dmd": self.dmd_generator_step,
                          "dmd2": self.dmd2_generator_step}[loss]
        if variants.regression_weight > 0:
            generator_step = self._with_regression(generator_step)
        self.players = {
            "generator": Player(generator_step, lambda: teacher.trainable_parameters("student"),
                                self.generator_optimizer),
            "fake_score": Player(self.fake_score_step, lambda: teacher.trainable_parameters("fake"),
                                 fake_score_optimizer),
        }
        self.discriminator = None
        if loss != "dmd":
            if discriminator is None:
                discriminator = LatentDiscriminator(backbone_role="fake" if loss == "dmd2" else "real")
            self.discriminator = discriminator.build(teacher)
            discriminator_step = self.adm_discriminator_step if loss == "adm" else self.dmd2_discriminator_step
            self.players["discriminator"] = Player(discriminator_step, lambda: list(self.discriminator.parameters()),
                                                   discriminator_optimizer)

    @classmethod
    def check_options(cls, options: Mapping[str, Any], key: str = "model.init_args") -> None:
        """Refuse a value or combination of this method's options (:class:`ConfigError` naming the
        key); run by ``__init__`` and, before anything is built, by :mod:`dmdx_lightning.preflight`."""
        get = options.get
        loss = get("loss", "adm")
        if loss not in ("adm", "dmd", "dmd2"):
            raise ConfigError(f"{key}.loss", loss, "unknown loss", "Choose adm (the paper), dmd or dmd2.")
        if not 0.0 < get("dt", 1.0 / 64) <= 1.0:
            raise ConfigError(f"{key}.dt", get("dt"), "the real and fake moves go from t to max(t - dt, 0), so dt "
                              "must be in (0, 1]", "The paper's is 1/64 = 0.015625.")
        if get("update_ratio", 1) < 1:
            raise ConfigError(f"{key}.update_ratio", get("update_ratio"), "it counts fake-score and discriminator "
                              "updates per generator update", "Use 1 (the paper) or more (TTUR, e.g. DMD2's 5).")
        t_min, t_max = get("t_min", 0.02), get("t_max", 0.98)
        if not 0 <= t_min <= t_max <= 1:
            raise ConfigError(f"{key}.t_min / t_max", (t_min, t_max), "the noise levels must satisfy "
                              "0 <= t_min <= t_max <= 1", "The defaults are 0.02 and 0.98.")
        sampler = get("t_sampler", "uniform")
        if sampler not in T_SAMPLERS:
            raise ConfigError(f"{key}.t_sampler", sampler, "unknown density of t", f"Choose one of {', '.join(T_SAMPLERS)}.")
        if get("t_shift", 1.0) <= 0:
            raise ConfigError(f"{key}.t_shift", get("t_shift"), "the shift must be > 0", "1 means no shift.")
        if get("dmd_diagnostic_every", 10) < 1:
            raise ConfigError(f"{key}.dmd_diagnostic_every", get("dmd_diagnostic_every"), "it counts iterations "
                              "between two DMD diagnostics", "Use 1 or more (or log_dmd_diagnostic: false).")
        _variants(options)  # the group's own checks (ADMVariants.__post_init__)
        if get("real_cfg_scale", 2.0) < 0:
            raise ConfigError(f"{key}.real_cfg_scale", get("real_cfg_scale"), "a guidance scale must be >= 0",
                              "1 is no guidance; the configs use the teacher's own scale.")

    @classmethod
    def batch_keys(cls, options: Mapping[str, Any]) -> dict[str, str]:
        keys = {}
        if options.get("loss", "adm") == "dmd2":
            keys["x0"] = "loss: dmd2 trains its GAN head on real latents (the teacher's ODE-pair x0)"
        regression = _variants(options).regression_weight
        if regression:
            keys.update(x0="variants.regression_weight > 0 regresses on ODE pairs", x_T="the pairs' noise x_T")
        return keys

    # ------------------------------------------------------------------ who steps
    def players_for_step(self, iteration: int) -> list[str]:
        """Generator every ``update_ratio``-th iteration after the fake-score warm-up; fake score (and
        discriminator) every one."""
        players = [p for p in self.players if p != "generator"]
        if iteration >= self.variants.fake_score_warmup and (iteration - self.variants.fake_score_warmup) % self.update_ratio == 0:
            players.insert(0, "generator")
        return players

    # ------------------------------------------------------------------ shared tensors
    def prepare(self, batch: dict, cond: Conditioning, players) -> dict[str, Any]:
        # one student sample per iteration, with gradient only when the generator steps; the
        # other players reuse it detached (DMD2 does the same)
        ctx = {"x0_hat": self.generate(cond, grad="generator" in players)}
        if self.variants.regression_weight > 0 and "generator" in players:
            if "x_T" not in batch or "x0" not in batch:
                raise KeyError("regression_weight > 0 needs ODE pairs in the batch (keys 'x_T', 'x0'): train on an "
                               "ODEPairDataModule (configs/mixture/regression.yaml shows how)")
            # the anchor's own student sample, from the pair's noise; the distribution loss keeps
            # fresh noise (only a few thousand pair noises exist, and sampling uses fresh ones)
            ctx["x0_pair"] = self.generate(cond, grad=True, noise=batch["x_T"])
        return ctx

    def _with_regression(self, step):
        """``step``'s loss plus ``regression_weight * ||x0_hat - x_0||^2`` on the batch's ODE pairs."""
        def generator_step(batch: dict, cond: Conditioning, ctx: dict) -> dict[str, Tensor]:
            out = step(batch, cond, ctx)
            regression = F.mse_loss(ctx["x0_pair"].float(), batch["x0"].float())
            out["loss"] = out["loss"] + self.variants.regression_weight * regression
            out["regression"] = regression.detach()
            return out
        return generator_step

    def _noised(self, x0: Tensor, t_min: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
        return noised(self.teacher.schedule, x0, self.t_sampler, shift=self.t_shift,
                      t_min=self.t_min if t_min is None else t_min, t_max=self.t_max)

    def _end_time(self, t: Tensor) -> Tensor:
        """Where the real and fake moves end: ``t - dt`` (absolute) or ``t - dt * t`` (relative), >= 0."""
        return (t - (self.dt * t if self.variants.dt_scaling == "relative" else self.dt)).clamp_min(0.0)

    def _ode_step(self, role: str, x_t: Tensor, t: Tensor, cond: Conditioning, cfg: float) -> tuple[Tensor, Tensor]:
        """The PF-ODE move of ``role`` from ``t`` to :meth:`_end_time` in ``adm_steps`` Euler steps.

        Returns ``(x_s, x0_pred)``, ``x0_pred`` being the prediction at the start (for the DMD diagnostic).
        """
        s_end = self._end_time(t)
        x, x0_first = x_t, None
        for i in range(self.variants.adm_steps):
            t_i = t + (s_end - t) * (i / self.variants.adm_steps)
            s_i = t + (s_end - t) * ((i + 1) / self.variants.adm_steps)
            x0, eps = self.teacher.predict(role, x, t_i, cond, cfg)
            x0_first = x0 if x0_first is None else x0_first
            x = self.teacher.schedule.ode_step(x0, eps, s_i)
        return x, x0_first

    # ------------------------------------------------------------------ players
    def adm_generator_step(self, batch: dict, cond: Conditioning, ctx: dict) -> dict[str, Tensor]:
        x0_hat = ctx["x0_hat"]
        dmd_due = self.variants.dmd_weight > 0 or (self.log_dmd_diagnostic and (
            self.variants.adm_pairing == "paired" or self._dmd_diagnostic_due(int(self.iteration))))
        # ADM's own share of the gradient at the student sample passes through a view of its own:
        # a hook there sees it (and rescales it, for adm_gradient="normalised") inside the one
        # backward pass every strategy expects, apart from DMD's or the regression anchor's share
        hooked = x0_hat.requires_grad and (self.variants.adm_gradient == "normalised" or dmd_due)
        x0_adm = x0_hat.view_as(x0_hat) if hooked else x0_hat
        x_t, t, _ = self._noised(x0_adm)
        x_fake, x0_fake = self._ode_step("fake", x_t, t, cond, 1.0)
        if not self.fake_jacobian:
            # straight-through: d x_fake / d x_t = I, the fake score's prediction is a constant
            x_fake = x_t + (x_fake - x_t).detach()
        s = self._end_time(t)
        x0_real = None
        if self.variants.adm_pairing == "paired":
            # the frozen real score passes the gradient on to x_t (its weights get none)
            x_real, x0_real = self._ode_step("real", x_t, t, cond, self.real_cfg_scale)
            logits_real, logits_fake = self.discriminator.pair(self.teacher, x_real, s, x_fake, s, cond, x_t, t)
            adm = paired_hinge_g(logits_real, logits_fake)
        else:
            adm = hinge_g(self.discriminator(self.teacher, x_fake, s, cond, x_t, t))
        out = {"loss": adm, "adm": adm}
        dmd_direction = None
        if dmd_due:
            if x0_real is None:
                with torch.no_grad():
                    x0_real, _ = self.teacher.predict("real", x_t.detach(), t, cond, self.real_cfg_scale)
            dmd_direction = dmd_gradient(x0_hat.detach(), x0_real.detach(), x0_fake.detach())
            # DMD's loss (dmd_loss) from the direction computed once for the term, the diagnostic and the hook
            if self.variants.dmd_weight > 0:
                dmd = gradient_surrogate(x0_hat, dmd_direction)
                out.update(loss=adm + self.variants.dmd_weight * dmd, dmd=dmd)
            else:
                out["dmd_diagnostic"] = gradient_surrogate(x0_hat.detach(), dmd_direction)
        if hooked:
            out.update(self._hook_adm_gradient(x0_adm, dmd_direction))
        return out

    def _hook_adm_gradient(self, x0_adm: Tensor, dmd_direction: Tensor | None) -> dict[str, Tensor]:
        """Hook ADM's gradient at the student sample: rescale it (``adm_gradient="normalised"``) and,
        where DMD's direction is known, measure how far ADM moves each sample the way DMD would.

        ``dmd_alignment`` is the batch mean of the per-sample cosine between the two gradients (1: ADM
        moves the samples where DMD would; 0: along something else; docs/reports/adm_study.md, "Where ADM's gradient
        points"). The hook fills the returned tensor during the generator's backward, before the
        module logs it.
        """
        alignment = torch.full((), float("nan"), device=x0_adm.device)

        def on_gradient(grad: Tensor) -> Tensor:
            if dmd_direction is not None:
                cosine = F.cosine_similarity(grad.detach().flatten(1).float(), dmd_direction.flatten(1).float(), dim=1)
                alignment.copy_(cosine.mean())
            return normalised_per_sample(grad) if self.variants.adm_gradient == "normalised" else grad

        x0_adm.register_hook(on_gradient)
        return {"dmd_alignment": alignment} if dmd_direction is not None else {}

    def dmd_generator_step(self, batch: dict, cond: Conditioning, ctx: dict) -> dict[str, Tensor]:
        x0_hat = ctx["x0_hat"]
        x_t, t, _ = self._noised(x0_hat.detach())
        with torch.no_grad():
            x0_real, _ = self.teacher.predict("real", x_t, t, cond, self.real_cfg_scale)
            x0_fake, _ = self.teacher.predict("fake", x_t, t, cond)
        dmd = dmd_loss(x0_hat, x0_real, x0_fake)
        return {"loss": dmd, "dmd": dmd}

    def dmd2_generator_step(self, batch: dict, cond: Conditioning, ctx: dict) -> dict[str, Tensor]:
        dmd = self.dmd_generator_step(batch, cond, ctx)["dmd"]
        x_t_g, t_g, _ = self._noised(ctx["x0_hat"])
        gan = nonsaturating_g(self.discriminator(self.teacher, x_t_g, t_g, cond))
        return {"loss": dmd + self.gan_generator_weight * gan, "dmd": dmd, "gan": gan}

    def _dmd_diagnostic_due(self, iteration: int) -> bool:
        """Whether this generator step is the first in its block of ``dmd_diagnostic_every``
        iterations (a function of the iteration alone, so a resumed run logs the same)."""
        start = iteration - iteration % self.dmd_diagnostic_every
        return not any("generator" in self.players_for_step(i) for i in range(start, iteration))

    def fake_score_step(self, batch: dict, cond: Conditioning, ctx: dict) -> dict[str, Tensor]:
        x0 = ctx["x0_hat"].detach()
        x_t, t, eps = noised(self.teacher.schedule, x0, t_min=self.t_min, t_max=self.t_max)
        pred = self.teacher.forward_role("fake", x_t, t, cond)
        target = self.teacher.schedule.training_target(x0, eps, t, self.teacher.prediction_type)
        loss = denoising_loss(pred, target)
        return {"loss": loss, "denoising": loss}

    def adm_discriminator_step(self, batch: dict, cond: Conditioning, ctx: dict) -> dict[str, Tensor]:
        x_t, t, _ = self._noised(ctx["x0_hat"].detach())
        with torch.no_grad():
            x_real, _ = self._ode_step("real", x_t, t, cond, self.real_cfg_scale)
            x_fake, _ = self._ode_step("fake", x_t, t, cond, 1.0)
        s = self._end_time(t)
        logits_real, logits_fake, r1, r2 = self._logits_and_penalties(x_real, x_fake, s, cond, x_t, t)
        pair_loss = hinge_d if self.variants.adm_pairing == "independent" else paired_hinge_d
        hinge = pair_loss(logits_real, logits_fake)
        out = {"loss": hinge, "hinge": hinge, "logit_gap": (logits_real - logits_fake).mean().detach()}
        if r1 is not None:
            out["loss"] = out["loss"] + 0.5 * self.variants.r1_gamma * r1
            out["r1"] = r1.detach()
        if r2 is not None:
            out["loss"] = out["loss"] + 0.5 * self.variants.r2_gamma * r2
            out["r2"] = r2.detach()
        return out

    def dmd2_discriminator_step(self, batch: dict, cond: Conditioning, ctx: dict) -> dict[str, Tensor]:
        x0_hat = ctx["x0_hat"].detach()
        if "x0" not in batch:
            raise KeyError("loss=dmd2 needs real latents in the batch (key 'x0'): train on an "
                           "ODEPairDataModule, whose teacher latents stand in for real images")
        x_real, t_r, _ = self._noised(batch["x0"].to(x0_hat))
        x_fake, t_f, _ = self._noised(x0_hat)
        gan = nonsaturating_d(*self.discriminator.pair(self.teacher, x_real, t_r, x_fake, t_f, cond))
        return {"loss": self.gan_discriminator_weight * gan, "gan": gan}

    def _logits_and_penalties(self, x_real: Tensor, x_fake: Tensor, s: Tensor, cond: Conditioning,
                              x_t: Tensor | None = None, t: Tensor | None = None
                              ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """Logits of both moves in one backbone pass and, where ``r1_gamma`` / ``r2_gamma`` > 0,
        ``E||grad_x D(x)||^2`` of each (R1 on the real moves, R2 on the fake ones).

        One input gradient of the summed logits serves both penalties: each sample's logit depends
        on its own input only (backbone and heads act per sample), so each half's gradient is that
        of its own logits.
        """
        penalties = self.variants.r1_gamma > 0 or self.variants.r2_gamma > 0
        x_real, x_fake = x_real.detach().requires_grad_(penalties), x_fake.detach().requires_grad_(penalties)
        # x_t: the moves' shared start, read only by a transition discriminator
        logits_real, logits_fake = self.discriminator.pair(self.teacher, x_real, s, x_fake, s, cond, x_t, t)
        if not penalties:
            return logits_real, logits_fake, None, None
        grad_real, grad_fake = torch.autograd.grad(logits_real.sum() + logits_fake.sum(), (x_real, x_fake),
                                                   create_graph=True)
        return (logits_real, logits_fake, gradient_penalty(grad_real) if self.variants.r1_gamma > 0 else None,
                gradient_penalty(grad_fake) if self.variants.r2_gamma > 0 else None)


def _variants(options: Mapping[str, Any]) -> ADMVariants:
    """The ``variants`` of ADM's options: built already (Python), a mapping as parsed from a config
    (built here, which runs its checks), or absent (the paper's)."""
    variants = options.get("variants")
    return ADMVariants(**variants) if isinstance(variants, Mapping) else variants or ADMVariants()

