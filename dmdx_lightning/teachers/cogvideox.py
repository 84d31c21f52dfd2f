"""CogVideoX-2b / -5b text-to-video teachers over diffusers' components (3D transformer, v-prediction).

The teacher is loaded from a diffusers ``CogVideoXPipeline`` folder or hub id (``transformer/``,
``vae/``, ``text_encoder/`` (T5), ``tokenizer/``, ``scheduler/``). Only what differs from the
:class:`~dmdx_lightning.teachers.base.Teacher` base lives here:

- prompt encoding exactly as ``CogVideoXPipeline._get_t5_prompt_embeds``: T5 tokens padded to
  ``max_sequence_length`` (the transformer's ``max_text_seq_length``, 226), no attention mask. CogVideoX
  has no pooled text vector; the discriminator heads get the mean of the prompt's real (non-pad)
  T5 tokens as ``pooled``;
- v-prediction on the discrete VP schedule of the scheduler config: zero-terminal-SNR betas and the
  SNR shift (:class:`~dmdx_lightning.schedules.VPSchedule`), trailing timestep spacing;
- the 3D rotary position embeddings the transformer needs for the latent grid (CogVideoX-5b;
  2b uses sin-cos embeddings inside the transformer), computed with the pipeline's own helpers;
- latents ``(B, F, C, H, W)`` as the pipeline holds them; the causal 3D VAE decodes to
  ``(B, 3, 4 (F - 1) + 1, 8 H, 8 W)`` with its ``scaling_factor``;
- feature maps from ``transformer_blocks``: a block returns ``(hidden_states,
  encoder_hidden_states)``; the video tokens ``(B, F h w, C)`` (frame-major) become ``(B, C, F, h, w)``
  maps, read by the 3D discriminator heads;
- the diffusers export: a ``CogVideoXPipeline`` folder or the student's LoRA for its
  ``load_lora_weights``, with a stock ``LCMScheduler`` that replays the student's sampler
  (:func:`student_vp_scheduler`).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from dmdx_lightning.errors import ConfigError
from dmdx_lightning.schedules import VPSchedule
from dmdx_lightning.teachers.base import Conditioning
from dmdx_lightning.teachers.diffusers_base import CONFIG_KEY, DiffusersTeacher, network_dtype

__all__ = ["CONFIG_KEY", "CogVideoXTeacher", "student_vp_scheduler"]

#: LCMScheduler.timestep_scaling for the export: its boundary condition ``denoised = c_out x0 +
#: c_skip x_t`` then has ``c_out = 1`` and ``c_skip < 1e-16`` at every timestep >= 1 (float32), so
#: the step is exactly "predict x0, re-noise with fresh noise"
_NO_BOUNDARY_SCALING = 1.0e6


def student_vp_scheduler(schedule: VPSchedule, timesteps: Sequence[float]):
    """A stock diffusers ``LCMScheduler`` that replays the student's sampler on ``schedule``.

    Our few-step sampler (:meth:`~dmdx_lightning.teachers.base.Teacher.sample_student`, DMD2)
    predicts ``x0`` and re-noises it with FRESH noise to the next student time,
    ``x_s = alpha(s) x0 + sigma(s) noise``; DDIM (CogVideoX's own scheduler) reuses the predicted
    noise instead, whatever its ``eta``. ``LCMScheduler``'s multistep step does exactly ours, drawing
    noise from the pipeline's ``generator``. It cannot express the SNR shift or zero terminal SNR as
    options, so it gets the schedule's exact ``alphas_cumprod`` as ``trained_betas``
    (``beta_i = 1 - acp_i / acp_{i-1}``), ``v_prediction``, and ``original_inference_steps`` = the
    training steps, so every integer timestep is on its grid (no warnings).

    Returns ``(scheduler, train_timesteps, default_call_exact)``: the student's integer timesteps
    and whether ``set_timesteps(len(timesteps))`` alone reproduces them (else pass
    ``timesteps=train_timesteps``).
    """
    from diffusers import LCMScheduler

    indices = [schedule.train_index(t) for t in timesteps]
    acp = schedule.alphas_cumprod.double()
    betas = torch.cat([1.0 - acp[:1], 1.0 - acp[1:] / acp[:-1]])
    n = schedule.num_train_timesteps
    scheduler = LCMScheduler(
        num_train_timesteps=n, trained_betas=betas.tolist(), original_inference_steps=n,
        prediction_type="v_prediction", clip_sample=False, thresholding=False, set_alpha_to_one=True,
        rescale_betas_zero_snr=False, timestep_spacing="trailing", timestep_scaling=_NO_BOUNDARY_SCALING)
    probe = LCMScheduler.from_config(scheduler.config)
    probe.set_timesteps(len(indices))
    return scheduler, indices, probe.timesteps.tolist() == indices


def tiled_decode_size(latent: int, tile_sample: int, scale: int, overlap_factor: float) -> int:
    """Pixels along one side that ``AutoencoderKLCogVideoX.tiled_decode`` returns for ``latent``
    latents: tiles of ``tile_sample / scale`` latents start every ``(1 - overlap_factor)`` tile and
    each keeps ``tile_sample - blend`` pixels (diffusers 0.3x-0.4x arithmetic, written out so a
    config can be checked without building the VAE)."""
    tile_latent = int(tile_sample / scale)
    stride = max(1, int(tile_latent * (1 - overlap_factor)))
    keep = tile_sample - int(tile_sample * overlap_factor)
    return sum(min(keep, min(tile_latent, latent - i) * scale) for i in range(0, latent, stride))


def check_vae_tiling(key: str, sides: dict[str, int], tiles: dict[str, int], overlaps: dict[str, float],
                     scale: int, vae_size: dict[str, int] | None = None) -> None:
    """Refuse ``vae_tiling`` (a :class:`ConfigError` on ``key``) when diffusers' tiled decode of a
    video of ``sides`` pixels (``height``, ``width``) in tiles of ``tiles`` pixels (the VAE's
    ``tile_sample_min_*``) would not give back that size. A video no larger than one tile is decoded
    whole by diffusers and passes."""
    latent = {side: sides[side] // scale for side in sides}
    if not any(latent[side] > int(tiles[side] / scale) for side in sides):
        return  # diffusers decodes it in one piece
    for side in ("height", "width"):
        decoded = tiled_decode_size(latent[side], tiles[side], scale, overlaps[side])
        if decoded != sides[side]:
            sized = f", sized for {vae_size['height']}x{vae_size['width']} px videos" if vae_size else ""
            raise ConfigError(key, True, f"diffusers' tiled VAE decode of a {sides[side]} px {side} gives {decoded} px "
                              f"(a {sides['height']}x{sides['width']} px video, height x width, in the VAE's "
                              f"{tiles['height']}x{tiles['width']} px tiles: tile_sample_min_height x "
                              f"tile_sample_min_width{sized})", "Set vae_tiling: false: a video this small "
                              "decodes in one piece (tiling saves memory on videos many tiles large, as "
                              "CogVideoX's 480x720).")


class CogVideoXTeacher(DiffusersTeacher):
    """CogVideoX-2b / -5b (``CogVideoXPipeline`` layout) as a distillation teacher.

    Args:
        pretrained_model_name_or_path: hub id (``THUDM/CogVideoX-2b``, ``THUDM/CogVideoX-5b``) or a
            local pipeline folder with ``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/`` and
            ``scheduler/`` subfolders.
        revision: hub revision (branch, tag or commit) of every component.
        variant: weight file variant of the models (e.g. ``fp16``); ``None`` for the default files.
        torch_dtype: ``float32 | bfloat16 | float16``: dtype every frozen part is loaded in
            (CogVideoX-2b was trained in fp16, 5b in bf16).
        trainable_dtype: dtype of the trainable copies in ``full`` mode (``None``: as
            ``torch_dtype``); the LoRA adapters are always float32 (``Teacher.setup_roles``).
        max_sequence_length: T5 tokens per prompt (``None``: the transformer's
            ``max_text_seq_length``, 226 = the pipeline default; the 2b model's sin-cos position
            table assumes exactly this many text tokens).
        num_frames: video frames in pixels, ``4k + 1`` (``None``: the transformer's
            ``sample_frames``, 49 = 13 latent frames).
        height, width: video size in pixels (``None``: the transformer's sample size times the
            VAE's spatial factor, 480 x 720).
        sample_steps: DDIM steps of the teacher's own sampler (50 = the pipeline default; the paper
            compares with 100-step teachers).
        cfg_scale: the teacher's default guidance scale (6.0 = the pipeline default).
        vae_tiling: decode / encode in tiles (diffusers' ``enable_tiling``): full-size 49-frame
            videos otherwise need tens of GB in the VAE.
        **kwargs: :class:`~dmdx_lightning.teachers.base.Teacher` options: ``mode`` (``full`` or
            ``lora``), ``lora_rank``, ``lora_alpha``, ``lora_target_modules`` (default: the
            attention projections, as diffusers' CogVideoX LoRA script), ``gradient_checkpointing``.
    """

    family = "cogvideox"
    prediction_type = "v"
    pipeline_name = "CogVideoX"
    pipeline_layout = "transformer/, vae/, text_encoder/, tokenizer/, scheduler/"
    export_formats = ("pipeline", "lora")
    # attention projections of every block: diffusers' CogVideoX LoRA training default, so the
    # exported adapter loads with CogVideoXPipeline.load_lora_weights
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    example_prompts: tuple[str, ...] = (
        "a golden retriever running on a beach at sunset, waves in the background",
        "a timelapse of clouds drifting over a snowy mountain range",
        "a panda playing a guitar in a bamboo forest",
        "a steaming cup of coffee on a wooden table, morning light")

    @classmethod
    def check_scheduler(cls, config: dict) -> str | None:
        if config.get("prediction_type") != "v_prediction":
            return (f"has prediction_type {config.get('prediction_type')!r}; CogVideoXTeacher expects 'v_prediction' "
                    "(every CogVideoX release)")
        return None

    @classmethod
    def check_options(cls, options, key: str = "model.init_args.teacher.init_args") -> None:
        """``vae_tiling`` against the sample size, from the pipeline's config files alone (no weights):
        diffusers' tiles are sized for the full-size model, and a smaller video cut into them decodes to
        the wrong size, which would otherwise surface at the first sample grid, after training."""
        if not options.get("vae_tiling"):
            return
        from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel

        source = str(options.get("pretrained_model_name_or_path") or "THUDM/CogVideoX-2b")
        try:
            vae = AutoencoderKLCogVideoX.load_config(source, subfolder="vae", revision=options.get("revision"))
            transformer = CogVideoXTransformer3DModel.load_config(source, subfolder="transformer",
                                                                  revision=options.get("revision"))
        except (OSError, ValueError):
            return  # not readable yet: loading the teacher reports that with its own message
        scale = 2 ** (len(vae["block_out_channels"]) - 1)
        sides = {side: int(options.get(side) or transformer[f"sample_{side}"] * scale) for side in ("height", "width")}
        # diffusers' defaults (AutoencoderKLCogVideoX.__init__): tile_sample_min_* and tile_overlap_factor_*
        tiles = {side: vae[f"sample_{side}"] // 2 for side in sides}
        check_vae_tiling(f"{key}.vae_tiling", sides, tiles, {"height": 1 / 6, "width": 1 / 5}, scale,
                         {side: vae[f"sample_{side}"] for side in sides})

    def check_setup(self, key: str = "model.init_args.teacher.init_args") -> None:
        """:meth:`check_options`' tiling check again on the built VAE, with the tile sizes and
        overlaps ``enable_tiling`` gave it (whatever the diffusers version): it also covers a teacher
        built in Python and a pipeline whose config files could not be read before loading."""
        vae = self.vae
        if not getattr(vae, "use_tiling", False):
            return
        sides = {"height": self.height, "width": self.width}
        tiles = {side: int(getattr(vae, f"tile_sample_min_{side}")) for side in sides}
        overlaps = {side: float(getattr(vae, f"tile_overlap_factor_{side}")) for side in sides}
        check_vae_tiling(f"{key}.vae_tiling", sides, tiles, overlaps, self.vae_scale_factor,
                         {side: vae.config[f"sample_{side}"] for side in sides})

    def __init__(
        self,
        pretrained_model_name_or_path: str = "THUDM/CogVideoX-2b",
        revision: str | None = None,
        variant: str | None = None,
        torch_dtype: str = "float32",
        trainable_dtype: str | None = None,
        max_sequence_length: int | None = None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        sample_steps: int = 50,
        cfg_scale: float = 6.0,
        vae_tiling: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.set_source(pretrained_model_name_or_path, revision, variant, torch_dtype, trainable_dtype)
        self.sample_steps, self.cfg_scale = int(sample_steps), float(cfg_scale)

        from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel
        from transformers import T5EncoderModel, T5TokenizerFast

        # any of CogVideoX's schedulers (2b: DDIM, 5b: DPM) shares these config keys
        self.scheduler_config = dict(self.load_component(CogVideoXDDIMScheduler, "scheduler", model=False).config)
        problem = self.check_scheduler(self.scheduler_config)
        if problem:
            raise ValueError(f"{self.pretrained_model_name_or_path}/scheduler {problem}")
        self.schedule = VPSchedule.from_diffusers_config(self.scheduler_config)
        self.tokenizer = self.load_component(T5TokenizerFast, "tokenizer", model=False)
        self.text_encoder = self.load_component(T5EncoderModel, "text_encoder").requires_grad_(False).eval()
        self.vae = self.load_component(AutoencoderKLCogVideoX, "vae").requires_grad_(False).eval()
        if vae_tiling:
            self.vae.enable_tiling()
        transformer = self.load_component(CogVideoXTransformer3DModel, "transformer")
        cfg = transformer.config
        if cfg.patch_size_t is not None:
            raise NotImplementedError(f"{self.pretrained_model_name_or_path} is a CogVideoX 1.5 transformer "
                                      "(patch_size_t set): CogVideoXTeacher implements CogVideoX 1.0 (2b, 5b)")
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.vae_temporal_factor = int(self.vae.config.temporal_compression_ratio)
        self.patch_size = cfg.patch_size
        self.max_sequence_length = int(max_sequence_length or cfg.max_text_seq_length)
        self.num_frames = int(num_frames or cfg.sample_frames)
        self.height = int(height or cfg.sample_height * self.vae_scale_factor)
        self.width = int(width or cfg.sample_width * self.vae_scale_factor)
        if (self.num_frames - 1) % self.vae_temporal_factor:
            raise ValueError(f"num_frames {self.num_frames} must be {self.vae_temporal_factor}k + 1 (the VAE "
                             f"compresses time {self.vae_temporal_factor}x after the first frame)")
        for name, size in (("height", self.height), ("width", self.width)):
            if size % (self.vae_scale_factor * self.patch_size):
                raise ValueError(f"{name} {size} must be a multiple of vae_scale_factor x patch_size = "
                                 f"{self.vae_scale_factor * self.patch_size}")
        self._rotary_cache: dict = {}
        self.setup_roles(transformer)

    # ------------------------------------------------------------------ prompts
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """``CogVideoXPipeline._get_t5_prompt_embeds`` for one prompt per sample (no CFG doubling);
        ``pooled`` is the mean of the prompt's non-pad T5 tokens (the discriminator heads' vector)."""
        device = self.denoiser_device
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_sequence_length,
                                truncation=True, add_special_tokens=True, return_tensors="pt")
        embeds = self.text_encoder(tokens.input_ids.to(device))[0].to(self.text_encoder.dtype)
        mask = tokens.attention_mask.to(device, embeds.dtype)[..., None]
        pooled = (embeds * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return Conditioning(prompt_embeds=embeds, pooled=pooled)

    # ------------------------------------------------------------------ network
    def rotary_embeddings(self, net: nn.Module, x_t: Tensor) -> tuple[Tensor, Tensor] | None:
        """The 3D rotary embeddings ``(cos, sin)`` for ``x_t``'s latent grid, as
        ``CogVideoXPipeline._prepare_rotary_positional_embeddings`` builds them (CogVideoX 1.0);
        ``None`` for transformers with sin-cos position embeddings (2b). Cached per grid."""
        cfg = net.config
        if not cfg.use_rotary_positional_embeddings:
            return None
        frames, (h, w) = x_t.shape[1], (x_t.shape[-2] // self.patch_size, x_t.shape[-1] // self.patch_size)
        key = (frames, h, w, x_t.device)
        if key not in self._rotary_cache:
            from diffusers.models.embeddings import get_3d_rotary_pos_embed
            from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

            crops = get_resize_crop_region_for_grid((h, w), cfg.sample_width // self.patch_size,
                                                    cfg.sample_height // self.patch_size)
            self._rotary_cache[key] = get_3d_rotary_pos_embed(
                embed_dim=cfg.attention_head_dim, crops_coords=crops, grid_size=(h, w), temporal_size=frames,
                device=x_t.device)
        return self._rotary_cache[key]

    def model_output(self, net: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        dtype = network_dtype(net)
        out = net(
            hidden_states=x_t.to(dtype),
            encoder_hidden_states=cond.prompt_embeds.to(dtype),
            # float32 timesteps (bf16 cannot tell 999 from 1000); the pipeline's integer ones are exact
            timestep=self.schedule.model_timestep(t).float(),
            image_rotary_emb=self.rotary_embeddings(net, x_t),
            return_dict=False,
        )[0]
        return out.to(x_t.dtype)

    def feature_blocks(self, net: nn.Module) -> Sequence[nn.Module]:
        return net.transformer_blocks

    def block_to_map(self, output, x_t: Tensor) -> Tensor:
        hidden = output[0]  # (hidden_states, encoder_hidden_states): video tokens, frame-major
        b, n, c = hidden.shape
        f, h, w = x_t.shape[1], x_t.shape[-2] // self.patch_size, x_t.shape[-1] // self.patch_size
        if n != f * h * w:
            raise RuntimeError(f"CogVideoX block gave {n} video tokens for a {f}x{h}x{w} latent grid")
        return hidden.reshape(b, f, h, w, c).permute(0, 4, 1, 2, 3)

    @property
    def latent_frames(self) -> int:
        return (self.num_frames - 1) // self.vae_temporal_factor + 1

    def latent_shape(self, batch_size: int) -> tuple[int, ...]:
        return (batch_size, self.latent_frames, self.denoiser.config.in_channels,
                self.height // self.vae_scale_factor, self.width // self.vae_scale_factor)

    # ------------------------------------------------------------------ VAE
    def decode(self, latents: Tensor) -> Tensor:
        """``(B, F, C, h, w)`` latents -> ``(B, 3, 4 (F - 1) + 1, H, W)`` video in ``[-1, 1]``
        (``CogVideoXPipeline.decode_latents``)."""
        z = latents.permute(0, 2, 1, 3, 4) / self.vae.config.scaling_factor
        video = self.vae.decode(z.to(self.vae.dtype)).sample.float().clamp(-1, 1)
        expected = ((z.shape[2] - 1) * self.vae_temporal_factor + 1, z.shape[3] * self.vae_scale_factor,
                    z.shape[4] * self.vae_scale_factor)
        if tuple(video.shape[2:]) != expected:
            raise RuntimeError(f"the CogVideoX VAE decoded {tuple(video.shape[2:])} (frames, height, width) where "
                               f"{expected} was expected; with vae_tiling, videos must be larger than the VAE's tiles")
        return video

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """``(B, 3, F, H, W)`` video in ``[-1, 1]`` -> ``(B, F', C, h, w)`` latents."""
        z = self.vae.encode(images.to(self.vae.dtype)).latent_dist.sample()
        return (z * self.vae.config.scaling_factor).permute(0, 2, 1, 3, 4).float()

    # ------------------------------------------------------------------ identity and export
    @property
    def pipeline_class(self):
        from diffusers import CogVideoXPipeline

        return CogVideoXPipeline

    def diffusers_pipeline(self, transformer: nn.Module, scheduler):
        """A ``CogVideoXPipeline`` of this teacher's components around ``transformer``."""
        return self.pipeline_class(tokenizer=self.tokenizer, text_encoder=self.text_encoder, vae=self.vae,
                                 transformer=transformer, scheduler=scheduler)

    def student_scheduler(self, timesteps: Sequence[float]):
        scheduler, indices, exact = student_vp_scheduler(self.schedule, timesteps)
        config = {k: v for k, v in scheduler.config.items() if not k.startswith("_") and k != "trained_betas"}
        # the video's size and the prompt length set the latent grid and the rotary embeddings: always passed
        call = {"num_inference_steps": len(indices), "guidance_scale": 1.0, **({} if exact else {"timesteps": indices}),
                "num_frames": self.num_frames, "height": self.height, "width": self.width,
                "max_sequence_length": self.max_sequence_length}
        return scheduler, {
            **self.pipeline_info(), "call": call,
            "timesteps": indices, "default_call_exact": exact, "scheduler": config,
            "max_sequence_length": self.max_sequence_length, "num_frames": self.num_frames,
            "height": self.height, "width": self.width}

