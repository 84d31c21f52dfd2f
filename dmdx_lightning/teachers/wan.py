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

Wan 2.2 A14B (two 14B experts: ``transformer`` denoises the times ``1000 t >= boundary_ratio x 1000``,
``transformer_2`` those below) is trained as ONE network of two experts (:class:`WanExperts`), so every
role (real score, fake score, student) is the teacher's score at every time, as ``WanPipeline`` runs it:

- each sample goes to its expert by its own time, the outputs are merged back in batch order; an expert
  no sample of the batch needs still runs on one token (its output times zero joins the result), so
  every rank runs both experts' blocks in the same order (FSDP2 gathers and reduces each block on every
  rank) and every parameter gets a gradient (DDP);
- LoRA adapters (one ``student``, one ``fake``) on both experts; feature maps for the discriminator heads
  are block ``i`` of whichever expert ran each sample (:meth:`WanTeacher.feature_blocks`);
- ``cfg_scale_2``: the guidance scale below the boundary (``WanPipeline``'s ``guidance_scale_2``);
- the export is a two-expert ``WanPipeline`` folder (``transformer``, ``transformer_2``,
  ``boundary_ratio``) or two LoRA files, the second loaded with ``load_into_transformer_2=True``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from dmdx_lightning.errors import ConfigError
from dmdx_lightning.schedules import FlowMatchSchedule
from dmdx_lightning.teachers.base import Conditioning
from dmdx_lightning.teachers.diffusers_base import CONFIG_KEY, DiffusersTeacher, RawConfig

__all__ = ["CONFIG_KEY", "WanExperts", "WanTeacher", "wan_flow_scheduler"]

#: the LoRA file of each expert of a two-expert export (``WanPipeline.load_lora_weights`` reads the
#: first into ``transformer``, the second with ``load_into_transformer_2=True``)
EXPERT_LORA_FILES = {"transformer": "pytorch_lora_weights.safetensors",
                     "transformer_2": "pytorch_lora_weights_transformer_2.safetensors"}

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


def _has_second_expert(index: dict) -> bool:
    second = index.get("transformer_2") or [None, None]
    return isinstance(second, (list, tuple)) and bool(second[-1])


class WanExperts(nn.Module):
    """Wan 2.2 A14B's two experts as one network, called as a ``WanTransformer3DModel``: each sample
    is denoised by ``transformer`` where its timestep is ``>= boundary_timestep`` (high noise) and by
    ``transformer_2`` below, as ``WanPipeline.__call__`` chooses per step; the outputs are merged back
    in batch order.

    Both experts run in every call, always ``transformer`` first: one no sample needs runs on a
    single token of the first sample and its output, times zero, joins the result. So every rank of
    a sharded run gathers and reduces every block (FSDP2 hangs where ranks differ), and every
    parameter gets a gradient, zero where unused (DDP), for one token's cost.

    Args:
        transformer, transformer_2: the high- and low-noise experts (the same architecture).
        boundary_timestep: ``boundary_ratio x num_train_timesteps`` of the pipeline.
    """

    def __init__(self, transformer: nn.Module, transformer_2: nn.Module, boundary_timestep: float) -> None:
        super().__init__()
        if len(transformer.blocks) != len(transformer_2.blocks):
            raise ValueError(f"the two Wan experts have {len(transformer.blocks)} and {len(transformer_2.blocks)} "
                             "blocks: a two-expert pipeline's transformer and transformer_2 share one architecture")
        self.transformer, self.transformer_2 = transformer, transformer_2
        self.boundary_timestep = float(boundary_timestep)
        #: the forward in progress: for each expert the batch indices it denoises (``None``: idle,
        #: run on one token); read by the feature hooks of :class:`_ExpertsBlock`
        self.routing: dict[str, Tensor | None] = {}

    @property
    def experts(self) -> tuple[tuple[str, nn.Module], ...]:
        return ("transformer", self.transformer), ("transformer_2", self.transformer_2)

    # what the family and diffusers' helpers read from a WanTransformer3DModel (the experts agree)
    @property
    def config(self):
        return self.transformer.config

    @property
    def patch_embedding(self) -> nn.Module:
        return self.transformer.patch_embedding

    @property
    def _keep_in_fp32_modules(self):
        return self.transformer._keep_in_fp32_modules

    def enable_gradient_checkpointing(self, **kwargs) -> None:
        for _, expert in self.experts:
            expert.enable_gradient_checkpointing(**kwargs)

    def fuse_lora(self, **kwargs) -> None:
        for _, expert in self.experts:
            expert.fuse_lora(**kwargs)

    def unload_lora(self) -> None:
        for _, expert in self.experts:
            expert.unload_lora()

    def high_noise(self, timestep: Tensor) -> Tensor:
        """Which samples ``transformer`` denoises: ``timestep`` (the network's, ``1000 t``; ``(B,)`` or
        Wan 2.2's per-token ``(B, tokens)``, equal over a sample's tokens in text-to-video) at or above
        the boundary, as ``WanPipeline`` chooses."""
        return timestep.reshape(timestep.shape[0], -1)[:, 0] >= self.boundary_timestep

    def forward(self, hidden_states: Tensor, timestep: Tensor, encoder_hidden_states: Tensor,
                return_dict: bool = False) -> tuple[Tensor]:
        high = self.high_noise(timestep)
        self.routing = {name: (take.nonzero().squeeze(1) if take.any() else None)
                        for name, take in (("transformer", high), ("transformer_2", ~high))}
        outputs, order, idle = [], [], []
        for name, expert in self.experts:
            index = self.routing[name]
            if index is None:  # one token of the first sample: (B, C, F, H, W) cut to one patch
                pt, ph, pw = expert.config.patch_size
                one = timestep[:1] if timestep.ndim == 1 else timestep[:1, :1]
                token = expert(hidden_states=hidden_states[:1, :, :pt, :ph, :pw], timestep=one,
                               encoder_hidden_states=encoder_hidden_states[:1, :1], return_dict=False)[0]
                idle.append(token.sum() * 0)
                continue
            outputs.append(expert(hidden_states=hidden_states[index], timestep=timestep[index],
                                  encoder_hidden_states=encoder_hidden_states[index], return_dict=False)[0])
            order.append(index)
        merged = _in_batch_order(outputs, order)
        for zero in idle:
            merged = merged + zero
        return (merged,)


def _in_batch_order(parts: list[Tensor], order: list[Tensor]) -> Tensor:
    """``parts`` (each expert's samples, in the order of its indices) as one batch in the original order."""
    if len(parts) == 1:
        return parts[0]
    return torch.cat(parts)[torch.argsort(torch.cat(order))]


class _ExpertsBlock:
    """Block ``i`` of a :class:`WanExperts` network for :meth:`Teacher.feature_maps`: a hook
    registered here gets the whole batch's output, each sample's from the expert that denoised it
    (called once the last expert with samples has run block ``i``)."""

    def __init__(self, net: WanExperts, i: int) -> None:
        self.net, self.i = net, i

    def register_forward_hook(self, hook):
        parts: dict[str, Tensor] = {}

        def part(name: str):
            def expert_hook(_module, inputs, output):
                routing = self.net.routing
                if routing[name] is None:  # the idle expert's token
                    return None
                parts[name] = output
                active = [n for n, index in routing.items() if index is not None]
                if list(parts) == active:
                    merged = _in_batch_order([parts[n] for n in active], [routing[n] for n in active])
                    parts.clear()
                    hook(self, inputs, merged)
                return None
            return expert_hook

        handles = [expert.blocks[self.i].register_forward_hook(part(name)) for name, expert in self.net.experts]
        return _Handles(handles)


class _Handles:
    def __init__(self, handles) -> None:
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class WanTeacher(DiffusersTeacher):
    """Wan 2.1 / 2.2 text-to-video (``WanPipeline`` layout) as a distillation teacher.

    Args:
        pretrained_model_name_or_path: hub id (``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``,
            ``Wan-AI/Wan2.1-T2V-14B-Diffusers``, ``Wan-AI/Wan2.2-TI2V-5B-Diffusers``,
            ``Wan-AI/Wan2.2-T2V-A14B-Diffusers``) or a local pipeline folder with ``transformer/``,
            ``vae/``, ``text_encoder/``, ``tokenizer/`` and ``scheduler/`` subfolders (and
            ``transformer_2/`` for Wan 2.2 A14B's two experts, see the module docstring).
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
        cfg_scale: the teacher's default guidance scale (5.0 = the pipeline default; Wan 2.2 A14B's
            recipe: 4.0 above the experts' boundary).
        cfg_scale_2: two-expert pipelines only: the guidance scale of the samples below the boundary
            (the low-noise expert's) whenever a caller guides (its scale != 1: the method's
            ``real_cfg_scale``, the ODE pairs' ``cfg_scale``), as ``WanPipeline``'s ``guidance_scale_2``
            (Wan 2.2 A14B's recipe: 3.0); ``None``: the caller's scale at every time.
        **kwargs: :class:`~dmdx_lightning.teachers.base.Teacher` options: ``mode`` (``full`` or
            ``lora``), ``lora_rank``, ``lora_alpha``, ``lora_target_modules`` (default: the attention
            projections of every block's self- and cross-attention, diffusers' Wan LoRA layout),
            ``gradient_checkpointing``.
    """

    family = "wan"
    prediction_type = "flow"
    pipeline_name = "Wan"
    pipeline_layout = "transformer/, vae/, text_encoder/, tokenizer/, scheduler/"
    #: text-to-video only (WanImageToVideoPipeline, WanVACEPipeline, ... are other tasks)
    pipeline_classes = ("WanPipeline",)
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
    def pipeline_problem(cls, index: dict) -> str | None:
        """Another pipeline class (text-to-video ``WanPipeline`` only), or half a two-expert layout."""
        problem = super().pipeline_problem(index)
        if problem is None and _has_second_expert(index) != (index.get("boundary_ratio") is not None):
            problem = (f"has {'a' if _has_second_expert(index) else 'no'} transformer_2 but boundary_ratio "
                       f"{index.get('boundary_ratio')}: a two-expert Wan 2.2 pipeline has both (which expert denoises "
                       "which time), a one-transformer pipeline neither")
        return problem

    @classmethod
    def check_options(cls, options, key: str = "model.init_args.teacher.init_args") -> None:
        """``cfg_scale_2`` against the pipeline's ``model_index.json`` (the pipeline itself: the base's check)."""
        index = cls.pipeline_index(options) if options.get("cfg_scale_2") is not None else None
        if index is not None and not _has_second_expert(index):
            raise ConfigError(f"{key}.cfg_scale_2", options.get("cfg_scale_2"), f"{options['pretrained_model_name_or_path']} "
                              "has one transformer, and cfg_scale_2 is the guidance of a two-expert pipeline's "
                              "low-noise expert", "Remove cfg_scale_2 (the caller's guidance scale applies at every time).")

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
        cfg_scale_2: float | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.set_source(pretrained_model_name_or_path, revision, variant, torch_dtype, trainable_dtype)
        self.sample_steps, self.cfg_scale = int(sample_steps), float(cfg_scale)
        self.cfg_scale_2 = None if cfg_scale_2 is None else float(cfg_scale_2)

        from diffusers import AutoencoderKLWan, WanTransformer3DModel
        from transformers import AutoTokenizer, UMT5EncoderModel

        index = self.load_component(RawConfig, None, model=False)
        problem = self.pipeline_problem(index)
        if problem:
            raise ValueError(f"{self.pretrained_model_name_or_path} {problem}")
        # Wan 2.2 TI2V-5B: the pipeline feeds one timestep per video token (equal ones for text-to-video)
        self.expand_timesteps = bool(index.get("expand_timesteps", False))
        self.scheduler_config = self.load_component(RawConfig, "scheduler", model=False)
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
        #: Wan 2.2 A14B: the fraction of the train timesteps above which ``transformer`` denoises
        self.boundary_ratio = index.get("boundary_ratio")
        if self.boundary_ratio is not None:
            transformer = WanExperts(transformer, self.load_component(WanTransformer3DModel, "transformer_2"),
                                     self.boundary_ratio * self.schedule.num_train_timesteps)
        elif self.cfg_scale_2 is not None:
            raise ValueError(f"cfg_scale_2 {self.cfg_scale_2}: {self.pretrained_model_name_or_path} has one transformer; "
                             "cfg_scale_2 is the guidance of a two-expert pipeline's low-noise expert")
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
        if isinstance(net, WanExperts):
            return [_ExpertsBlock(net, i) for i in range(len(net.transformer.blocks))]
        return net.blocks

    def network_blocks(self, net: nn.Module) -> Sequence[nn.Module]:
        if isinstance(net, WanExperts):
            return [*net.transformer.blocks, *net.transformer_2.blocks]
        return net.blocks

    def guidance_scales(self, cfg_scale: float, t: Tensor) -> float | Tensor:
        """``cfg_scale`` above the experts' boundary, ``cfg_scale_2`` below (where set)."""
        if self.cfg_scale_2 is None:
            return cfg_scale
        high = self.denoiser.high_noise(self.schedule.model_timestep(t).float())
        return torch.where(high, torch.tensor(float(cfg_scale), device=t.device),
                           torch.tensor(self.cfg_scale_2, device=t.device))

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
        """A ``WanPipeline`` of this teacher's components around ``transformer`` (two experts: both,
        with the teacher's ``boundary_ratio``)."""
        experts = ({"transformer": transformer.transformer, "transformer_2": transformer.transformer_2,
                    "boundary_ratio": self.boundary_ratio} if isinstance(transformer, WanExperts)
                   else {"transformer": transformer})
        return self.pipeline_class(tokenizer=self.tokenizer, text_encoder=self.text_encoder, vae=self.vae,
                                   scheduler=scheduler, expand_timesteps=self.expand_timesteps, **experts)

    def pipeline_denoiser(self, pipe) -> nn.Module:
        if getattr(pipe, "transformer_2", None) is None:
            return pipe.transformer
        return WanExperts(pipe.transformer, pipe.transformer_2,
                          pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps)

    def lora_files(self, state: dict) -> list[tuple[str | None, dict, dict]]:
        """One file (a one-transformer pipeline), or one per expert: :data:`EXPERT_LORA_FILES`, the
        second loaded with ``load_lora_weights(..., load_into_transformer_2=True)``."""
        if self.boundary_ratio is None:
            return super().lora_files(state)
        files = []
        for component, weight_name in EXPERT_LORA_FILES.items():
            prefix = f"{component}."
            entries = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            files.append((weight_name, entries, {"load_into_transformer_2": True} if component == "transformer_2" else {}))
        return files

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

