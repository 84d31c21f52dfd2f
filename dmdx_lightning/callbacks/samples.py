"""Sample grids: fixed prompts and seeds, student (and once, teacher) grids to TensorBoard and PNG."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
import torchvision
from torch import Tensor

from dmdx_lightning.methods.distributed import outside_training_step
from dmdx_lightning.rng import fixed_noise


def unit_range(images: Tensor) -> Tensor:
    """Images in ``[-1, 1]`` (the teachers' ``decode``) -> float in ``[0, 1]`` (clamped)."""
    return (images.float().clamp(-1, 1) + 1) / 2


def to_grid(images: Tensor, nrow: int) -> Tensor:
    """``[-1, 1]`` images (video: first frame) -> one ``(3, H, W)`` grid in ``[0, 1]``."""
    if images.ndim == 5:  # (B, C, F, H, W)
        images = images[:, :, 0]
    return torchvision.utils.make_grid(unit_range(images).cpu(), nrow=nrow, padding=1)


class SampleGrid(pl.Callback):
    """Every ``every_n_steps`` optimizer steps (and at the end of fit) draw the student's samples
    for fixed prompts and seeds; log them to TensorBoard (``samples/student``) and save a PNG under
    ``<log_dir>/samples/``. The teacher's grid (``samples/teacher``) is drawn once.

    Args:
        prompts: the grid's rows (default: the teacher's ``example_prompts``).
        samples_per_prompt: columns; seeds are ``seed, seed + 1, ...`` per column.
        seed: first noise seed.
        every_n_steps: cadence in Lightning ``global_step`` units (optimizer steps); 0 = only at fit end.
        teacher_steps, teacher_cfg_scale: the teacher's own sampler for its reference grid
            (default: the teacher's ``sample_steps`` / ``cfg_scale``).
        log_teacher: draw the teacher grid once.
    """

    def __init__(self, prompts: list[str] | None = None, samples_per_prompt: int = 8, seed: int = 0,
                 every_n_steps: int = 0, teacher_steps: int | None = None,
                 teacher_cfg_scale: float | None = None, log_teacher: bool = True) -> None:
        self.prompts = prompts
        self.samples_per_prompt = samples_per_prompt
        self.seed = seed
        self.every_n_steps = every_n_steps
        self.teacher_steps, self.teacher_cfg_scale = teacher_steps, teacher_cfg_scale
        self.log_teacher = log_teacher
        self._teacher_done = False
        self._last_step = -1
        self._dir: Path | None = None

    def setup(self, trainer: pl.Trainer, module, stage: str) -> None:
        # trainer.log_dir is a collective under DDP (rank 0 broadcasts its logger's folder), so it is
        # read here, in a hook every rank runs at the same point, and never in draw: there (rank 0
        # alone, before) the broadcast waited for ranks already in the next step's gradient
        # all-reduce, and a multi-process run hung at its first grid
        self._dir = Path(trainer.log_dir or trainer.default_root_dir) / "samples"

    def _inputs(self, module):
        teacher = module.teacher
        prompts = self.prompts or list(teacher.example_prompts)
        rows = [p for p in prompts for _ in range(self.samples_per_prompt)]
        seeds = [self.seed + j for _ in prompts for j in range(self.samples_per_prompt)]
        cond = teacher.encode_prompts(rows)
        noise = fixed_noise(teacher.latent_shape(len(rows)), seeds).to(module.device)
        return cond, noise

    def draw(self, trainer: pl.Trainer, module) -> Path:
        """Sample on EVERY rank, write on rank 0: under FSDP the weights are sharded, so each
        forward is a collective that all ranks must join (rank 0 alone would wait forever)."""
        teacher = module.teacher
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad(), outside_training_step(trainer.strategy):
                cond, noise = self._inputs(module)
                gen = torch.Generator(module.device).manual_seed(self.seed)
                self._emit(trainer, "student", to_grid(teacher.decode(module.sample(cond, noise, generator=gen)),
                                                       self.samples_per_prompt))
                if self.log_teacher and not self._teacher_done:
                    steps = self.teacher_steps or teacher.sample_steps
                    cfg = self.teacher_cfg_scale or teacher.cfg_scale
                    images = teacher.decode(teacher.sample_ode(noise, cond, steps, cfg))
                    self._emit(trainer, "teacher", to_grid(images, self.samples_per_prompt))
                    self._teacher_done = True
        finally:
            module.train(was_training)
        return self._png_path(trainer, "student")

    def _png_path(self, trainer, name: str) -> Path:
        if self._dir is None:
            raise RuntimeError("SampleGrid draws only inside a Trainer run (its setup hook finds the log folder)")
        return self._dir / f"{name}_step{trainer.global_step:07d}.png"

    def _emit(self, trainer, name: str, grid: Tensor) -> None:
        if not trainer.is_global_zero:
            return
        path = self._png_path(trainer, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        torchvision.utils.save_image(grid, path)
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                experiment.add_image(f"samples/{name}", grid, trainer.global_step)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step // self.every_n_steps != self._last_step // self.every_n_steps:
            self._last_step = step
            self.draw(trainer, module)

    def on_fit_end(self, trainer, module) -> None:
        self.draw(trainer, module)
