"""Pixel-space discriminator ``D_tau2`` of ADP (the paper, Stage 1, step 3).

Latents are decoded through the teacher's VAE (``teacher.decode``; with gradient for the
student's samples, so the generator learns through the decoder), fed to a FROZEN vision backbone,
and trainable :class:`~dmdx_lightning.discriminators.heads.Head2D` heads read several of its
layers; the logit is the mean over heads. Backbones, each resizing and normalising the
``[-1, 1]`` images to its own expected input:

- :class:`SamBackbone`: SAM's ViT image encoder (transformers ``SamVisionModel``), the paper's choice;
- :class:`Dinov2Backbone`: DINOv2 (transformers ``Dinov2Model``), the paper's ablation;
- :class:`~dmdx_lightning.evaluation.digits.DigitsClassifierBackbone`: the built-in digits
  classifier (quickstart, CPU; it lives with the digits teacher's evaluation code).

Heads are conditioned on the prompt (pooled vector) and on ``t = 0`` (clean images), so the
same :class:`Head2D` serves both discriminators.

Memory: the generator's pixel term keeps, for backward, the activations of a full VAE decode and
of the backbone at its input size (SAM: 1024 px), both with gradient. Two options recompute them in
backward instead (losses and gradients unchanged): ``PixelDiscriminator(decode_checkpointing=True)``
and ``SamBackbone(checkpointing=True)``; ``PixelDiscriminator(decode_batch=1)`` then bounds the
decoder's recomputation to one sample. ``benchmarks/pixel_memory.py`` measures them
(``benchmarks/results/pixel_memory.md``).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dmdx_lightning.discriminators.heads import Head2D

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PixelBackbone(nn.Module):
    """A frozen image network: ``[-1, 1]`` images ``(B, C, H, W)`` -> one ``(B, C', h, w)`` map per layer.

    Subclasses set ``self.net`` and implement :meth:`preprocess` and :meth:`hidden_maps`.
    The backbone never trains and stays in eval mode; gradients still flow through it to the images.
    """

    net: nn.Module
    #: recompute each block in backward instead of keeping its activations (a backbone that
    #: supports it takes a ``checkpointing`` option)
    checkpointing: bool = False

    def freeze(self) -> None:
        self.net.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "PixelBackbone":
        super().train(mode)
        self.net.eval()  # frozen: no dropout, no norm-statistics updates
        return self

    def preprocess(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def hidden_maps(self, inputs: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def forward(self, images: Tensor, layers: Sequence[int]) -> list[Tensor]:
        maps = self.hidden_maps(self.preprocess(images))
        bad = [i for i in layers if not -len(maps) <= i < len(maps)]
        if bad:
            raise ValueError(f"{type(self).__name__} has {len(maps)} layers; layers {bad} do not exist")
        return [maps[i] for i in layers]


def _to_rgb_normalised(images: Tensor, size: int, mean, std) -> Tensor:
    """``[-1, 1]`` images -> 3 channels, bilinear ``size x size``, ImageNet-normalised (differentiable)."""
    x = images.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] != 3:
        raise ValueError(f"pixel backbones take 1- or 3-channel images, got {x.shape[1]} channels")
    if x.shape[-2:] != (size, size):
        # SAM's processor resizes the longest side and pads; our decoded images are square, so a
        # plain resize is the same thing without a padding band.
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    x = (x + 1.0) / 2.0
    mean = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class SamBackbone(PixelBackbone):
    """SAM's ViT image encoder (``SamVisionModel``); maps are the per-block hidden states.

    Args:
        pretrained: hub id or local folder of a ``SamVisionModel`` or a full ``SamModel``
            (e.g. ``facebook/sam-vit-base``; its vision encoder is taken).
        image_size: input resolution (default: the encoder's ``config.image_size``, 1024 for SAM).
        dtype: weight dtype of the frozen encoder (``float32 | float16 | bfloat16``).
        checkpointing: recompute each ViT block in backward (the generator's pixel term) instead of
            keeping its activations: at 1024 px SAM ViT-B keeps 64x64 tokens x 768 wide several
            times per block, and its 4 global-attention blocks their 12 x 4096 x 4096 attention
            weights (4.2 GiB in bf16 all told); with it only the 12 block outputs are kept
            (``benchmarks/results/pixel_memory.md``), for one more
            encoder forward per generator step. Results are unchanged. transformers' own
            ``gradient_checkpointing_enable`` does not serve here: it acts only in training mode,
            and the frozen encoder stays in eval mode.
    """

    def __init__(self, pretrained: str, image_size: int | None = None, dtype: str = "float32",
                 checkpointing: bool = False) -> None:
        from transformers import SamVisionModel

        super().__init__()
        self.pretrained = pretrained
        try:
            net = SamVisionModel.from_pretrained(pretrained, dtype=getattr(torch, dtype))
        except (OSError, ValueError) as e:
            raise OSError(f"could not load a SAM vision encoder from {pretrained!r} ({e}); pass a hub id "
                          "such as facebook/sam-vit-base or a local folder saved with save_pretrained") from e
        self._setup(net, image_size, checkpointing)

    @classmethod
    def from_model(cls, net: nn.Module, image_size: int | None = None, checkpointing: bool = False) -> "SamBackbone":
        """A backbone around an already built ``SamVisionModel`` (benchmarks build the real ViT-B
        config with random weights, on the meta device, without a folder)."""
        backbone = cls.__new__(cls)
        PixelBackbone.__init__(backbone)
        backbone.pretrained = None
        backbone._setup(net, image_size, checkpointing)
        return backbone

    def _setup(self, net: nn.Module, image_size: int | None, checkpointing: bool) -> None:
        from transformers import SamVisionConfig

        self.net = net
        if not isinstance(self.net.config, SamVisionConfig):
            raise ValueError(f"{self.pretrained!r} did not give a SamVisionConfig")
        self.image_size = image_size or self.net.config.image_size
        self.checkpointing = checkpointing
        self.freeze()

    def preprocess(self, images: Tensor) -> Tensor:
        return _to_rgb_normalised(images, self.image_size, IMAGENET_MEAN, IMAGENET_STD).to(self.net.dtype)

    def hidden_maps(self, inputs: Tensor) -> list[Tensor]:
        if self.checkpointing and torch.is_grad_enabled() and inputs.requires_grad:
            return self._checkpointed_maps(inputs)
        out = self.net(pixel_values=inputs, output_hidden_states=True)
        # hidden_states[0] is the patch embedding; blocks follow, channels-last (B, h, w, C)
        return [h.permute(0, 3, 1, 2) for h in out.hidden_states[1:]]

    def _checkpointed_maps(self, inputs: Tensor) -> list[Tensor]:
        """The encoder's blocks one by one (``SamVisionEncoder.forward`` without its neck, which no
        head reads), each under non-reentrant checkpointing; the same maps as :meth:`hidden_maps`."""
        encoder = self.net.vision_encoder
        h = encoder.patch_embed(inputs)
        if encoder.pos_embed is not None:
            h = h + encoder.pos_embed
        maps = []
        for layer in encoder.layers:
            # the frozen encoder has no dropout: recomputing without the RNG state gives the same values
            h = checkpoint(layer, h, use_reentrant=False, preserve_rng_state=False)
            h = h[0] if isinstance(h, tuple) else h  # transformers < 5 returned (hidden_states,)
            maps.append(h.permute(0, 3, 1, 2))
        return maps


class Dinov2Backbone(PixelBackbone):
    """DINOv2 (``Dinov2Model``); maps are the per-layer patch tokens (CLS dropped) as grids.

    Args:
        pretrained: hub id or local folder (e.g. ``facebook/dinov2-base``).
        image_size: input resolution, a multiple of the patch size (224 as DINOv2's processor).
        dtype: weight dtype of the frozen encoder.
    """

    def __init__(self, pretrained: str, image_size: int = 224, dtype: str = "float32") -> None:
        super().__init__()
        from transformers import Dinov2Model

        self.pretrained = pretrained
        self.net = Dinov2Model.from_pretrained(pretrained, dtype=getattr(torch, dtype))
        patch = self.net.config.patch_size
        if image_size % patch:
            raise ValueError(f"image_size {image_size} must be a multiple of DINOv2's patch size {patch}")
        self.image_size = image_size
        self.freeze()

    def preprocess(self, images: Tensor) -> Tensor:
        return _to_rgb_normalised(images, self.image_size, IMAGENET_MEAN, IMAGENET_STD).to(self.net.dtype)

    def hidden_maps(self, inputs: Tensor) -> list[Tensor]:
        out = self.net(pixel_values=inputs, output_hidden_states=True)
        side = self.image_size // self.net.config.patch_size
        maps = []
        for h in out.hidden_states[1:]:
            tokens = h[:, 1:]  # drop CLS
            maps.append(tokens.transpose(1, 2).reshape(h.shape[0], h.shape[-1], side, side))
        return maps


class PixelDiscriminator(nn.Module):
    """``D_tau2``: decode -> frozen backbone -> trainable heads on ``layers``; mean logit over heads.

    Args:
        backbone: a :class:`PixelBackbone` (SAM, DINOv2, or a family's own, e.g. the digits classifier).
        layers: backbone layers that feed heads (negative counts from the end); the paper hooks
            several evenly spaced encoder blocks.
        head_channels: hidden width of every head.
        num_down: stride-2 stages of a head on large maps.
        decode_checkpointing: in the generator's pixel term (the only decode with gradient), recompute
            the VAE decoder's blocks in backward instead of keeping all their activations (at 1024 px
            the largest part of ADP's memory; see ``benchmarks/results/pixel_memory.md``). The
            teacher's ``enable_decode_checkpointing`` turns on its decoder's own per-block
            checkpointing (the diffusers families: their VAE's, which acts only when gradients
            flow); a teacher whose decoder cannot (e.g. the digits teacher) is recomputed whole. Costs one more decode per generator step; losses and gradients are unchanged.
        decode_batch: decode this many samples at a time (``None``: the whole batch at once). With
            ``decode_checkpointing``, a block's recomputation in backward then holds one chunk's
            activations at a time instead of the whole batch's; in the discriminator's step (no
            gradient) it bounds the decoder's working memory the same way. Without checkpointing it
            saves nothing: every chunk's activations are kept for backward alike.
    """

    def __init__(self, backbone: PixelBackbone, layers: Sequence[int] = (-1,), head_channels: int = 256,
                 num_down: int = 3, decode_checkpointing: bool = False, decode_batch: int | None = None) -> None:
        super().__init__()
        if decode_batch is not None and decode_batch < 1:
            raise ValueError(f"decode_batch must be >= 1 or None (the whole batch), got {decode_batch}")
        self.backbone = backbone
        self.layers = list(layers)
        self.head_channels, self.num_down = head_channels, num_down
        self.decode_checkpointing, self.decode_batch = decode_checkpointing, decode_batch
        self._recompute_whole_decode = False
        self.heads = nn.ModuleList()

    @torch.no_grad()
    def build(self, teacher) -> "PixelDiscriminator":
        """Create one head per layer, sized by decoding one zero latent through the backbone (and,
        with ``decode_checkpointing``, turn on the checkpointing of the teacher's decoder)."""
        device = teacher.denoiser_device
        images = teacher.decode(torch.zeros(teacher.latent_shape(1), device=device))
        if self.decode_checkpointing:
            self._recompute_whole_decode = not teacher.enable_decode_checkpointing()
        self.backbone.to(device)
        maps = self.backbone(images, self.layers)
        cond_dim = teacher.encode_prompts([""]).pooled.shape[-1]
        self.heads = nn.ModuleList(
            Head2D(m.shape[1], cond_dim, min(m.shape[2:]), self.head_channels, self.num_down) for m in maps)
        return self

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.heads.parameters())

    def decode(self, teacher, latents: Tensor) -> Tensor:
        """``teacher.decode`` in chunks of ``decode_batch`` (see ``decode_checkpointing``)."""
        chunks = latents.split(self.decode_batch) if self.decode_batch else (latents,)
        whole = self._recompute_whole_decode and torch.is_grad_enabled() and latents.requires_grad
        # a VAE decode draws no random numbers, so the RNG state need not be saved for the recomputation
        images = [checkpoint(teacher.decode, z, use_reentrant=False, preserve_rng_state=False) if whole
                  else teacher.decode(z) for z in chunks]
        return images[0] if len(images) == 1 else torch.cat(images)

    def score_images(self, images: Tensor, pooled: Tensor) -> Tensor:
        """Logits ``(B,)`` of already-decoded ``[-1, 1]`` images."""
        if not len(self.heads):
            raise RuntimeError("PixelDiscriminator.build(teacher) must run before the first forward")
        maps = self.backbone(images, self.layers)
        t = torch.zeros(images.shape[0], device=images.device)
        return torch.stack([head(m, t, pooled) for head, m in zip(self.heads, maps)]).mean(0)

    def forward(self, teacher, x0: Tensor, cond) -> Tensor:
        """Logits of latents ``x0``: decoded by :meth:`decode` (differentiable) first."""
        return self.score_images(self.decode(teacher, x0), cond.pooled)
