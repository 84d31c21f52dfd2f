"""Noise schedules, prediction conversions, the one-step ODE move and timestep samplers.

Every teacher family speaks one common language here (k-diffusion style): a continuous
schedule time ``t`` in ``[0, 1]`` (0 = data, 1 = noise), the forward process
``x_t = alpha(t) * x0 + sigma(t) * eps`` and, whatever the network predicts, the pair
``(x0_pred, eps_pred)``. The one-step PF-ODE move from ``t`` to ``s`` is then the DDIM step
``x_s = alpha(s) * x0_pred + sigma(s) * eps_pred`` (the paper, Notation); for flow matching it
is exactly the Euler step ``x_s = x_t + (s - t) * v``.
"""

from __future__ import annotations

import typing

from typing import Literal, Sequence

import torch
from torch import Tensor

PredictionType = Literal["flow", "v", "eps", "x0"]
PREDICTION_TYPES: tuple[str, ...] = ("flow", "v", "eps", "x0")

# Divisions by alpha or sigma blow up at the ends of the schedule (alpha(1) = 0 for flow
# matching, sigma(0) = 0 everywhere); this floor keeps them finite without changing any value
# the samplers and losses actually visit.
_EPS = 1e-6


def expand_like(t: Tensor | float, x: Tensor) -> Tensor:
    """Broadcast a per-sample time ``(B,)`` (or a scalar) against ``x`` of shape ``(B, ...)``."""
    t = torch.as_tensor(t, device=x.device, dtype=x.dtype)
    if t.ndim == 0:
        return t
    if t.shape[0] != x.shape[0]:
        raise ValueError(f"time has batch {t.shape[0]} but x has batch {x.shape[0]}")
    return t.reshape(t.shape[0], *([1] * (x.ndim - 1)))


class NoiseSchedule:
    """Base schedule: subclasses give ``alpha(t)``, ``sigma(t)`` and the network's timestep input."""

    def alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def model_timestep(self, t: Tensor) -> Tensor:
        """The timestep value the denoiser was trained with (e.g. ``1000 * t`` for SD3)."""
        raise NotImplementedError

    def shift_time(self, u: Tensor | float) -> Tensor | float:
        """Map evenly spaced sampler times ``u`` to this schedule's inference times.

        The identity here; flow matching applies SD3's shift. Samplers and student grids call it
        on every schedule, so no caller needs to know which schedule shifts.
        """
        return u

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """Forward process ``x_t = alpha(t) x0 + sigma(t) eps``."""
        return expand_like(self.alpha(t), x0) * x0 + expand_like(self.sigma(t), x0) * eps

    def to_x0_eps(
        self, model_output: Tensor, x_t: Tensor, t: Tensor, prediction_type: str
    ) -> tuple[Tensor, Tensor]:
        """Convert a network output of ``prediction_type`` into ``(x0_pred, eps_pred)``.

        ``flow``: velocity ``v = eps - x0`` (SD3, FLUX); ``v``: ``v = alpha eps - sigma x0``
        (CogVideoX); ``eps``: noise (SDXL); ``x0``: the clean sample.
        """
        a = expand_like(self.alpha(t), x_t)
        s = expand_like(self.sigma(t), x_t)
        if prediction_type == "flow":
            # x_t = a x0 + s (v + x0)  =>  x0 = (x_t - s v) / (a + s)
            x0 = (x_t - s * model_output) / (a + s)
            return x0, model_output + x0
        if prediction_type == "v":
            norm = a * a + s * s
            return (a * x_t - s * model_output) / norm, (s * x_t + a * model_output) / norm
        if prediction_type == "eps":
            return (x_t - s * model_output) / a.clamp_min(_EPS), model_output
        if prediction_type == "x0":
            return model_output, (x_t - a * model_output) / s.clamp_min(_EPS)
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")

    def training_target(self, x0: Tensor, eps: Tensor, t: Tensor, prediction_type: str) -> Tensor:
        """The regression target a ``prediction_type`` network is trained on (fake-score loss)."""
        if prediction_type == "flow":
            return eps - x0
        if prediction_type == "v":
            return expand_like(self.alpha(t), x0) * eps - expand_like(self.sigma(t), x0) * x0
        if prediction_type == "eps":
            return eps
        if prediction_type == "x0":
            return x0
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")

    def ode_step(self, x0: Tensor, eps: Tensor, s: Tensor) -> Tensor:
        """One deterministic PF-ODE (DDIM) move to time ``s``: ``alpha(s) x0 + sigma(s) eps``.

        ``x_t`` and ``t`` are not arguments: the DDIM move is fully determined by the
        prediction pair, and ``(x0, eps)`` already encodes ``x_t`` exactly.
        """
        return self.add_noise(x0, eps, s)


class FlowMatchSchedule(NoiseSchedule):
    """Rectified flow: ``alpha = 1 - t``, ``sigma = t`` (SD3, SD3.5, FLUX, the digits teacher).

    Args:
        shift: SD3's timestep shift ``t -> shift t / (1 + (shift - 1) t)``, applied by
            :meth:`shift_time` to uniform times (samplers, inference grids), never to ``t`` itself.
        num_train_timesteps: the network is fed ``t * num_train_timesteps``.
    """

    def __init__(self, shift: float = 1.0, num_train_timesteps: int = 1000) -> None:
        if shift <= 0:
            raise ValueError(f"shift must be positive, got {shift}")
        self.shift = shift
        self.num_train_timesteps = num_train_timesteps

    def alpha(self, t: Tensor) -> Tensor:
        return 1.0 - t

    def sigma(self, t: Tensor) -> Tensor:
        return t

    def model_timestep(self, t: Tensor) -> Tensor:
        return t * self.num_train_timesteps

    def shift_time(self, u: Tensor | float) -> Tensor | float:
        return self.shift * u / (1.0 + (self.shift - 1.0) * u)

    def __repr__(self) -> str:
        return f"FlowMatchSchedule(shift={self.shift})"


class VPSchedule(NoiseSchedule):
    """Discrete variance-preserving schedule (SDXL, CogVideoX) read at continuous ``t``.

    ``alpha^2 + sigma^2 = 1``; ``alphas_cumprod`` is interpolated linearly between the
    ``num_train_timesteps`` (``N``) training indices. Where ``t`` falls among them is
    ``time_mapping``:

    - ``"endpoints"``: index ``t (N - 1)``: ``t = 0`` is the first training step (not quite data),
      ``t = 1`` the last.
    - ``"trailing"``: index ``N t - 1``, with ``alphas_cumprod = 1`` at index ``-1``: ``t = 0`` is
      clean data and ``t = 1`` the last training step (999). Evenly spaced times ``k / n`` then
      land on diffusers' "trailing" integer timesteps ``N k / n - 1``: a 4-step student
      ``[1, .75, .5, .25]`` is fed DMD2's ``[999, 749, 499, 249]``, a one-step student DMD2's
      999, and the teacher's Euler grid is DDIM with ``timestep_spacing="trailing"`` ending at
      the data. SDXL uses this mapping (teachers/sdxl.py).

    The network is fed the (fractional) index.

    Args:
        beta_start, beta_end, beta_schedule: as diffusers' ``DDPMScheduler`` (``linear`` or
            ``scaled_linear``).
        num_train_timesteps: ``N``.
        time_mapping: ``endpoints`` or ``trailing`` (above).
        snr_shift_scale: CogVideoX's SNR shift (``CogVideoXDDIMScheduler.snr_shift_scale``):
            ``acp -> acp / (s + (1 - s) acp)`` divides every SNR ``acp / (1 - acp)`` by ``s``
            (1.0: no shift). Applied before the zero-terminal-SNR rescale, in diffusers' order.
        rescale_betas_zero_snr: rescale ``sqrt(acp)`` so the last training index is pure noise
            (Lin et al. 2023, Algorithm 1), keeping the first index's value; a v-prediction
            network can then start from ``alpha(1) = 0``.
        timestep_spacing: ``None`` (sampler times are used as given) or ``"trailing"``: the
            diffusers spacing (Lin et al. 2023, Table 2) that starts every sampler at index
            ``N - 1``; :meth:`shift_time` then snaps evenly spaced times ``u`` to the integer
            index ``round(N u) - 1`` (read back through ``time_mapping``), so our samplers and a
            stock diffusers scheduler with ``set_timesteps(n)`` visit the same training indices
            (CogVideoX, on the ``endpoints`` mapping; under ``trailing`` the even grid is
            already on those indices).
    """

    def __init__(
        self,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        num_train_timesteps: int = 1000,
        time_mapping: Literal["endpoints", "trailing"] = "endpoints",
        snr_shift_scale: float = 1.0,
        rescale_betas_zero_snr: bool = False,
        timestep_spacing: str | None = None,
    ) -> None:
        n = num_train_timesteps
        if beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
        else:
            raise ValueError(f"beta_schedule must be 'linear' or 'scaled_linear', got {beta_schedule!r}")
        if time_mapping not in ("endpoints", "trailing"):
            raise ValueError(f"time_mapping must be 'endpoints' or 'trailing', got {time_mapping!r}")
        if snr_shift_scale <= 0:
            raise ValueError(f"snr_shift_scale must be positive, got {snr_shift_scale}")
        if timestep_spacing not in (None, "trailing"):
            raise ValueError(f"timestep_spacing must be None or 'trailing', got {timestep_spacing!r}")
        acp = torch.cumprod(1.0 - betas, dim=0)
        acp = acp / (snr_shift_scale + (1.0 - snr_shift_scale) * acp)
        if rescale_betas_zero_snr:
            root = acp.sqrt()
            first, last = root[0].clone(), root[-1].clone()
            acp = ((root - last) * first / (first - last)) ** 2
        self.alphas_cumprod = acp
        self.beta_start, self.beta_end, self.beta_schedule = beta_start, beta_end, beta_schedule
        self.num_train_timesteps = n
        self.time_mapping = time_mapping
        self.snr_shift_scale = snr_shift_scale
        self.rescale_betas_zero_snr = rescale_betas_zero_snr
        self.timestep_spacing = timestep_spacing
        # the interpolation table; "trailing" puts the clean data (alphas_cumprod = 1) at index -1,
        # i.e. position 0 of the table
        if time_mapping == "trailing":
            self._table = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod])
        else:
            self._table = self.alphas_cumprod

    @classmethod
    def from_diffusers_config(cls, config: dict) -> "VPSchedule":
        """The schedule of a diffusers DDIM-family scheduler config (``DDIMScheduler``,
        ``CogVideoXDDIMScheduler``, ...) on the ``endpoints`` mapping; options this class does not
        model are refused by name."""
        if config.get("trained_betas") is not None:
            raise ValueError("scheduler config with trained_betas is not supported by VPSchedule")
        spacing = config.get("timestep_spacing", "leading")
        if spacing != "trailing":
            raise ValueError(f"scheduler timestep_spacing {spacing!r}: VPSchedule reproduces only 'trailing' spacing")
        return cls(beta_start=float(config.get("beta_start", 0.0001)), beta_end=float(config.get("beta_end", 0.02)),
                   beta_schedule=config.get("beta_schedule", "linear"),
                   num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
                   snr_shift_scale=float(config.get("snr_shift_scale", 1.0)),
                   rescale_betas_zero_snr=bool(config.get("rescale_betas_zero_snr", False)),
                   timestep_spacing="trailing")

    def _position(self, t: Tensor) -> Tensor:
        """``t`` -> position in ``_table`` (float64)."""
        if self.time_mapping == "trailing":
            return t.double() * self.num_train_timesteps
        return t.double() * (self.num_train_timesteps - 1)

    def _acp(self, t: Tensor) -> Tensor:
        pos = self._position(t)
        last = len(self._table) - 1
        lo = pos.floor().long().clamp(0, last)
        hi = (lo + 1).clamp(max=last)
        acp = self._table.to(t.device)
        w = pos - lo
        return ((1 - w) * acp[lo] + w * acp[hi]).to(t.dtype)

    def alpha(self, t: Tensor) -> Tensor:
        return self._acp(torch.as_tensor(t)).sqrt()

    def sigma(self, t: Tensor) -> Tensor:
        return (1.0 - self._acp(torch.as_tensor(t))).sqrt()

    def model_timestep(self, t: Tensor) -> Tensor:
        if self.time_mapping == "trailing":
            return t * self.num_train_timesteps - 1
        return t * (self.num_train_timesteps - 1)

    def timestep_to_t(self, index: float) -> float:
        """Inverse of :meth:`model_timestep` for one value (e.g. DMD2's 999 -> 1.0 under ``trailing``)."""
        if self.time_mapping == "trailing":
            return (index + 1) / self.num_train_timesteps
        return index / (self.num_train_timesteps - 1)

    def shift_time(self, u: Tensor | float) -> Tensor | float:
        if self.timestep_spacing is None:
            return u
        n = self.num_train_timesteps
        # trailing spacing: index round(N u) - 1, read back through the time mapping; u = 0 (the
        # sampler's end) stays 0
        uu = torch.as_tensor(u, dtype=torch.float64)
        index = torch.clamp(torch.round(uu * n) - 1, min=0)
        t = (index + 1) / n if self.time_mapping == "trailing" else index / (n - 1)
        t = torch.where(uu == 0, torch.zeros_like(t), t)
        return t.to(u.dtype) if isinstance(u, Tensor) else float(t)

    def train_index(self, t: Tensor | float) -> int:
        """The integer training index a sampler time ``t`` stands for (diffusers' ``timesteps``);
        raises where ``t`` is not on the integer grid (a diffusers scheduler could not replay it)."""
        pos = float(self.model_timestep(torch.as_tensor(float(t), dtype=torch.float64)))
        index = round(pos)
        if abs(pos - index) > 1e-3:
            raise ValueError(f"time {float(t)} is index {pos:.4f}, not an integer training index of this "
                             f"{self.num_train_timesteps}-step schedule: diffusers schedulers take integer timesteps")
        return index

    def __repr__(self) -> str:
        return (f"VPSchedule(N={self.num_train_timesteps}, time_mapping={self.time_mapping!r}, snr_shift_scale="
                f"{self.snr_shift_scale}, rescale_betas_zero_snr={self.rescale_betas_zero_snr}, "
                f"timestep_spacing={self.timestep_spacing!r})")


# ----------------------------------------------------------------------------------------------
# Timestep samplers: small pure functions (diffusers' training_utils style).
# ----------------------------------------------------------------------------------------------

TimeSampler = Literal["uniform", "shifted", "cubic", "logit_normal"]
T_SAMPLERS: tuple[str, ...] = typing.get_args(TimeSampler)


def sample_t(
    kind: str,
    n: int,
    *,
    t_min: float = 0.0,
    t_max: float = 1.0,
    shift: float = 1.0,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw ``n`` schedule times in ``[t_min, t_max]``.

    - ``uniform``: ``t ~ U(t_min, t_max)``.
    - ``shifted``: uniform ``u`` through SD3's shift ``shift u / (1 + (shift - 1) u)``.
    - ``cubic``: ``t = 1 - u^3``, favouring high noise (ADP's student times, the paper's Stage 1).
    - ``logit_normal``: ``t = sigmoid(N(0, 1))`` (SD3's training density).
    Non-uniform kinds are mapped affinely into ``[t_min, t_max]``.
    """
    if not 0.0 <= t_min <= t_max <= 1.0:
        raise ValueError(f"need 0 <= t_min <= t_max <= 1, got t_min={t_min}, t_max={t_max}")
    u = torch.rand(n, device=device, generator=generator)
    if kind == "uniform":
        base = u
    elif kind == "shifted":
        base = shift * u / (1.0 + (shift - 1.0) * u)
    elif kind == "cubic":
        base = 1.0 - u**3
    elif kind == "logit_normal":
        base = torch.sigmoid(torch.randn(n, device=device, generator=generator))
    else:
        raise ValueError(f"time sampler must be uniform | shifted | cubic | logit_normal, got {kind!r}")
    return t_min + (t_max - t_min) * base


def noised(schedule: NoiseSchedule, x0: Tensor, kind: str = "uniform", *, t_min: float = 0.0, t_max: float = 1.0,
           shift: float = 1.0, eps: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``x0`` re-noised to random times (:func:`sample_t`): ``(x_t, t, eps)`` with
    ``x_t = alpha_t x0 + sigma_t eps`` and fresh standard normal ``eps`` unless given."""
    t = sample_t(kind, x0.shape[0], t_min=t_min, t_max=t_max, shift=shift, device=x0.device).to(x0.dtype)
    eps = torch.randn_like(x0) if eps is None else eps.to(x0)
    return schedule.add_noise(x0, eps, t), t, eps


def student_timesteps(num_steps: int, *, shift: float = 1.0, t_max: float = 1.0,
                      schedule: NoiseSchedule | None = None) -> list[float]:
    """Evenly spaced student times from ``t_max`` down (before shift), e.g. 4 steps ->
    ``[1, 0.75, 0.5, 0.25]`` (DMD2's ``[999, 749, 499, 249]`` on a 1000-step schedule).

    The grid goes through ``schedule.shift_time`` when a schedule is given, else through SD3's
    shift ``shift u / (1 + (shift - 1) u)``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    grid = [t_max * (1.0 - i / num_steps) for i in range(num_steps)]
    if schedule is not None:
        return [float(schedule.shift_time(u)) for u in grid]
    return [shift * u / (1.0 + (shift - 1.0) * u) for u in grid]


def sample_discrete(
    timesteps: Sequence[float], n: int, *, device=None, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Pick one of a student's discrete times per sample; returns ``(index, t)``."""
    idx = torch.randint(len(timesteps), (n,), device=device, generator=generator)
    return idx, torch.tensor(list(timesteps), device=device)[idx]


def euler_grid(num_steps: int, schedule: NoiseSchedule, t_max: float = 1.0) -> list[float]:
    """Teacher sampling grid ``t_max -> 0`` with ``num_steps`` moves, through ``schedule.shift_time``
    (SD3's shift for flow matching). The times pass through float32, as the samplers' tensors do."""
    u = [t_max * (1.0 - i / num_steps) for i in range(num_steps + 1)]
    return [float(schedule.shift_time(torch.tensor(x))) for x in u]

