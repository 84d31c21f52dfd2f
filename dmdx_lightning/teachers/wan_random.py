"""Random-weight Wan pipeline folders, built in code with no download (tests, benchmarks, smoke runs).

:func:`save_random_wan` writes a folder with the layout of ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``
(``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``, ``model_index.json``)
from diffusers' and transformers' real classes (``WanTransformer3DModel``, the causal 3D
``AutoencoderKLWan``, ``UMT5EncoderModel``, the ``UniPCMultistepScheduler`` with flow sigmas that Wan
ships), so :class:`~dmdx_lightning.teachers.wan.WanTeacher` and diffusers' ``WanPipeline`` load it
exactly as they load the hub weights. The tokenizer is a real T5 unigram tokenizer with a tiny
in-memory vocabulary (UMT5's is a 256k-piece T5 tokenizer).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dmdx_lightning.teachers.sd3_random import _t5_tokenizer


def save_random_wan(
    folder: str | Path,
    *,
    num_layers: int = 2,
    num_heads: int = 2,
    head_dim: int = 8,
    latent_channels: int = 4,
    text_dim: int = 16,
    flow_shift: float = 3.0,
    two_experts: bool = False,
    boundary_ratio: float = 0.875,
    ti2v: bool = False,
    seed: int = 0,
) -> Path:
    """Write a random Wan 2.1 text-to-video pipeline folder (or Wan 2.2's layouts) and return its path.

    Args:
        folder: output directory (created).
        num_layers, num_heads, head_dim: transformer size (the rotary embedding splits ``head_dim``
            over time, height and width: a multiple of 6 at least 6, or 8 here).
        latent_channels: the VAE's ``z_dim`` = the transformer's input channels; the VAE's
            ``latents_mean`` / ``latents_std`` are set away from 0 / 1 so the normalisation matters.
        text_dim: UMT5 width = the transformer's ``text_dim``.
        flow_shift: the scheduler's ``flow_shift`` (3.0 as Wan2.1-T2V-1.3B's scheduler, 480p).
        two_experts: also write a ``transformer_2`` (other random weights) and ``boundary_ratio``, the
            layout of Wan 2.2 A14B.
        boundary_ratio: with ``two_experts``: ``transformer`` denoises the timesteps ``>= boundary_ratio x
            1000`` (0.875 = Wan2.2-T2V-A14B's).
        ti2v: Wan 2.2 TI2V-5B's layout: the residual Wan 2.2 VAE (2x2 pixel patches, 16x spatial
            compression) and one timestep per video token (``expand_timesteps``).
        seed: torch seed of the random weights.

    The VAE compresses space 8x and time 4x (three stages, as Wan's), so a 9-frame 32x32 px video
    is 3 latent frames of 4x4 (with ``ti2v``, 16x: a 9-frame 64x64 px video).
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    tokenizer = _t5_tokenizer()
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=text_dim, d_kv=8, d_ff=2 * text_dim, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0))

    def transformer():
        return WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=num_heads, attention_head_dim=head_dim,
            in_channels=latent_channels, out_channels=latent_channels, text_dim=text_dim, freq_dim=16,
            ffn_dim=2 * num_heads * head_dim, num_layers=num_layers, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32)

    generator = torch.Generator().manual_seed(seed)
    wan22 = dict(is_residual=True, in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16,
                 decoder_base_dim=8) if ti2v else {}
    vae = AutoencoderKLWan(
        base_dim=8 if ti2v else 4, z_dim=latent_channels, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=(0.5 * torch.randn(latent_channels, generator=generator)).tolist(),
        latents_std=(1.5 + torch.rand(latent_channels, generator=generator)).tolist(), **wan22)
    # Wan2.1-T2V-1.3B-Diffusers' scheduler: UniPC on flow sigmas with the flow shift
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=flow_shift)
    extra = {"transformer_2": transformer(), "boundary_ratio": boundary_ratio} if two_experts else {}
    if ti2v:
        extra["expand_timesteps"] = True
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer(),
                       scheduler=scheduler, **extra)
    folder = Path(folder)
    pipe.save_pretrained(folder)
    return folder
