"""GPU check of the SD3 path (one CUDA GPU, no downloads): FSDP + bf16 through the CLI, and
SD3-Medium-size memory / speed with random weights.

    python benchmarks/sd3_gpu_check.py OUT_DIR

1. ``dmdx fit --config configs/sd3/adm_sd35_large_4step.yaml --config configs/trainer/fsdp.yaml`` on a tiny
   random SD3 (full mode, bf16 frozen / fp32 trainable, bf16-mixed), then ``dmdx export`` of its
   checkpoint (the FSDP "full" state dict) to a pipeline folder that diffusers loads and runs.
2. An SD3-Medium-size transformer (24 blocks, width 1536, random weights, bf16) at 1024 px
   (128x128 latents): resident GPU bytes after loading the teacher in lora and full mode, then
   ADM iterations (batch 1, LoRA rank 64, gradient checkpointing, bf16-mixed): seconds per
   iteration and peak memory. Text encoders here are tiny; they are shared by every role.

Section 2 is superseded by ``benchmarks/gpu_check.py`` (every shipped SDXL / SD3 method, LoRA and
full, built from the shipped configs, with FLOPs and MFU); this script remains for section 1, the
FSDP check through the CLI.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/gpu_check")
EXTRA = sys.argv[2:]  # extra CLI args for the fit of section 1 (e.g. a CPU dry run)
OUT.mkdir(parents=True, exist_ok=True)
RESULT: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
GIB = 2**30
SCRATCH = Path(tempfile.gettempdir())  # random weights, the FSDP run and its export
RUN, EXPORT = SCRATCH / "fsdp_run", SCRATCH / "fsdp_export"


def save():
    (OUT / "gpu_check.json").write_text(json.dumps(RESULT, indent=2) + "\n")


def section(name):
    def wrap(fn):
        t0 = time.perf_counter()
        try:
            RESULT[name] = fn()
        except Exception as e:  # keep going: each section is reported on its own
            traceback.print_exc()
            RESULT[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        RESULT[name] = {**RESULT[name], "wall_s": round(time.perf_counter() - t0, 1)}
        print(name, json.dumps(RESULT[name], indent=1), flush=True)
        save()
        return fn
    return wrap


from dmdx_lightning.teachers.sd3_random import save_random_sd3  # noqa: E402

tiny = save_random_sd3(SCRATCH / "tiny_sd3")


@section("fsdp_cli")
def fsdp_cli():
    t = "--model.init_args.teacher.init_args."
    args = [sys.executable, "-m", "dmdx_lightning.cli", "fit", "--config", "configs/sd3/adm_sd35_large_4step.yaml",
            "--config", "configs/trainer/fsdp.yaml", t + "pretrained_model_name_or_path", str(tiny),
            t + "resolution", "16", t + "max_sequence_length", "16",
            "--model.init_args.discriminator.init_args.layers", "[0, 1]", "--trainer.devices", "1",
            "--trainer.max_steps", "3", "--trainer.logger", "false", "--trainer.default_root_dir", str(RUN),
            "--trainer.callbacks", json.dumps([{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {
                "dirpath": str(RUN / "checkpoints"), "save_last": True, "every_n_train_steps": 1}}])] + EXTRA
    fit = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    print(fit.stdout[-3000:], fit.stderr[-6000:])
    out = {"fit_rc": fit.returncode}
    ckpts = sorted((RUN / "checkpoints").glob("*.ckpt")) if (RUN / "checkpoints").exists() else []
    out["checkpoints"] = [c.name for c in ckpts]
    if fit.returncode or not ckpts:
        out["fit_error_lines"] = [line[:600] for line in fit.stderr.splitlines() if "Error" in line][-6:]
        return out
    ckpt = RUN / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    out["ckpt_keys"] = len(state)
    out["ckpt_frozen_teacher_keys"] = sum(k.startswith("teacher.denoiser.") or k.startswith("teacher.text_encoder")
                                          for k in state)
    out["ckpt_mib"] = round(ckpt.stat().st_size / 2**20, 2)
    exp = subprocess.run([sys.executable, "-m", "dmdx_lightning.cli", "export", "--ckpt_path", str(ckpt),
                          "--output", str(EXPORT), "--format", "pipeline",
                          "--config", str(RUN / "config.yaml")], capture_output=True, text=True, cwd=ROOT)
    print(exp.stdout[-2000:], exp.stderr[-4000:])
    out["export_rc"] = exp.returncode
    if exp.returncode:
        out["export_stderr_tail"] = exp.stderr[-1500:]
        return out
    from diffusers import DiffusionPipeline

    info = json.loads((EXPORT / "dmdx_export.json").read_text())
    pipe = DiffusionPipeline.from_pretrained(str(EXPORT), torch_dtype=torch.bfloat16).to("cuda")
    img = pipe("a cat", height=16, width=16, guidance_scale=1.0, sigmas=info["sigmas"],
               max_sequence_length=16, output_type="pt").images
    out.update(exported_image_shape=list(img.shape), exported_finite=bool(torch.isfinite(img).all()))
    return out


SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                  attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                  caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192)
big = SCRATCH / "sd3_medium_size"


@section("build_sd3_medium_size")
def build():
    from diffusers import SD3Transformer2DModel

    save_random_sd3(big, num_layers=1, latent_size=128, latent_channels=16, clip_dim=1024, joint_dim=4096)
    torch.manual_seed(0)
    with torch.device("cuda"):
        net = SD3Transformer2DModel(**SD3_MEDIUM).to(torch.bfloat16)
    params = sum(p.numel() for p in net.parameters())
    net.save_pretrained(big / "transformer")
    del net
    torch.cuda.empty_cache()
    return {"transformer_params": params}


def prompt_loader(n, batch):
    items = [{"prompt": f"a photo of object number {i}", "index": i} for i in range(n)]
    return torch.utils.data.DataLoader(items, batch_size=batch, collate_fn=lambda b: {
        "prompt": [x["prompt"] for x in b], "index": torch.tensor([x["index"] for x in b])})


def train_and_time(mode, iterations, **teacher_kw):
    import lightning.pytorch as pl
    from functools import partial

    from dmdx_lightning.discriminators.latent import LatentDiscriminator
    from dmdx_lightning.methods.adm import ADMModule
    from dmdx_lightning.teachers.sd3 import SD3Teacher

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    teacher = SD3Teacher(str(big), mode=mode, torch_dtype="bfloat16", resolution=256, max_sequence_length=77,
                         lora_rank=64, lora_alpha=64, gradient_checkpointing=True, **teacher_kw).cuda()
    resident = torch.cuda.memory_allocated() - base
    roles = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
             for r in ("real", "fake", "student") for p in teacher.network(r).parameters()}
    transformer_bytes = sum(roles.values())  # distinct storages of the three roles
    opt = partial(torch.optim.AdamW, lr=1e-5, betas=(0.0, 0.99))
    module = ADMModule(teacher, LatentDiscriminator(layers=[5, 11, 17, 23], head_channels=256), student_steps=4,
                       real_cfg_scale=7.0, generator_optimizer=opt, fake_score_optimizer=opt,
                       discriminator_optimizer=opt)
    times = []

    class Timer(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *a):
            torch.cuda.synchronize()
            times.append(time.perf_counter())

    trainer = pl.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=iterations,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[Timer()])
    trainer.fit(module, prompt_loader(64, 1))
    steps = [b - a for a, b in zip(times[1:], times[2:])]  # skip the first (warm-up) iteration
    out = {"resident_teacher_bytes_gib": round(resident / GIB, 3),
           "role_param_bytes_gib": round(transformer_bytes / GIB, 3),
           "peak_training_gib": round(torch.cuda.max_memory_allocated() / GIB, 2),
           "seconds_per_iteration": round(sum(steps) / max(1, len(steps)), 3), "timed_iterations": len(steps)}
    del trainer, module, teacher
    torch.cuda.empty_cache()
    return out


@section("sd3_medium_size_lora")
def lora():
    return train_and_time("lora", 6)


@section("sd3_medium_size_full")
def full():
    return train_and_time("full", 3)  # bf16 trainable copies (fp32 master copies would not fit with Adam on one GPU)


save()
print(json.dumps(RESULT, indent=2))
