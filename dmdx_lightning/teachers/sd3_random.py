"""Random-weight SD3 pipeline folders, built in code with no download (tests, benchmarks, smoke runs).

:func:`save_random_sd3` writes a folder with the same layout as
``stabilityai/stable-diffusion-3-medium-diffusers`` (``transformer/``, ``vae/``, ``text_encoder*/``,
``tokenizer*/``, ``scheduler/``, ``model_index.json``), so :class:`~dmdx_lightning.teachers.sd3.SD3Teacher`
and diffusers' ``StableDiffusion3Pipeline`` load it exactly as they load the hub weights. The
tokenizers are real byte-level CLIP BPE and T5 unigram tokenizers with tiny in-memory vocabularies.
"""

from __future__ import annotations

from pathlib import Path

import torch


def _clip_tokenizer(max_length: int = 77):
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _clip_config(vocab: int, clip_dim: int):
    """A 2-layer CLIP text encoder's config on :func:`_clip_tokenizer`'s ``vocab`` tokens (every tiny
    family's CLIP: SD3, SDXL, SD 1.x, FLUX)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab, hidden_size=clip_dim, intermediate_size=2 * clip_dim, projection_dim=clip_dim,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu",
        bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)


def _t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(chr(c), -2.0) for c in range(33, 127)]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def save_random_sd3(
    folder: str | Path,
    *,
    num_layers: int = 2,
    num_heads: int = 2,
    head_dim: int = 8,
    latent_size: int = 8,
    latent_channels: int = 4,
    patch_size: int = 2,
    clip_dim: int = 16,
    joint_dim: int = 32,
    with_t5: bool = True,
    shift: float = 3.0,
    seed: int = 0,
) -> Path:
    """Write a random SD3 pipeline folder and return its path.

    Args:
        folder: output directory (created).
        num_layers, num_heads, head_dim: transformer size (``caption_projection_dim = num_heads * head_dim``).
        latent_size: latent height/width (the VAE downsamples images by 2 here).
        latent_channels, patch_size: transformer input channels and patch size.
        clip_dim: hidden and projection width of each CLIP text encoder (pooled = ``2 * clip_dim``).
        joint_dim: T5 width = the transformer's ``joint_attention_dim`` (must be >= ``2 * clip_dim``).
        with_t5: write ``text_encoder_3`` / ``tokenizer_3`` (``False``: a folder without T5).
        shift: the scheduler's timestep shift (3.0 as SD3).
        seed: torch seed of the random weights.
    """
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    if joint_dim < 2 * clip_dim:
        raise ValueError(f"joint_dim ({joint_dim}) must be >= 2 * clip_dim ({2 * clip_dim}): SD3 pads CLIP to T5 width")
    torch.manual_seed(seed)
    tokenizer = _clip_tokenizer()
    vocab = len(tokenizer.get_vocab())

    def clip():
        return CLIPTextModelWithProjection(_clip_config(vocab, clip_dim))

    transformer = SD3Transformer2DModel(
        sample_size=latent_size, patch_size=patch_size, in_channels=latent_channels, out_channels=latent_channels,
        num_layers=num_layers, attention_head_dim=head_dim, num_attention_heads=num_heads,
        joint_attention_dim=joint_dim, caption_projection_dim=num_heads * head_dim,
        pooled_projection_dim=2 * clip_dim, pos_embed_max_size=max(16, latent_size // patch_size))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=4, sample_size=2 * latent_size,
        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    t5_tokenizer = t5 = None
    if with_t5:
        t5_tokenizer = _t5_tokenizer()
        t5 = T5EncoderModel(T5Config(
            vocab_size=len(t5_tokenizer), d_model=joint_dim, d_kv=8, d_ff=2 * joint_dim, num_layers=2, num_heads=2,
            relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), vae=vae,
        text_encoder=clip(), tokenizer=tokenizer, text_encoder_2=clip(), tokenizer_2=tokenizer,
        text_encoder_3=t5, tokenizer_3=t5_tokenizer)
    folder = Path(folder)
    pipe.save_pretrained(folder)
    return folder
