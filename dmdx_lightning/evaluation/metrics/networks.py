"""Loaders of the scoring networks the metrics share (moved here from
``dmdx_lightning.callbacks.metrics``, which re-exports them).

- :func:`load_clip` / :class:`CLIPEmbedder`: a transformers ``CLIPModel`` and its processor, from a
  hub id or a local ``save_pretrained`` folder, with tensor-returning feature methods.
- :func:`load_lpips`: ``lpips.LPIPS`` (lpips 0.1.4) with an offline backbone option.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn


class CLIPEmbedder(nn.Module):
    """A CLIP model whose ``get_image_features`` / ``get_text_features`` return embedding tensors.

    transformers 5 returns a model output object from these methods (the projected embedding in
    ``pooler_output``) where transformers 4 returned the tensor; torchmetrics 1.9 expects the
    tensor. This adapter accepts both, so ``CLIPScore`` works with either version.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def config(self):  # torchmetrics reads text_config.max_position_embeddings to truncate captions
        return self.model.config

    def get_image_features(self, pixel_values: Tensor) -> Tensor:
        return _embedding(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return _embedding(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


def _embedding(output) -> Tensor:
    if isinstance(output, Tensor):
        return output
    for name in ("image_embeds", "text_embeds", "pooler_output"):
        value = getattr(output, name, None)
        if isinstance(value, Tensor):
            return value
    raise TypeError(f"cannot find the CLIP embedding in {type(output).__name__}: expected a tensor or "
                    "an output with image_embeds / text_embeds / pooler_output")


def load_clip(model_name_or_path: str, revision: str | None = None, owner: str = "CLIPScoreCallback",
              argument: str = "model_name_or_path") -> tuple[CLIPEmbedder, object]:
    """``(CLIPEmbedder, processor)`` from a hub id (e.g. ``openai/clip-vit-large-patch14``) or a
    local folder holding ``save_pretrained`` output of a ``CLIPModel`` and its processor.

    ``owner`` and ``argument`` name who asked and which of its arguments held the path, for the error.
    """
    from transformers import AutoProcessor, CLIPModel

    try:
        model = CLIPModel.from_pretrained(model_name_or_path, revision=revision)
        processor = AutoProcessor.from_pretrained(model_name_or_path, revision=revision)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"{owner} could not load {argument}={model_name_or_path!r}: {e}\n"
            "Give a hub id (needs the network or a filled HF cache) or a local folder with a CLIPModel "
            "and its processor (model.save_pretrained(DIR); processor.save_pretrained(DIR)).") from e
    return CLIPEmbedder(model.eval().requires_grad_(False)), processor


def load_lpips(net: str = "alex", backbone_weights: str | None = None, pnet_rand: bool = False) -> nn.Module:
    """``lpips.LPIPS`` with its learned linear layers (they ship in the lpips wheel).

    The backbone (ImageNet AlexNet / VGG16 / SqueezeNet) comes from, in order of precedence:
    ``backbone_weights`` (a torchvision state-dict file, e.g. ``alexnet-owt-7be5be79.pth``, for
    offline clusters), random weights (``pnet_rand=True``, for tests only), or torchvision's usual
    place (``$TORCH_HOME/hub/checkpoints``, downloaded there when missing).
    """
    import lpips

    if net not in ("alex", "vgg", "squeeze"):
        raise ValueError(f"LPIPS net must be 'alex', 'vgg' or 'squeeze', got {net!r}")
    offline = pnet_rand or backbone_weights is not None
    try:
        model = lpips.LPIPS(net=net, pnet_rand=offline, verbose=False)
    except Exception as e:  # torchvision's download error when offline; keep the cause
        raise RuntimeError(
            f"LPIPS could not fetch the ImageNet {net} backbone ({e}). Offline: place torchvision's weight file "
            "in $TORCH_HOME/hub/checkpoints/ or pass backbone_weights=<that file>.") from e
    if backbone_weights is not None:
        _load_lpips_backbone(model.net, backbone_weights)
    return model.eval().requires_grad_(False)


def _load_lpips_backbone(pnet: nn.Module, path: str) -> None:
    """lpips splits torchvision's ``features[i]`` into ``slice<n>.<i>``; map the names back."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"LPIPS backbone_weights file {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    wanted = {}
    for name in pnet.state_dict():
        key = "features." + name.split(".", 1)[1]  # slice2.3.weight -> features.3.weight
        if key not in state:
            raise KeyError(f"LPIPS backbone_weights {path} has no {key!r}: is it torchvision's "
                           f"state dict of the same network ({type(pnet).__name__})?")
        wanted[name] = state[key]
    pnet.load_state_dict(wanted)
