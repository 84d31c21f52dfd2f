"""End-of-fit reports: one arm per run, merged into one summary JSON file (row names, atomic writes).

The reports themselves belong to a teacher family: ``DigitsSummary`` in
:mod:`dmdx_lightning.evaluation.digits`, ``MixtureSummary`` in :mod:`dmdx_lightning.callbacks.mixture`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning.pytorch as pl

from dmdx_lightning.atomic import write_json_atomic
from dmdx_lightning.methods.adm import ADMModule
from dmdx_lightning.methods.adp import ADPModule


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


class TrainingDiagnostics(pl.Callback):
    """Base of the end-of-fit reports: keeps the run's length and ADM's training diagnostics for the
    summary row.

    ``iterations`` (``trainer.global_step``) and ``generator_updates`` at the end of training;
    ``logit_gap`` (``E[D(real move)] - E[D(fake move)]``: how well the discriminator separates the
    moves; the ADM issue expects it to grow with d) and ``dmd_alignment`` (the cosine between the
    directions ADM and DMD move the student's samples), each the mean of the latest logged value
    at the last ``window`` iterations; :meth:`diagnostics` gives those present (the last two: ADM
    runs only). Each rank logs the diagnostics of its own share of the batch: in a multi-process run
    the means are averaged over the ranks at the end of training (:meth:`on_train_end`, which every
    rank runs), so the row describes the whole batch, not rank 0's share.
    """

    TRACKED = {"logit_gap": "train/discriminator/logit_gap", "dmd_alignment": "train/generator/dmd_alignment"}

    def __init__(self, window: int = 50) -> None:
        self.window = window
        self._recent: dict[str, list[float]] = {name: [] for name in self.TRACKED}
        self._length: dict[str, int] = {}
        self._over_ranks: dict[str, float] | None = None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._length = {"iterations": trainer.global_step}
        if hasattr(module, "generator_updates"):
            self._length["generator_updates"] = int(module.generator_updates)
        for name, key in self.TRACKED.items():
            value = trainer.callback_metrics.get(key)
            if value is not None and math.isfinite(float(value)):
                self._recent[name] = (self._recent[name] + [float(value)])[-self.window:]

    def _local_means(self) -> dict[str, float]:
        return {name: sum(v) / len(v) for name, v in self._recent.items() if v}

    def on_train_end(self, trainer, module) -> None:
        # every rank runs this hook at the same point, so the one collective is safe here (not in the
        # reports' on_fit_end, which under DDP runs on rank 0 alone)
        if trainer.world_size < 2:
            return
        import torch

        local = self._local_means()
        # per name: (sum of the ranks' means, ranks that have one); a rank whose values were all
        # non-finite has none
        pairs = torch.tensor([[local.get(name, 0.0), float(name in local)] for name in self.TRACKED],
                             dtype=torch.float64, device=module.device)
        total = trainer.strategy.reduce(pairs, reduce_op="sum").tolist()
        self._over_ranks = {name: s / n for name, (s, n) in zip(self.TRACKED, total) if n}

    def diagnostics(self) -> dict[str, float | int]:
        means = self._over_ranks if self._over_ranks is not None else self._local_means()
        return {**self._length, **means}


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
