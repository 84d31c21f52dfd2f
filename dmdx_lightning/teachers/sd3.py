"""Stable Diffusion 3 / 3.5 teachers over diffusers' components (MMDiT, rectified flow).

The teacher is loaded from a diffusers pipeline folder or hub id (``transformer/``, ``vae/``, two
CLIP text encoders, T5, their tokenizers, ``scheduler/``). Only what differs from the
:class:`~dmdx_lightning.teachers.base.Teacher` base lives here:

- prompt encoding exactly as ``StableDiffusion3Pipeline.encode_prompt``: penultimate CLIP-L and
  CLIP-G hidden states concatenated, zero-padded to T5 width and stacked with T5 tokens; the pooled
  projections of both CLIPs are the ``pooled`` vector (which also conditions the discriminator
  heads). Without T5 (``drop_t5``) its tokens are zeros, as diffusers does;
- the flow-matching schedule with the scheduler's ``shift`` (``prediction_type = "flow"``);
- feature maps from ``transformer_blocks``: a block returns ``(encoder_hidden_states,
  hidden_states)`` (the last one ``(None, hidden_states)``); image tokens ``(B, N, C)`` are
  reshaped to ``(B, C, H/p, W/p)``;
- the VAE with its ``scaling_factor`` and ``shift_factor``;
- the diffusers export (``dmdx export``): a ``StableDiffusion3Pipeline`` folder or the student's
  LoRA for its ``load_lora_weights``, with a stochastic ``FlowMatchEulerDiscreteScheduler`` that
  replays the student's sampler (:func:`student_flow_scheduler`).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmdx_lightning.schedules import FlowMatchSchedule
from dmdx_lightning.teachers.base import Conditioning
from dmdx_lightning.teachers.diffusers_base import (CONFIG_KEY, IMAGE_EXAMPLE_PROMPTS, JOINT_ATTENTION_LORA_TARGETS,
                                                    DiffusersTeacher, network_dtype, parse_dtype)

__all__ = ["CONFIG_KEY", "SD3Teacher", "parse_dtype", "student_flow_scheduler"]


def student_flow_scheduler(base_config: dict, timesteps: Sequence[float]):
    """A stock ``FlowMatchEulerDiscreteScheduler`` that replays the student's sampler.

    Our few-step sampler (:meth:`~dmdx_lightning.teachers.base.Teacher.sample_student`, DMD2)
    predicts ``x0`` and re-noises it with FRESH noise to the next student time; the scheduler
    with ``stochastic_sampling=True`` does exactly that (``x_s = (1 - s) x0 + s * noise``), drawing
    its noise from torch's global generator. It has ``shift: 1.0`` so that the student's times,
    passed as ``sigmas=...``, are used verbatim; when they are evenly spaced from 1 (e.g.
    ``[1, 0.75, 0.5, 0.25]``, or one step) ``shift_terminal`` makes even the default
    ``num_inference_steps=N`` call reproduce them.

    Returns ``(scheduler, default_call_exact)``: whether ``set_timesteps(len(timesteps))``
    alone reproduces the times (else pass ``sigmas=timesteps``).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    ts = [float(t) for t in timesteps]
    n = len(ts)
    config = {k: v for k, v in base_config.items() if not k.startswith("_")}
    config.update(shift=1.0, use_dynamic_shifting=False, stochastic_sampling=True, shift_terminal=None,
                  use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
                  invert_sigmas=False)
    evenly = n > 1 and abs(ts[0] - 1.0) < 1e-6 and all(
        abs(t - (1.0 - i * (1.0 - ts[-1]) / (n - 1))) < 1e-6 for i, t in enumerate(ts))
    if evenly:
        config["shift_terminal"] = ts[-1]  # stretch diffusers' linspace(1, 1/1000) to end at ts[-1]
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    probe = FlowMatchEulerDiscreteScheduler.from_config(config)
    probe.set_timesteps(n)
    exact = bool(torch.allclose(probe.sigmas[:-1].double(), torch.tensor(ts, dtype=torch.float64), atol=1e-6))
    return scheduler, exact


class SD3Teacher(DiffusersTeacher):
    """SD3-Medium, SD3.5-Medium/Large (``StableDiffusion3Pipeline`` layout) as a distillation teacher.

    Args:
        pretrained_model_name_or_path: hub id (e.g. ``stabilityai/stable-diffusion-3-medium-diffusers``)
            or a local pipeline folder with ``transformer/``, ``vae/``, ``text_encoder*/``,
            ``tokenizer*/`` and ``scheduler/`` subfolders.
        revision: hub revision (branch, tag or commit) of every component.
        variant: weight file variant of the models (e.g. ``fp16``); ``None`` for the default files.
        torch_dtype: ``float32 | bfloat16 | float16``: dtype every frozen part is loaded in.
        trainable_dtype: dtype of the trainable copies in ``full`` mode (``None``: same as
            ``torch_dtype``). ``float32`` keeps fp32 master weights for the optimizer while the
            frozen teacher stays in ``torch_dtype``; bf16 compute comes from the trainer's
            ``precision: bf16-mixed``. In ``lora`` mode the adapters are always float32
            (``Teacher.setup_roles``; peft alone would create them in ``torch_dtype``).
        drop_t5: do not load T5 (``text_encoder_3``), saving ~9 GB in bf16 for SD3; its tokens
            become zeros, exactly as diffusers' ``text_encoder_3=None`` (a quality cost; the
            exported pipeline must then be run without T5 too).
        max_sequence_length: T5 tokens per prompt (256 = the diffusers pipeline default, so the
            exported pipeline's default call sees the same conditioning).
        resolution: image size in pixels; latents are ``resolution / vae_scale_factor`` wide.
        sample_steps: Euler steps of the teacher's own ODE sampler (ODE pairs, evaluation).
        cfg_scale: the teacher's default guidance scale (7.0 for SD3-Medium, 3.5-4.5 for SD3.5).
        **kwargs: :class:`~dmdx_lightning.teachers.base.Teacher` options: ``mode`` (``full`` or
            ``lora``), ``lora_rank``, ``lora_alpha``, ``lora_target_modules`` (default: the
            attention projections of both streams, as diffusers' SD3 LoRA scripts),
            ``gradient_checkpointing``.
    """

    family = "sd3"
    prediction_type = "flow"
    pipeline_name = "SD3"
    pipeline_layout = "transformer/, vae/, text_encoder*/, tokenizer*/, scheduler/"
    export_formats = ("pipeline", "lora")
    # attention projections of the image and the text stream: diffusers' SD3 LoRA default, so the
    # exported adapter loads with StableDiffusion3Pipeline.load_lora_weights
    default_lora_targets = JOINT_ATTENTION_LORA_TARGETS
    example_prompts: tuple[str, ...] = IMAGE_EXAMPLE_PROMPTS

    @classmethod
    def check_scheduler(cls, config: dict) -> str | None:
        problem = cls.flow_match_scheduler_problem(config, "SD3Teacher")
        if problem:
            return problem
        if config.get("use_dynamic_shifting"):
            return "uses resolution-dependent shifting, which SD3Teacher does not implement (SD3 and SD3.5 use a fixed `shift`)"
        return None

    def __init__(
        self,
        pretrained_model_name_or_path: str = "stabilityai/stable-diffusion-3-medium-diffusers",
        revision: str | None = None,
        variant: str | None = None,
        torch_dtype: str = "float32",
        trainable_dtype: str | None = None,
        drop_t5: bool = False,
        max_sequence_length: int = 256,
        resolution: int = 1024,
        sample_steps: int = 28,
        cfg_scale: float = 7.0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.set_source(pretrained_model_name_or_path, revision, variant, torch_dtype, trainable_dtype)
        self.drop_t5 = drop_t5
        self.max_sequence_length = max_sequence_length
        self.sample_steps, self.cfg_scale = int(sample_steps), float(cfg_scale)

        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        self.scheduler_config = dict(self._load(FlowMatchEulerDiscreteScheduler, "scheduler", model=False).config)
        problem = self.check_scheduler(self.scheduler_config)
        if problem:
            raise ValueError(f"{self.pretrained_model_name_or_path}/scheduler {problem}")
        self.schedule = FlowMatchSchedule(shift=float(self.scheduler_config.get("shift", 1.0)),
                                          num_train_timesteps=int(self.scheduler_config["num_train_timesteps"]))
        self.tokenizer = self._load(CLIPTokenizer, "tokenizer", model=False)
        self.tokenizer_2 = self._load(CLIPTokenizer, "tokenizer_2", model=False)
        frozen = dict(text_encoder=self._load(CLIPTextModelWithProjection, "text_encoder"),
                      text_encoder_2=self._load(CLIPTextModelWithProjection, "text_encoder_2"),
                      vae=self._load(AutoencoderKL, "vae"))
        self.tokenizer_3 = None
        if not drop_t5:
            self.tokenizer_3 = self._load(T5TokenizerFast, "tokenizer_3", model=False)
            frozen["text_encoder_3"] = self._load(T5EncoderModel, "text_encoder_3")
        for name, module in frozen.items():
            setattr(self, name, module.requires_grad_(False).eval())
        if drop_t5:
            self.text_encoder_3 = None
        transformer = self._load(SD3Transformer2DModel, "transformer")
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.patch_size = transformer.config.patch_size
        if resolution % (self.vae_scale_factor * self.patch_size):
            raise ValueError(f"resolution {resolution} must be a multiple of vae_scale_factor x patch_size = "
                             f"{self.vae_scale_factor * self.patch_size}")
        self.resolution = resolution
        self.setup_roles(transformer)

    def _load(self, cls, subfolder: str, model: bool = True):
        hint = " or set drop_t5: true to run without T5" if subfolder.endswith("_3") else ""
        return self.load_component(cls, subfolder, model, missing_hint=hint)

    # ------------------------------------------------------------------ prompts
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """``StableDiffusion3Pipeline.encode_prompt`` for one prompt per sample (no CFG doubling)."""
        prompts = list(prompts)
        device = self.denoiser_device
        clip_tokens, pooled = [], []
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            # both CLIPs use the first tokenizer's length, as the pipeline does
            ids = tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(device)
            out = encoder(ids, output_hidden_states=True)
            pooled.append(out[0])
            clip_tokens.append(out.hidden_states[-2].to(self.text_encoder.dtype))
        clip = torch.cat(clip_tokens, dim=-1)
        t5 = self._t5_tokens(prompts, device)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return Conditioning(prompt_embeds=torch.cat([clip, t5], dim=-2), pooled=torch.cat(pooled, dim=-1))

    def _t5_tokens(self, prompts: list[str], device) -> Tensor:
        if self.text_encoder_3 is None:
            width = self.denoiser.config.joint_attention_dim
            return torch.zeros(len(prompts), self.max_sequence_length, width, device=device,
                               dtype=self.text_encoder.dtype)
        ids = self.tokenizer_3(prompts, padding="max_length", max_length=self.max_sequence_length,
                               truncation=True, add_special_tokens=True, return_tensors="pt").input_ids
        return self.text_encoder_3(ids.to(device))[0].to(self.text_encoder_3.dtype)

    # ------------------------------------------------------------------ network
    def model_output(self, net: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        dtype = network_dtype(net)
        out = net(
            hidden_states=x_t.to(dtype),
            # float32 timesteps as the pipeline passes them (bf16 cannot tell 999 from 1000)
            timestep=self.schedule.model_timestep(t).float(),
            encoder_hidden_states=cond.prompt_embeds.to(dtype),
            pooled_projections=cond.pooled.to(dtype),
            return_dict=False,
        )[0]
        return out.to(x_t.dtype)

    def feature_blocks(self, net: nn.Module) -> Sequence[nn.Module]:
        return net.transformer_blocks

    def block_to_map(self, output, x_t: Tensor) -> Tensor:
        hidden = output[1]  # (encoder_hidden_states or None, hidden_states)
        b, n, c = hidden.shape
        h, w = x_t.shape[-2] // self.patch_size, x_t.shape[-1] // self.patch_size
        if n != h * w:
            raise RuntimeError(f"SD3 block gave {n} image tokens for a {h}x{w} patch grid")
        return hidden.transpose(1, 2).reshape(b, c, h, w)

    # ------------------------------------------------------------------ export
    @property
    def pipeline_class(self):
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline

    def diffusers_pipeline(self, transformer: nn.Module, scheduler):
        """A ``StableDiffusion3Pipeline`` of this teacher's components around ``transformer``."""
        return self.pipeline_class(
            transformer=transformer, scheduler=scheduler, vae=self.vae,
            text_encoder=self.text_encoder, tokenizer=self.tokenizer,
            text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2,
            text_encoder_3=self.text_encoder_3, tokenizer_3=self.tokenizer_3)

    def student_scheduler(self, timesteps: Sequence[float]):
        scheduler, exact = student_flow_scheduler(self.scheduler_config, timesteps)
        ts = [float(t) for t in timesteps]
        call = {"num_inference_steps": len(ts), "guidance_scale": 1.0, **({} if exact else {"sigmas": ts})}
        # what differs from the pipeline's defaults must be passed too (as SDXL's export does)
        if self.resolution != self.denoiser.config.sample_size * self.vae_scale_factor:
            call.update(height=self.resolution, width=self.resolution)
        if self.max_sequence_length != 256:  # StableDiffusion3Pipeline.__call__'s default
            call["max_sequence_length"] = self.max_sequence_length
        return scheduler, {
            **self.pipeline_info(), "sigmas": ts, "default_call_exact": exact, "call": call,
            "scheduler": {k: v for k, v in scheduler.config.items() if not k.startswith("_")},
            "max_sequence_length": self.max_sequence_length, "t5_dropped": self.drop_t5}

    # ------------------------------------------------------------------ VAE
    def decode(self, latents: Tensor) -> Tensor:
        """As the pipeline decodes; differentiable: ADP's pixel discriminator trains the generator
        through it (under ``no_grad``, as before, D2's generator loss had no effect on SD3)."""
        cfg = self.vae.config
        z = latents / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        return self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0].float().clamp(-1, 1)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        cfg = self.vae.config
        z = self.vae.encode(images.to(self.vae.dtype)).latent_dist.sample()
        return ((z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor).float()
