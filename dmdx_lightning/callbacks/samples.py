"""Sample grids: fixed prompts and seeds, student (and once, teacher) samples to TensorBoard and disk.

Images: one grid (rows = prompts, columns = seeds) to TensorBoard and a PNG. Video (decoded
``(B, 3, F, H, W)``): one animated GIF per prompt (its seeds side by side; MP4 with PyAV, see
``video_format``), a frame-grid PNG (rows = samples, columns = frames) as the still overview, and
TensorBoard's ``add_video`` (it needs moviepy; without it the frame grid is logged as an image).
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
import torchvision
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from dmdx_lightning.errors import ConfigError
from dmdx_lightning.methods.distributed import outside_training_step, shards_parameters
from dmdx_lightning.rng import fixed_noise


def unit_range(images: Tensor) -> Tensor:
    """Images in ``[-1, 1]`` (the teachers' ``decode``) -> float in ``[0, 1]`` (clamped)."""
    return (images.float().clamp(-1, 1) + 1) / 2


def to_grid(images: Tensor, nrow: int) -> Tensor:
    """``[-1, 1]`` images -> one ``(3, H, W)`` grid in ``[0, 1]``; video ``(B, C, F, H, W)`` -> a
    frame grid, one row of ``F`` frames per sample."""
    if images.ndim == 5:  # (B, C, F, H, W) -> (B F, C, H, W), frame-major within each sample
        nrow = images.shape[2]
        images = images.transpose(1, 2).flatten(0, 1)
    return torchvision.utils.make_grid(unit_range(images).cpu(), nrow=nrow, padding=1)


def video_frames(videos: Tensor) -> Tensor:
    """``[-1, 1]`` videos ``(K, C, F, H, W)`` of one prompt -> ``uint8`` frames ``(F, H, K W, 3)``,
    the ``K`` samples side by side (gray -> RGB)."""
    if videos.shape[1] == 1:
        videos = videos.expand(-1, 3, -1, -1, -1)
    frames = ((videos.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    return frames.permute(2, 3, 0, 4, 1).flatten(2, 3)  # (F, H, K, W, C) -> (F, H, K W, C)


def write_video(frames: Tensor, path: Path, fps: int) -> Path:
    """Write ``uint8`` frames ``(F, H, W, 3)``: H.264 MP4 when ``path`` ends in ``.mp4`` and PyAV is
    installed, else an animated GIF (Pillow, always installed with torchvision) next to it.
    Returns the path written."""
    if path.suffix == ".mp4":
        try:
            import av
        except ImportError:  # torchvision >= 0.25 has no video writer of its own; GIF needs nothing extra
            rank_zero_warn("SampleGrid: MP4 needs PyAV (`pip install av`); writing GIF videos instead",
                           category=UserWarning)
            path = path.with_suffix(".gif")
        else:
            # yuv420p (what players expect) needs even sizes: drop an odd last row / column
            frames = frames[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2]
            with av.open(str(path), mode="w") as container:
                stream = container.add_stream("libx264", rate=fps)
                stream.height, stream.width, stream.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
                for frame in frames:
                    container.mux(stream.encode(av.VideoFrame.from_ndarray(frame.numpy(), format="rgb24")))
                container.mux(stream.encode())
            return path
    from PIL import Image

    # Pillow stores identical consecutive frames once (with their summed duration)
    images = [Image.fromarray(f.numpy()) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=max(1, round(1000 / fps)), loop=0)
    return path


class SampleGrid(pl.Callback):
    """Every ``every_n_steps`` iterations (and at the end of fit) draw the student's samples
    for fixed prompts and seeds; log them to TensorBoard (``samples/student``) and save them under
    ``<log_dir>/samples/``: a PNG grid for images; for video one GIF / MP4 per prompt
    (``student_step<N>_p<i>.gif``) and a frame-grid PNG. The teacher's samples
    (``samples/teacher``) are drawn once.

    Args:
        prompts: the grid's rows (default: the teacher's ``example_prompts``).
        samples_per_prompt: columns; seeds are ``seed, seed + 1, ...`` per column.
        seed: first noise seed.
        every_n_steps: cadence in iterations (``trainer.global_step``); 0 = only at fit end. Files are
            named after the iteration (``student_step0000200.png``).
        teacher_steps, teacher_cfg_scale: the teacher's own sampler for its reference grid
            (default: the teacher's ``sample_steps`` / ``cfg_scale``).
        log_teacher: draw the teacher grid once.
        fps: frames per second of the videos (video teachers only).
        video_format: ``gif`` (no extra dependency) or ``mp4`` (needs PyAV; GIF when it is missing).
        progress: show a progress bar while the teacher's many-step samples render.
    """

    @classmethod
    def check_options(cls, options, key: str = "trainer.callbacks[0].init_args") -> None:
        """The grid's prompts and cadence, before anything is built (the first grid is drawn after
        training has run: a bad value here would surface only then)."""
        prompts = options.get("prompts")
        if prompts is not None:
            check_prompt_list(prompts, f"{key}.prompts", "Leave prompts out to draw the teacher's example prompts.")
        for name, least in (("samples_per_prompt", 1), ("every_n_steps", 0), ("fps", 1)):
            value = options.get(name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < least):
                why = {"every_n_steps": "iterations between grids, 0 = only at the end of fit"}.get(name, "a count")
                raise ConfigError(f"{key}.{name}", value, f"must be an integer >= {least} ({why})",
                                  "The shipped configs use samples_per_prompt 2, every_n_steps 500, fps 8.")
        steps = options.get("teacher_steps")
        if steps is not None and (not isinstance(steps, int) or steps < 1):
            raise ConfigError(f"{key}.teacher_steps", steps, "the teacher's sampler needs >= 1 step",
                              "Leave it out for the teacher's own sample_steps.")
        if options.get("video_format", "gif") not in ("gif", "mp4"):
            raise ConfigError(f"{key}.video_format", options.get("video_format"), "choose one of gif | mp4",
                              "gif needs nothing extra; mp4 needs PyAV (`pip install av`).")

    def __init__(self, prompts: list[str] | None = None, samples_per_prompt: int = 8, seed: int = 0,
                 every_n_steps: int = 0, teacher_steps: int | None = None,
                 teacher_cfg_scale: float | None = None, log_teacher: bool = True, fps: int = 8,
                 video_format: str = "gif", progress: bool = True) -> None:
        if video_format not in ("gif", "mp4"):
            raise ValueError(f"video_format must be 'gif' or 'mp4', got {video_format!r}")
        if prompts is not None:
            check_prompt_list(prompts, "SampleGrid prompts", "Leave prompts out to draw the teacher's example prompts.")
        self.fps, self.video_format, self.progress = fps, video_format, progress
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
        if stage == "fit" and self.every_n_steps and trainer.max_steps >= 0 and self.every_n_steps > trainer.max_steps:
            rank_zero_warn(f"SampleGrid every_n_steps={self.every_n_steps} is more than trainer.max_steps="
                           f"{trainer.max_steps}: only the grid at the end of fit is drawn", category=UserWarning)

    def _inputs(self, module):
        teacher = module.teacher
        prompts = self.prompts or list(teacher.example_prompts)
        rows = [p for p in prompts for _ in range(self.samples_per_prompt)]
        seeds = [self.seed + j for _ in prompts for j in range(self.samples_per_prompt)]
        cond = teacher.encode_prompts(rows)
        noise = fixed_noise(teacher.latent_shape(len(rows)), seeds).to(module.device)
        return cond, noise

    def draw(self, trainer: pl.Trainer, module) -> Path:
        """Sample on rank 0, write there. Under FSDP EVERY rank samples (the weights are sharded,
        so each forward is a collective that all ranks must join; rank 0 alone would wait forever)."""
        if not trainer.is_global_zero and not shards_parameters(trainer.strategy):
            return self._png_path(trainer, "student")  # replicated weights: rank 0 draws alone
        teacher = module.teacher
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad(), outside_training_step(trainer.strategy):
                cond, noise = self._inputs(module)
                gen = torch.Generator(module.device).manual_seed(self.seed)
                self._emit(trainer, "student", teacher.decode(module.sample(cond, noise, generator=gen)))
                if self.log_teacher and not self._teacher_done:
                    steps = self.teacher_steps or teacher.sample_steps
                    cfg = self.teacher_cfg_scale or teacher.cfg_scale
                    progress = self.progress and trainer.is_global_zero
                    images = teacher.decode(teacher.sample_ode(noise, cond, steps, cfg, progress=progress))
                    self._emit(trainer, "teacher", images)
                    self._teacher_done = True
        finally:
            module.train(was_training)
        return self._png_path(trainer, "student")

    def _png_path(self, trainer, name: str) -> Path:
        if self._dir is None:
            raise RuntimeError("SampleGrid draws only inside a Trainer run (its setup hook finds the log folder)")
        return self._dir / f"{name}_step{trainer.global_step:07d}.png"

    def _emit(self, trainer, name: str, samples: Tensor) -> None:
        if not trainer.is_global_zero:
            return
        grid = to_grid(samples, self.samples_per_prompt)
        path = self._png_path(trainer, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        torchvision.utils.save_image(grid, path)
        videos = self._write_videos(path, samples) if samples.ndim == 5 else []
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if videos and hasattr(experiment, "add_video") and _has_moviepy():
                # (N, T, C, H, W) in [0, 1]: one clip per prompt, its seeds side by side
                clips = torch.stack([v.permute(0, 3, 1, 2) for v in videos]).float() / 255
                experiment.add_video(f"samples/{name}", clips, trainer.global_step, fps=self.fps)
            elif hasattr(experiment, "add_image"):
                experiment.add_image(f"samples/{name}", grid, trainer.global_step)

    def _write_videos(self, png: Path, samples: Tensor) -> list[Tensor]:
        """One video per prompt next to the frame-grid PNG; returns each prompt's frames."""
        per_prompt = samples.split(self.samples_per_prompt)
        frames = [video_frames(v) for v in per_prompt]
        for i, f in enumerate(frames):
            write_video(f, png.with_name(f"{png.stem}_p{i:02d}.{self.video_format}"), self.fps)
        return frames

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step // self.every_n_steps != self._last_step // self.every_n_steps:
            self._last_step = step
            self.draw(trainer, module)

    def on_fit_end(self, trainer, module) -> None:
        # not again where the last interval's grid was just drawn (the same file, a second image at
        # that step in TensorBoard); every rank knows _last_step, so under FSDP all ranks agree
        if self._last_step != trainer.global_step:
            self.draw(trainer, module)


def check_prompt_list(prompts, key: str, fix: str) -> None:
    """A config's list of prompts: non-empty, each a non-empty string (an empty prompt is CFG's
    unconditional branch, never a prompt to show)."""
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise ConfigError(key, prompts, "expected a list of prompts", 'e.g. ["a cat", "a dog"]. ' + fix)
    if not prompts:
        raise ConfigError(key, prompts, "an empty list of prompts", fix)
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
    if bad:
        raise ConfigError(key, prompts, f"prompt(s) {bad} are empty or not text",
                          "Give each prompt as a non-empty string.")


def _has_moviepy() -> bool:
    """TensorBoard's ``add_video`` encodes with moviepy and logs nothing (only prints) without it."""
    import importlib.util

    return importlib.util.find_spec("moviepy") is not None

