"""FLUX.1-dev / FLUX.1-schnell teachers over diffusers' components (double + single-stream MMDiT,
rectified flow, a guidance embedding instead of classifier-free guidance).

The teacher is loaded from a diffusers ``FluxPipeline`` folder or hub id (``transformer/``, ``vae/``,
``text_encoder/`` CLIP-L, ``text_encoder_2/`` T5, their tokenizers, ``scheduler/``). Only what
differs from the :class:`~dmdx_lightning.teachers.base.Teacher` base lives here:

- prompt encoding exactly as ``FluxPipeline.encode_prompt``: T5 tokens are the sequence, CLIP-L's
  pooled output the ``pooled`` vector (which also conditions the discriminator heads); the text
  position ids are zeros, the image ones the latent grid's ``(0, row, col)``;
- latents ``(B, 16, h, w)`` as the VAE gives them, packed into 2x2 patches ``(B, h w / 4, 64)``
  around each transformer call as the pipeline packs them;
- the flow-matching schedule. FLUX.1-dev's scheduler shifts resolution-dependently
  (``use_dynamic_shifting``: ``mu`` from the image token count by ``calculate_shift``, sigmas
  ``exp(mu) t / (1 + (exp(mu) - 1) t)``); the teacher trains at ONE ``resolution``, so this is a
  fixed shift ``exp(mu)`` computed once for it (3.16 at 1024 px). FLUX.1-schnell does not shift;
- the guidance (``guidance``, below);
- feature maps from ``transformer_blocks`` then ``single_transformer_blocks`` (both return
  ``(text tokens, image tokens)``), the image tokens reshaped to ``(B, C, h/2, w/2)``; together they
  hold 99.5% of the 11.9B parameters, which FSDP2 shards and ``compile_blocks`` compiles block by block;
- the VAE with its ``scaling_factor`` and ``shift_factor``;
- the diffusers export: a ``FluxPipeline`` folder or the student's LoRA for its
  ``load_lora_weights``, with the stochastic scheduler of :func:`~dmdx_lightning.teachers.sd3.student_flow_scheduler`
  (dynamic shifting off, so the pipeline's ``mu`` leaves the student's sigmas alone).

Guidance. FLUX.1-dev was guidance-distilled: its transformer takes the guidance scale as an input
(``guidance_embeds``) and one pass at ``guidance = w`` approximates CFG at ``w``; it has no trained
"true" CFG use, though ``FluxPipeline(true_cfg_scale=..., negative_prompt=...)`` runs it. Hence:

- ``guidance: embedded`` (default with a guidance embedding): the real score at ``cfg_scale = w`` is
  ONE pass with ``guidance = w`` (half the cost of CFG). Every other call (the student, the fake
  score, the discriminator's features, and any ``cfg_scale = 1``) runs at ``guidance_scale``, the
  value the exported pipeline is then called with (3.5, ``FluxPipeline``'s default);
- ``guidance: true_cfg``: two passes ``uncond + w (cond - uncond)`` on ``negative_prompt`` (as
  ``true_cfg_scale``), the embedding at ``guidance_scale`` in both (as the pipeline): twice the cost;
- ``guidance: none`` (default without a guidance embedding, i.e. FLUX.1-schnell, which was distilled
  to sample unguided): the real score is the network as it is, so ``cfg_scale`` (the teacher's and
  the method's ``real_cfg_scale``) must be 1. ``embedded`` and ``true_cfg`` are refused there.

Measured (benchmarks/results/flux_guidance.md, ``python benchmarks/flux_guidance.py --steps 2500``): a
tiny ``FluxTransformer2DModel`` guidance-distilled on the exact Gaussian mixture, whose CFG is known
in closed form. The DMD direction's guidance term under the embedding (``net(w) - net(1)``) points
where exact CFG points: per-sample cosine 0.92-0.99 at ``t >= 0.5``, 0.62-0.71 at ``t = 0.3`` (where
the direction is small), as close as true CFG on the same network (0.66-0.97) and with a smaller
error (relative 0.12-0.77 vs 0.35-1.18). It shows the mechanism on a testbed, not FLUX.1-dev's own
accuracy (its distillation is unpublished).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from dmdx_lightning.errors import ConfigError
from dmdx_lightning.schedules import FlowMatchSchedule
from dmdx_lightning.teachers.base import Conditioning
from dmdx_lightning.teachers.diffusers_base import (CONFIG_KEY, IMAGE_EXAMPLE_PROMPTS, JOINT_ATTENTION_LORA_TARGETS,
                                                    DiffusersTeacher, network_dtype)
from dmdx_lightning.teachers.sd3 import student_flow_scheduler

__all__ = ["CONFIG_KEY", "FluxTeacher", "calculate_shift", "pack_latents", "unpack_latents", "latent_image_ids"]

KEY = "model.init_args.teacher.init_args"
#: ``FluxTeacher(guidance=...)`` values (``None``: from the transformer)
GUIDANCE_OPTIONS = ("embedded", "true_cfg", "none")


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FluxPipeline's ``mu``: linear in the packed image token count between the two anchors."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + base_shift - m * base_seq_len


def pack_latents(latents: Tensor) -> Tensor:
    """``(B, C, h, w)`` -> ``(B, h w / 4, 4 C)``: 2x2 patches, as ``FluxPipeline._pack_latents``."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, h: int, w: int) -> Tensor:
    """The inverse of :func:`pack_latents` for a ``h x w`` latent (``FluxPipeline._unpack_latents``)."""
    b, _, c4 = tokens.shape
    x = tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def latent_image_ids(h: int, w: int, device=None, dtype=None) -> Tensor:
    """``(h/2 w/2, 3)`` position ids ``(0, row, col)`` of the packed tokens (``_prepare_latent_image_ids``)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxTeacher(DiffusersTeacher):
    """FLUX.1-dev, FLUX.1-schnell (``FluxPipeline`` layout) as a distillation teacher.

    Args:
        pretrained_model_name_or_path: hub id (``black-forest-labs/FLUX.1-dev`` or ``-schnell``) or a
            local pipeline folder with ``transformer/``, ``vae/``, ``text_encoder*/``, ``tokenizer*/``
            and ``scheduler/`` subfolders.
        revision: hub revision (branch, tag or commit) of every component.
        variant: weight file variant of the models; ``None`` for the default files.
        torch_dtype: ``float32 | bfloat16 | float16``: dtype every frozen part is loaded in.
        trainable_dtype: dtype of the trainable copies in ``full`` mode (``None``: ``torch_dtype``).
        guidance: how the real score is guided at ``cfg_scale = w`` (the module docstring):
            ``embedded`` (one pass with the guidance embedding at ``w``), ``true_cfg`` (two passes
            on ``negative_prompt``) or ``none`` (no guidance, ``cfg_scale`` 1). ``None``: ``embedded``
            where the transformer has a guidance embedding (FLUX.1-dev), else ``none`` (schnell).
        guidance_scale: the guidance embedding's value in every pass that asks for no guidance: the
            student, the fake score, the discriminator's features, both passes of ``true_cfg``; the
            exported pipeline's ``guidance_scale``. 3.5 = ``FluxPipeline``'s default. Without a
            guidance embedding (schnell) the network has no such input and it is unused.
        negative_prompt: the unconditional branch of ``guidance: true_cfg`` (``""``: the empty prompt).
        max_sequence_length: T5 tokens per prompt (512 = ``FluxPipeline``'s default and maximum;
            256 is what schnell's model card uses).
        resolution: image size in pixels; latents are ``resolution / 8`` wide, and the schedule's
            shift is FLUX.1-dev's dynamic shift for this size.
        sample_steps: Euler steps of the teacher's own ODE sampler (28 for dev, 4 for schnell).
        cfg_scale: the teacher's default guidance scale (3.5 for dev: with ``embedded`` the
            embedding's value; must be 1 with ``guidance: none``).
        **kwargs: :class:`~dmdx_lightning.teachers.base.Teacher` options: ``mode`` (``full`` or
            ``lora``), ``lora_rank``, ``lora_alpha``, ``lora_target_modules`` (default: the attention
            projections of both streams, the names ``FluxPipeline.load_lora_weights`` reads),
            ``gradient_checkpointing``.
    """

    family = "flux"
    prediction_type = "flow"
    pipeline_name = "FLUX.1"
    pipeline_layout = "transformer/, vae/, text_encoder*/, tokenizer*/, scheduler/"
    pipeline_classes = ("FluxPipeline",)
    export_formats = ("pipeline", "lora")
    # attention projections of the double blocks' two streams and of the single blocks (whose
    # attn.to_q/k/v these names match too), as diffusers' FLUX LoRA scripts adapt them
    default_lora_targets = JOINT_ATTENTION_LORA_TARGETS
    example_prompts: tuple[str, ...] = IMAGE_EXAMPLE_PROMPTS

    @classmethod
    def check_scheduler(cls, config: dict) -> str | None:
        return cls.flow_match_scheduler_problem(config, "FluxTeacher")

    @staticmethod
    def _transformer_config(options) -> dict | None:
        """The transformer's ``config.json`` from a local folder or a Hub id already in the cache
        (no download at parse time); ``None`` where it cannot be read yet (loading checks it then)."""
        from diffusers import FluxTransformer2DModel

        source = str(options.get("pretrained_model_name_or_path") or "black-forest-labs/FLUX.1-dev")
        try:
            return dict(FluxTransformer2DModel.load_config(source, subfolder="transformer", local_files_only=True,
                                                           revision=options.get("revision")))
        except (OSError, ValueError):
            return None

    @classmethod
    def check_options(cls, options, key: str = KEY) -> None:
        """``guidance`` against the transformer's ``guidance_embeds`` and the guidance values (the
        pipeline itself: the base's check)."""
        transformer = cls._transformer_config(options)
        if transformer is not None:
            cls._check_guidance(options, bool(transformer.get("guidance_embeds")), key)

    @classmethod
    def guidance_from_options(cls, options) -> str | None:
        """``guidance`` as set, else from the transformer's ``guidance_embeds``; ``None`` where its
        config file cannot be read yet."""
        if options.get("guidance"):
            return options["guidance"]
        transformer = cls._transformer_config(options)
        return None if transformer is None else ("embedded" if transformer.get("guidance_embeds") else "none")

    @staticmethod
    def _check_guidance(options, embeds: bool, key: str = KEY) -> str:
        """The guidance the options resolve to for a transformer with (or without) a guidance
        embedding; a :class:`ConfigError` naming the key where it cannot work."""
        guidance = options.get("guidance")
        if guidance is not None and guidance not in GUIDANCE_OPTIONS:
            raise ConfigError(f"{key}.guidance", guidance, "unknown guidance",
                              f"Choose one of {', '.join(GUIDANCE_OPTIONS)} (or leave it unset).")
        guidance = guidance or ("embedded" if embeds else "none")
        if not embeds and guidance != "none":
            raise ConfigError(
                f"{key}.guidance", guidance, "this transformer has no guidance embedding (guidance_embeds: false, "
                "FLUX.1-schnell), and schnell was distilled to sample without guidance: its real score is the "
                "network as it is", "Leave guidance unset (none) with cfg_scale 1 and the method's real_cfg_scale 1, "
                "or use a FLUX.1-dev folder to distil a guided teacher.")
        cfg = float(options.get("cfg_scale", 3.5))
        if guidance == "none" and cfg != 1.0:
            raise ConfigError(f"{key}.cfg_scale", cfg, f"with guidance none ({'the default without a guidance embedding' if not embeds else 'set'}) the real "
                              "score is the network as it is, with no guidance scale",
                              "Set cfg_scale: 1 (and the method's real_cfg_scale: 1).")
        if options.get("negative_prompt") and guidance != "true_cfg":
            raise ConfigError(f"{key}.negative_prompt", options["negative_prompt"],
                              f"only guidance true_cfg has an unconditional branch (guidance is {guidance})",
                              "Remove negative_prompt, or set guidance: true_cfg (two passes per guided prediction).")
        return guidance

    def __init__(
        self,
        pretrained_model_name_or_path: str = "black-forest-labs/FLUX.1-dev",
        revision: str | None = None,
        variant: str | None = None,
        torch_dtype: str = "float32",
        trainable_dtype: str | None = None,
        guidance: str | None = None,
        guidance_scale: float = 3.5,
        negative_prompt: str = "",
        max_sequence_length: int = 512,
        resolution: int = 1024,
        sample_steps: int = 28,
        cfg_scale: float = 3.5,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.set_source(pretrained_model_name_or_path, revision, variant, torch_dtype, trainable_dtype)
        if not 1 <= max_sequence_length <= 512:
            raise ConfigError(f"{KEY}.max_sequence_length", max_sequence_length, "FluxPipeline reads 1 to 512 T5 tokens",
                              "Use 512 (dev) or 256 (schnell).")
        self.max_sequence_length = int(max_sequence_length)
        self.guidance_scale, self.negative_prompt = float(guidance_scale), negative_prompt
        self.sample_steps, self.cfg_scale = int(sample_steps), float(cfg_scale)

        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        self.scheduler_config = dict(self.load_component(FlowMatchEulerDiscreteScheduler, "scheduler", False).config)
        problem = self.check_scheduler(self.scheduler_config)
        if problem:
            raise ValueError(f"{self.pretrained_model_name_or_path}/scheduler {problem}")
        self.tokenizer = self.load_component(CLIPTokenizer, "tokenizer", False)
        self.tokenizer_2 = self.load_component(T5TokenizerFast, "tokenizer_2", False)
        frozen = dict(text_encoder=self.load_component(CLIPTextModel, "text_encoder"),
                      text_encoder_2=self.load_component(T5EncoderModel, "text_encoder_2"),
                      vae=self.load_component(AutoencoderKL, "vae"))
        for name, module in frozen.items():
            setattr(self, name, module.requires_grad_(False).eval())
        transformer = self.load_component(FluxTransformer2DModel, "transformer")
        self.guidance_embeds = bool(transformer.config.guidance_embeds)
        self.guidance = self._check_guidance(
            dict(guidance=guidance, cfg_scale=cfg_scale, negative_prompt=negative_prompt), self.guidance_embeds)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if resolution % (self.vae_scale_factor * 2):
            raise ConfigError(f"{KEY}.resolution", resolution, f"FLUX packs 2x2 latent patches: the resolution must be "
                              f"a multiple of 2 x vae_scale_factor = {2 * self.vae_scale_factor}")
        self.resolution = int(resolution)
        self.schedule = FlowMatchSchedule(shift=self.resolution_shift(self.resolution),
                                          num_train_timesteps=int(self.scheduler_config["num_train_timesteps"]))
        self.setup_roles(transformer)

    def resolution_shift(self, resolution: int) -> float:
        """The scheduler's shift at ``resolution``: ``exp(mu)`` with FluxPipeline's ``mu`` for its
        image token count where the scheduler shifts dynamically (FLUX.1-dev), else its ``shift``."""
        c = self.scheduler_config
        if not c.get("use_dynamic_shifting"):
            return float(c.get("shift", 1.0))
        if c.get("time_shift_type", "exponential") != "exponential":
            raise ValueError(f"{self.pretrained_model_name_or_path}/scheduler has time_shift_type "
                             f"{c['time_shift_type']!r}; FluxTeacher implements FLUX.1's exponential shift")
        tokens = (resolution // self.vae_scale_factor // 2) ** 2
        mu = calculate_shift(tokens, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                             c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        return math.exp(mu)

    def latent_shape(self, batch_size: int) -> tuple[int, ...]:
        size = self.resolution // self.vae_scale_factor
        return (batch_size, self.denoiser.config.in_channels // 4, size, size)

    # ------------------------------------------------------------------ prompts
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """``FluxPipeline.encode_prompt`` for one prompt per sample: CLIP-L's pooled output and T5's tokens."""
        prompts = list(prompts)
        device = self.denoiser_device
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(device)
        pooled = self.text_encoder(ids, output_hidden_states=False).pooler_output.to(self.text_encoder.dtype)
        ids = self.tokenizer_2(prompts, padding="max_length", max_length=self.max_sequence_length,
                               truncation=True, return_tensors="pt").input_ids.to(device)
        tokens = self.text_encoder_2(ids, output_hidden_states=False)[0].to(self.text_encoder_2.dtype)
        return Conditioning(prompt_embeds=tokens, pooled=pooled)

    def unconditional(self) -> Conditioning:
        """``guidance: true_cfg``'s branch: ``negative_prompt`` encoded (the pipeline's ``negative_prompt``)."""
        return self.encode_prompts([self.negative_prompt])

    # ------------------------------------------------------------------ network
    def model_output(self, net: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        dtype = network_dtype(net)
        h, w = x_t.shape[-2:]
        guidance = None
        if self.guidance_embeds:
            # embedded guidance puts the real score's w in the conditioning; every other pass runs
            # at guidance_scale, as the exported pipeline calls the student
            guidance = cond.get("guidance")
            if guidance is None:
                guidance = torch.full((x_t.shape[0],), self.guidance_scale, device=x_t.device)
            guidance = guidance.float()
        out = net(
            hidden_states=pack_latents(x_t.to(dtype)),
            # the pipeline feeds sigma = t; float32 (bf16 cannot tell nearby times apart)
            timestep=t.float(),
            guidance=guidance,
            pooled_projections=cond.pooled.to(dtype),
            encoder_hidden_states=cond.prompt_embeds.to(dtype),
            txt_ids=torch.zeros(cond.prompt_embeds.shape[1], 3, device=x_t.device, dtype=dtype),
            img_ids=latent_image_ids(h, w, x_t.device, dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w).to(x_t.dtype)

    def feature_blocks(self, net: nn.Module) -> Sequence[nn.Module]:
        """Double-stream then single-stream blocks: 19 + 38 in FLUX.1, 99.5% of its parameters (FSDP2's
        units and the compile units; a discriminator layer ``-1`` is the last single block)."""
        return [*net.transformer_blocks, *net.single_transformer_blocks]

    def block_to_map(self, output, x_t: Tensor) -> Tensor:
        hidden = output[1]  # (text tokens, image tokens), both block kinds
        b, n, c = hidden.shape
        h, w = x_t.shape[-2] // 2, x_t.shape[-1] // 2
        if n != h * w:
            raise RuntimeError(f"FLUX block gave {n} image tokens for a {h}x{w} patch grid")
        return hidden.transpose(1, 2).reshape(b, c, h, w)

    # ------------------------------------------------------------------ export
    @property
    def pipeline_class(self):
        from diffusers import FluxPipeline

        return FluxPipeline

    def diffusers_pipeline(self, transformer: nn.Module, scheduler):
        """A ``FluxPipeline`` of this teacher's components around ``transformer``."""
        return self.pipeline_class(
            transformer=transformer, scheduler=scheduler, vae=self.vae, text_encoder=self.text_encoder,
            tokenizer=self.tokenizer, text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2)

    def student_scheduler(self, timesteps: Sequence[float]):
        # student_flow_scheduler turns dynamic shifting off: the pipeline's mu is then ignored and
        # the student's times are the sigmas
        scheduler, exact = student_flow_scheduler(self.scheduler_config, timesteps)
        ts = [float(t) for t in timesteps]
        call = {"num_inference_steps": len(ts), **({} if exact else {"sigmas": ts})}
        if self.guidance_embeds:
            call["guidance_scale"] = self.guidance_scale  # the student's embedding value, one pass
        if self.resolution != 1024:  # FluxPipeline's default_sample_size 128 x 8
            call.update(height=self.resolution, width=self.resolution)
        if self.max_sequence_length != 512:
            call["max_sequence_length"] = self.max_sequence_length
        c, size = self.latent_shape(1)[1:3]
        info = {**self.pipeline_info(), "sigmas": ts, "default_call_exact": exact, "call": call,
                "scheduler": {k: v for k, v in scheduler.config.items() if not k.startswith("_")},
                "max_sequence_length": self.max_sequence_length, "guidance": self.guidance,
                # FluxPipeline takes its latents packed: `dmdx sample` draws the seeded noise in this shape
                "latent_shape": [(size // 2) ** 2, 4 * c]}
        if self.guidance_embeds:
            info["guidance_scale"] = self.guidance_scale
        return scheduler, info

    # ------------------------------------------------------------------ VAE
    def decode(self, latents: Tensor) -> Tensor:
        """As the pipeline decodes (``z / scaling_factor + shift_factor``); differentiable."""
        cfg = self.vae.config
        z = latents / cfg.scaling_factor + cfg.shift_factor
        return self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0].float().clamp(-1, 1)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        cfg = self.vae.config
        z = self.vae.encode(images.to(self.vae.dtype)).latent_dist.sample()
        return ((z - cfg.shift_factor) * cfg.scaling_factor).float()
