"""Pixel discriminator: real tiny AutoencoderKL + SamVisionModel / Dinov2Model built in code and
round-tripped through save_pretrained / from_pretrained, and the digits-classifier backbone."""

import pytest
import torch
from torch import nn

from dmdx_lightning.discriminators.pixel import IMAGENET_MEAN, IMAGENET_STD, Dinov2Backbone, PixelDiscriminator, SamBackbone
from dmdx_lightning.evaluation.digits import DigitsClassifierBackbone
from dmdx_lightning.teachers.base import Conditioning
from dmdx_lightning.teachers.digits import DIGIT_PROMPTS


class VAETeacher(nn.Module):
    """The three things the pixel discriminator asks of a teacher, over a real (tiny) AutoencoderKL:
    latent shape, a differentiable decode to [-1, 1], and pooled prompt vectors."""

    family = "tiny_vae"

    def __init__(self, vae):
        super().__init__()
        self.vae = vae.requires_grad_(False).eval()

    @property
    def denoiser_device(self):
        return next(self.vae.parameters()).device

    def latent_shape(self, batch_size):
        return (batch_size, self.vae.config.latent_channels, 8, 8)

    def decode(self, latents):
        return self.vae.decode(latents / self.vae.config.scaling_factor).sample.clamp(-1, 1)

    def encode_prompts(self, prompts):
        pooled = torch.stack([torch.full((6,), float(len(p) % 5)) for p in prompts])
        return Conditioning(pooled=pooled)


@pytest.fixture(scope="module")
def tiny_vae_teacher(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16],
                        latent_channels=4, norm_num_groups=4, layers_per_block=1)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return VAETeacher(AutoencoderKL.from_pretrained(path))


def test_sam_pixel_discriminator_decodes_with_gradient(tiny_vae_teacher, tiny_sam_path):
    backbone = SamBackbone(tiny_sam_path)
    assert backbone.image_size == 32
    disc = PixelDiscriminator(backbone, layers=[0, -1], head_channels=16).build(tiny_vae_teacher)
    assert len(disc.heads) == 2
    latents = torch.randn(tiny_vae_teacher.latent_shape(3), requires_grad=True)
    cond = tiny_vae_teacher.encode_prompts(["a", "bb", "ccc"])
    logits = disc(tiny_vae_teacher, latents, cond)
    assert logits.shape == (3,) and torch.isfinite(logits).all()
    logits.sum().backward()
    # the student's gradient reaches its latents through the frozen backbone and the VAE decoder
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    assert all(p.grad is not None for p in disc.heads.parameters())
    assert all(p.grad is None and not p.requires_grad for p in backbone.parameters())
    assert all(p.grad is None for p in tiny_vae_teacher.vae.parameters())


def test_sam_preprocessing_resizes_and_normalises(tiny_sam_path):
    backbone = SamBackbone(tiny_sam_path)
    gray = torch.full((2, 1, 8, 8), -1.0)  # black 8x8 grayscale -> 3 x 32 x 32, ImageNet-normalised
    x = backbone.preprocess(gray)
    assert x.shape == (2, 3, 32, 32)
    expected = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])
    torch.testing.assert_close(x[0, :, 5, 7], expected)
    maps = backbone(gray, [0, 1, 2])
    assert [tuple(m.shape) for m in maps] == [(2, 32, 4, 4)] * 3  # channels-first block maps
    with pytest.raises(ValueError, match="layers \\[7\\] do not exist"):
        backbone(gray, [7])


def test_backbone_stays_frozen_in_train_mode(tiny_sam_path, tiny_vae_teacher):
    disc = PixelDiscriminator(SamBackbone(tiny_sam_path), layers=[-1], head_channels=16).build(tiny_vae_teacher)
    disc.train()
    assert not disc.backbone.net.training and disc.heads.training


def test_dinov2_backbone_maps_patch_tokens(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=28, patch_size=14)).save_pretrained(tmp_path)
    backbone = Dinov2Backbone(str(tmp_path), image_size=28)
    images = torch.rand(2, 3, 16, 16, requires_grad=True)
    maps = backbone(images * 2 - 1, [0, -1])
    assert [tuple(m.shape) for m in maps] == [(2, 32, 2, 2)] * 2
    maps[-1].sum().backward()
    assert images.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="multiple of DINOv2's patch size"):
        Dinov2Backbone(str(tmp_path), image_size=30)


def test_digits_classifier_backbone(digits_teacher):
    disc = PixelDiscriminator(DigitsClassifierBackbone(), layers=[1, 2], head_channels=16).build(digits_teacher)
    maps = disc.backbone(torch.zeros(2, 1, 8, 8), [0, 1, 2])
    assert [tuple(m.shape[1:]) for m in maps] == [(32, 8, 8), (64, 4, 4), (128, 2, 2)]
    x0 = torch.rand(4, 1, 8, 8, requires_grad=True)
    cond = digits_teacher.encode_prompts(list(DIGIT_PROMPTS[:4]))
    disc(digits_teacher, x0 * 1.8 - 0.9, cond).sum().backward()
    assert x0.grad.abs().sum() > 0


def test_unbuilt_discriminator_is_a_clear_error(tiny_sam_path):
    disc = PixelDiscriminator(SamBackbone(tiny_sam_path))
    with pytest.raises(RuntimeError, match="build"):
        disc.score_images(torch.zeros(1, 3, 8, 8), torch.zeros(1, 6))


def test_missing_sam_weights_name_the_path(tmp_path):
    with pytest.raises(OSError, match="no_such_sam"):
        SamBackbone(str(tmp_path / "no_such_sam"))
