"""End-of-fit report for the digits teacher: one arm per run, merged into one summary.json."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_only

from dmdx_lightning.callbacks.metrics import digits_metrics
from dmdx_lightning.callbacks.samples import fixed_noise
from dmdx_lightning.methods.adm import ADMModule
from dmdx_lightning.methods.adp import ADPModule
from dmdx_lightning.teachers.digits import DIGIT_PROMPTS, load_classifier


def _timed(fn, n: int) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - start) / n


def write_json_atomic(path: str | Path, data) -> None:
    """Write JSON through a temporary file and a rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def arm_name(module: pl.LightningModule) -> str:
    """A run's row name in reports (``<method>_<n>step``, e.g. ``adm_1step``), the benchmark's names.

    ADM's losses are the arms ``adm`` / ``dmd`` / ``dmd2``; started from an ADP checkpoint
    (``init_from``) ADM is the paper's two-stage ``dmdx`` and the baselines get ``_adp``. ADP with
    no adversarial player is the regression ablation ``mse``.
    """
    if isinstance(module, ADMModule):
        name = module.loss if not module.init_from else ("dmdx" if module.loss == "adm" else f"{module.loss}_adp")
    elif isinstance(module, ADPModule):
        name = "adp" if "discriminator" in module.players else "mse"
    else:
        name = type(module).__name__.removesuffix("Module").lower()
    return f"{name}_{len(module.student_timesteps)}step"


def update_summary(path: str | Path, arm: str, row: dict) -> None:
    """Set one arm's row of a summary JSON file, keeping the other arms."""
    path = Path(path)
    summary = json.loads(path.read_text()) if path.is_file() else {}
    summary[arm] = row
    write_json_atomic(path, summary)


def format_table(summary: dict) -> str:
    cols = ("nfe", "class_accuracy", "fd", "precision", "recall", "class_coverage", "seconds_per_sample")
    lines = ["| arm | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for arm, row in summary.items():
        cells = [f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in cols]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


class DigitsSummary(pl.Callback):
    """After fit, score the student (and the teacher, if the file lacks it) on fixed seeds.

    Writes ``{arm: {nfe, class_accuracy, fd, class_coverage, seconds_per_sample}}`` into
    ``path``, keeping the other arms already there (so several runs fill one table).

    Args:
        path: the summary JSON file.
        arm: this run's row name (default: :func:`arm_name`, e.g. ``adm_1step``).
        samples_per_digit: samples per prompt (seeds ``0..n-1``).
        teacher_steps, teacher_cfg_scale: the teacher arm's sampler (default: the teacher's own).
    """

    def __init__(self, path: str = "runs/quickstart/summary.json", arm: str | None = None,
                 samples_per_digit: int = 50, teacher_steps: int | None = None,
                 teacher_cfg_scale: float | None = None) -> None:
        self.path, self.arm = Path(path), arm
        self.samples_per_digit = samples_per_digit
        self.teacher_steps, self.teacher_cfg_scale = teacher_steps, teacher_cfg_scale

    @rank_zero_only
    def on_fit_end(self, trainer, module) -> None:
        summary = json.loads(self.path.read_text()) if self.path.is_file() else {}
        teacher = module.teacher
        prompts = [p for p in DIGIT_PROMPTS for _ in range(self.samples_per_digit)]
        cond = teacher.encode_prompts(prompts)
        noise = fixed_noise(teacher.latent_shape(len(prompts)), list(range(len(prompts)))).to(module.device)
        classifier = load_classifier()
        module.eval()
        with torch.no_grad():
            if "teacher" not in summary:
                steps = self.teacher_steps or teacher.sample_steps
                cfg = self.teacher_cfg_scale or teacher.cfg_scale
                x, sps = _timed(lambda: teacher.sample_ode(noise, cond, steps, cfg), len(prompts))
                summary["teacher"] = {"nfe": steps * (2 if cfg != 1.0 else 1), "cfg_scale": cfg,
                                      **digits_metrics(x, cond.labels, classifier), "seconds_per_sample": sps}
            gen = torch.Generator(module.device).manual_seed(0)
            x, sps = _timed(lambda: module.sample(cond, noise, generator=gen), len(prompts))
            summary[self.arm or arm_name(module)] = {
                "nfe": len(module.student_timesteps), **digits_metrics(x, cond.labels, classifier),
                "seconds_per_sample": sps}
        write_json_atomic(self.path, summary)
        print(f"\n{self.path}:\n{format_table(summary)}\n")
