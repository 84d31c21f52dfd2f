"""Random-weight CogVideoX pipeline folders, built in code with no download (tests, benchmarks, smoke runs).

:func:`save_random_cogvideox` writes a folder with the layout of ``THUDM/CogVideoX-2b`` / ``-5b``
(``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``, ``model_index.json``)
from diffusers' and transformers' real classes (3D transformer, causal 3D VAE, T5, the CogVideoX
DDIM scheduler), so :class:`~dmdx_lightning.teachers.cogvideox.CogVideoXTeacher` and diffusers'
``CogVideoXPipeline`` load it exactly as they load the hub weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dmdx_lightning.teachers.sd3_random import _t5_tokenizer


def save_random_cogvideox(
    folder: str | Path,
    *,
    num_layers: int = 2,
    num_heads: int = 2,
    head_dim: int = 16,
    latent_size: int = 8,
    latent_channels: int = 4,
    num_frames: int = 9,
    text_dim: int = 16,
    max_text_seq_length: int = 8,
    rotary: bool = True,
    snr_shift_scale: float = 3.0,
    seed: int = 0,
) -> Path:
    """Write a random CogVideoX pipeline folder and return its path.

    Args:
        folder: output directory (created).
        num_layers, num_heads, head_dim: transformer size; the 3D rotary embedding splits
            ``head_dim`` into 1/4 for time and 3/8 each for height and width, all even: a multiple of 16.
        latent_size: latent height/width; the VAE has 3 stages, so videos are ``4 * latent_size`` px.
        latent_channels: VAE latent channels = transformer input channels.
        num_frames: pixel frames (``4k + 1``; the VAE compresses time 4x: 9 frames -> 3 latent frames).
        text_dim: T5 width = the transformer's ``text_embed_dim``.
        max_text_seq_length: T5 tokens per prompt the transformer is built for.
        rotary: 3D rotary position embeddings (CogVideoX-5b) instead of sin-cos ones (2b).
        snr_shift_scale: the scheduler's SNR shift (3.0 as CogVideoX-2b's scheduler).
        seed: torch seed of the random weights.
    """
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline,
                           CogVideoXTransformer3DModel)
    from transformers import T5Config, T5EncoderModel

    if (num_frames - 1) % 4:
        raise ValueError(f"num_frames must be 4k + 1 (the VAE compresses time 4x), got {num_frames}")
    torch.manual_seed(seed)
    tokenizer = _t5_tokenizer()
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=text_dim, d_kv=8, d_ff=2 * text_dim, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=num_heads, attention_head_dim=head_dim, in_channels=latent_channels,
        out_channels=latent_channels, time_embed_dim=8, text_embed_dim=text_dim, num_layers=num_layers,
        sample_width=latent_size, sample_height=latent_size, sample_frames=num_frames, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=max_text_seq_length,
        use_rotary_positional_embeddings=rotary)
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 3,
        up_block_types=("CogVideoXUpBlock3D",) * 3, block_out_channels=(8, 8, 8), latent_channels=latent_channels,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4, sample_height=4 * latent_size,
        sample_width=4 * latent_size, scaling_factor=1.15258426)
    # CogVideoX-2b's scheduler config (v-prediction, zero terminal SNR, SNR shift, trailing spacing)
    scheduler = CogVideoXDDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        num_train_timesteps=1000, prediction_type="v_prediction", rescale_betas_zero_snr=True,
        set_alpha_to_one=True, snr_shift_scale=snr_shift_scale, steps_offset=0, timestep_spacing="trailing")
    pipe = CogVideoXPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                             scheduler=scheduler)
    folder = Path(folder)
    pipe.save_pretrained(folder)
    return folder
