"""Random-weight FLUX.1 pipeline folders, built in code with no download (tests, benchmarks, smoke runs).

:func:`save_random_flux` writes a folder with the layout of ``black-forest-labs/FLUX.1-dev`` (or, with
``guidance_embeds=False``, of ``FLUX.1-schnell``): ``transformer/``, ``vae/``, ``text_encoder/``
(CLIP-L), ``text_encoder_2/`` (T5), ``tokenizer*/``, ``scheduler/`` and ``model_index.json``, so
:class:`~dmdx_lightning.teachers.flux.FluxTeacher` and diffusers' ``FluxPipeline`` load it exactly
as they load the hub weights. The tokenizers are those of :mod:`~dmdx_lightning.teachers.sd3_random`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dmdx_lightning.teachers.sd3_random import _clip_config, _clip_tokenizer, _t5_tokenizer


def flux_scheduler_config(guidance_embeds: bool = True) -> dict:
    """The published ``scheduler/scheduler_config.json`` of FLUX.1-dev (resolution-dependent
    shifting) or, without guidance embedding, of FLUX.1-schnell (no shift)."""
    config = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
              "num_train_timesteps": 1000}
    if guidance_embeds:
        return {**config, "shift": 3.0, "use_dynamic_shifting": True}
    return {**config, "shift": 1.0, "use_dynamic_shifting": False}


def save_random_flux(
    folder: str | Path,
    guidance_embeds: bool = True,
    *,
    num_layers: int = 1,
    num_single_layers: int = 2,
    num_heads: int = 2,
    head_dim: int = 16,
    latent_channels: int = 16,
    clip_dim: int = 16,
    joint_dim: int = 32,
    seed: int = 0,
) -> Path:
    """Write a random FLUX.1 pipeline folder and return its path.

    Args:
        folder: output directory (created).
        guidance_embeds: a FLUX.1-dev-like transformer with a guidance embedding and dynamic
            shifting (``False``: FLUX.1-schnell-like, neither).
        num_layers, num_single_layers: double-stream and single-stream blocks (19 and 38 in FLUX.1).
        num_heads, head_dim: attention size (rope axes ``head_dim / 4, / 4, / 2``).
        latent_channels: VAE latent channels (16 as FLUX.1); the transformer reads 2x2 patches of
            them (``in_channels = 4 * latent_channels``).
        clip_dim: CLIP width (its pooled output = ``pooled_projection_dim``; 768 in FLUX.1).
        joint_dim: T5 width = the transformer's ``joint_attention_dim`` (4096 in FLUX.1).
        seed: torch seed of the random weights.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    if head_dim % 8:
        raise ValueError(f"head_dim ({head_dim}) must be a multiple of 8: FLUX splits it over three rope axes")
    torch.manual_seed(seed)
    tokenizer = _clip_tokenizer()
    vocab = len(tokenizer.get_vocab())
    clip = CLIPTextModel(_clip_config(vocab, clip_dim))
    t5_tokenizer = _t5_tokenizer()
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tokenizer), d_model=joint_dim, d_kv=8, d_ff=2 * joint_dim, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=head_dim, num_attention_heads=num_heads, joint_attention_dim=joint_dim,
        pooled_projection_dim=clip_dim, guidance_embeds=guidance_embeds,
        axes_dims_rope=(head_dim // 4, head_dim // 4, head_dim // 2))
    # FLUX.1's VAE: 16 channels, scaling 0.3611, shift 0.1159 (2x downsampling here instead of 8x)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=4, sample_size=32,
        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**flux_scheduler_config(guidance_embeds)), vae=vae,
        text_encoder=clip, tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=t5_tokenizer, transformer=transformer)
    folder = Path(folder)
    pipe.save_pretrained(folder)
    return folder
