"""Look at a student (or its teacher): ``dmdx sample SOURCE --output DIR [--prompt P ...] [-n N] ...``.

SOURCE is any of

- a checkpoint written by ``dmdx fit`` (any stage, any teacher), or its run folder
  (``checkpoints/last.ckpt`` is used): the student's few-step sampler, from the student's weights
  alone (its EMA when the run kept one, unless ``--no-ema``), built from the run's ``config.yaml``
  found near the checkpoint (or ``--config``) exactly as ``dmdx export`` builds it;
- a folder written by ``dmdx export``: a diffusers ``pipeline`` folder (SD3 / SDXL / CogVideoX)
  sampled through the diffusers pipeline itself with the call ``dmdx_export.json`` records; a
  ``lora`` export on the teacher's pipeline; a ``safetensors`` export (digits, mixture) loaded
  with :func:`dmdx_lightning.export.load_export`. A plain diffusers pipeline folder (``model_index.json``)
  is sampled with the pipeline's defaults;
- with ``--teacher``: the teacher itself, with its own sampler (the PF-ODE, ``sample_steps`` and
  ``cfg_scale`` of the config, overridden by ``--steps`` / ``--cfg``), from the config of a
  checkpoint or export, or from a config file given as SOURCE (e.g. ``configs/quickstart/adm.yaml``).

The same ``--seed`` gives the same noise to every source: sample ``j`` of every prompt starts from
the noise of seed ``seed + j`` (:func:`~dmdx_lightning.rng.fixed_noise`), and a multi-step
sampler's fresh noise comes from seed ``seed + j0`` (``j0``: the batch's first sample, see
``--batch_size``), drawn as the exported diffusers pipelines draw it, so a checkpoint and its
pipeline export give the same pictures (on the CPU; in float32 to ~1e-4), and the teacher's grid
lines up with the student's, column for column.

Writes to ``--output``: one PNG per image (``<prompt #>_<prompt>_seed<S>.png``), for video one GIF
and, with PyAV installed (``pip install av``), one MP4 per video; ``grid.png`` (rows = prompts,
columns = samples, each row labelled with its prompt; a video's middle frame); and
``sample.json``: the command, the source, the sampler's settings, the prompts and the files.
Every file is written atomically. A user's mistake (a missing checkpoint, config or prompt file, a
prompt the teacher cannot read) ends the command with one message and exit status 2
(``DMDX_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path
from typing import Any, Sequence

from dmdx_lightning.atomic import atomic_path, write_json_atomic
from dmdx_lightning.export import (EXPORT_INFO, build_teacher, load_checkpoint_student, load_export,
                                   read_export_info, resolve_checkpoint, run_config, user_errors)

DESCRIPTION = ("Draw samples from a checkpoint (its student), a `dmdx export` folder, or the teacher (--teacher); "
               "write one PNG per image (GIF, and MP4 with PyAV, per video), a labelled grid.png and sample.json.")
EXAMPLES = """examples:
  dmdx sample runs/quickstart/adm/checkpoints/last.ckpt --output samples/adm -n 8
  dmdx sample runs/quickstart/adm --teacher --output samples/teacher -n 8      # same seeds, teacher's sampler
  dmdx sample runs/adm_sd3/pipeline --prompts prompts.txt -n 4 --output samples/sd3
  dmdx sample configs/quickstart/adm.yaml --teacher --steps 32 --cfg 3 --prompt "the digit 7" --output t7
"""
SAMPLE_INFO = "sample.json"
GRID = "grid.png"
#: a grid cell is scaled up (nearest neighbour) to at least this many pixels a side (8x8 digits)
MIN_CELL = 64
#: width of the grid's prompt column, in pixels
LABEL_WIDTH = 220


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dmdx sample", description=DESCRIPTION, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", metavar="SOURCE",
                        help="a checkpoint (or run folder), a `dmdx export` folder, or with --teacher a config YAML")
    parser.add_argument("--output", required=True, help="output folder (created; files of the same name are replaced)")
    parser.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                        help="a prompt (repeat for several); default: the teacher's example prompts")
    parser.add_argument("--prompts", metavar="FILE", default=None,
                        help="a prompt file (.txt: one a line, # comments; .jsonl / .csv / .parquet: column "
                             "--prompt_field), after the --prompt ones")
    parser.add_argument("--prompt_field", default="prompt", help="the prompt's key / column in a table prompt file")
    parser.add_argument("-n", "--num_samples", type=int, default=4, metavar="N", help="samples per prompt (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="sample j of every prompt uses noise seed SEED + j")
    parser.add_argument("--steps", type=int, default=None,
                        help="sampling steps: the teacher's ODE steps (--teacher; default its sample_steps), a "
                             "student's steps re-spaced evenly (default: the times it was trained with), or a "
                             "pipeline's num_inference_steps (its scheduler's own spacing)")
    parser.add_argument("--cfg", type=float, default=None,
                        help="guidance scale: the teacher's (default its cfg_scale) or a pipeline folder's; a "
                             "distilled student samples without guidance")
    parser.add_argument("--teacher", action="store_true",
                        help="sample the teacher with its own sampler instead of the student (side by side: "
                             "same --seed, same noise)")
    parser.add_argument("--config", default=None, help="the run's config.yaml (default: found near the checkpoint)")
    parser.add_argument("--no-ema", dest="use_ema", action="store_false",
                        help="the student's raw weights, not its EMA (checkpoints only)")
    parser.add_argument("--batch_size", type=int, default=None, help="samples per forward (default: N)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="dtype of a diffusers folder (default: the one it was exported in, float32 otherwise)")
    parser.add_argument("--fps", type=int, default=8, help="frames per second of videos (video teachers)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    with user_errors("dmdx sample"):
        record = sample(args, command="dmdx sample " + shlex.join(argv))
    videos = " and videos" if record["videos"] else ""
    print(f"wrote {sum(map(len, record['images']))} images{videos}, {GRID} and {SAMPLE_INFO} to {args.output}")


# ---------------------------------------------------------------------------------------- the samplers
class TeacherSampler:
    """Samples through a :class:`~dmdx_lightning.teachers.base.Teacher`: the student's few-step
    sampler at ``timesteps``, or (``timesteps=None``) the teacher's own PF-ODE sampler."""

    def __init__(self, teacher, device, timesteps: Sequence[float] | None = None, steps: int | None = None,
                 cfg: float | None = None, progress: bool = False) -> None:
        self.teacher = teacher.to(device).eval()
        self.device, self.timesteps, self.progress = device, timesteps, progress
        self.steps = steps or teacher.sample_steps
        self.cfg = teacher.cfg_scale if cfg is None else cfg
        self.example_prompts = list(teacher.example_prompts)
        self.settings = ({"sampler": "student", "student_timesteps": list(timesteps)} if timesteps is not None else
                         {"sampler": "teacher ODE", "steps": self.steps, "cfg_scale": self.cfg})

    def prepare(self, prompts: list[str]) -> None:
        """Encode every prompt once, before any sample is drawn (a prompt the teacher cannot read
        stops the command before anything is written)."""
        import torch

        with torch.no_grad():
            self.cond = self.teacher.encode_prompts(prompts)

    def draw(self, index: int | Sequence[int], seeds: list[int], generator_seed: int):
        """Samples of prompt ``index`` from ``seeds`` (or of prompts ``index[k]``, one per seed), in ``[-1, 1]``."""
        import torch

        from dmdx_lightning.rng import fixed_noise

        teacher = self.teacher
        if isinstance(index, int):
            cond = self.cond[index:index + 1].repeat(len(seeds))
        else:  # one prompt per sample (`dmdx evaluate` packs prompts with few samples into one batch)
            from dmdx_lightning.teachers.base import Conditioning

            cond = Conditioning.cat([self.cond[i:i + 1] for i in index])
        noise = fixed_noise(teacher.latent_shape(len(seeds)), seeds).to(self.device)
        with torch.no_grad():
            if self.timesteps is None:
                x0 = teacher.sample_ode(noise, cond, self.steps, self.cfg, role="real", progress=self.progress)
            else:
                # the exported pipelines' re-noising: SD3's scheduler draws from torch's global
                # generator, SDXL's and CogVideoX's from the call's generator (both seeded alike)
                torch.manual_seed(generator_seed)
                generator = torch.Generator(self.device).manual_seed(generator_seed)
                x0 = teacher.sample_student(noise, cond, self.timesteps, generator=generator)
            return teacher.decode(x0).float().cpu()


class PipelineSampler:
    """Samples through a diffusers pipeline with ``call`` (its keyword arguments); the noise is
    seeded as :class:`TeacherSampler`'s when the latent shape is known (``dmdx export`` records it)."""

    def __init__(self, pipe, call: dict, latent_shape: Sequence[int] | None, device, example_prompts) -> None:
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(device)
        self.call, self.latent_shape, self.device = call, latent_shape, device
        self.example_prompts = list(example_prompts or [])
        self.settings = {"sampler": f"diffusers {type(pipe).__name__}", "call": call}

    def prepare(self, prompts: list[str]) -> None:
        self.prompts = prompts

    def draw(self, index: int | Sequence[int], seeds: list[int], generator_seed: int):
        """As :meth:`TeacherSampler.draw`, through the pipeline."""
        import torch

        from dmdx_lightning.rng import fixed_noise

        kwargs = dict(self.call)
        if self.latent_shape is not None:
            dtype = self.pipe.dtype
            kwargs["latents"] = fixed_noise([len(seeds), *self.latent_shape], seeds).to(self.device, dtype)
            torch.manual_seed(generator_seed)
            kwargs["generator"] = torch.Generator(self.device).manual_seed(generator_seed)
        else:  # a folder not written by `dmdx export`: the pipeline draws each sample's noise from its seed
            kwargs["generator"] = [torch.Generator(self.device).manual_seed(s) for s in seeds]
        with torch.no_grad():
            rows = [self.prompts[index]] * len(seeds) if isinstance(index, int) else [self.prompts[i] for i in index]
            out = self.pipe(rows, output_type="pt", **kwargs)
        frames = getattr(out, "frames", None)
        if frames is not None:  # video pipelines: (B, F, 3, H, W) in [0, 1]
            return (torch.as_tensor(frames).float().transpose(1, 2) * 2 - 1).cpu()
        return (torch.as_tensor(out.images).float() * 2 - 1).cpu()


def _device(name: str | None):
    import torch

    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def open_source(args) -> tuple[Any, dict]:
    """The sampler SOURCE (and ``--teacher``) names, and what ``sample.json`` records about it."""
    source, device = Path(args.source), _device(args.device)
    if args.teacher:
        config = _teacher_config(source, args.config)
        teacher, _ = build_teacher(config, roles=("real",), overrides=getattr(args, "teacher_args", None))
        return (TeacherSampler(teacher, device, steps=args.steps, cfg=args.cfg, progress=args.progress),
                {"kind": "teacher", "config": str(config), "teacher": teacher.identity()})
    if source.suffix in (".yaml", ".yml") and source.is_file():
        raise ValueError(f"{source} is a config: it holds no student weights. Pass a checkpoint or a `dmdx export` "
                         f"folder, or add --teacher to sample the teacher of {source}")
    if source.is_dir() and (source / EXPORT_INFO).is_file():
        return _open_export(source, args, device)
    if source.is_dir() and (source / "model_index.json").is_file():
        return _open_pipeline(source, {}, args, device)
    ckpt = resolve_checkpoint(source, what="SOURCE")
    if args.cfg is not None:
        raise ValueError("--cfg applies to --teacher and diffusers pipeline folders: a distilled student samples "
                         "without guidance")
    config = run_config(ckpt, args.config)
    teacher, timesteps = build_teacher(config, overrides=getattr(args, "teacher_args", None))
    ema = load_checkpoint_student(teacher, ckpt, args.use_ema)
    timesteps = _student_steps(timesteps, args.steps, teacher)
    return (TeacherSampler(teacher, device, timesteps=timesteps),
            {"kind": "checkpoint", "checkpoint": str(ckpt), "config": str(config), "ema": ema,
             "teacher": teacher.identity()})


def _student_steps(timesteps: list[float], steps: int | None, teacher) -> list[float]:
    if steps is None or steps == len(timesteps):
        return timesteps
    from dmdx_lightning.methods.base import default_student_timesteps

    return default_student_timesteps(steps, teacher.schedule)


def _teacher_config(source: Path, config: str | None) -> Path:
    """The config ``--teacher`` builds its teacher from."""
    if config is not None:
        return run_config(None, config)
    if source.suffix in (".yaml", ".yml"):
        from dmdx_lightning.configs_index import resolve_config

        return Path(resolve_config(str(source)))  # a file, or a shipped config's name (`dmdx configs`)
    if source.is_dir() and (source / EXPORT_INFO).is_file():
        recorded = read_export_info(source).get("config")
        if recorded and Path(recorded).is_file():
            return Path(recorded)
        raise FileNotFoundError(f"--teacher needs the run's config: {source / EXPORT_INFO} names "
                                f"{recorded or 'none'}{' (missing)' if recorded else ''}; pass it with --config")
    return run_config(resolve_checkpoint(source, what="SOURCE"), None)


def _open_export(folder: Path, args, device) -> tuple[Any, dict]:
    info = read_export_info(folder)
    fmt = info.get("format")
    if fmt == "safetensors":
        if args.cfg is not None:
            raise ValueError("--cfg applies to --teacher and diffusers pipeline folders: a distilled student samples "
                             "without guidance")
        teacher, timesteps = load_export(folder)
        timesteps = _student_steps(timesteps, args.steps, teacher)
        return (TeacherSampler(teacher, device, timesteps=timesteps),
                {"kind": "safetensors export", "export": str(folder), "teacher": info.get("teacher")})
    if fmt not in ("pipeline", "lora"):
        raise ValueError(f"{folder / EXPORT_INFO} has format {fmt!r}; `dmdx sample` reads pipeline, lora and "
                         "safetensors exports")
    return _open_pipeline(folder, info, args, device)


def _open_pipeline(folder: Path, info: dict, args, device) -> tuple[Any, dict]:
    import diffusers

    from dmdx_lightning.dtypes import parse_dtype

    dtype = parse_dtype(args.dtype or info.get("torch_dtype") or "float32", "--dtype")
    if info.get("format") == "lora":  # the teacher's pipeline, the student's adapter and scheduler
        extra = {"text_encoder_3": None, "tokenizer_3": None} if info.get("t5_dropped") else {}
        pipe = diffusers.DiffusionPipeline.from_pretrained(info["teacher"], torch_dtype=dtype, **extra)
        for kwargs in info.get("load_lora_weights") or [{}]:  # two-expert Wan: one file per expert
            pipe.load_lora_weights(folder, **kwargs)
        scheduler_config = folder / "scheduler" / "scheduler_config.json"
        if not scheduler_config.is_file():
            raise FileNotFoundError(f"{scheduler_config} is missing: export the LoRA again with `dmdx export`")
        name = json.loads(scheduler_config.read_text())["_class_name"]
        pipe.scheduler = getattr(diffusers, name).from_pretrained(folder, subfolder="scheduler")
    else:
        pipe = diffusers.DiffusionPipeline.from_pretrained(folder, torch_dtype=dtype)
    call = dict(info.get("call") or ({"num_inference_steps": info["num_inference_steps"], "guidance_scale": 1.0}
                                     if "num_inference_steps" in info else {}))
    if args.steps is not None:  # the scheduler's own spacing for another step count
        call = {k: v for k, v in call.items() if k not in ("sigmas", "timesteps")}
        call["num_inference_steps"] = args.steps
    if args.cfg is not None:
        call["guidance_scale"] = args.cfg
    sampler = PipelineSampler(pipe, call, info.get("latent_shape"), device, info.get("example_prompts"))
    kind = f"{info['format']} export" if info else "diffusers folder"
    return sampler, {"kind": kind, "export": str(folder), "teacher": info.get("teacher"),
                     "dtype": str(dtype).removeprefix("torch.")}


# ---------------------------------------------------------------------------------------- prompts
def read_prompt_args(args) -> list[str]:
    """``--prompt`` values, then ``--prompts FILE``'s (an empty list: the source's example prompts)."""
    prompts = [p.strip() for p in args.prompt]
    if any(not p for p in prompts):
        raise ValueError("--prompt is empty: the empty prompt is CFG's unconditional branch, not a prompt to sample")
    if args.prompts is not None:
        from dmdx_lightning.data.prompts import read_prompts

        prompts += read_prompts(_prompt_source(args.prompts), field=args.prompt_field, key="--prompts")
    return prompts


# ---------------------------------------------------------------------------------------- the command
def sample(args, command: str = "dmdx sample") -> dict:
    """Draw ``args.num_samples`` samples per prompt from ``args.source`` and write them, the grid and
    ``sample.json`` to ``args.output``; returns what ``sample.json`` holds."""
    import importlib.util

    import torch
    from tqdm.auto import tqdm

    import dmdx_lightning

    if args.num_samples < 1 or (args.batch_size is not None and args.batch_size < 1):
        raise ValueError(f"-n and --batch_size must be >= 1, got {args.num_samples} and {args.batch_size}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    prompts = read_prompt_args(args)  # a bad prompt file stops us before anything is built
    sampler, source = open_source(args)
    prompts = prompts or sampler.example_prompts
    if not prompts:
        raise ValueError(f"{args.source} names no example prompts: pass --prompt TEXT or --prompts FILE")
    sampler.prepare(prompts)

    out = Path(args.output)
    n, batch = args.num_samples, args.batch_size or args.num_samples
    seeds = [args.seed + j for j in range(n)]
    mp4 = importlib.util.find_spec("av") is not None
    images: list[list[str]] = []
    videos: list[list[dict]] = []
    cells = []
    with tqdm(total=len(prompts) * n, desc="dmdx sample", unit="sample", disable=not args.progress) as bar:
        for i, prompt in enumerate(prompts):
            row_files, row_videos, row_cells = [], [], []
            for j0 in range(0, n, batch):
                chunk = seeds[j0:j0 + batch]
                x = sampler.draw(i, chunk, args.seed + j0)
                for seed, item in zip(chunk, x):
                    stem = f"{i:03d}_{_slug(prompt)}_seed{seed}"
                    still = item if item.ndim == 3 else item[:, item.shape[1] // 2]  # a video's middle frame
                    write_png(still, out / f"{stem}.png")
                    row_files.append(f"{stem}.png")
                    row_cells.append(still)
                    if item.ndim == 4:
                        frames = video_frames(item)
                        write_gif(frames, out / f"{stem}.gif", args.fps)
                        entry = {"gif": f"{stem}.gif"}
                        if mp4:
                            write_mp4(frames, out / f"{stem}.mp4", args.fps)
                            entry["mp4"] = f"{stem}.mp4"
                        row_videos.append(entry)
                bar.update(len(chunk))
            images.append(row_files)
            videos.append(row_videos)
            cells.append(row_cells)
    grid = labelled_grid(cells, prompts, [f"seed {s}" for s in seeds])
    with atomic_path(out / GRID) as tmp:
        grid.save(tmp, format="PNG")

    record = {
        "command": command,
        "source": source,
        "sampling": sampler.settings,
        "prompts": prompts,
        "samples_per_prompt": n,
        "seed": args.seed,
        "noise_seeds": "sample j of every prompt: seed + j; a batch's fresh noise: seed + its first j",
        "batch_size": batch,
        "device": str(sampler.device),
        "images": images,
        "videos": videos if any(videos) else [],
        "grid": GRID,
        "versions": {"dmdx_lightning": dmdx_lightning.__version__, "torch": torch.__version__},
    }
    if any(videos) and not mp4:
        record["mp4"] = "not written: PyAV is not installed (pip install av); GIF only"
        print("dmdx sample: MP4 needs PyAV (pip install av); wrote GIF videos only")
    write_json_atomic(out / SAMPLE_INFO, record)
    return record


# ---------------------------------------------------------------------------------------- writing
def _slug(prompt: str, width: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:width].rstrip("-") or "prompt"


def to_pil(image):
    """A ``[-1, 1]`` image ``(C, H, W)`` (1 or 3 channels) -> a PIL image (``L`` or ``RGB``)."""
    import torch
    from PIL import Image

    pixels = ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if pixels.shape[0] == 1:
        return Image.fromarray(pixels[0].numpy())
    return Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy())


def write_png(image, path: Path) -> None:
    with atomic_path(path) as tmp:
        to_pil(image).save(tmp, format="PNG")


def video_frames(video):
    """A ``[-1, 1]`` video ``(C, F, H, W)`` -> ``uint8`` RGB frames ``(F, H, W, 3)``."""
    import torch

    if video.shape[0] == 1:
        video = video.expand(3, -1, -1, -1)
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).contiguous()


def write_gif(frames, path: Path, fps: int) -> None:
    from PIL import Image

    pictures = [Image.fromarray(f.numpy()) for f in frames]
    with atomic_path(path) as tmp:
        pictures[0].save(tmp, format="GIF", save_all=True, append_images=pictures[1:],
                         duration=max(1, round(1000 / fps)), loop=0)


def write_mp4(frames, path: Path, fps: int) -> None:
    """H.264 MP4 with PyAV (yuv420p needs even sizes: an odd last row / column is dropped)."""
    import av

    frames = frames[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2]
    with atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.height, stream.width, stream.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame.numpy(), format="rgb24")))
            container.mux(stream.encode())


def labelled_grid(cells: list[list], row_labels: Sequence[str], column_labels: Sequence[str]):
    """Rows of ``[-1, 1]`` images -> one RGB picture: a header of ``column_labels``, then each row
    after its label (wrapped), cells scaled up to at least :data:`MIN_CELL` pixels a side."""
    import math

    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=13)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: its fixed bitmap font
        font = ImageFont.load_default()
    h, w = cells[0][0].shape[-2:]
    scale = max(1, math.ceil(MIN_CELL / min(h, w)))
    cell_h, cell_w, pad = h * scale, w * scale, 4
    label_w = min(LABEL_WIDTH, max(math.ceil(font.getlength(label)) for label in row_labels) + 2 * pad)
    lines = [_wrap(label, font, label_w - 2 * pad) for label in row_labels]
    line_h = _text_height(font) + 3
    header = line_h + 2 * pad
    columns = max(len(row) for row in cells)
    width = label_w + columns * (cell_w + pad) + pad
    heights = [max(cell_h, len(text) * line_h) + pad for text in lines]
    grid = Image.new("RGB", (width, header + sum(heights) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for j, text in enumerate(column_labels[:columns]):
        draw.text((label_w + j * (cell_w + pad), pad), text, fill="black", font=font)
    y = header
    for row, text, row_h in zip(cells, lines, heights):
        for k, line in enumerate(text):
            draw.text((pad, y + k * line_h), line, fill="black", font=font)
        for j, image in enumerate(row):
            picture = to_pil(image).convert("RGB").resize((cell_w, cell_h), Image.NEAREST)
            grid.paste(picture, (label_w + j * (cell_w + pad), y))
        y += row_h
    return grid


def _text_height(font) -> int:
    box = font.getbbox("Ag")
    return box[3] - box[1]


def _wrap(text: str, font, width: int) -> list[str]:
    """``text`` in lines no wider than ``width`` pixels (a word longer than a line is cut)."""
    lines, line = [], ""
    for word in text.split():
        while font.getlength(word) > width:  # a long word alone: cut it
            cut = max(1, int(len(word) * width / font.getlength(word)))
            if line:
                lines.append(line)
                line = ""
            lines.append(word[:cut])
            word = word[cut:]
        candidate = f"{line} {word}".strip()
        if font.getlength(candidate) <= width:
            line = candidate
        else:
            lines.append(line)
            line = word
    return [*lines, line] if line else lines or [""]


def _prompt_source(value: str) -> str:
    """``--prompts``: the file as given when it exists, else a shipped prompt file of that name
    (``configs/prompts/sd3_example.txt`` or ``prompts/sd3_example.txt`` from any folder, as
    ``--config`` finds shipped configs)."""
    if Path(value).exists():
        return value
    from dmdx_lightning.configs_index import shipped_file

    return str(shipped_file(value) or value)

