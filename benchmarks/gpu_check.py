"""One prepared GPU check: every shipped SDXL / SD3 training method's iteration time, peak memory
and model FLOPs utilisation, LoRA and full, at the real model configs with random weights.

    python benchmarks/gpu_check.py --device cuda                 # one GPU: writes benchmarks/results/gpu_<device>_<date>.{md,json}
    python benchmarks/gpu_check.py --device cpu --tiny --out DIR # the same code at tiny sizes (tests/test_gpu_check.py)

On the GPU machines we are lent, diffusers and jsonargparse are not installed and
nothing can be downloaded: bring them as pure-Python wheels fetched beforehand
(``pip download --no-deps --python-version 3.12 diffusers jsonargparse docstring-parser
typeshed-client importlib_metadata``), unpack them into a folder and run with
``PYTHONPATH=<that folder>:<this repo>`` instead of installing the repository.

What runs, per family (SDXL at 1024 px, SD3-Medium at 1024 px) and method (ADM, ADP, DMD2), in
LoRA and in full mode (12 arms):

- the module is built from the SHIPPED config (``configs/<family>/<method>...yaml``) the way
  ``dmdx fit`` builds it (``dmdx_lightning.export.build_module``), with only the teacher's folder
  replaced by a random-weight folder of the real architecture (UNet / transformer and VAE at their
  real configs; SDXL's CLIP-L and bigG at their real configs; SD3's CLIPs at their real configs
  and T5-XXL at its real width with 2 of its 24 layers, since it runs once per batch without
  gradient; the tokenizers are tiny) and ADP's SAM ViT-B random too; ``mode`` set per arm;
- a Lightning ``Trainer`` with the config's precision runs warm-up, one iteration under
  ``torch.utils.flop_counter.FlopCounterMode`` (model FLOPs of one iteration, forward and
  backward), then the timed iterations (median seconds, ``torch.cuda.synchronize`` around each);
- peak memory: ``torch.cuda.max_memory_allocated`` over the arm, loading included (CPU: none);
- MFU = counted FLOPs / median seconds / the device's bf16 matmul peak, measured here with a
  loop of large bf16 matmuls (so MFU is relative to what this GPU reaches, not its datasheet).

Budget (8 minutes on one H200; estimated, not yet run there): the SDXL UNet (2.6B) and SD3-Medium
transformer (2.0B) folders are written once (about 30 s each, bf16, initialised on the GPU); an arm
builds its module on the CPU and moves it (about 10-20 s; the 2026-11 SD3 check saw 60-120 s per
arm including load), runs 1 warm-up + 1 counted + ``--iterations`` (3) timed iterations at batch
``--batch`` (1; the configs train at 4 per GPU: one sample keeps 12 arms near the budget, and the
time scales about linearly) of 1-4 s each: about 25-40 s per arm. The LoRA arms (the shipped
mode) run first, then the full ones; each arm's row is written to the JSON and the Markdown as it
finishes, so a timeout loses the arm in progress and those after it, not the run. ``--arms`` picks
a subset (e.g. ``sdxl/adp/lora,sdxl/adm/lora``). The 'Scale' issue's compile option does not exist
yet, so no compile on/off rows.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import RESULTS, markdown_table, random_batches  # noqa: E402
from dmdx_lightning.atomic import write_json_atomic  # noqa: E402

#: the shipped config of each (family, method); every arm runs it in LoRA and in full mode
CONFIGS = {
    ("sdxl", "adm"): "configs/sdxl/adm_4step.yaml",
    ("sdxl", "adp"): "configs/sdxl/adp_1step.yaml",
    ("sdxl", "dmd2"): "configs/sdxl/dmd2_4step.yaml",
    ("sd3", "adm"): "configs/sd3/adm_4step.yaml",
    ("sd3", "adp"): "configs/sd3/adp_4step.yaml",
    ("sd3", "dmd2"): "configs/sd3/dmd2_4step.yaml",
}
MODES = ("lora", "full")

SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280), down_block_types=(
                     "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                  attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                  caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192)
VAE = dict(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
           block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=1024)
VAE_LATENTS = {"sdxl": dict(latent_channels=4, scaling_factor=0.13025),
               "sd3": dict(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                           use_post_quant_conv=False)}
TINY_SAM = dict(hidden_size=32, output_channels=16, num_hidden_layers=3, num_attention_heads=2, image_size=32,
                patch_size=8, mlp_dim=64, window_size=2, global_attn_indexes=[2], num_pos_feats=8)


# ---------------------------------------------------------------------------------------- folders
def _clip(folder: Path, subfolder: str, hidden: int, layers: int, heads: int, projection: bool, device, dtype):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    vocab = len(CLIPTokenizer.from_pretrained(folder / "tokenizer").get_vocab())
    config = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, projection_dim=hidden,
                            num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                            hidden_act="gelu", bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    with torch.device(device):
        model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).to(dtype)
    model.save_pretrained(folder / subfolder)


def _save(model_cls, config: dict, folder: Path, subfolder: str, device, dtype) -> int:
    with torch.device(device):
        model = model_cls(**config).to(dtype)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder / subfolder)
    return params


def real_size_folder(family: str, folder: Path, device: str) -> dict:
    """A random pipeline folder of the family's real architecture (see the module docstring)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel

    from dmdx_lightning.teachers.sd3_random import save_random_sd3
    from dmdx_lightning.teachers.sdxl_random import save_random_sdxl

    torch.manual_seed(0)
    dtype = torch.bfloat16
    if family == "sdxl":
        save_random_sdxl(folder, latent_size=128)  # layout, scheduler and tokenizers; the models follow
        denoiser = _save(UNet2DConditionModel, SDXL_UNET, folder, "unet", device, dtype)
        _save(AutoencoderKL, {**VAE, **VAE_LATENTS[family]}, folder, "vae", device, dtype)
        _clip(folder, "text_encoder", 768, 12, 12, False, device, dtype)  # CLIP-L
        _clip(folder, "text_encoder_2", 1280, 32, 20, True, device, dtype)  # OpenCLIP bigG
    else:
        from transformers import T5Config, T5EncoderModel, T5Tokenizer

        save_random_sd3(folder, latent_size=128, latent_channels=16, clip_dim=16, joint_dim=32)
        denoiser = _save(SD3Transformer2DModel, SD3_MEDIUM, folder, "transformer", device, dtype)
        _save(AutoencoderKL, {**VAE, **VAE_LATENTS[family]}, folder, "vae", device, dtype)
        _clip(folder, "text_encoder", 768, 12, 12, True, device, dtype)  # CLIP-L
        _clip(folder, "text_encoder_2", 1280, 32, 20, True, device, dtype)  # CLIP-G
        vocab = len(T5Tokenizer.from_pretrained(folder / "tokenizer_3"))
        with torch.device(device):  # T5-XXL's width, 2 of its 24 layers (module docstring)
            t5 = T5EncoderModel(T5Config(vocab_size=vocab, d_model=4096, d_kv=64, d_ff=10240, num_layers=2,
                                         num_heads=64, feed_forward_proj="gated-gelu", pad_token_id=0,
                                         eos_token_id=1, decoder_start_token_id=0)).to(dtype)
        t5.save_pretrained(folder / "text_encoder_3")
    return {"denoiser_params": denoiser}


def sam_folder(folder: Path, tiny: bool, device: str) -> Path:
    from transformers import SamVisionConfig, SamVisionModel

    torch.manual_seed(0)
    with torch.device(device):
        model = SamVisionModel(SamVisionConfig(**(TINY_SAM if tiny else {})))  # the defaults are ViT-B
    model.save_pretrained(folder)
    return folder


def tiny_folder(family: str, folder: Path) -> Path:
    from dmdx_lightning.teachers.sd3_random import save_random_sd3
    from dmdx_lightning.teachers.sdxl_random import save_random_sdxl

    return save_random_sdxl(folder) if family == "sdxl" else save_random_sd3(folder)


# ---------------------------------------------------------------------------------------- one arm
def arm_config(config: str, folder: Path, sam: Path, mode: str, tiny: bool, out: Path) -> tuple[Path, dict]:
    """The shipped config's model section with the random teacher (and SAM) and this arm's mode;
    returns its path and the config's data / trainer sections."""
    full = yaml.safe_load((ROOT / config).read_text())
    model = full["model"]["init_args"]
    teacher = model["teacher"]["init_args"]
    teacher.update(pretrained_model_name_or_path=str(folder), mode=mode)
    if mode == "full":
        # fp32 master weights for the trainable copies, as configs/sdxl/dmd2_1step_full.yaml
        teacher.setdefault("trainable_dtype", "float32")
    if "pixel_discriminator" in model:
        backbone = model["pixel_discriminator"]["init_args"]["backbone"]["init_args"]
        backbone["pretrained"] = str(sam)
    if tiny:
        teacher.update(torch_dtype="float32", lora_rank=4)
        teacher.pop("trainable_dtype", None)
        if "resolution" in teacher and teacher["resolution"] is not None:
            teacher.update(resolution=16, max_sequence_length=16)
        if "sd3" in config and "discriminator" in model:
            model["discriminator"]["init_args"]["layers"] = [0, 1]
        if "pixel_discriminator" in model:
            backbone["dtype"] = "float32"
            model["pixel_discriminator"]["init_args"]["layers"] = [1, 2]
    path = out / f"{Path(config).stem}_{mode}.yaml"
    path.write_text(yaml.safe_dump({"model": full["model"]}))
    return path, full


def run_arm(config_path: Path, precision: str, device: str, batch: int, iterations: int, warmup: int = 1) -> dict:
    import lightning.pytorch as pl
    from torch.utils.flop_counter import FlopCounterMode

    from dmdx_lightning.export import build_module

    cuda = device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    module = build_module(config_path)
    load_s = time.perf_counter() - t0
    counted = 1
    times: list[float] = []
    flops: dict[str, int] = {}

    class Measure(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch_, batch_idx):
            if cuda:
                torch.cuda.synchronize()
            if batch_idx == warmup:
                self.counter = FlopCounterMode(display=False)
                self.counter.__enter__()
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch_, batch_idx):
            if cuda:
                torch.cuda.synchronize()
            if batch_idx == warmup:
                self.counter.__exit__(None, None, None)
                flops["total"] = self.counter.get_total_flops()
            elif batch_idx >= warmup + counted:
                times.append(time.perf_counter() - self.start)

    trainer = pl.Trainer(accelerator="gpu" if cuda else "cpu", devices=1, precision=precision, max_epochs=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[Measure()], num_sanity_val_steps=0)
    trainer.fit(module, torch.utils.data.DataLoader(random_batches(module, warmup + counted + iterations, batch),
                                                    batch_size=None))
    players = list(module.players)
    del trainer, module
    gc.collect()
    return {"seconds_per_iteration": statistics.median(times), "timed_iterations": len(times),
            "seconds_all": [round(t, 4) for t in times], "flops_per_iteration": flops["total"],
            "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            "load_seconds": round(load_s, 1), "players": players}


def matmul_peak(device: str, tiny: bool) -> float:
    """bf16 matmul FLOP/s this device reaches: a loop of square matmuls, best of 3 timings."""
    n = 256 if tiny else 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    reps = 2 if tiny else 50
    best = float("inf")
    for _ in range(3):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * reps / best


# ---------------------------------------------------------------------------------------- report
def device_name(device: str) -> str:
    return torch.cuda.get_device_name(0) if device == "cuda" else "cpu"


def write(result: dict, out: Path, stem: str) -> None:
    write_json_atomic(out / f"{stem}.json", result)
    gib = 2**30
    rows = []
    for key, arm in result["arms"].items():
        if "error" in arm:
            rows.append([*key.split("/"), arm.get("batch", ""), "failed", "", "", "", arm["error"][:120]])
            continue
        peak = "-" if arm["peak_memory_bytes"] is None else f"{arm['peak_memory_bytes'] / gib:.2f} GiB"
        rows.append([*key.split("/"), arm["batch"], f"{arm['seconds_per_iteration']:.3f}", peak,
                     f"{arm['flops_per_iteration'] / 1e12:.4g}", f"{arm['mfu']:.3g}", arm["config"]])
    lines = [f"# GPU check: {result['device_name']}", "",
             f"Command: `{result['command']}` ({result['date_utc']} UTC, torch {result['torch']}). Raw numbers: "
             f"`{stem}.json`. Random weights at the real configs (`benchmarks/gpu_check.py` docstring), "
             f"{'tiny sizes' if result['tiny'] else 'SDXL and SD3-Medium at 1024 px'}; each arm is the shipped "
             "config with its teacher folder replaced and `mode` set; the config's precision.", "",
             f"bf16 matmul peak measured here: {result['matmul_peak_flops'] / 1e12:.4g} TFLOP/s. MFU = FLOPs of one "
             "iteration (FlopCounterMode, forward + backward of every player) / median seconds / that peak. "
             "Peak memory: `torch.cuda.max_memory_allocated` over the arm, loading included (CPU: -).", "",
             markdown_table(["family", "method", "mode", "batch", "s / iteration (median)", "peak memory",
                             "TFLOP / iteration", "MFU", "config"], rows), ""]
    (out / f"{stem}.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny random models (the CPU test of this script)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--batch", type=int, default=1, help="samples per iteration (the configs train at 4 per GPU)")
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations per arm (after warm-up + counted)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first (CUDA: kernel selection, "
                        "allocator growth)")
    parser.add_argument("--arms", default="", help="comma-separated family/method/mode keys to run (default: all)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (use --device cpu --tiny for the CPU dry run)")
    name = device_name(args.device)
    stem = f"gpu_{re.sub(r'[^a-z0-9]+', '_', name.lower()).strip('_')}_{time.strftime('%Y-%m-%d', time.gmtime())}"
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"command": "python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "device_name": name, "tiny": args.tiny, "torch": torch.__version__,
              "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "batch": args.batch,
              "matmul_peak_flops": matmul_peak(args.device, args.tiny), "folders": {}, "arms": {}}
    wanted = {a for a in args.arms.split(",") if a}
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    sam = sam_folder(scratch / "sam", args.tiny, args.device)
    folders = {}
    for family in ("sdxl", "sd3"):
        t0 = time.perf_counter()
        folders[family] = scratch / family
        try:
            result["folders"][family] = {} if args.tiny else real_size_folder(family, folders[family], args.device)
            if args.tiny:
                tiny_folder(family, folders[family])
        except Exception as e:  # the other family still runs; this one's arms say why they failed
            traceback.print_exc()
            result["folders"][family] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        result["folders"][family]["write_seconds"] = round(time.perf_counter() - t0, 1)
    # LoRA arms first (the shipped configs' mode): if the budget runs out, the full-mode arms go
    for mode in MODES:
        for (family, method), config in CONFIGS.items():
            key = f"{family}/{method}/{mode}"
            if wanted and key not in wanted:
                continue
            started = time.perf_counter()
            try:
                if "error" in result["folders"][family]:
                    raise RuntimeError(f"no {family} folder: {result['folders'][family]['error']}")
                path, full = arm_config(config, folders[family], sam, mode, args.tiny, scratch)
                arm = run_arm(path, str(full["trainer"].get("precision", "32-true")), args.device, args.batch,
                              args.iterations, args.warmup)
                arm["mfu"] = arm["flops_per_iteration"] / arm["seconds_per_iteration"] / result["matmul_peak_flops"]
            except Exception as e:  # keep going: each arm is reported on its own
                traceback.print_exc()
                arm = {"error": f"{type(e).__name__}: {e}"[:2000]}
            arm.update(config=config, batch=args.batch, wall_seconds=round(time.perf_counter() - started, 1))
            result["arms"][key] = arm
            write(result, args.out, stem)  # as each arm finishes: a timeout loses one arm
            print(key, json.dumps({k: v for k, v in arm.items() if k != "seconds_all"}), flush=True)
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
    write(result, args.out, stem)
    return result


if __name__ == "__main__":
    main()
