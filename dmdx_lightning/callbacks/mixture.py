"""End-of-fit report for the Gaussian-mixture teacher: exact coverage, precision and TV per arm.

One row per run merged into a JSON file (like :class:`~dmdx_lightning.evaluation.digits.DigitsSummary`),
and the same numbers logged as ``mixture/*`` so TensorBoard shows them next to the losses.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from dmdx_lightning.rng import fixed_noise
from dmdx_lightning.callbacks.summary import TrainingDiagnostics, arm_name, update_summary
from dmdx_lightning.methods.distributed import outside_training_step, summary_ranks
from dmdx_lightning.teachers.mixture import MixtureTeacher, class_prompt, mixture_metrics


@torch.no_grad()
def evaluate_mixture(module, samples_per_class: int = 1000, teacher: bool = False,
                     teacher_steps: int | None = None, teacher_cfg_scale: float | None = None) -> dict:
    """Score ``module``'s student (or, with ``teacher=True``, the teacher's own ODE sampler) on fixed seeds.

    The noise of sample ``i`` is seeded by ``i`` so every arm of a study sees the same noise.
    """
    mixture_teacher: MixtureTeacher = module.teacher
    if not isinstance(mixture_teacher, MixtureTeacher):
        raise TypeError(f"mixture metrics need a MixtureTeacher, this run's teacher is {type(mixture_teacher).__name__}")
    K = mixture_teacher.mixture.num_classes
    prompts = [class_prompt(k) for k in range(K) for _ in range(samples_per_class)]
    cond = mixture_teacher.encode_prompts(prompts)
    noise = fixed_noise(mixture_teacher.latent_shape(len(prompts)), list(range(len(prompts)))).to(module.device)
    was_training = module.training
    module.eval()
    steps = teacher_steps or mixture_teacher.sample_steps
    cfg = teacher_cfg_scale if teacher_cfg_scale is not None else mixture_teacher.cfg_scale
    chunks = []
    for i in range(0, len(prompts), 500):
        part, c = noise[i:i + 500], cond[i:i + 500]
        if teacher:
            chunks.append(mixture_teacher.sample_ode(part, c, steps, cfg))
        else:
            gen = torch.Generator(module.device).manual_seed(i)
            chunks.append(module.sample(c, part, generator=gen))
    module.train(was_training)
    x = torch.cat(chunks)
    nfe = steps * (1 if cfg == 1.0 else 2) if teacher else len(module.student_timesteps)
    return {"nfe": nfe, **mixture_metrics(x, cond.labels, mixture_teacher.mixture)}


class MixtureSummary(TrainingDiagnostics):
    """Score the student at the start (``initial``) and end of fit; the teacher once per file.

    Args:
        path: the summary JSON file (rows merged by arm name).
        arm: this run's row name (default: :func:`~dmdx_lightning.callbacks.summary.arm_name`).
        samples_per_class: evaluation samples per class (seeds ``0..``).
        score_initial: also score the student before its first step (tells "failed to
            de-collapse" from "collapsed"), as row ``<arm>@init``.
        score_teacher: add the teacher's row (its own ODE sampler) when the file lacks one.
    """

    def __init__(self, path: str = "runs/mixture/summary.json", arm: str | None = None,
                 samples_per_class: int = 1000, score_initial: bool = True, score_teacher: bool = True) -> None:
        self.path, self.arm = path, arm
        self.samples_per_class, self.score_initial = samples_per_class, score_initial
        self.score_teacher = score_teacher
        super().__init__()

    def _arm(self, module) -> str:
        return self.arm or arm_name(module)

    def on_train_start(self, trainer, module) -> None:
        samples, _ = summary_ranks(trainer)
        if not (self.score_initial and samples):
            return
        with outside_training_step(trainer.strategy):
            row = evaluate_mixture(module, self.samples_per_class)
        if trainer.is_global_zero:
            update_summary(self.path, f"{self._arm(module)}@init", row)

    def on_fit_end(self, trainer, module) -> None:
        samples, everyone = summary_ranks(trainer)
        if not samples:
            return
        score_teacher = self.score_teacher and trainer.is_global_zero and not _has_row(self.path, "teacher")
        if everyone:
            score_teacher = bool(trainer.strategy.broadcast(score_teacher, src=0))
        with outside_training_step(trainer.strategy):
            teacher = evaluate_mixture(module, self.samples_per_class, teacher=True) if score_teacher else None
            row = evaluate_mixture(module, self.samples_per_class)
        if not trainer.is_global_zero:
            return
        if teacher is not None:
            update_summary(self.path, "teacher", teacher)
        row.update(self.diagnostics())
        update_summary(self.path, self._arm(module), row)
        if module.logger is not None:
            module.logger.log_metrics({f"mixture/{k}": row[k] for k in ("coverage", "precision", "tv")},
                                      step=trainer.global_step)
        print(f"{self._arm(module)}: modes {row['modes_covered']}/{row['modes_total']}, "
              f"precision {row['precision']:.3f}, TV {row['tv']:.3f}")


def _has_row(path: str, name: str) -> bool:
    p = Path(path)
    return p.is_file() and name in json.loads(p.read_text())
