"""Wan 2.1 / 2.2 text-to-video teachers over diffusers' components (3D DiT, flow matching).

The teacher is loaded from a diffusers ``WanPipeline`` folder or hub id (``transformer/``, ``vae/``,
``text_encoder/`` (UMT5-XXL), ``tokenizer/``, ``scheduler/``): Wan2.1-T2V-1.3B / -14B, and Wan2.2-TI2V-5B
(one transformer on the 48-channel Wan 2.2 VAE, per-token timesteps). Only what differs from the
:class:`~dmdx_lightning.teachers.base.Teacher` base lives here:

- prompt encoding exactly as ``WanPipeline._get_t5_prompt_embeds``: the prompt cleaned
  (``prompt_clean``), UMT5 run with its attention mask, its tokens trimmed to the prompt's real ones
  and zero-padded back to ``max_sequence_length`` (512). Wan has no pooled text vector; the
  discriminator heads get the mean of the real tokens as ``pooled``;
- flow matching (``prediction_type = "flow"``, the transformer fed ``1000 t``) with the scheduler's
  flow shift: Wan ships ``UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=...)`` (read from
  its ``flow_shift``; a ``FlowMatchEulerDiscreteScheduler``'s ``shift`` is read too);
- latents ``(B, C, F, H, W)`` as the pipeline holds them, normalised with the VAE's
  ``latents_mean`` / ``latents_std`` exactly as ``WanPipeline`` decodes them;
- feature maps from ``blocks``: a block returns the video tokens ``(B, F h w, C)`` (frame-major),
  reshaped to ``(B, C, F, h, w)`` maps for the 3D discriminator heads;
- the diffusers export: a ``WanPipeline`` folder or the student's LoRA for its
  ``load_lora_weights``, with a stock ``FlowMatchEulerDiscreteScheduler`` whose default call replays
  the student's sampler (:func:`wan_flow_scheduler`: ``WanPipeline.__call__`` takes no ``sigmas``).

Wan 2.2 A14B (two experts, ``transformer`` for high noise and ``transformer_2`` below
``boundary_ratio``) is refused, with the reason: every role here (real score, fake score, student) is
one network, and one network is not that teacher's score at every time.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from dmdx_lightning.errors import ConfigError
from dmdx_lightning.schedules import FlowMatchSchedule
from dmdx_lightning.teachers.base import Conditioning
from dmdx_lightning.teachers.diffusers_base import CONFIG_KEY, DiffusersTeacher

__all__ = ["CONFIG_KEY", "WanTeacher", "wan_flow_scheduler"]

#: the schedulers a Wan pipeline may ship that describe flow matching with a fixed shift, and the
#: config key that holds the shift
_FLOW_SHIFT_KEY = {"UniPCMultistepScheduler": "flow_shift", "FlowMatchEulerDiscreteScheduler": "shift"}


def _replaying_shift(shift: float, n: int, num_train_timesteps: int) -> float:
    """The ``shift`` S' of a ``FlowMatchEulerDiscreteScheduler`` whose ``set_timesteps(n)`` gives the
    ``n`` times ``shift_S(1 - i / n)`` (with ``shift_terminal`` = the last one).

    diffusers' default call gives ``stretch(shift_S'(1 - i (1 - m) / (n - 1)))``, ``m`` being its
    ``sigma_min = shift_S'(1 / N)`` and ``stretch`` the affine map of ``1 - sigma`` that ends the grid at
    ``shift_terminal``. In ``w = 1 - sigma`` every one of these maps is a Moebius map fixing ``w = 0``
    (``shift_S: w -> w / (S - (S - 1) w)``), and two of them agree on the whole grid when
    ``S' / (S' - 1) = n (1 - m) / (n - 1) * S / (S - 1)``; ``m`` depends on S' weakly, so a few
    fixed-point rounds converge (the caller checks the result on a probe)."""
    m = 1.0 / num_train_timesteps
    new = shift
    for _ in range(50):
        q = n * (1.0 - m) / (n - 1) * shift / (shift - 1.0)
        new = q / (q - 1.0)
        m = new / (num_train_timesteps + new - 1.0)
    return new


def wan_flow_scheduler(schedule: FlowMatchSchedule, timesteps: Sequence[float], stochastic: bool = True):
    """A stock ``FlowMatchEulerDiscreteScheduler`` whose DEFAULT ``set_timesteps(len(timesteps))``
    reproduces ``timesteps``: ``WanPipeline.__call__`` passes no ``sigmas``, so the scheduler alone
    must give the student's times.

    With ``stochastic`` (the export) each step predicts ``x0`` and re-noises it with fresh noise to
    the next time, as :meth:`~dmdx_lightning.teachers.base.Teacher.sample_student` does (the
    scheduler's ``stochastic_sampling``, drawing from torch's global generator: ``WanPipeline`` passes
    no generator to ``step``); without it, the Euler step of the teacher's ODE sampler. Evenly
    spaced times (no shift) are :func:`~dmdx_lightning.teachers.sd3.student_flow_scheduler`'s case;
    the flow-shifted grid of the methods' default (``shift_S(1 - i / n)``) gets the scheduler shift of
    :func:`_replaying_shift`.

    Returns ``(scheduler, exact)``: whether ``set_timesteps(len(timesteps))`` reproduces the times
    (to 1e-6); other times (e.g. a hand-set ``student_timesteps``) are not replayable by ``WanPipeline``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    from dmdx_lightning.teachers.sd3 import student_flow_scheduler

    ts = [float(t) for t in timesteps]
    n, train_steps = len(ts), schedule.num_train_timesteps
    scheduler, exact = student_flow_scheduler({"num_train_timesteps": train_steps}, ts)
    config = {k: v for k, v in scheduler.config.items() if not k.startswith("_")}
    config["stochastic_sampling"] = stochastic
    if not exact and n > 1 and schedule.shift != 1.0:
        shifted = {**config, "shift": _replaying_shift(schedule.shift, n, train_steps), "shift_terminal": ts[-1]}
        probe = FlowMatchEulerDiscreteScheduler.from_config(shifted)
        probe.set_timesteps(n)
        if torch.allclose(probe.sigmas[:-1].double(), torch.tensor(ts, dtype=torch.float64), atol=1e-6):
            config, exact = shifted, True
    return FlowMatchEulerDiscreteScheduler.from_config(config), exact


class _RawConfig:
    """``from_pretrained`` giving a config file as stored, whatever class it names (for
    :meth:`DiffusersTeacher.load_component`'s errors): the scheduler's (any scheduler class) or the
    pipeline's ``model_index.json`` (``subfolder=None``)."""

    @staticmethod
    def from_pretrained(source: str, **kwargs) -> dict:
        from diffusers import DDPMScheduler, DiffusionPipeline

        reader = DDPMScheduler if kwargs.get("subfolder") else DiffusionPipeline
        return dict(reader.load_config(source, **kwargs))


def _pipeline_problem(index: dict) -> str | None:
    """What in a pipeline's ``model_index.json`` WanTeacher cannot train (``None``: nothing)."""
    name = index.get("_class_name", "WanPipeline")
    if name != "WanPipeline":
        return (f"is a {name} folder; WanTeacher distils text-to-video WanPipeline folders (Wan2.1-T2V-1.3B / -14B, "
                "Wan2.2-TI2V-5B)")
    second = index.get("transformer_2") or [None, None]
    if index.get("boundary_ratio") is not None or (isinstance(second, (list, tuple)) and second[-1]):
        return (f"is a two-expert Wan 2.2 pipeline (transformer_2, boundary_ratio {index.get('boundary_ratio')}): its "
                "`transformer` denoises the high-noise times and `transformer_2` those below the boundary, while "
                "WanTeacher builds the real score, the fake score and the student on ONE network, which would be "
                "the teacher's score on one side of the boundary only. Distil Wan-AI/Wan2.1-T2V-14B-Diffusers or "
                "Wan-AI/Wan2.2-TI2V-5B-Diffusers (one transformer) instead")
    return None


class WanTeacher(DiffusersTeacher):
    """Wan 2.1 / 2.2 text-to-video (``WanPipeline`` layout) as a distillation teacher.

    Args:
        pretrained_model_name_or_path: hub id (``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``,
            ``Wan-AI/Wan2.1-T2V-14B-Diffusers``, ``Wan-AI/Wan2.2-TI2V-5B-Diffusers``) or a local pipeline
            folder with ``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/`` and ``scheduler/``
            subfolders. Two-expert Wan 2.2 A14B folders are refused (see the module docstring).
        revision: hub revision (branch, tag or commit) of every component.
        variant: weight file variant of the models (e.g. ``fp16``); ``None`` for the default files.
        torch_dtype: ``float32 | bfloat16 | float16``: dtype every frozen part is loaded in (Wan was
            released in bf16; diffusers recommends its VAE in fp32 for decoding quality).
        trainable_dtype: dtype of the trainable copies in ``full`` mode (``None``: as
            ``torch_dtype``); the LoRA adapters are always float32 (``Teacher.setup_roles``).
        max_sequence_length: UMT5 tokens per prompt (512 = the pipeline default: the real tokens,
            then zeros).
        num_frames: video frames in pixels, ``4k + 1`` (81 = the pipeline default: 21 latent frames).
        height, width: video size in pixels (480 x 832 = the pipeline default, Wan's 480p; 720 x 1280
            for the 14B's 720p).
        sample_steps: Euler steps of the teacher's own sampler (ODE pairs, reference samples; 50 =
            the pipeline default).
        cfg_scale: the teacher's default guidance scale (5.0 = the pipeline default).
        **kwargs: :class:`~dmdx_lightning.teachers.base.Teacher` options: ``mode`` (``full`` or
            ``lora``), ``lora_rank``, ``lora_alpha``, ``lora_target_modules`` (default: the attention
            projections of every block's self- and cross-attention, diffusers' Wan LoRA layout),
            ``gradient_checkpointing``.
    """

    family = "wan"
    prediction_type = "flow"
    pipeline_name = "Wan"
    pipeline_layout = "transformer/, vae/, text_encoder/, tokenizer/, scheduler/"
    export_formats = ("pipeline", "lora")
    # attn1 (self) and attn2 (cross) projections of every block: the modules diffusers' Wan LoRA
    # training targets, so the exported adapter loads with WanPipeline.load_lora_weights
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    example_prompts: tuple[str, ...] = (
        "a golden retriever running on a beach at sunset, waves in the background",
        "a timelapse of clouds drifting over a snowy mountain range",
        "a cat and a dog baking a cake together in a cozy kitchen",
        "a steaming cup of coffee on a wooden table, morning light")

    @classmethod
    def check_scheduler(cls, config: dict) -> str | None:
        name = config.get("_class_name", "UniPCMultistepScheduler")
        if name not in _FLOW_SHIFT_KEY:
            return (f"is a {name}; WanTeacher trains flow-matching Wan pipelines (UniPCMultistepScheduler with "
                    "use_flow_sigmas, or FlowMatchEulerDiscreteScheduler)")
        if name == "UniPCMultistepScheduler" and not (config.get("use_flow_sigmas")
                                                      and config.get("prediction_type") == "flow_prediction"):
            return (f"is a UniPCMultistepScheduler with use_flow_sigmas {config.get('use_flow_sigmas')!r} and "
                    f"prediction_type {config.get('prediction_type')!r}; a Wan pipeline's has use_flow_sigmas true "
                    "and prediction_type 'flow_prediction' (flow matching)")
        if config.get("use_dynamic_shifting"):
            return ("uses resolution-dependent shifting (use_dynamic_shifting), which WanTeacher does not implement "
                    "(Wan uses a fixed flow shift)")
        return None

    @classmethod
    def check_options(cls, options, key: str = "model.init_args.teacher.init_args") -> None:
        """A two-expert (Wan 2.2 A14B) or non-text-to-video pipeline, from its ``model_index.json``
        alone, before any weight loads."""
        source = options.get("pretrained_model_name_or_path")
        if not source:
            return
        try:  # a local folder, or a Hub id already in the cache: no download at parse time
            index = _RawConfig.from_pretrained(str(source), revision=options.get("revision"), local_files_only=True)
        except (OSError, ValueError):
            return  # not readable yet: loading the teacher reports that with its own message
        problem = _pipeline_problem(index)
        if problem:
            raise ConfigError(f"{key}.pretrained_model_name_or_path", str(source), problem,
                              "Point it at a one-transformer WanPipeline folder or Hub id.")

    def __init__(
        self,
        pretrained_model_name_or_path: str = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
        revision: str | None = None,
        variant: str | None = None,
        torch_dtype: str = "float32",
        trainable_dtype: str | None = None,
        max_sequence_length: int = 512,
        num_frames: int = 81,
        height: int = 480,
        width: int = 832,
        sample_steps: int = 50,
        cfg_scale: float = 5.0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.set_source(pretrained_model_name_or_path, revision, variant, torch_dtype, trainable_dtype)
        self.sample_steps, self.cfg_scale = int(sample_steps), float(cfg_scale)

        from diffusers import AutoencoderKLWan, WanTransformer3DModel
        from transformers import AutoTokenizer, UMT5EncoderModel

        index = self.load_component(_RawConfig, None, model=False)
        problem = _pipeline_problem(index)
        if problem:
            raise ValueError(f"{self.pretrained_model_name_or_path} {problem}")
        # Wan 2.2 TI2V-5B: the pipeline feeds one timestep per video token (equal ones for text-to-video)
        self.expand_timesteps = bool(index.get("expand_timesteps", False))
        self.scheduler_config = self.load_component(_RawConfig, "scheduler", model=False)
        problem = self.check_scheduler(self.scheduler_config)
        if problem:
            raise ValueError(f"{self.pretrained_model_name_or_path}/scheduler {problem}")
        shift = self.scheduler_config.get(_FLOW_SHIFT_KEY[self.scheduler_config["_class_name"]], 1.0)
        self.schedule = FlowMatchSchedule(shift=float(shift),
                                          num_train_timesteps=int(self.scheduler_config.get("num_train_timesteps", 1000)))
        self.tokenizer = self.load_component(AutoTokenizer, "tokenizer", model=False)
        self.text_encoder = self.load_component(UMT5EncoderModel, "text_encoder").requires_grad_(False).eval()
        self.vae = self.load_component(AutoencoderKLWan, "vae").requires_grad_(False).eval()
        transformer = self.load_component(WanTransformer3DModel, "transformer")
        # as WanPipeline reads them
        self.vae_scale_factor = int(self.vae.config.scale_factor_spatial)
        self.vae_temporal_factor = int(self.vae.config.scale_factor_temporal)
        self.patch_size = tuple(transformer.config.patch_size)
        self.max_sequence_length = int(max_sequence_length)
        self.num_frames, self.height, self.width = int(num_frames), int(height), int(width)
        if (self.num_frames - 1) % self.vae_temporal_factor:
            raise ValueError(f"num_frames {self.num_frames} must be {self.vae_temporal_factor}k + 1 (the Wan VAE "
                             f"compresses time {self.vae_temporal_factor}x after the first frame)")
        if (self.num_frames - 1) // self.vae_temporal_factor % self.patch_size[0]:
            raise ValueError(f"num_frames {self.num_frames}: the latent frames must be a multiple of the "
                             f"transformer's temporal patch {self.patch_size[0]}")
        for name, size, patch in (("height", self.height, self.patch_size[1]), ("width", self.width, self.patch_size[2])):
            multiple = self.vae_scale_factor * patch
            if size % multiple or size % 16:  # WanPipeline.check_inputs: divisible by 16
                raise ValueError(f"{name} {size} must be a multiple of 16 and of vae_scale_factor x patch_size = "
                                 f"{multiple}")
        self.setup_roles(transformer)

    # ------------------------------------------------------------------ prompts
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """``WanPipeline._get_t5_prompt_embeds`` for one prompt per sample (no CFG doubling);
        ``pooled`` is the mean of the prompt's real (unmasked) UMT5 tokens."""
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        device = self.denoiser_device
        tokens = self.tokenizer([prompt_clean(p) for p in prompts], padding="max_length",
                                max_length=self.max_sequence_length, truncation=True, add_special_tokens=True,
                                return_attention_mask=True, return_tensors="pt")
        mask = tokens.attention_mask.to(device)
        embeds = self.text_encoder(tokens.input_ids.to(device), mask).last_hidden_state.to(self.text_encoder.dtype)
        # the pipeline keeps the first mask.sum() tokens and pads with zeros (right padding: the same)
        keep = mask[..., None].to(embeds.dtype)
        embeds = embeds * keep
        return Conditioning(prompt_embeds=embeds, pooled=embeds.sum(1) / keep.sum(1).clamp_min(1.0))

    # ------------------------------------------------------------------ network
    def model_output(self, net: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        # the input's dtype: the patch embedding's (network_dtype would read scale_shift_table, which
        # diffusers keeps in fp32 whatever torch_dtype is: _keep_in_fp32_modules)
        dtype = net.patch_embedding.weight.dtype
        # float32 timesteps as the (FlowMatchEuler) pipeline passes them (bf16 cannot tell 999 from 1000)
        timestep = self.schedule.model_timestep(t).float()
        if self.expand_timesteps:  # Wan 2.2 TI2V: one (equal) timestep per video token, as WanPipeline
            pt, ph, pw = self.patch_size
            tokens = (x_t.shape[2] // pt) * (x_t.shape[3] // ph) * (x_t.shape[4] // pw)
            timestep = timestep[:, None].expand(-1, tokens)
        out = net(hidden_states=x_t.to(dtype), timestep=timestep, encoder_hidden_states=cond.prompt_embeds.to(dtype),
                  return_dict=False)[0]
        return out.to(x_t.dtype)

    def feature_blocks(self, net: nn.Module) -> Sequence[nn.Module]:
        return net.blocks

    def block_to_map(self, output, x_t: Tensor) -> Tensor:
        b, n, c = output.shape  # video tokens, frame-major (the patch embedding's flatten of (F, h, w))
        pt, ph, pw = self.patch_size
        f, h, w = x_t.shape[2] // pt, x_t.shape[3] // ph, x_t.shape[4] // pw
        if n != f * h * w:
            raise RuntimeError(f"Wan block gave {n} video tokens for a {f}x{h}x{w} latent grid")
        return output.reshape(b, f, h, w, c).permute(0, 4, 1, 2, 3)

    @property
    def latent_frames(self) -> int:
        return (self.num_frames - 1) // self.vae_temporal_factor + 1

    def latent_shape(self, batch_size: int) -> tuple[int, ...]:
        return (batch_size, self.denoiser.config.in_channels, self.latent_frames,
                self.height // self.vae_scale_factor, self.width // self.vae_scale_factor)

    # ------------------------------------------------------------------ VAE
    def _latent_stats(self, device) -> tuple[Tensor, Tensor]:
        """The VAE's ``latents_mean`` and ``1 / latents_std`` as WanPipeline builds them (VAE dtype)."""
        cfg = self.vae.config
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(device, self.vae.dtype)
        inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(device, self.vae.dtype)
        return mean, inv_std

    def decode(self, latents: Tensor) -> Tensor:
        """``(B, C, F, h, w)`` latents -> ``(B, 3, 4 (F - 1) + 1, H, W)`` video in ``[-1, 1]``, the
        un-normalisation of ``WanPipeline.__call__`` (``latents / (1 / std) + mean``)."""
        mean, inv_std = self._latent_stats(latents.device)
        z = latents.to(self.vae.dtype) / inv_std + mean
        video = self.vae.decode(z, return_dict=False)[0].float().clamp(-1, 1)
        expected = ((z.shape[2] - 1) * self.vae_temporal_factor + 1, z.shape[3] * self.vae_scale_factor,
                    z.shape[4] * self.vae_scale_factor)
        if tuple(video.shape[2:]) != expected:
            raise RuntimeError(f"the Wan VAE decoded {tuple(video.shape[2:])} (frames, height, width) where "
                               f"{expected} was expected")
        return video

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """``(B, 3, F, H, W)`` video in ``[-1, 1]`` -> normalised ``(B, C, F', h, w)`` latents
        (``WanVideoToVideoPipeline.prepare_latents``: ``(z - mean) * (1 / std)``)."""
        mean, inv_std = self._latent_stats(images.device)
        z = self.vae.encode(images.to(self.vae.dtype)).latent_dist.sample()
        return ((z - mean) * inv_std).float()

    def enable_decode_checkpointing(self) -> bool:
        """``AutoencoderKLWan`` has no gradient checkpointing (diffusers 0.42): the caller recomputes
        the whole decode."""
        return False

    # ------------------------------------------------------------------ export
    @property
    def pipeline_class(self):
        from diffusers import WanPipeline

        return WanPipeline

    def diffusers_pipeline(self, transformer: nn.Module, scheduler):
        """A ``WanPipeline`` of this teacher's components around ``transformer``."""
        return self.pipeline_class(tokenizer=self.tokenizer, text_encoder=self.text_encoder, vae=self.vae,
                           transformer=transformer, scheduler=scheduler, expand_timesteps=self.expand_timesteps)

    def student_scheduler(self, timesteps: Sequence[float]):
        ts = [float(t) for t in timesteps]
        scheduler, exact = wan_flow_scheduler(self.schedule, ts)
        if not exact:
            raise ValueError(
                f"the student's times {ts} cannot be replayed by a WanPipeline: its __call__ takes no sigmas, and no "
                f"FlowMatchEulerDiscreteScheduler's set_timesteps({len(ts)}) gives them. Train with "
                "model.init_args.student_steps (its evenly spaced times through the flow shift, the default) instead "
                "of model.init_args.student_timesteps to export to WanPipeline")
        # the video's size and the prompt length differ from WanPipeline's defaults in general: always passed
        call = {"num_inference_steps": len(ts), "guidance_scale": 1.0, "num_frames": self.num_frames,
                "height": self.height, "width": self.width, "max_sequence_length": self.max_sequence_length}
        return scheduler, {
            **self.pipeline_info(), "sigmas": ts, "default_call_exact": exact, "call": call,
            "scheduler": {k: v for k, v in scheduler.config.items() if not k.startswith("_")},
            "max_sequence_length": self.max_sequence_length, "num_frames": self.num_frames,
            "height": self.height, "width": self.width}

