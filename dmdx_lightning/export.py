"""Student -> files: diffusers LoRA weights or pipeline folder, or a plain safetensors student (``dmdx export``).

``dmdx export --ckpt_path CKPT --output DIR [--format pipeline|lora|safetensors] [--config YAML] [--no-ema]``

- ``--format lora`` (lora-mode runs): the student adapter as ``pytorch_lora_weights.safetensors``
  with its LoRA config in the metadata, loadable by the teacher pipeline's ``load_lora_weights``.
- ``--format pipeline``: the teacher's pipeline folder with the student denoiser (the adapter
  merged into the base in lora mode) and a scheduler configured for the student.
- ``--format safetensors`` (the built-in digits and mixture teachers, which have no diffusers
  pipeline): the student's network as ``student.safetensors`` (the adapter merged in lora mode),
  loaded back by :func:`load_export` (and sampled by ``dmdx sample DIR``).

The default format is the family's first (``pipeline`` for SD3 / SDXL / CogVideoX, ``safetensors``
for digits and mixture). What is written is the teacher family's business (the Teacher contract's
``export_formats``, ``export_pipeline``, ``export_lora``, ``export_safetensors``; e.g.
:class:`~dmdx_lightning.teachers.sd3.SD3Teacher` writes a ``StableDiffusion3Pipeline`` whose
stochastic flow-matching scheduler replays the student's sampler step for step). A family without
the asked format stops with an error naming it and the formats it has. The times, the student's
latent shape, the teacher's example prompts and, for diffusers exports, the call that reproduces the
student (``call``: the pipeline's keyword arguments) are written to ``dmdx_export.json``.

Only what the export needs is built, from the run's ``config.yaml`` (written by the CLI next to
the logs; found automatically near the checkpoint, or given with ``--config``): the teacher with
the student role alone (``build_roles=("student",)``): in full mode the loaded network becomes the
student (no second copy, no real score), in lora mode the frozen base gets the student's adapter
only. The fake score, the discriminator and the rest of the method are never built. The
checkpoint is memory-mapped and only the student's tensors are read (its EMA when it has one,
unless ``--no-ema``); optimizer states and other players stay on disk. The lora merge is the
model library's own (diffusers' ``fuse_lora`` / ``unload_lora`` for SD3; peft's layer merge for
the plain networks), in place.

Errors a user can fix (a missing checkpoint or config, a format the family lacks, a checkpoint of
another teacher) end the command with one message and exit status 2; ``DMDX_DEBUG=1`` shows the
traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from dmdx_lightning.atomic import write_json_atomic

EXPORT_INFO = "dmdx_export.json"
#: the roles an export builds (Teacher ``build_roles``)
EXPORT_ROLES = ("student",)
#: every ``--format`` (``dmdx_lightning.teachers.base.EXPORT_FORMATS``, not imported: ``--help`` stays light)
FORMATS = ("pipeline", "lora", "safetensors")
#: where a run keeps its checkpoints, relative to a run folder given in place of a checkpoint
RUN_CHECKPOINTS = ("checkpoints/last.ckpt", "last.ckpt")
#: errors a user can act on: said in one message (exit status 2), not as a traceback
USER_ERRORS = (OSError, ValueError, KeyError, NotImplementedError)


# ---------------------------------------------------------------------------------------- errors
@contextmanager
def user_errors(prog: str) -> Iterator[None]:
    """Run a light verb's body: an error in :data:`USER_ERRORS` ends it with ``PROG: error: ...`` on
    stderr and exit status 2 (``DMDX_DEBUG=1``: the traceback instead), as ``dmdx fit``'s config errors."""
    try:
        yield
    except USER_ERRORS as e:
        if os.environ.get("DMDX_DEBUG"):
            raise
        from dmdx_lightning.cli import config_error

        text = config_error(e) or (e.args[0] if isinstance(e, KeyError) and e.args else str(e))
        print(f"{prog}: error: {text}\n(set DMDX_DEBUG=1 for the full traceback)", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------------------------------- the student
def student_lora_state(teacher) -> tuple[dict, dict]:
    """The student adapter's weights (peft names without the adapter name) and its LoRA config."""
    from peft.utils import get_peft_model_state_dict

    if teacher.mode != "lora":
        raise ValueError(f"--format lora needs a run in lora mode; this teacher ran in {teacher.mode!r} mode "
                         "(export it with --format pipeline)")
    state = get_peft_model_state_dict(teacher.denoiser, adapter_name="student")
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    config = teacher.denoiser.peft_config["student"].to_dict()
    meta = {"r": config["r"], "lora_alpha": config["lora_alpha"],
            "target_modules": sorted(config["target_modules"]), "lora_dropout": 0.0, "bias": "none",
            "use_dora": False, "use_rslora": bool(config.get("use_rslora", False))}
    return state, meta


# ---------------------------------------------------------------------------------------- export
def export(teacher, timesteps: Sequence[float], output: str | Path, format: str | None = None,
           provenance: dict | None = None) -> dict:
    """Write ``teacher``'s student (current weights), sampled at ``timesteps``, to ``output`` as
    ``lora``, ``pipeline`` or ``safetensors`` (``None``: the family's first ``export_formats``), and
    ``dmdx_export.json`` (how to call or load it, plus ``provenance``: where the weights came from)
    once, atomically.

    ``teacher`` must be built with the student alone (:func:`build_teacher`), because the
    pipeline and safetensors exports consume it: the adapter is merged into the base in place (no
    copy) and the student is cast to the teacher's dtype.
    """
    if tuple(teacher.build_roles) != EXPORT_ROLES:
        raise ValueError(f"export needs a teacher built with build_roles={EXPORT_ROLES} (build_teacher(config) "
                         f"builds one; the pipeline export merges into it in place), got {teacher.build_roles}")
    if format is None:
        if not teacher.export_formats:
            raise NotImplementedError(f"teacher family {teacher.family!r} ({type(teacher).__name__}) has no export")
        format = teacher.export_formats[0]
    if format not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    if format not in teacher.export_formats:
        what = "plain safetensors" if format == "safetensors" else f"diffusers {format}"
        raise NotImplementedError(
            f"teacher family {teacher.family!r} ({type(teacher).__name__}) has no {what} export "
            f"(it exports: {', '.join(teacher.export_formats) or 'nothing'}; pass --format "
            f"{teacher.export_formats[0] if teacher.export_formats else '...'})")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    timesteps = [float(t) for t in timesteps]
    info = {
        "format": format,
        "teacher": teacher.identity(),
        "teacher_family": teacher.family,
        "teacher_mode": teacher.mode,
        "student_timesteps": timesteps,
        "num_inference_steps": len(timesteps),
        "guidance_scale": 1.0,
        # one sample's noise shape and prompts it understands: `dmdx sample` draws seeded noise of
        # this shape for a pipeline folder too, and samples the example prompts when given none
        "latent_shape": list(teacher.latent_shape(1)[1:]),
        "example_prompts": list(teacher.example_prompts),
    }
    write = {"lora": teacher.export_lora, "pipeline": teacher.export_pipeline,
             "safetensors": teacher.export_safetensors}[format]
    info.update(write(output, timesteps))
    info.update(provenance or {})
    write_json_atomic(output / EXPORT_INFO, info)
    return info


def read_export_info(folder: str | Path) -> dict:
    """The ``dmdx_export.json`` of an export folder, with an error that says what is missing."""
    folder = Path(folder)
    path = folder / EXPORT_INFO
    if not folder.is_dir():
        raise FileNotFoundError(f"export folder {folder} does not exist: write it with `dmdx export --ckpt_path CKPT "
                                f"--output {folder}`")
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {EXPORT_INFO}: it was not written by `dmdx export` (write it "
                                f"with `dmdx export --ckpt_path CKPT --output {folder}`)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): export again with `dmdx export`") from None


def load_export(folder: str | Path):
    """``(teacher, student_timesteps)`` of a ``safetensors`` export (``dmdx export --format
    safetensors``, the default for the digits and mixture teachers).

    The teacher holds the student alone (``build_roles=("student",)``); sample it as the methods
    do::

        teacher, timesteps = load_export("runs/digits/dmd/export")
        cond = teacher.encode_prompts(["a handwritten digit seven"] * 4)
        noise = torch.randn(teacher.latent_shape(4))
        images = teacher.decode(teacher.sample_student(noise, cond, timesteps))  # [-1, 1]

    A diffusers export (``pipeline`` / ``lora``) is loaded by diffusers itself
    (``DiffusionPipeline.from_pretrained``; ``dmdx sample`` does both).
    """
    from dmdx_lightning.teachers.base import Teacher

    folder = Path(folder)
    info = read_export_info(folder)
    if info.get("format") != "safetensors":
        raise ValueError(f"{folder} is a diffusers {info.get('format')} export: load it with diffusers "
                         "(DiffusionPipeline.from_pretrained) or sample it with `dmdx sample`")
    missing = [k for k in ("teacher_class", "teacher_init_args", "weights", "student_timesteps") if k not in info]
    if missing:
        raise KeyError(f"{folder / EXPORT_INFO} lacks {', '.join(missing)}: export again with `dmdx export`")
    weights = folder / info["weights"]
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} (named by {folder / EXPORT_INFO}) does not exist: export again with "
                                "`dmdx export`")
    module_name, _, name = info["teacher_class"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{folder / EXPORT_INFO} names teacher class {info['teacher_class']!r}, which cannot be "
                         f"imported ({e})") from None
    if not (isinstance(cls, type) and issubclass(cls, Teacher)):
        raise ValueError(f"{folder / EXPORT_INFO}: {info['teacher_class']!r} is not a Teacher")
    teacher = cls.load_student_export(weights, info["teacher_init_args"])
    return teacher, [float(t) for t in info["student_timesteps"]]


# ---------------------------------------------------------------------------------------- from a checkpoint
def resolve_checkpoint(path: str | Path, what: str = "--ckpt_path") -> Path:
    """The checkpoint file ``path`` names: the file itself, or a run folder's ``checkpoints/last.ckpt``
    (or ``last.ckpt``); an error naming what was looked for otherwise."""
    from dmdx_lightning.sharded_checkpoint import is_checkpoint

    path = Path(path)
    if is_checkpoint(path):  # a file, or an FSDP2 checkpoint folder
        return path
    if path.is_dir():
        for name in RUN_CHECKPOINTS:
            if is_checkpoint(path / name):
                return path / name
        found = sorted(str(p.relative_to(path)) for p in path.rglob("*.ckpt"))[:5]
        hint = f" (it holds {', '.join(found)}: pass one of them)" if found else ""
        raise FileNotFoundError(f"{what} {path} is a folder without {' or '.join(RUN_CHECKPOINTS)}{hint}")
    raise FileNotFoundError(f"{what} {path} does not exist: pass a checkpoint written by `dmdx fit` (e.g. "
                            "runs/<run>/checkpoints/last.ckpt) or the run's folder")


def find_run_config(ckpt_path: str | Path) -> Path:
    """The ``config.yaml`` LightningCLI saved for the run that wrote ``ckpt_path``."""
    ckpt = Path(ckpt_path).resolve()
    for folder in (ckpt.parent, ckpt.parent.parent):
        candidates = [folder / "config.yaml"] + sorted(folder.glob("version_*/config.yaml"),
                                                       key=lambda p: p.stat().st_mtime, reverse=True)
        for c in candidates:
            if c.is_file():
                return c
    raise FileNotFoundError(f"no config.yaml found next to {ckpt_path} (looked in its folder, the folder above "
                            "and their version_*/ folders): pass the run's config with --config")


def run_config(ckpt_path: str | Path | None, config: str | Path | None) -> Path:
    """``config`` (checked to exist) or the one found near ``ckpt_path``."""
    if config is None:
        return find_run_config(ckpt_path)
    config = Path(config)
    if not config.is_file():
        raise FileNotFoundError(f"--config {config} does not exist: pass the config.yaml the run wrote next to its "
                                "logs (or leave --config out to find it near the checkpoint)")
    return config


def _model_parser():
    import lightning.pytorch as pl
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(pl.LightningModule, "model", required=True)
    return parser


def _model_config(config: str | Path) -> dict:
    import yaml

    try:
        raw = yaml.safe_load(Path(config).read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{config} is not valid YAML ({e})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict) or "class_path" not in raw["model"]:
        raise ValueError(f"{config} has no 'model' section with a class_path: pass the config the run was trained "
                         "with (the config.yaml next to its logs; an overlay config alone names no model)")
    model_cfg = dict(raw["model"])
    model_cfg["init_args"] = dict(model_cfg.get("init_args") or {})
    model_cfg["init_args"].pop("init_from", None)  # the checkpoint supplies the student
    return model_cfg


def _parse_model(config: str | Path):
    """``(parser, parsed config)`` of a run config's model section; a value the classes refuse is a
    ``ValueError`` naming the config and the key (jsonargparse's own error is pages long)."""
    from jsonargparse import ArgumentError

    from dmdx_lightning.errors import explain_parse_error

    parser = _model_parser()
    try:
        return parser, parser.parse_object({"model": _model_config(config)})
    except ArgumentError as e:
        raise ValueError(f"{config}: {explain_parse_error(str(e), 'fit')}") from e


def build_module(config: str | Path):
    """Instantiate the whole ``model`` of a run config (no trainer, no data), as training builds it."""
    parser, parsed = _parse_model(config)
    return parser.instantiate_classes(parsed).model


def build_teacher(config: str | Path, roles: Sequence[str] = EXPORT_ROLES, overrides: dict | None = None):
    """``(teacher, student_timesteps)`` of a run config, building only what an export needs.

    The model section is parsed (its classes resolved and its values checked, nothing built); then
    the teacher alone is instantiated, with ``build_roles=roles`` (the student alone by default;
    ``("real",)``: the teacher's own network alone, as ``dmdx sample --teacher`` builds it). The
    student's times are the method's (``student_timesteps``, else ``student_steps`` evenly spaced;
    ``None`` for a model without a student, e.g. the ODE-pair writer, whose teacher alone can be built).
    ``overrides``: teacher options replacing the config's (``dmdx evaluate``'s ``teacher_args``, e.g.
    ``{"resolution": 512}``).
    """
    from jsonargparse import ArgumentError, ArgumentParser

    from dmdx_lightning.methods.base import resolve_student_timesteps
    from dmdx_lightning.teachers.base import Teacher

    model = _parse_model(config)[1].model.init_args
    has_student = "student_steps" in model
    if "teacher" not in model or (not has_student and "student" in roles):
        raise ValueError(f"{config}: the model has no teacher / student_steps: `dmdx export` and `dmdx sample` read "
                         "the student of a distillation run (ADM, DMD, ADP ...)")
    teacher_cfg = model.teacher.as_dict()
    teacher_cfg["init_args"].update(overrides or {})
    teacher_cfg["init_args"]["build_roles"] = list(roles)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(Teacher, "teacher", required=True)
    try:
        parsed = parser.parse_object({"teacher": teacher_cfg})
    except ArgumentError as e:
        if not overrides:
            raise
        from dmdx_lightning.errors import explain_parse_error

        raise ValueError(f"teacher options {overrides} do not fit {teacher_cfg['class_path']}: "
                         f"{explain_parse_error(str(e), 'fit')}") from None
    teacher = parser.instantiate_classes(parsed).teacher
    if not has_student:
        return teacher, None
    timesteps = resolve_student_timesteps(model.student_steps, model.get("student_timesteps"), teacher.schedule)
    return teacher, timesteps


def load_checkpoint_student(teacher, ckpt_path: str | Path, use_ema: bool = True) -> bool:
    """``load_student`` with the checkpoint named as the user gave it, and an unreadable file said
    as such (not as torch's zip-reader error); returns whether the EMA was used."""
    from dmdx_lightning.methods.base import load_student

    try:
        return load_student(teacher, str(ckpt_path), use_ema, what="checkpoint")
    except (RuntimeError, EOFError) as e:  # torch.load of a truncated / foreign file, or mismatched shapes
        raise ValueError(f"could not read the student from checkpoint {ckpt_path}: {str(e).splitlines()[0]} "
                         "(is it a complete checkpoint of this run's config?)") from e


def export_checkpoint(ckpt_path: str | Path, output: str | Path, format: str | None = None,
                      config: str | Path | None = None, use_ema: bool = True) -> dict:
    ckpt_path = resolve_checkpoint(ckpt_path)
    config = run_config(ckpt_path, config)
    teacher, timesteps = build_teacher(config)
    ema = load_checkpoint_student(teacher, ckpt_path, use_ema)
    return export(teacher, timesteps, output, format,
                  provenance={"checkpoint": str(ckpt_path), "config": str(config), "ema": ema})


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dmdx export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_path", required=True,
                        help="checkpoint written by `dmdx fit` (or its run folder: checkpoints/last.ckpt is used)")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--format", choices=FORMATS, default=None,
                        help="pipeline: a diffusers pipeline folder; lora: LoRA weights for load_lora_weights "
                             "(lora-mode runs); safetensors: the student network + config, loaded back by "
                             "dmdx_lightning.export.load_export (digits, mixture). Default: the teacher "
                             "family's first (pipeline for SD3/SDXL/CogVideoX, safetensors for digits/mixture)")
    parser.add_argument("--config", default=None, help="the run's config.yaml (default: found near the checkpoint)")
    parser.add_argument("--no-ema", dest="use_ema", action="store_false", help="export raw weights, not the EMA")
    args = parser.parse_args(argv)
    with user_errors("dmdx export"):
        info = export_checkpoint(args.ckpt_path, args.output, args.format, args.config, args.use_ema)
    if info["format"] == "safetensors":
        print(f"wrote safetensors export to {args.output}; load it with "
              f"dmdx_lightning.export.load_export({str(args.output)!r}) or sample it with "
              f"`dmdx sample {args.output}` (see {EXPORT_INFO})")
        return
    # the family's export says which pipeline arguments replay the student (``call``)
    call = info.get("call") or {"num_inference_steps": info["num_inference_steps"], "guidance_scale": 1.0}
    print(f"wrote {info['format']} export to {args.output}; generate with "
          f"{', '.join(f'{k}={v}' for k, v in call.items())} (see {EXPORT_INFO})")
    if info.get("load_lora_weights"):  # several adapter files (two-expert Wan): each its own call
        calls = "; ".join("pipe.load_lora_weights(" + ", ".join([repr(str(args.output))] + [
            f"{k}={v!r}" for k, v in kwargs.items()]) + ")" for kwargs in info["load_lora_weights"])
        print(f"load it into the teacher's pipeline with {calls}; `dmdx sample {args.output}` does this")
