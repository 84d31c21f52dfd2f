"""GPU benchmark: ADM / DMD iteration time and peak memory on a real-size SD3-Medium architecture.

Random weights (no hub on the benchmark machines): the transformer and VAE have SD3-Medium's exact
configuration; the two CLIP text encoders have the real output widths (pooled 2048) but only 2
layers, and T5 is dropped (``drop_t5``); text encoding runs once per iteration and is a small
share of the step. Each arm runs the real ``ADMModule`` under a Lightning ``Trainer`` with
``bf16-mixed`` precision; times are per iteration (one batch: all players that step), measured
after warm-up with CUDA synchronisation, and the peak is ``torch.cuda.max_memory_allocated``.

    python benchmarks/gpu_sd3.py --out benchmarks/results   # needs a CUDA GPU
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                  attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                  caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192)
SD3_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
               up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=(128, 256, 512, 512),
               layers_per_block=2, latent_channels=16, norm_num_groups=32, sample_size=1024,
               scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)


def build_folder(folder: Path) -> Path:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from dmdx_lightning.teachers.sd3_random import _clip_tokenizer

    torch.manual_seed(0)
    tok = _clip_tokenizer()
    vocab = len(tok.get_vocab())

    def clip():
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=vocab, hidden_size=1024, intermediate_size=4096, projection_dim=1024, num_hidden_layers=2,
            num_attention_heads=16, max_position_embeddings=77, bos_token_id=vocab - 2, eos_token_id=vocab - 1,
            pad_token_id=vocab - 1))

    with torch.device("cuda"):
        transformer = SD3Transformer2DModel(**SD3_MEDIUM).to(torch.bfloat16)
        vae = AutoencoderKL(**SD3_VAE).to(torch.bfloat16)
        te1, te2 = clip().to(torch.bfloat16), clip().to(torch.bfloat16)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=te1, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(folder)
    del pipe, transformer, vae, te1, te2
    torch.cuda.empty_cache()
    return folder


class IterationTimer(pl.Callback):
    """Wall time of each training batch (CUDA-synchronised); the peak is reset after warm-up."""

    def __init__(self, warmup: int) -> None:
        self.times: list[float] = []
        self.warmup, self._t = warmup, 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        torch.cuda.synchronize()
        if batch_idx == self.warmup:
            torch.cuda.reset_peak_memory_stats()
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        torch.cuda.synchronize()
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self._t)


def run_arm(folder: Path, *, loss: str, mode: str, resolution: int, batch_size: int, iterations: int,
            warmup: int, checkpointing: bool) -> dict:
    from dmdx_lightning.discriminators.latent import LatentDiscriminator
    from dmdx_lightning.methods.adm import ADMModule
    from dmdx_lightning.teachers.sd3 import SD3Teacher

    torch.cuda.reset_peak_memory_stats()
    opt = partial(torch.optim.AdamW, lr=1e-6, betas=(0.0, 0.999))
    teacher = SD3Teacher(str(folder), torch_dtype="bfloat16", drop_t5=True, resolution=resolution, mode=mode,
                         lora_rank=64, gradient_checkpointing=checkpointing, trainable_dtype="float32" if mode == "full" else None)
    teacher.to("cuda")
    disc = LatentDiscriminator(layers=[5, 11, 17, 23], head_channels=256) if loss != "dmd" else None
    module = ADMModule(teacher, disc, loss=loss, student_steps=4, real_cfg_scale=7.0, generator_optimizer=opt,
                       fake_score_optimizer=opt, discriminator_optimizer=opt)
    prompts = ["a photo of a cat wearing a red scarf"] * (batch_size * (iterations + warmup))
    data = torch.utils.data.DataLoader([{"prompt": p} for p in prompts], batch_size=batch_size,
                                       collate_fn=lambda b: {"prompt": [x["prompt"] for x in b]})
    timer = IterationTimer(warmup)
    steps = sum(len(module.players_for_step(i)) for i in range(iterations + warmup))
    trainer = pl.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[timer])
    trainer.fit(module, data)
    times = sorted(timer.times)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    result = {"loss": loss, "mode": mode, "resolution": resolution, "batch_size": batch_size,
              "gradient_checkpointing": checkpointing, "iterations_timed": len(times),
              "median_s_per_iteration": times[len(times) // 2], "min_s_per_iteration": times[0],
              "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30, "trainable_params": trainable}
    del trainer, module, teacher, disc
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--folder", default="/tmp/sd3_medium_random")
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu_sd3.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    start = time.perf_counter()
    folder = build_folder(Path(args.folder))
    print(f"built random SD3-Medium folder in {time.perf_counter() - start:.0f} s", flush=True)
    arms = [
        dict(loss="adm", mode="lora", resolution=1024, batch_size=1, checkpointing=True),
        dict(loss="dmd", mode="lora", resolution=1024, batch_size=1, checkpointing=True),
        dict(loss="adm", mode="lora", resolution=1024, batch_size=1, checkpointing=False),
        dict(loss="adm", mode="lora", resolution=1024, batch_size=4, checkpointing=True),
        dict(loss="adm", mode="full", resolution=1024, batch_size=1, checkpointing=True),
    ]
    results = []
    for arm in arms:
        try:
            r = run_arm(folder, iterations=args.iterations, warmup=args.warmup, **arm)
        except torch.cuda.OutOfMemoryError as e:
            gc.collect()
            torch.cuda.empty_cache()
            r = {**arm, "error": f"CUDA out of memory: {str(e).splitlines()[0]}"}
        print(json.dumps(r), flush=True)
        results.append(r)
    device = torch.cuda.get_device_name(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"device": device, "torch": torch.__version__, "architecture": "SD3-Medium (random weights)",
               "transformer_config": SD3_MEDIUM, "results": results}
    (out / "gpu_sd3.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [f"# ADM on a real-size SD3-Medium architecture ({device})", "",
             "Random weights; T5 dropped; 2-layer CLIP encoders of real width; bf16-mixed; 4-step student;",
             "LoRA rank 64; latent discriminator heads on blocks 5, 11, 17, 23. Command: "
             "`python benchmarks/gpu_sd3.py`.", "",
             "| loss | mode | res | batch | grad ckpt | s / iteration (median) | peak GiB |", "|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['loss']} | {r['mode']} | {r['resolution']} | {r['batch_size']} | "
                         f"{r['checkpointing']} | {r['error'][:60]} | - |")
        else:
            lines.append(f"| {r['loss']} | {r['mode']} | {r['resolution']} | {r['batch_size']} | "
                         f"{r['gradient_checkpointing']} | {r['median_s_per_iteration']:.3f} | {r['peak_memory_gib']:.1f} |")
    (out / "gpu_sd3.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
