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
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmdx_lightning.discriminators.heads import Head2D

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PixelBackbone(nn.Module):
    """A frozen image network: ``[-1, 1]`` images ``(B, C, H, W)`` -> one ``(B, C', h, w)`` map per layer.

    Subclasses set ``self.net`` and implement :meth:`preprocess` and :meth:`hidden_maps`.
    The backbone never trains and stays in eval mode; gradients still flow through it to the images.
    """

    net: nn.Module

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
    """

    def __init__(self, pretrained: str, image_size: int | None = None, dtype: str = "float32") -> None:
        super().__init__()
        from transformers import SamVisionConfig, SamVisionModel

        self.pretrained = pretrained
        torch_dtype = getattr(torch, dtype)
        try:
            self.net = SamVisionModel.from_pretrained(pretrained, dtype=torch_dtype)
        except (OSError, ValueError) as e:
            raise OSError(f"could not load a SAM vision encoder from {pretrained!r} ({e}); pass a hub id "
                          "such as facebook/sam-vit-base or a local folder saved with save_pretrained") from e
        if not isinstance(self.net.config, SamVisionConfig):
            raise ValueError(f"{pretrained!r} did not give a SamVisionConfig")
        self.image_size = image_size or self.net.config.image_size
        self.freeze()

    def preprocess(self, images: Tensor) -> Tensor:
        return _to_rgb_normalised(images, self.image_size, IMAGENET_MEAN, IMAGENET_STD).to(self.net.dtype)

    def hidden_maps(self, inputs: Tensor) -> list[Tensor]:
        out = self.net(pixel_values=inputs, output_hidden_states=True)
        # hidden_states[0] is the patch embedding; blocks follow, channels-last (B, h, w, C)
        return [h.permute(0, 3, 1, 2) for h in out.hidden_states[1:]]


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
    """

    def __init__(self, backbone: PixelBackbone, layers: Sequence[int] = (-1,), head_channels: int = 256,
                 num_down: int = 3) -> None:
        super().__init__()
        self.backbone = backbone
        self.layers = list(layers)
        self.head_channels, self.num_down = head_channels, num_down
        self.heads = nn.ModuleList()

    @torch.no_grad()
    def build(self, teacher) -> "PixelDiscriminator":
        """Create one head per layer, sized by decoding one zero latent through the backbone."""
        device = teacher.denoiser_device
        images = teacher.decode(torch.zeros(teacher.latent_shape(1), device=device))
        self.backbone.to(device)
        maps = self.backbone(images, self.layers)
        cond_dim = teacher.encode_prompts([""]).pooled.shape[-1]
        self.heads = nn.ModuleList(
            Head2D(m.shape[1], cond_dim, min(m.shape[2:]), self.head_channels, self.num_down) for m in maps)
        return self

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.heads.parameters())

    def score_images(self, images: Tensor, pooled: Tensor) -> Tensor:
        """Logits ``(B,)`` of already-decoded ``[-1, 1]`` images."""
        if not len(self.heads):
            raise RuntimeError("PixelDiscriminator.build(teacher) must run before the first forward")
        maps = self.backbone(images, self.layers)
        t = torch.zeros(images.shape[0], device=images.device)
        return torch.stack([head(m, t, pooled) for head, m in zip(self.heads, maps)]).mean(0)

    def forward(self, teacher, x0: Tensor, cond) -> Tensor:
        """Logits of latents ``x0``: decoded by ``teacher.decode`` (differentiable) first."""
        return self.score_images(teacher.decode(x0), cond.pooled)
