"""The built-in digits teacher: a class-conditional flow-matching model on scikit-learn's 8x8 digits.

No download is ever needed: the data ship with scikit-learn, and the trained weights ship in
``dmdx_lightning/assets`` (remake them with ``dmdx fit --config configs/digits/teacher.yaml`` and
``configs/digits/classifier.yaml``). Prompts are text ("a handwritten digit seven", "the digit 7");
the empty prompt is the unconditional branch for CFG. The "VAE" is the identity on pixels, and a
frozen digits classifier stands in for SAM (pixel discriminator backbone) and Inception
(evaluation features). ``dmdx export`` writes a trained student as a weights file of this same
format (``student.safetensors``), loaded back by ``dmdx_lightning.export.load_export``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from dmdx_lightning.atomic import atomic_path
from dmdx_lightning.schedules import FlowMatchSchedule, sample_t
from dmdx_lightning.teachers.base import Conditioning, Teacher
from dmdx_lightning.teachers.blocks import ResBlock, timestep_embedding

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_TEACHER = ASSETS / "digits_teacher.safetensors"
DEFAULT_CLASSIFIER = ASSETS / "digits_classifier.safetensors"

NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # label index of the empty prompt
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def digit_prompt(label: int) -> str:
    return f"a handwritten digit {DIGIT_WORDS[label]}"


DIGIT_PROMPTS: tuple[str, ...] = tuple(digit_prompt(i) for i in range(NUM_CLASSES))


def prompt_to_label(prompt: str) -> int:
    """Map a prompt to its digit: a digit word or a single numeral; ``""`` is the null class."""
    text = prompt.strip().lower()
    if not text:
        return NULL_CLASS
    found = {DIGIT_WORDS.index(w) for w in re.findall(r"[a-z]+", text) if w in DIGIT_WORDS}
    found |= {int(d) for d in re.findall(r"\b\d\b", text)}
    if len(found) != 1:
        raise ValueError(
            f"digits teacher cannot read prompt {prompt!r}: it must name exactly one digit "
            f"(a word zero..nine or a numeral 0-9), e.g. {DIGIT_PROMPTS[7]!r}")
    return found.pop()


def load_digits_data(split: str = "train", seed: int = 0) -> tuple[Tensor, Tensor]:
    """scikit-learn's 1797 digits as ``(N, 1, 8, 8)`` in ``[-1, 1]`` and labels; fixed 80/20 split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(x))
    idx = {"train": perm[:cut], "test": perm[cut:], "all": perm}[split]
    return x[idx], y[idx]


# -------------------------------------------------------------------------------- networks
class DigitsDenoiser(nn.Module):
    """Small conv net ``(x_t, timestep, label) -> velocity`` on ``(B, 1, 8, 8)``.

    Label ``10`` is the empty prompt. ``blocks`` are the discriminator's feature blocks.
    """

    def __init__(self, channels: int = 64, num_blocks: int = 4, emb_dim: int = 128) -> None:
        super().__init__()
        self.config = {"channels": channels, "num_blocks": num_blocks, "emb_dim": emb_dim}
        self.emb_dim = emb_dim
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(NUM_CLASSES + 1, emb_dim)
        self.conv_in = nn.Conv2d(1, channels, 3, padding=1)
        self.blocks = nn.ModuleList(ResBlock(channels, emb_dim) for _ in range(num_blocks))
        self.norm_out = nn.GroupNorm(8, channels)
        self.conv_out = nn.Conv2d(channels, 1, 3, padding=1)

    def forward(self, x: Tensor, timestep: Tensor, labels: Tensor) -> Tensor:
        emb = F.silu(self.time_mlp(timestep_embedding(timestep, self.emb_dim)) + self.label_emb(labels))
        h = self.conv_in(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))


class DigitsClassifier(nn.Module):
    """Frozen evaluation network: ``hidden_states`` feed the pixel discriminator, ``features`` FD."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.config = {"width": width}
        self.stages = nn.ModuleList([
            nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.SiLU()),                 # 8x8
            nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU()),  # 4x4
            nn.Sequential(nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), nn.SiLU()),  # 2x2
        ])
        self.head = nn.Linear(4 * width, NUM_CLASSES)

    def hidden_states(self, x: Tensor) -> list[Tensor]:
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps

    def features(self, x: Tensor) -> Tensor:
        return self.hidden_states(x)[-1].mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def save_network(net: nn.Module, path: str | Path) -> None:
    """Write weights as safetensors with the constructor config in the metadata (atomic rename)."""
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"config": json.dumps(net.config), "class": type(net).__name__})


def load_network(cls: type[nn.Module], path: str | Path) -> nn.Module:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{cls.__name__} weights not found at {path}. Remake them with "
            f"`dmdx fit --config configs/digits/{'teacher' if cls is DigitsDenoiser else 'classifier'}.yaml`.")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise ValueError(f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupted.") from None
    if meta.get("class") != cls.__name__:
        raise ValueError(f"{path} holds a {meta.get('class')!r}, not a {cls.__name__}.")
    net = cls(**json.loads(meta["config"]))
    net.load_state_dict(load_file(str(path)))
    return net


def load_classifier(path: str | Path | None = None) -> DigitsClassifier:
    net = load_network(DigitsClassifier, path or DEFAULT_CLASSIFIER)
    return net.requires_grad_(False).eval()


# -------------------------------------------------------------------------------- teacher
class DigitsTeacher(Teacher):
    """Built-in flow-matching teacher on 8x8 digits (runs the whole pipeline on a CPU in minutes).

    Args:
        weights: safetensors file of a trained :class:`DigitsDenoiser` (default: the packaged one).
        sample_steps: Euler steps of the teacher's own ODE sampler (ODE pairs, evaluation).
        cfg_scale: the teacher's default guidance scale.
        **kwargs: :class:`~dmdx_lightning.teachers.base.Teacher` options (``mode``, LoRA size, ...).
    """

    family = "digits"
    prediction_type = "flow"
    default_lora_targets = ("conv1", "conv2", "film")
    example_prompts: tuple[str, ...] = DIGIT_PROMPTS
    #: ``dmdx export`` writes the student as a digits weights file (``student.safetensors``, the
    #: packaged teacher's format) and the sampler settings; :meth:`load_student_export` loads it
    export_formats = ("safetensors",)

    def __init__(self, weights: str | None = None, sample_steps: int = 16, cfg_scale: float = 2.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.schedule = FlowMatchSchedule(shift=1.0)
        self.weights = str(weights or DEFAULT_TEACHER)
        self.sample_steps = int(sample_steps)
        self.cfg_scale = float(cfg_scale)
        try:
            denoiser = load_network(DigitsDenoiser, self.weights)
        except (OSError, ValueError) as e:
            # name the config key: the user's fix is in their YAML, not in this file
            raise type(e)(f"DigitsTeacher `weights` (config key model.init_args.teacher.init_args.weights) = "
                          f"{self.weights!r}: {e} Leave the key out to use the packaged weights.") from e
        self.setup_roles(denoiser)

    def identity(self) -> str:
        """The weights file."""
        return self.weights

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        labels = torch.tensor([prompt_to_label(p) for p in prompts], dtype=torch.long,
                              device=self.denoiser_device)
        return Conditioning(labels=labels, pooled=F.one_hot(labels, NUM_CLASSES + 1).float())

    def model_output(self, net: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        return net(x_t, self.schedule.model_timestep(t), cond.labels)

    def feature_blocks(self, net: nn.Module) -> Sequence[nn.Module]:
        return net.blocks

    def latent_shape(self, batch_size: int) -> tuple[int, ...]:
        return (batch_size, 1, 8, 8)

    def decode(self, latents: Tensor) -> Tensor:
        return latents.clamp(-1, 1)

    def encode(self, images: Tensor) -> Tensor:
        return images

    # ------------------------------------------------------------------ export
    def student_config(self) -> dict:
        """The sampler settings; the network's size is in the student file itself."""
        return {"sample_steps": self.sample_steps, "cfg_scale": self.cfg_scale}

    def save_student(self, net: nn.Module, path: Path) -> None:
        """A :class:`DigitsDenoiser` weights file (its config in the metadata), as the packaged
        teacher's: it can also serve as ``weights`` of a DigitsTeacher."""
        save_network(net, path)

    @classmethod
    def load_student_export(cls, weights: Path, init_args: dict) -> "DigitsTeacher":
        return cls(weights=str(weights), **init_args, build_roles=("student",))


# -------------------------------------------------------------------------------- making the weights
class _DigitsTraining(pl.LightningModule):
    """Shared plumbing of the two training jobs that make the packaged weights."""

    def __init__(self, output: str, lr: float, batch_size: int) -> None:
        super().__init__()
        self.output, self.lr, self.batch_size = output, lr, batch_size

    def train_dataloader(self):
        x, y = load_digits_data("train")
        ds = torch.utils.data.TensorDataset(x, y)
        return torch.utils.data.DataLoader(ds, batch_size=self.batch_size, shuffle=True, drop_last=True)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=0.0)
        steps = self.trainer.estimated_stepping_batches
        return {"optimizer": opt, "lr_scheduler": {
            "scheduler": torch.optim.lr_scheduler.OneCycleLR(opt, self.lr, total_steps=steps, pct_start=0.05),
            "interval": "step"}}

    def on_fit_end(self) -> None:
        if self.trainer.is_global_zero:
            save_network(self.net, self.output)


class DigitsTeacherTraining(_DigitsTraining):
    """Train the digits flow-matching teacher (labels dropped 10% of the time for CFG).

    Args:
        output: where the safetensors weights are written at the end of fit.
        channels, num_blocks: network size.
        label_dropout: probability of training on the empty prompt (enables CFG).
    """

    def __init__(self, output: str = str(DEFAULT_TEACHER), channels: int = 64, num_blocks: int = 4,
                 lr: float = 2e-3, batch_size: int = 128, label_dropout: float = 0.1) -> None:
        super().__init__(output, lr, batch_size)
        self.net = DigitsDenoiser(channels, num_blocks)
        self.schedule = FlowMatchSchedule()
        self.label_dropout = label_dropout

    def training_step(self, batch, batch_idx):
        x0, y = batch
        y = torch.where(torch.rand(y.shape, device=y.device) < self.label_dropout, NULL_CLASS, y)
        eps = torch.randn_like(x0)
        t = sample_t("logit_normal", x0.shape[0], device=x0.device)
        x_t = self.schedule.add_noise(x0, eps, t)
        pred = self.net(x_t, self.schedule.model_timestep(t), y)
        loss = F.mse_loss(pred, self.schedule.training_target(x0, eps, t, "flow"))
        self.log("train/flow_matching", loss, prog_bar=True)
        return loss


class DigitsClassifierTraining(_DigitsTraining):
    """Train the frozen evaluation classifier; logs held-out accuracy (``val/accuracy``)."""

    def __init__(self, output: str = str(DEFAULT_CLASSIFIER), width: int = 32, lr: float = 3e-3,
                 batch_size: int = 128) -> None:
        super().__init__(output, lr, batch_size)
        self.net = DigitsClassifier(width)

    def training_step(self, batch, batch_idx):
        x, y = batch
        x = x + 0.05 * torch.randn_like(x)  # mild noise: students' samples are not pixel-perfect
        loss = F.cross_entropy(self.net(x), y)
        self.log("train/ce", loss, prog_bar=True)
        return loss

    def val_dataloader(self):
        x, y = load_digits_data("test")
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=512)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/accuracy", (self.net(x).argmax(-1) == y).float().mean(), prog_bar=True)
