"""Stable Diffusion XL teacher over diffusers' components (UNet, epsilon prediction, discrete VP schedule).

The teacher is loaded from a ``StableDiffusionXLPipeline`` folder or hub id (``unet/``, ``vae/``,
``text_encoder/`` (CLIP ViT-L), ``text_encoder_2/`` (OpenCLIP bigG with projection), their
tokenizers, ``scheduler/``). Only what differs from the
:class:`~dmdx_lightning.teachers.base.Teacher` base lives here:

- prompt encoding exactly as ``StableDiffusionXLPipeline.encode_prompt``: the penultimate hidden
  states of both encoders concatenated (``prompt_embeds``), the pooled projection of the second
  (``pooled``, which also conditions the discriminator heads), plus the micro-conditioning
  ``time_ids`` = (original size, crop top-left, target size). CFG's unconditional branch is what
  the pipeline uses without a negative prompt: zeros for SDXL base (``force_zeros_for_empty_prompt``);
- the discrete VP schedule of the scheduler's betas (scaled-linear for SDXL) with the
  ``trailing`` time mapping (:class:`~dmdx_lightning.schedules.VPSchedule`): continuous ``t`` is
  fed to the UNet as timestep ``1000 t - 1``, so ``t = 1`` is 999 (DMD2's one-step input), evenly
  spaced student times ``[1, .75, .5, .25]`` are DMD2's ``[999, 749, 499, 249]`` and ``t = 0`` is
  clean data. The epsilon output becomes ``(x0_pred, eps_pred)`` once, in the base;
- feature maps from the UNet's blocks: ``down_blocks`` (each returns ``(hidden_states,
  skip_states)``), ``mid_block``, ``up_blocks``, indexed in that order. SDXL has 3 + 1 + 3 = 7:
  0-2 down (64, 32, 32 latent pixels at 1024 px), 3 mid (32), 4-6 up (64, 128, 128). The configs'
  default ``[1, 2, 3]`` reads the encoder half at 32x32, so the forward stops after the mid block;
- LoRA on the attention projections ``to_q, to_k, to_v, to_out.0`` (diffusers' SDXL LoRA scripts),
  so the student's adapter loads with ``StableDiffusionXLPipeline.load_lora_weights``;
- the VAE with its ``scaling_factor`` (and ``latents_mean`` / ``latents_std`` where configured), an
  optional separate VAE (e.g. ``madebyollin/sdxl-vae-fp16-fix``);
- the diffusers export (``dmdx export``): a ``StableDiffusionXLPipeline`` folder or the student's
  LoRA, with an ``LCMScheduler`` that replays the student's sampler (:func:`student_lcm_scheduler`).

Stable Diffusion 1.x / 2.x (``StableDiffusionPipeline``) is the same UNet family with one text
encoder and no added conditioning: :class:`StableDiffusionTeacher` overrides only the steps that
differ (text encoders, the UNet check, prompt encoding, the added conditioning, the pipeline class).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from dmdx_lightning.errors import ConfigError
from dmdx_lightning.schedules import VPSchedule
from dmdx_lightning.teachers.base import Conditioning
from dmdx_lightning.teachers.diffusers_base import CONFIG_KEY, IMAGE_EXAMPLE_PROMPTS, DiffusersTeacher, network_dtype

#: the config key of the optional separate VAE
VAE_KEY = "model.init_args.teacher.init_args.vae"

#: diffusers' scheduler ``prediction_type`` -> ours (:mod:`dmdx_lightning.schedules`)
_PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v"}

#: LCMScheduler's boundary condition ``c_skip x + c_out x0`` (consistency models) with this scaling is
#: ``c_skip < 3e-9``, ``c_out = 1`` in float32 for every timestep >= 1: a plain "predict x0, re-noise"
#: step, which is our student sampler (DMD2's)
_NO_BOUNDARY_CONDITION = 1.0e4


def student_timestep_indices(schedule: VPSchedule, timesteps: Sequence[float]) -> list[int]:
    """The UNet timesteps of the student's times; they must be integer training timesteps >= 1.

    A diffusers discrete scheduler reads ``alphas_cumprod[timestep]`` at integer timesteps only, so
    the export can replay exactly the students whose times are on that grid.
    """
    out = []
    for t in timesteps:
        index = float(schedule.model_timestep(torch.tensor(float(t), dtype=torch.float64)))
        if abs(index - round(index)) > 1e-4 or not 1 <= round(index) < schedule.num_train_timesteps:
            grid = [round(schedule.timestep_to_t(k), 6) for k in (999, 749, 499, 249)]
            raise ValueError(
                f"student time {t} is UNet timestep {index:.3f}; a diffusers SDXL pipeline can only replay integer "
                f"timesteps in [1, {schedule.num_train_timesteps - 1}]. Train with times t = (k + 1) / "
                f"{schedule.num_train_timesteps} (model.init_args.student_timesteps, e.g. {grid} for DMD2's "
                f"[999, 749, 499, 249]), or a student_steps that divides {schedule.num_train_timesteps}")
        out.append(int(round(index)))
    return out


def student_lcm_scheduler(schedule: VPSchedule, prediction_type: str, timesteps: Sequence[float]):
    """A stock ``LCMScheduler`` that replays the student's sampler.

    Our few-step sampler (:meth:`~dmdx_lightning.teachers.base.Teacher.sample_student`, DMD2)
    converts the UNet's output to ``x0`` at the student's timestep, then re-noises it with FRESH
    noise to the next one (``x_s = alpha_s x0 + sigma_s noise``) and returns ``x0`` after the last.
    ``LCMScheduler.step`` does exactly that, with the noise from the pipeline's ``generator``; its
    consistency-model boundary condition is switched off (``timestep_scaling``). With
    ``original_inference_steps`` = the number of student steps, the default call
    ``num_inference_steps=N`` gives the evenly spaced timesteps ``1000 k / N - 1`` (DMD2's
    ``[999, 749, 499, 249]`` for 4, 999 for 1); other times need ``timesteps=[...]``.

    Returns ``(scheduler, indices, default_call_exact)``.
    """
    from diffusers import LCMScheduler

    indices = student_timestep_indices(schedule, timesteps)
    scheduler = LCMScheduler(
        num_train_timesteps=schedule.num_train_timesteps, beta_start=schedule.beta_start, beta_end=schedule.beta_end,
        beta_schedule=schedule.beta_schedule, prediction_type=prediction_type, original_inference_steps=len(indices),
        timestep_scaling=_NO_BOUNDARY_CONDITION, clip_sample=False, thresholding=False, set_alpha_to_one=True,
        # unused by LCMScheduler; StableDiffusionPipeline rewrites any other value, with a deprecation warning
        steps_offset=1)
    probe = LCMScheduler.from_config(scheduler.config)
    probe.set_timesteps(len(indices))
    return scheduler, indices, probe.timesteps.tolist() == indices


class SDXLTeacher(DiffusersTeacher):
    """SDXL base (and fine-tunes with its layout: ``StableDiffusionXLPipeline``) as a distillation teacher.

    Args:
        pretrained_model_name_or_path: hub id (``stabilityai/stable-diffusion-xl-base-1.0``) or a
            local pipeline folder with ``unet/``, ``vae/``, ``text_encoder/``, ``text_encoder_2/``,
            ``tokenizer/``, ``tokenizer_2/`` and ``scheduler/`` subfolders.
        revision: hub revision (branch, tag or commit) of the pipeline's components.
        variant: weight file variant of the pipeline's models (``fp16`` for SDXL base's half files);
            ``None`` for the default files.
        torch_dtype: ``float32 | bfloat16 | float16``: dtype every frozen part is loaded in. With
            ``float16`` the pipeline's own VAE is kept in float32 when its config says
            ``force_upcast`` (SDXL's VAE overflows in fp16), unless a separate ``vae`` is given.
        trainable_dtype: dtype of the trainable copies in ``full`` mode (``None``: ``torch_dtype``);
            ``float32`` keeps fp32 master weights while the frozen teacher stays in ``torch_dtype``.
            In ``lora`` mode the adapters are always float32 (``Teacher.setup_roles``).
        vae: a separately stored ``AutoencoderKL`` (hub id or folder) used instead of the
            pipeline's ``vae/``, e.g. ``madebyollin/sdxl-vae-fp16-fix`` for fp16 decoding. It is
            loaded in ``torch_dtype`` and written into the exported pipeline.
        resolution: image size in pixels (``None``: the UNet's ``sample_size`` times the VAE's
            downsampling, 1024 for SDXL base, as the pipeline's default); latents are
            ``resolution / 8`` wide.
        original_size, crops_coords_top_left, target_size: SDXL's micro-conditioning
            (``add_time_ids``); ``None`` sizes are ``(resolution, resolution)``, the pipeline's
            defaults, so the exported pipeline's default call conditions the same way.
        force_zeros_for_empty_prompt: CFG's unconditional branch is zero embeddings (``True``) or
            the encoded empty prompt (``False``); ``None`` reads the pipeline's ``model_index.json``
            (``true`` for SDXL base), as ``StableDiffusionXLPipeline`` does without a negative prompt.
        sample_steps: steps of the teacher's own ODE sampler (DDIM, "trailing" timesteps, ending at
            the data): ODE pairs, reference grids. 25 = the paper's teacher row (25 steps, 50 NFE).
        cfg_scale: the teacher's default guidance scale (5.0 = diffusers' SDXL default).
        **kwargs: :class:`~dmdx_lightning.teachers.base.Teacher` options: ``mode`` (``full`` or
            ``lora``), ``lora_rank``, ``lora_alpha``, ``lora_target_modules`` (default:
            ``to_q, to_k, to_v, to_out.0`` as diffusers' SDXL LoRA scripts),
            ``gradient_checkpointing``.
    """

    family = "sdxl"
    prediction_type = "eps"  # SDXL base; a v-prediction fine-tune is read from its scheduler config
    pipeline_name = "SDXL"
    pipeline_layout = "unet/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/"
    export_formats = ("pipeline", "lora")
    # every attention projection of the UNet's transformer blocks (self- and cross-attention):
    # diffusers' SDXL LoRA default, so the adapter loads with StableDiffusionXLPipeline.load_lora_weights
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    example_prompts: tuple[str, ...] = IMAGE_EXAMPLE_PROMPTS

    def __init__(
        self,
        pretrained_model_name_or_path: str = "stabilityai/stable-diffusion-xl-base-1.0",
        revision: str | None = None,
        variant: str | None = None,
        torch_dtype: str = "float32",
        trainable_dtype: str | None = None,
        vae: str | None = None,
        resolution: int | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        force_zeros_for_empty_prompt: bool | None = None,
        sample_steps: int = 25,
        cfg_scale: float = 5.0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        unet = self._load_pipeline(pretrained_model_name_or_path, revision, variant, torch_dtype, trainable_dtype, vae,
                                   resolution, sample_steps, cfg_scale)
        if force_zeros_for_empty_prompt is None:
            force_zeros_for_empty_prompt = bool(self._pipeline_config().get("force_zeros_for_empty_prompt", True))
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        size = (self.resolution, self.resolution)
        self.original_size = tuple(original_size or size)
        self.crops_coords_top_left = tuple(crops_coords_top_left)
        self.target_size = tuple(target_size or size)
        self.add_time_ids = [*self.original_size, *self.crops_coords_top_left, *self.target_size]
        # the pipeline's own check: 6 numbers of addition_time_embed_dim each + the pooled projection
        expected = unet.add_embedding.linear_1.in_features
        given = unet.config.addition_time_embed_dim * len(self.add_time_ids) + self.text_encoder_2.config.projection_dim
        if expected != given:
            raise ValueError(f"the UNet expects an added embedding of {expected} values, but {len(self.add_time_ids)} "
                             f"micro-conditioning numbers and text_encoder_2's projection make {given}")
        self.setup_roles(unet)

    # ------------------------------------------------------------------ loading
    def _load_pipeline(self, pretrained_model_name_or_path: str, revision: str | None, variant: str | None,
                       torch_dtype: str, trainable_dtype: str | None, vae: str | None, resolution: int | None,
                       sample_steps: int, cfg_scale: float) -> nn.Module:
        """What every pipeline of this file loads alike (SDXL, and SD 1.x / 2.x in
        :class:`StableDiffusionTeacher`): the schedule and prediction type of ``scheduler/``, the
        text encoders (:meth:`_load_text_encoders`), the VAE, the resolution; returns the UNet,
        checked by :meth:`_check_unet`, for ``setup_roles``."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        self.set_source(pretrained_model_name_or_path, revision, variant, torch_dtype, trainable_dtype)
        self.vae_source = vae
        self.sample_steps, self.cfg_scale = int(sample_steps), float(cfg_scale)
        self.schedule, self.prediction_type = self._schedule(
            dict(self.load_component(DDPMScheduler, "scheduler", model=False).config))
        self._load_text_encoders()
        if vae is None:
            self.vae = self.load_component(AutoencoderKL, "vae")
            if self.torch_dtype == torch.float16 and self.vae.config.force_upcast:
                self.vae.to(torch.float32)  # as the pipeline does before decoding
        else:
            self.vae = self.load_component(AutoencoderKL, None, source=str(vae), source_key=VAE_KEY)
        self.vae.requires_grad_(False).eval()
        unet = self.load_component(UNet2DConditionModel, "unet")
        self._check_unet(unet)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if resolution is None:
            resolution = unet.config.sample_size * self.vae_scale_factor
        if resolution % self.vae_scale_factor:
            raise ValueError(f"resolution {resolution} must be a multiple of the VAE's factor {self.vae_scale_factor}")
        self.resolution = int(resolution)
        return unet

    def _load_text_encoders(self) -> None:
        """SDXL's two CLIPs: ViT-L (``text_encoder``) and OpenCLIP bigG with projection (``text_encoder_2``)."""
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        one = "; a pipeline with one text encoder (SD 1.x / 2.x) is StableDiffusionTeacher's"
        self.tokenizer = self.load_component(CLIPTokenizer, "tokenizer", model=False)
        self.tokenizer_2 = self.load_component(CLIPTokenizer, "tokenizer_2", model=False, missing_hint=one)
        self.text_encoder = self.load_component(CLIPTextModel, "text_encoder").requires_grad_(False).eval()
        self.text_encoder_2 = self.load_component(CLIPTextModelWithProjection, "text_encoder_2", missing_hint=one)
        self.text_encoder_2.requires_grad_(False).eval()

    @classmethod
    def unet_problem(cls, addition_embed_type: str | None) -> str | None:
        """What makes a UNet with this ``addition_embed_type`` another family's (``None``: nothing)."""
        if addition_embed_type != "text_time":
            return (f"has addition_embed_type={addition_embed_type!r}, not SDXL's 'text_time' (SD 1.x / 2.x "
                    "pipelines are StableDiffusionTeacher's)")
        return None

    @classmethod
    def check_options(cls, options, key: str = "model.init_args.teacher.init_args") -> None:
        """A local pipeline folder whose UNet is the other family's (SDXL vs SD 1.x / 2.x), from its
        ``unet/config.json`` alone, before any weight loads."""
        source = options.get("pretrained_model_name_or_path")
        config = Path(str(source)).expanduser() / "unet" / "config.json" if source else None
        if config is None or not config.is_file():
            return  # a Hub id (checked when loaded), or a folder DiffusersTeacher.check_options reports
        problem = cls.unet_problem(json.loads(config.read_text()).get("addition_embed_type"))
        if problem:
            raise ConfigError(f"{key}.pretrained_model_name_or_path", str(source), f"its unet/ {problem}",
                              f"{cls.__name__} trains {cls.pipeline_name} pipelines: use the teacher class of this "
                              "pipeline's family, or another folder.")

    def _check_unet(self, unet: nn.Module) -> None:
        problem = self.unet_problem(unet.config.addition_embed_type)
        if problem:
            raise ValueError(f"{self.pretrained_model_name_or_path}/unet {problem}: {CONFIG_KEY} must name a "
                             f"{self.pipeline_name} pipeline")

    @classmethod
    def check_scheduler(cls, config: dict) -> str | None:
        if "FlowMatch" in config.get("_class_name", ""):
            return f"is a {config['_class_name']}; {cls.__name__} trains discrete-time (DDPM-family) pipelines"
        if config.get("trained_betas") is not None or config.get("rescale_betas_zero_snr"):
            return (f"sets trained_betas or rescale_betas_zero_snr; {cls.__name__} reads beta_start / beta_end / "
                    "beta_schedule only")
        if config.get("prediction_type", "epsilon") not in _PREDICTION_TYPES:
            return f"has prediction_type {config['prediction_type']!r}, not one of {sorted(_PREDICTION_TYPES)}"
        return None

    @classmethod
    def _schedule(cls, config: dict) -> tuple[VPSchedule, str]:
        """The training schedule and prediction type of the pipeline's scheduler config."""
        problem = cls.check_scheduler(config)
        if problem:
            raise ValueError(f"the scheduler {problem}")
        kind = config.get("prediction_type", "epsilon")
        schedule = VPSchedule(beta_start=config["beta_start"], beta_end=config["beta_end"],
                              beta_schedule=config["beta_schedule"], num_train_timesteps=int(config["num_train_timesteps"]),
                              time_mapping="trailing")
        return schedule, _PREDICTION_TYPES[kind]

    def _pipeline_config(self) -> dict:
        """``model_index.json`` of the pipeline (local folder or hub cache)."""
        local = Path(self.pretrained_model_name_or_path).expanduser()
        if local.is_dir():
            path = local / "model_index.json"
            if not path.is_file():
                raise FileNotFoundError(f"{local} has no model_index.json: {CONFIG_KEY} must name a diffusers SDXL "
                                        f"pipeline folder ({self.pipeline_layout}, model_index.json)")
            return json.loads(path.read_text())
        from diffusers import StableDiffusionXLPipeline

        try:
            return dict(StableDiffusionXLPipeline.load_config(self.pretrained_model_name_or_path, revision=self.revision))
        except (OSError, ValueError) as e:
            raise OSError(f"could not read model_index.json of SDXL teacher {self.pretrained_model_name_or_path!r} "
                          f"(set by {CONFIG_KEY}): {e}") from e

    # ------------------------------------------------------------------ prompts
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """``StableDiffusionXLPipeline.encode_prompt`` for one prompt per sample (no CFG doubling)."""
        prompts = list(prompts)
        device = self.denoiser_device
        hidden, pooled = [], None
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(device)
            out = encoder(ids, output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:  # the first encoder with a projection: text_encoder_2
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        prompt_embeds = torch.cat(hidden, dim=-1).to(self.text_encoder_2.dtype)
        time_ids = torch.tensor([self.add_time_ids], dtype=prompt_embeds.dtype, device=device).repeat(len(prompts), 1)
        return Conditioning(prompt_embeds=prompt_embeds, pooled=pooled.to(prompt_embeds.dtype), time_ids=time_ids)

    def unconditional(self) -> Conditioning:
        """The pipeline's CFG branch without a negative prompt: zero text embeddings when
        ``force_zeros_for_empty_prompt`` (SDXL base), else the encoded empty prompt; the
        micro-conditioning is the prompt's (the pipeline's ``negative_add_time_ids``)."""
        empty = self.encode_prompts([""])
        if not self.force_zeros_for_empty_prompt:
            return empty
        return Conditioning(prompt_embeds=torch.zeros_like(empty.prompt_embeds), pooled=torch.zeros_like(empty.pooled),
                            time_ids=empty.time_ids)

    # ------------------------------------------------------------------ network
    def model_output(self, net: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        dtype = network_dtype(net)
        out = net(
            x_t.to(dtype),
            # float32 timesteps (bf16 cannot tell 998 from 999); 1000 t - 1 (VPSchedule "trailing")
            self.schedule.model_timestep(t).float(),
            encoder_hidden_states=cond.prompt_embeds.to(dtype),
            added_cond_kwargs=self._added_cond_kwargs(cond, dtype),
            return_dict=False,
        )[0]
        return out.to(x_t.dtype)

    def _added_cond_kwargs(self, cond: Conditioning, dtype: torch.dtype) -> dict | None:
        """SDXL's added conditioning: the pooled projection and the micro-conditioning numbers."""
        return {"text_embeds": cond.pooled.to(dtype), "time_ids": cond.time_ids.to(dtype)}

    def feature_blocks(self, net: nn.Module) -> Sequence[nn.Module]:
        """``down_blocks``, ``mid_block``, ``up_blocks`` in forward order (module docstring)."""
        return [*net.down_blocks, net.mid_block, *net.up_blocks]

    def block_to_map(self, output, x_t: Tensor) -> Tensor:
        # a down block returns (hidden_states, skip connections); mid and up blocks the map itself
        return output[0] if isinstance(output, tuple) else output

    # ------------------------------------------------------------------ export
    denoiser_component = "unet"  # StableDiffusionXLPipeline.save_lora_weights(unet_lora_layers=...)

    @property
    def pipeline_class(self):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    def diffusers_pipeline(self, unet: nn.Module, scheduler):
        """A ``StableDiffusionXLPipeline`` of this teacher's components around ``unet``."""
        return self.pipeline_class(
            vae=self.vae, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2,
            tokenizer=self.tokenizer, tokenizer_2=self.tokenizer_2, unet=unet, scheduler=scheduler,
            force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt)

    def student_scheduler(self, timesteps: Sequence[float]):
        scheduler, indices, exact = student_lcm_scheduler(self.schedule, self.pipeline_prediction_type, timesteps)
        call = {"num_inference_steps": len(indices), "guidance_scale": 1.0}
        if not exact:
            call["timesteps"] = indices
        size = (self.resolution, self.resolution)
        if size != (self.denoiser.config.sample_size * self.vae_scale_factor,) * 2:
            call.update(height=self.resolution, width=self.resolution)
        call.update(self._conditioning_call())
        return scheduler, {
            **self.pipeline_info(), "timesteps": indices, "default_call_exact": exact, "call": call,
            "scheduler": {k: v for k, v in scheduler.config.items() if not k.startswith("_")}}

    def _conditioning_call(self) -> dict:
        """Pipeline arguments for SDXL's micro-conditioning where it differs from the pipeline's defaults."""
        call, size = {}, (self.resolution, self.resolution)
        if self.original_size != size:
            call["original_size"] = list(self.original_size)
        if self.crops_coords_top_left != (0, 0):
            call["crops_coords_top_left"] = list(self.crops_coords_top_left)
        if self.target_size != size:
            call["target_size"] = list(self.target_size)
        return call

    @property
    def pipeline_prediction_type(self) -> str:
        return {v: k for k, v in _PREDICTION_TYPES.items()}[self.prediction_type]

    # ------------------------------------------------------------------ VAE
    def _latent_stats(self):
        cfg = self.vae.config
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is None or std is None:
            return None
        shape = (1, len(mean), 1, 1)
        return torch.tensor(mean).view(shape), torch.tensor(std).view(shape)

    def decode(self, latents: Tensor) -> Tensor:
        """As the pipeline decodes; differentiable (the pixel discriminator's generator loss)."""
        scale, stats = self.vae.config.scaling_factor, self._latent_stats()
        if stats is None:
            z = latents / scale
        else:
            mean, std = (s.to(latents) for s in stats)
            z = latents * std / scale + mean
        return self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0].float().clamp(-1, 1)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        scale, stats = self.vae.config.scaling_factor, self._latent_stats()
        z = self.vae.encode(images.to(self.vae.dtype)).latent_dist.sample().float()
        if stats is None:
            return z * scale
        mean, std = (s.to(z) for s in stats)
        return (z - mean) * scale / std


class StableDiffusionTeacher(SDXLTeacher):
    """Stable Diffusion 1.x / 2.x (``StableDiffusionPipeline``) as a distillation teacher: SDXL's
    UNet family with one text encoder and no added conditioning.

    What differs from :class:`SDXLTeacher`, and nothing else: one CLIP text encoder whose last
    hidden state (after its final layer norm) is ``prompt_embeds``, as
    ``StableDiffusionPipeline.encode_prompt`` without ``clip_skip`` (SD 2.x's "penultimate layer" is
    built into its checkpoint: its OpenCLIP-H text encoder has 23 of 24 layers); its pooled output
    (the end-of-text token) conditions the discriminator heads; CFG's unconditional branch is the
    encoded empty prompt (the pipeline's without a negative prompt); the UNet has no added
    embedding. Epsilon (SD 1.5, SD 2.1-base, 512 px) and v-prediction (SD 2.1, 768 px) are read from
    the scheduler config. The export is a ``StableDiffusionPipeline`` without a safety checker (the
    teacher never loads one), or a LoRA for its ``load_lora_weights``.

    Args:
        pretrained_model_name_or_path: hub id (``stable-diffusion-v1-5/stable-diffusion-v1-5``,
            the mirror of the removed ``runwayml/stable-diffusion-v1-5``;
            ``stabilityai/stable-diffusion-2-1``, ...) or a local pipeline folder with ``unet/``,
            ``vae/``, ``text_encoder/``, ``tokenizer/`` and ``scheduler/`` subfolders (a
            ``safety_checker/`` is not read).
        revision: hub revision (branch, tag or commit) of the pipeline's components.
        variant: weight file variant of the pipeline's models (``fp16`` for the half files);
            ``None`` for the default files.
        torch_dtype: ``float32 | bfloat16 | float16``: dtype every frozen part is loaded in (the VAE
            stays float32 under ``float16`` when its config says ``force_upcast``).
        trainable_dtype: dtype of the trainable copies in ``full`` mode (``None``: ``torch_dtype``);
            ``float32`` keeps fp32 master weights while the frozen teacher stays in ``torch_dtype``.
        vae: a separately stored ``AutoencoderKL`` (hub id or folder) used instead of the
            pipeline's ``vae/`` (e.g. ``stabilityai/sd-vae-ft-mse``); written into the export.
        resolution: image size in pixels (``None``: the UNet's ``sample_size`` times the VAE's
            downsampling: 512 for SD 1.5 and 2.1-base, 768 for SD 2.1, as the pipeline's default).
        sample_steps: steps of the teacher's own ODE sampler (DDIM, "trailing" timesteps, ending at
            the data): ODE pairs, reference grids. 50 = the pipeline's default.
        cfg_scale: the teacher's default guidance scale (7.5 = the pipeline's default).
        **kwargs: :class:`~dmdx_lightning.teachers.base.Teacher` options: ``mode`` (``full`` or
            ``lora``), ``lora_rank``, ``lora_alpha``, ``lora_target_modules`` (default:
            ``to_q, to_k, to_v, to_out.0``, as diffusers' LoRA scripts), ``gradient_checkpointing``.
    """

    family = "sd"
    pipeline_name = "Stable Diffusion 1.x / 2.x"
    pipeline_layout = "unet/, vae/, text_encoder/, tokenizer/, scheduler/"
    #: the pipeline has no zeroed unconditional branch: CFG's is the encoded empty prompt
    force_zeros_for_empty_prompt = False

    def __init__(
        self,
        pretrained_model_name_or_path: str = "stable-diffusion-v1-5/stable-diffusion-v1-5",
        revision: str | None = None,
        variant: str | None = None,
        torch_dtype: str = "float32",
        trainable_dtype: str | None = None,
        vae: str | None = None,
        resolution: int | None = None,
        sample_steps: int = 50,
        cfg_scale: float = 7.5,
        **kwargs,
    ) -> None:
        # SDXLTeacher.__init__ is skipped: its options (micro-conditioning, zeroed CFG branch) do not
        # apply, and `super(SDXLTeacher, ...)` keeps them out of this class's --help
        super(SDXLTeacher, self).__init__(**kwargs)
        self.setup_roles(self._load_pipeline(pretrained_model_name_or_path, revision, variant, torch_dtype,
                                             trainable_dtype, vae, resolution, sample_steps, cfg_scale))

    def _load_text_encoders(self) -> None:
        from transformers import CLIPTextModel, CLIPTokenizer

        self.tokenizer = self.load_component(CLIPTokenizer, "tokenizer", model=False)
        self.text_encoder = self.load_component(CLIPTextModel, "text_encoder").requires_grad_(False).eval()

    @classmethod
    def unet_problem(cls, addition_embed_type: str | None) -> str | None:
        if addition_embed_type is not None:
            return (f"has addition_embed_type={addition_embed_type!r}; SD 1.x / 2.x UNets have none (SDXL "
                    "pipelines are SDXLTeacher's)")
        return None

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """``StableDiffusionPipeline.encode_prompt`` (no ``clip_skip``) for one prompt per sample."""
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        device = self.denoiser_device
        # as the pipeline: an attention mask only for text encoders configured to take one
        mask = tokens.attention_mask.to(device) if getattr(self.text_encoder.config, "use_attention_mask", False) else None
        prompt_embeds, pooled = self.text_encoder(tokens.input_ids.to(device), attention_mask=mask, return_dict=False)[:2]
        return Conditioning(prompt_embeds=prompt_embeds.to(self.text_encoder.dtype), pooled=pooled.to(self.text_encoder.dtype))

    def _added_cond_kwargs(self, cond: Conditioning, dtype: torch.dtype) -> None:
        return None

    def _conditioning_call(self) -> dict:
        return {}

    @property
    def pipeline_class(self):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def diffusers_pipeline(self, unet: nn.Module, scheduler):
        """A ``StableDiffusionPipeline`` of this teacher's components around ``unet``; no safety
        checker (the teacher loads none; a user adds the original's back with
        ``safety_checker=..., feature_extractor=...`` when loading)."""
        return self.pipeline_class(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
