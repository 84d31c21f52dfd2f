"""Random-weight Stable Diffusion 1.x / 2.x pipeline folders, built in code with no download (tests, smoke runs).

:func:`save_random_sd` writes a folder with the layout of ``stable-diffusion-v1-5/stable-diffusion-v1-5``
(epsilon) or ``stabilityai/stable-diffusion-2-1`` (v-prediction): ``unet/``, ``vae/``,
``text_encoder/`` (one CLIP), ``tokenizer/``, ``scheduler/``, ``model_index.json``, so
:class:`~dmdx_lightning.teachers.sdxl.StableDiffusionTeacher` and diffusers'
``StableDiffusionPipeline`` load it as they load the hub weights. The UNet is SD's kind (no added
embedding, cross-attention on the text encoder's width), only small; no safety checker is written.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dmdx_lightning.teachers.sd3_random import _clip_config, _clip_tokenizer


def save_random_sd(
    folder: str | Path,
    *,
    prediction_type: str = "epsilon",
    latent_size: int = 8,
    block_out_channels: tuple[int, ...] = (16, 32),
    vae_block_out_channels: tuple[int, ...] = (8, 16),
    clip_dim: int = 16,
    seed: int = 0,
) -> Path:
    """Write a random SD 1.x / 2.x pipeline folder and return its path.

    Args:
        folder: output directory (created).
        prediction_type: ``epsilon`` (SD 1.5, SD 2.1-base; scheduler ``PNDMScheduler`` as they
            ship) or ``v_prediction`` (SD 2.1 768 px; ``DDIMScheduler`` as it ships).
        latent_size: the UNet's ``sample_size`` (latent height/width).
        block_out_channels: UNet widths; every block cross-attends but the last (SD's pattern:
            ``CrossAttnDownBlock2D`` x3 + ``DownBlock2D``), mirrored on the way up.
        vae_block_out_channels: the VAE's widths (SD: (128, 256, 512, 512)); it downsamples by
            ``2 ** (len - 1)``.
        clip_dim: the CLIP text encoder's width = the UNet's ``cross_attention_dim`` (SD 1.5: 768,
            SD 2.x: 1024).
        seed: torch seed of the random weights.
    """
    from diffusers import (AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextModel

    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    torch.manual_seed(seed)
    tokenizer = _clip_tokenizer()
    vocab = len(tokenizer.get_vocab())
    text_encoder = CLIPTextModel(_clip_config(vocab, clip_dim))
    n = len(block_out_channels)
    v = prediction_type == "v_prediction"
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=block_out_channels,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        # SD 1.5: 8 heads, conv projections; SD 2.x: 64-channel heads, linear projections
        attention_head_dim=tuple(max(1, c // 8) for c in block_out_channels) if v else 2,
        use_linear_projection=v, cross_attention_dim=clip_dim, norm_num_groups=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * len(vae_block_out_channels),
        up_block_types=["UpDecoderBlock2D"] * len(vae_block_out_channels), block_out_channels=vae_block_out_channels,
        layers_per_block=1, latent_channels=4, norm_num_groups=4,
        sample_size=2 ** (len(vae_block_out_channels) - 1) * latent_size, scaling_factor=0.18215)
    # the schedulers SD ships with, on the scaled-linear betas (the training schedule is what matters)
    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                  steps_offset=1, set_alpha_to_one=False, prediction_type=prediction_type)
    scheduler = DDIMScheduler(clip_sample=False, **common) if v else PNDMScheduler(skip_prk_steps=True, **common)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    folder = Path(folder)
    pipe.save_pretrained(folder)
    return folder
