"""Student -> diffusers: LoRA weights or a complete pipeline folder (``dmdx export``).

``dmdx export --ckpt_path CKPT --output DIR [--format lora|pipeline] [--config YAML] [--no-ema]``

- ``--format lora`` (lora-mode runs): the student adapter as ``pytorch_lora_weights.safetensors``
  with its LoRA config in the metadata, loadable by the teacher pipeline's ``load_lora_weights``.
- ``--format pipeline``: the teacher's pipeline folder with the student denoiser (the adapter
  merged into the base in lora mode) and a scheduler configured for the student.

What is written is the teacher family's business (the Teacher contract's ``export_formats``,
``export_pipeline`` and ``export_lora``; e.g. :class:`~dmdx_lightning.teachers.sd3.SD3Teacher`
writes a ``StableDiffusion3Pipeline`` whose stochastic flow-matching scheduler replays the
student's sampler step for step). A family without an export stops with a ``NotImplementedError``
naming it. The times and the call that reproduces the student (``call``: the pipeline's keyword
arguments) are written to ``dmdx_export.json`` in the output folder.

Only what the export needs is built, from the run's ``config.yaml`` (written by the CLI next to
the logs; found automatically near the checkpoint, or given with ``--config``): the teacher with
the student role alone (``build_roles=("student",)``): in full mode the loaded network becomes the
student (no second copy, no real score), in lora mode the frozen base gets the student's adapter
only. The fake score, the discriminator and the rest of the method are never built. The
checkpoint is memory-mapped and only the student's tensors are read (its EMA when it has one,
unless ``--no-ema``); optimizer states and other players stay on disk. The lora merge is the
model library's own (diffusers' ``fuse_lora`` / ``unload_lora`` for SD3), in place.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from dmdx_lightning.atomic import write_json_atomic

EXPORT_INFO = "dmdx_export.json"
#: the roles an export builds (Teacher ``build_roles``)
EXPORT_ROLES = ("student",)


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
def export(teacher, timesteps: Sequence[float], output: str | Path, format: str = "pipeline",
           provenance: dict | None = None) -> dict:
    """Write ``teacher``'s student (current weights), sampled at ``timesteps``, to ``output`` as
    ``lora`` or ``pipeline``, and ``dmdx_export.json`` (how to call it, plus ``provenance``:
    where the weights came from) once, atomically.

    ``teacher`` must be built with the student alone (:func:`build_teacher`), because the
    pipeline export consumes it: the adapter is merged into the base in place (no copy) and the
    student is cast to the teacher's dtype.
    """
    if tuple(teacher.build_roles) != EXPORT_ROLES:
        raise ValueError(f"export needs a teacher built with build_roles={EXPORT_ROLES} (build_teacher(config) "
                         f"builds one; the pipeline export merges into it in place), got {teacher.build_roles}")
    if format not in ("lora", "pipeline"):
        raise ValueError(f"--format must be 'lora' or 'pipeline', got {format!r}")
    if format not in teacher.export_formats:
        raise NotImplementedError(
            f"teacher family {teacher.family!r} ({type(teacher).__name__}) has no diffusers {format} export "
            f"(it exports: {', '.join(teacher.export_formats) or 'nothing'})")
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
    }
    write = teacher.export_lora if format == "lora" else teacher.export_pipeline
    info.update(write(output, timesteps))
    info.update(provenance or {})
    write_json_atomic(output / EXPORT_INFO, info)
    return info


# ---------------------------------------------------------------------------------------- from a checkpoint
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


def _model_parser():
    import lightning.pytorch as pl
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(pl.LightningModule, "model", required=True)
    return parser


def _model_config(config: str | Path) -> dict:
    import yaml

    raw = yaml.safe_load(Path(config).read_text())
    if not isinstance(raw, dict) or "model" not in raw:
        raise ValueError(f"{config} has no 'model' section: pass the config the run was trained with")
    model_cfg = dict(raw["model"])
    model_cfg["init_args"] = dict(model_cfg.get("init_args") or {})
    model_cfg["init_args"].pop("init_from", None)  # the checkpoint supplies the student
    return model_cfg


def build_module(config: str | Path):
    """Instantiate the whole ``model`` of a run config (no trainer, no data), as training builds it."""
    parser = _model_parser()
    return parser.instantiate_classes(parser.parse_object({"model": _model_config(config)})).model


def build_teacher(config: str | Path):
    """``(teacher, student_timesteps)`` of a run config, building only what an export needs.

    The model section is parsed (its classes resolved and its values checked, nothing built); then
    the teacher alone is instantiated, with ``build_roles=("student",)``. The student's times are
    the method's (``student_timesteps``, else ``student_steps`` evenly spaced).
    """
    from jsonargparse import ArgumentParser

    from dmdx_lightning.methods.base import resolve_student_timesteps
    from dmdx_lightning.teachers.base import Teacher

    model = _model_parser().parse_object({"model": _model_config(config)}).model.init_args
    if "teacher" not in model or "student_steps" not in model:
        raise ValueError(f"{config}: the model has no teacher / student_steps: `dmdx export` exports the student "
                         "of a distillation run (ADM, DMD, ADP ...)")
    teacher_cfg = model.teacher.as_dict()
    teacher_cfg["init_args"]["build_roles"] = list(EXPORT_ROLES)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(Teacher, "teacher", required=True)
    teacher = parser.instantiate_classes(parser.parse_object({"teacher": teacher_cfg})).teacher
    timesteps = resolve_student_timesteps(model.student_steps, model.get("student_timesteps"), teacher.schedule)
    return teacher, timesteps


def export_checkpoint(ckpt_path: str | Path, output: str | Path, format: str = "pipeline",
                      config: str | Path | None = None, use_ema: bool = True) -> dict:
    from dmdx_lightning.methods.base import load_student

    config = Path(config) if config else find_run_config(ckpt_path)
    teacher, timesteps = build_teacher(config)
    ema = load_student(teacher, str(ckpt_path), use_ema, what="--ckpt_path")
    return export(teacher, timesteps, output, format,
                  provenance={"checkpoint": str(ckpt_path), "config": str(config), "ema": ema})


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dmdx export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_path", required=True, help="checkpoint written by `dmdx fit`")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--format", choices=("lora", "pipeline"), default="pipeline",
                        help="LoRA weights for load_lora_weights (lora-mode runs) or a full pipeline folder")
    parser.add_argument("--config", default=None, help="the run's config.yaml (default: found near the checkpoint)")
    parser.add_argument("--no-ema", dest="use_ema", action="store_false", help="export raw weights, not the EMA")
    args = parser.parse_args(argv)
    info = export_checkpoint(args.ckpt_path, args.output, args.format, args.config, args.use_ema)
    # the family's export says which pipeline arguments replay the student (``call``)
    call = info.get("call") or {"num_inference_steps": info["num_inference_steps"], "guidance_scale": 1.0}
    print(f"wrote {args.format} export to {args.output}; generate with "
          f"{', '.join(f'{k}={v}' for k, v in call.items())} (see {EXPORT_INFO})")
