"""Random-weight SDXL pipeline folders, built in code with no download (tests, benchmarks, smoke runs).

:func:`save_random_sdxl` writes a folder with the layout of ``stabilityai/stable-diffusion-xl-base-1.0``
(``unet/``, ``vae/``, ``text_encoder/`` (CLIP), ``text_encoder_2/`` (CLIP with projection),
``tokenizer*/``, ``scheduler/``, ``model_index.json``), so
:class:`~dmdx_lightning.teachers.sdxl.SDXLTeacher` and diffusers' ``StableDiffusionXLPipeline``
load it exactly as they load the hub weights. The UNet is SDXL's kind (``addition_embed_type:
text_time``: pooled text embedding + 6 micro-conditioning numbers), only small.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dmdx_lightning.teachers.sd3_random import _clip_config, _clip_tokenizer


def save_random_sdxl(
    folder: str | Path,
    *,
    latent_size: int = 8,
    block_out_channels: tuple[int, ...] = (16, 32),
    layers_per_block: int = 1,
    transformer_layers_per_block: int | tuple[int, ...] = 1,
    attention_head_dim: tuple[int, ...] | None = None,
    vae_block_out_channels: tuple[int, ...] = (8, 16),
    clip_dim: int = 16,
    time_embed_dim: int = 8,
    force_zeros_for_empty_prompt: bool = True,
    seed: int = 0,
) -> Path:
    """Write a random SDXL pipeline folder and return its path.

    Args:
        folder: output directory (created).
        latent_size: the UNet's ``sample_size`` (latent height/width).
        block_out_channels: UNet widths; the first block is a plain ``DownBlock2D``, the others
            cross-attend (SDXL's pattern), mirrored on the way up.
        layers_per_block, transformer_layers_per_block, attention_head_dim: as the UNet's config
            (SDXL base: 2, (1, 2, 10), (5, 10, 20) heads per level); default one of each and a
            head per 8 channels.
        vae_block_out_channels: the VAE's widths (SDXL: (128, 256, 512, 512)); it downsamples by
            ``2 ** (len - 1)``.
        clip_dim: hidden width of each CLIP text encoder and the projection width of the second
            (UNet ``cross_attention_dim = 2 * clip_dim``: both encoders' tokens are concatenated).
        time_embed_dim: ``addition_time_embed_dim`` (SDXL: 256) of each micro-conditioning number.
        force_zeros_for_empty_prompt: the pipeline's CFG unconditional branch is zeros (SDXL base).
        seed: torch seed of the random weights.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = _clip_tokenizer()
    vocab = len(tokenizer.get_vocab())

    def clip_config():
        return _clip_config(vocab, clip_dim)

    n = len(block_out_channels)
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=layers_per_block,
        block_out_channels=block_out_channels,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        attention_head_dim=attention_head_dim or tuple(max(1, c // 8) for c in block_out_channels),
        use_linear_projection=True, cross_attention_dim=2 * clip_dim, norm_num_groups=8,
        transformer_layers_per_block=transformer_layers_per_block,
        addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
        # 6 micro-conditioning numbers (original size, crop, target size) + the pooled projection
        projection_class_embeddings_input_dim=6 * time_embed_dim + clip_dim)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * len(vae_block_out_channels),
        up_block_types=["UpDecoderBlock2D"] * len(vae_block_out_channels), block_out_channels=vae_block_out_channels,
        layers_per_block=1, latent_channels=4, norm_num_groups=4,
        sample_size=2 ** (len(vae_block_out_channels) - 1) * latent_size, scaling_factor=0.13025)
    # SDXL base's scheduler: Euler on the scaled-linear betas (the training schedule is what matters)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading",
                                       prediction_type="epsilon")
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(clip_config()), text_encoder_2=CLIPTextModelWithProjection(clip_config()),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
    folder = Path(folder)
    pipe.save_pretrained(folder)
    return folder
