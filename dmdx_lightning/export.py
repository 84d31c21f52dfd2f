"""Student -> diffusers: LoRA weights or a complete pipeline folder (``dmdx export``).

``dmdx export --ckpt_path CKPT --output DIR [--format lora|pipeline] [--config YAML] [--no-ema]``

- ``--format lora`` (lora-mode runs): the student adapter as ``pytorch_lora_weights.safetensors``
  with its LoRA config in the metadata, loadable by the teacher pipeline's ``load_lora_weights``.
- ``--format pipeline``: the teacher's pipeline folder with the student denoiser (the adapter
  merged into a copy of the base in lora mode) and a scheduler configured for the student.

What is written is the teacher family's business (the Teacher contract's ``export_formats``,
``export_pipeline`` and ``export_lora``; e.g. :class:`~dmdx_lightning.teachers.sd3.SD3Teacher`
writes a ``StableDiffusion3Pipeline`` whose stochastic flow-matching scheduler replays the
student's sampler step for step). A family without an export stops with a ``NotImplementedError``
naming it. The times and the call that reproduces the student (``call``: the pipeline's keyword
arguments) are written to ``dmdx_export.json`` in the output folder.

The module is rebuilt from the run's ``config.yaml`` (written by the CLI next to the logs; found
automatically near the checkpoint, or given with ``--config``); the checkpoint supplies the
student's weights (its EMA when it has one, unless ``--no-ema``).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Sequence

from torch import nn

EXPORT_INFO = "dmdx_export.json"


# ---------------------------------------------------------------------------------------- the student
def merged_student(teacher) -> nn.Module:
    """The student as a plain denoiser: its own copy (full mode) or base + merged adapter (lora mode)."""
    if teacher.mode == "full":
        return copy.deepcopy(teacher.roles["student"]).requires_grad_(False).eval()
    from peft.tuners.lora import LoraLayer

    net = copy.deepcopy(teacher.denoiser)
    for name, layer in list(net.named_modules()):
        if isinstance(layer, LoraLayer):
            layer.merge(adapter_names=["student"])
            parent_name, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent_name) if parent_name else net, child, layer.get_base_layer())
    net.__dict__.pop("peft_config", None)  # set by peft's injection; the merged net has no adapters
    if "_hf_peft_config_loaded" in net.__dict__:
        net._hf_peft_config_loaded = False
    return net.requires_grad_(False).eval()


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
def export(module, output: str | Path, format: str = "pipeline") -> dict:
    """Write ``module``'s student (current weights) to ``output`` as ``lora`` or ``pipeline``."""
    teacher = module.teacher
    if format not in ("lora", "pipeline"):
        raise ValueError(f"--format must be 'lora' or 'pipeline', got {format!r}")
    if format not in teacher.export_formats:
        raise NotImplementedError(
            f"teacher family {teacher.family!r} ({type(teacher).__name__}) has no diffusers {format} export "
            f"(it exports: {', '.join(teacher.export_formats) or 'nothing'})")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    timesteps = [float(t) for t in module.student_timesteps]
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
    (output / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
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


def build_module(config: str | Path):
    """Instantiate only the ``model`` of a run config (no trainer, no data)."""
    import lightning.pytorch as pl
    import yaml
    from jsonargparse import ArgumentParser

    raw = yaml.safe_load(Path(config).read_text())
    if not isinstance(raw, dict) or "model" not in raw:
        raise ValueError(f"{config} has no 'model' section: pass the config the run was trained with")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(pl.LightningModule, "model", required=True)
    model_cfg = dict(raw["model"])
    model_cfg.get("init_args", {}).pop("init_from", None)  # the checkpoint supplies the student
    cfg = parser.parse_object({"model": model_cfg})
    return parser.instantiate(cfg).model


def export_checkpoint(ckpt_path: str | Path, output: str | Path, format: str = "pipeline",
                      config: str | Path | None = None, use_ema: bool = True) -> dict:
    config = Path(config) if config else find_run_config(ckpt_path)
    module = build_module(config)
    module.load_student_from(str(ckpt_path), use_ema=use_ema)
    info = export(module, output, format)
    info.update(checkpoint=str(ckpt_path), config=str(config), ema=use_ema and module.ema is not None)
    (Path(output) / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return info


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
