"""One prepared GPU check: every shipped SDXL / SD3 training method's iteration time, peak memory
and model FLOPs utilisation, LoRA and full, under DDP, FSDP2 and FSDP1, compiled or not, at the
real model configs with random weights.

    python benchmarks/gpu_check.py --device cuda                 # one GPU: writes benchmarks/results/gpu_<device>_<date>.{md,json}
    # the strategy and compile arms for one H200's ~8 minutes (Budget), one line:
    python benchmarks/gpu_check.py --device cuda --arms sdxl/adm/lora/ddp/off,sdxl/adm/lora/fsdp2/off,sd3/adm/full/fsdp2/off,sd3/adm/full/fsdp1/off,sd3/adm/full/fsdp2/on
    python benchmarks/gpu_check.py --device cpu --tiny --out DIR # the same code at tiny sizes (tests/test_gpu_check.py)

On the GPU machines we are lent, diffusers and jsonargparse are not installed and
nothing can be downloaded: bring them as pure-Python wheels fetched beforehand
(``pip download --no-deps --python-version 3.12 diffusers jsonargparse docstring-parser
typeshed-client importlib_metadata``), unpack them into a folder and run with
``PYTHONPATH=<that folder>:<this repo>`` instead of installing the repository.

An arm is ``family/method/mode/strategy/compile``: family SDXL at 1024 px or SD3-Medium at 1024 px;
method ADM, ADP or DMD2; mode ``lora`` or ``full``; strategy ``ddp``, ``fsdp2`` or ``fsdp1``
(``--strategies``, default ``ddp``); compile ``off`` or ``on`` (``--compile``, default ``off``).
The defaults give the 12 arms of the first version of this script (every method, LoRA and full).

- the module is built from the SHIPPED config (``configs/<family>/<method>...yaml``) the way
  ``dmdx fit`` builds it (``dmdx_lightning.export.build_module``; under FSDP2 with the full-mode
  copies on the meta device, as ``dmdx fit`` does), with only the teacher's folder replaced by a
  random-weight folder of the real architecture (UNet / transformer and VAE at their real
  configs; SDXL's CLIP-L and bigG at their real configs; SD3's CLIPs at their real configs and
  T5-XXL at its real width with 2 of its 24 layers, since it runs once per batch without gradient;
  the tokenizers are tiny) and ADP's SAM ViT-B random too; ``mode`` set per arm;
- the strategy is the one a user sets, on one device: ``ddp`` the shipped config's own
  (``ddp_find_unused_parameters_true``: DDP over one process, gradient buckets included);
  ``fsdp2`` the class and init_args of ``configs/trainer/fsdp2.yaml`` (``FSDP2Strategy``: bf16
  compute under the configs' bf16-mixed, fp32 reduction and master weights; on CPU
  ``param_dtype`` / ``reduce_dtype`` null: no cast); ``fsdp1`` those of
  ``configs/trainer/fsdp.yaml`` (Lightning's ``FSDPStrategy``). ``fsdp1`` arms are skipped, with
  a row saying why, on CPU ("FSDP1 needs CUDA") and for SDXL (fsdp.yaml wraps SD3's classes only);
  in LoRA mode a block unit holds bf16 weights and fp32 adapters, which FSDP1's one flat tensor
  per unit may refuse (the row says so);
- compile ``on`` sets ``model.init_args.compile: {backend: ...}`` (``--compile-backend``;
  default inductor on CUDA, aot_eager on CPU), which compiles every teacher block in
  ``configure_model``, after FSDP2's sharding;
- a Lightning ``Trainer`` with the config's precision runs warm-up, one iteration under
  ``torch.utils.flop_counter.FlopCounterMode`` (model FLOPs of one iteration, forward and
  backward), then the timed iterations (median seconds, ``torch.cuda.synchronize`` around each).
  Compiled arms warm up until an iteration compiles no new graph
  (``torch._dynamo.utils.counters["stats"]["unique_graphs"]``; at least 2, at most
  ``--max-warmup``), then until the next iterations step the same players as an uncompiled arm's
  (DMD2 steps the generator every 5th iteration; the JSON's ``timed_players`` says which stepped:
  DMD2's timed iterations are its fake-score / discriminator ones); the counted iteration runs
  eagerly (compiled kernels escape the counter); ``compile_seconds`` = the warm-up's seconds minus
  as many timed medians, reported apart from the timed iterations, with the graph count and any
  graph compiled while timed;
- peak memory: ``torch.cuda.max_memory_allocated`` over the arm, loading (and compiling) included
  (CPU: none);
- MFU = counted FLOPs / median seconds / the device's bf16 matmul peak, measured here with a
  loop of large bf16 matmuls (so MFU is relative to what this GPU reaches, not its datasheet).

Order: ``--arms`` runs its keys in the order given (``family/method/mode`` stands for that arm
under each ``--strategies`` x ``--compile``). Without it, the arms in :data:`FIRST` that the flags
select run first: SDXL ADM LoRA under DDP then FSDP2 (what sharding costs on one GPU), SD3 ADM
full under FSDP2 then FSDP1 (today's fallback), and that FSDP2 arm compiled (compile and FSDP2
together, paired with its uncompiled row; SD3's blocks are one joint transformer layer each, so
its graphs are small, where an SDXL block holds up to 3 x 10 transformer layers and ADM LoRA
compiles 36 states at tiny size against SD3's 14-16); then every other arm, compile setting by
compile setting, strategy by strategy, the LoRA arms (the shipped mode) before the full ones (with
the default flags: the 12 DDP arms in the first version's order). Each arm's row is written to the
JSON and the Markdown as it finishes, so a timeout loses the arm in progress and those after it,
not the run.

Budget (8 minutes on one H200; estimated, not yet run there): only the families and SAM the chosen
arms need are written; the SDXL UNet (2.6B) and SD3-Medium transformer (2.0B) folders take about 30
s each (bf16, initialised on the GPU); an uncompiled arm builds its module on the CPU and moves it
(about 10-20 s; the 2026-11 SD3 check saw 60-120 s per arm including load), runs 1 warm-up + 1
counted + ``--iterations`` (3) timed iterations at batch ``--batch`` (1; the configs train at 4 per
GPU: one sample keeps the arms near the budget, and the time scales about linearly) of 1-4 s each:
about 25-40 s per LoRA arm, 40-60 s per full-mode FSDP2 arm, 60-120 s for the FSDP1 arm (the two
fp32 trainable SD3 copies built on the CPU before wrapping). The second command above then takes
about 1 (matmul peak, both folders) + 0.5 + 0.6 + 0.8 + 1.5 = 4.5 minutes before its last (compiled)
arm. That arm's time is the unknown: inductor compiles, from a cold cache, one graph per block state
(SD3 ADM full: 14-16 at tiny size, 23 for the shipped LoRA config at 24 blocks,
benchmarks/results/compile.md), forward and backward, at a time per graph not measured on a GPU yet;
14-23 graphs at 10-30 s each are 2.5-11 minutes, so it may not finish in 8 (it runs last: the others
are written first). The default (the 12 DDP arms) is about 8-10 minutes; ``--strategies
ddp,fsdp2,fsdp1 --compile off,on`` without ``--arms`` selects 72 arms: the :data:`FIRST` ones fill
the budget, the rest are for a longer loan.
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
#: the Trainer strategy of an arm (:func:`trainer_strategy`) and whether its teacher's blocks are compiled
STRATEGIES = ("ddp", "fsdp2", "fsdp1")
COMPILE = ("off", "on")
#: the overlay a user adds for each sharded strategy (``--config configs/trainer/...``)
STRATEGY_OVERLAYS = {"fsdp2": "configs/trainer/fsdp2.yaml", "fsdp1": "configs/trainer/fsdp.yaml"}
#: the arms that run first by default, where --strategies / --compile select them (module docstring)
FIRST = ("sdxl/adm/lora/ddp/off", "sdxl/adm/lora/fsdp2/off", "sd3/adm/full/fsdp2/off", "sd3/adm/full/fsdp1/off",
         "sd3/adm/full/fsdp2/on")

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
def arm_config(config: str, folder: Path, sam: Path, mode: str, tiny: bool, out: Path,
               compile: dict | None = None) -> tuple[Path, dict]:
    """The shipped config's model section with the random teacher (and SAM), this arm's mode and,
    when given, ``model.init_args.compile`` (as a user sets it); returns its path and the config's
    data / trainer sections."""
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
    if compile is not None:
        model["compile"] = dict(compile)
    path = out / f"{Path(config).stem}_{mode}{'_compile' if compile is not None else ''}.yaml"
    path.write_text(yaml.safe_dump({"model": full["model"]}))
    return path, full


def trainer_strategy(strategy: str, shipped: dict, device: str):
    """The Trainer's ``strategy`` for an arm, as a user sets it: ``ddp`` the shipped config's own
    (``ddp_find_unused_parameters_true``: DDP over one process here); ``fsdp2`` / ``fsdp1`` the
    class and init_args of their overlay (``configs/trainer/fsdp2.yaml`` / ``fsdp.yaml``). On CPU
    FSDP2 computes and reduces in the stored dtype (``param_dtype`` / ``reduce_dtype`` null)."""
    from dmdx_lightning.errors import import_class

    if strategy == "ddp":
        return shipped["trainer"].get("strategy", "auto")
    spec = yaml.safe_load((ROOT / STRATEGY_OVERLAYS[strategy]).read_text())["trainer"]["strategy"]
    kwargs = dict(spec.get("init_args") or {})
    if strategy == "fsdp2" and device == "cpu":
        kwargs.update(param_dtype=None, reduce_dtype=None)
    if "auto_wrap_policy" in kwargs:  # FSDP1: the classes the overlay names, as the CLI resolves them
        kwargs["auto_wrap_policy"] = {import_class(c, "trainer.strategy.init_args.auto_wrap_policy")
                                      for c in kwargs["auto_wrap_policy"]}
    return import_class(spec["class_path"], "trainer.strategy.class_path")(**kwargs)


def skip_reason(family: str, strategy: str, device: str) -> str | None:
    if strategy == "fsdp1" and device != "cuda":
        return "FSDP1 needs CUDA (Lightning's FSDPStrategy refuses the CPU)"
    if strategy == "fsdp1" and family != "sd3":
        return "configs/trainer/fsdp.yaml wraps SD3's classes only (no FSDP1 overlay for SDXL)"
    return None


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def run_arm(config_path: Path, precision: str, device: str, batch: int, iterations: int, warmup: int = 1,
            strategy="auto", compiled: bool = False, max_warmup: int = 8) -> dict:
    """Build the module as ``dmdx fit`` does under ``strategy``, then train: ``warmup`` untimed
    iterations, one under FlopCounterMode, then ``iterations`` timed ones.

    Compiled: the warm-up goes on until an iteration compiles no new graph (at least 2, at most
    ``max_warmup``), and then until the next iterations step the same players as the uncompiled
    arm's counted and timed ones (DMD2's TTUR steps the generator every 5th); the counted one runs
    eagerly (``force_eager``: compiled kernels escape the counter)."""
    import contextlib

    import lightning.pytorch as pl
    from torch._dynamo.utils import counters
    from torch.utils.flop_counter import FlopCounterMode

    from dmdx_lightning.export import build_module
    from dmdx_lightning.strategies import FSDP2Strategy
    from dmdx_lightning.teachers.base import meta_role_copies

    cuda = device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if compiled:
        torch._dynamo.reset()
        counters.clear()
        torch.compiler.set_stance("default")  # whatever an arm that failed mid-count left
    t0 = time.perf_counter()
    torch.manual_seed(0)
    # under FSDP2 dmdx fit makes the full-mode copies on the meta device (training_cli.DMDXCLI)
    with meta_role_copies() if isinstance(strategy, FSDP2Strategy) else contextlib.nullcontext():
        module = build_module(config_path)
    load_s = time.perf_counter() - t0
    warmups = max(warmup, 2) if compiled else warmup
    limit = max(warmups, max_warmup) if compiled else warmups

    def aligned(i: int) -> bool:  # iterations i... step the players the uncompiled arm's warmup... step
        return all(module.players_for_step(i + j) == module.players_for_step(warmup + j) for j in range(1 + iterations))

    def start(done: int) -> int:  # where the counted iteration goes once ``done`` warm-ups ended it
        return next(i for i in range(done, done + 1000) if aligned(i)) if compiled else done

    batches = max(start(w) for w in range(warmups, limit + 1)) + 1 + iterations
    record: dict = {"warmup_seconds_all": [], "warmup_new_graphs": [], "times": [], "timed_players": [],
                    "graphs_while_timed": 0}

    class Measure(pl.Callback):
        phase = "warmup" if warmups else "counted"
        ended = None
        counter = stance = None

        def on_train_batch_start(self, trainer, pl_module, batch_, batch_idx):
            if cuda:
                torch.cuda.synchronize()
            if self.phase == "counted":
                self.stance = torch.compiler.set_stance("force_eager") if compiled else None  # sets it now
                self.counter = FlopCounterMode(display=False)
                self.counter.__enter__()
            self.graphs = _graphs()
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch_, batch_idx):
            if cuda:
                torch.cuda.synchronize()
            seconds, new = time.perf_counter() - self.start, _graphs() - self.graphs
            if self.phase == "warmup":
                record["warmup_seconds_all"].append(round(seconds, 4))
                record["warmup_new_graphs"].append(new)
                done = len(record["warmup_seconds_all"])
                if self.ended is None and (done >= limit or (done >= warmups and not (compiled and new))):
                    self.ended = done  # compiled: no new graph (or the limit); now align the players
                if self.ended is not None and done == start(self.ended):
                    self.phase = "counted"
            elif self.phase == "counted":
                self.close()
                record["flops"] = self.counter.get_total_flops()
                self.phase = "timed"
            else:
                record["times"].append(seconds)
                record["timed_players"].append(pl_module.players_for_step(batch_idx))
                record["graphs_while_timed"] += new
                if len(record["times"]) >= iterations:
                    trainer.should_stop = True

        def close(self):  # the counter and the stance end with the counted iteration, or with a failure in it
            if self.stance is not None:
                self.stance.__exit__(None, None, None)
                self.stance = None
            if self.phase == "counted" and self.counter is not None:
                self.counter.__exit__(None, None, None)
                self.phase = "closed"

    measure = Measure()
    trainer = pl.Trainer(accelerator="gpu" if cuda else "cpu", devices=1, strategy=strategy, precision=precision,
                         max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[measure], num_sanity_val_steps=0)
    try:
        trainer.fit(module, torch.utils.data.DataLoader(random_batches(module, batches, batch), batch_size=None))
    finally:
        measure.close()
    players = list(module.players)
    trainer_strategy_name = type(trainer.strategy).__name__
    del trainer, module
    gc.collect()
    times = record["times"]
    if len(times) < iterations:
        raise RuntimeError(f"{len(times)} of {iterations} timed iterations ran (the loader ran out)")
    arm = {"seconds_per_iteration": statistics.median(times), "timed_iterations": len(times),
           "seconds_all": [round(t, 4) for t in times], "flops_per_iteration": record["flops"],
           "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
           "load_seconds": round(load_s, 1), "players": players, "timed_players": record["timed_players"],
           "trainer_strategy": trainer_strategy_name,
           "warmup_iterations": len(record["warmup_seconds_all"]), "warmup_seconds_all": record["warmup_seconds_all"]}
    if compiled:
        # compile time: what the warm-up took beyond as many compiled iterations
        arm.update(compile_seconds=round(sum(record["warmup_seconds_all"]) - len(record["warmup_seconds_all"])
                                         * arm["seconds_per_iteration"], 1),
                   graphs=_graphs(), warmup_new_graphs=record["warmup_new_graphs"],
                   graphs_while_timed=record["graphs_while_timed"],
                   frames_eager=counters["frames"]["total"] - counters["frames"]["ok"])
        torch._dynamo.reset()
    return arm


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
        if "skipped" in arm:
            rows.append([*key.split("/"), "", "skipped", "", "", "", "", arm["skipped"]])
            continue
        if "error" in arm:
            rows.append([*key.split("/"), arm.get("batch", ""), "failed", "", "", "", "", arm["error"][:120]])
            continue
        peak = "-" if arm["peak_memory_bytes"] is None else f"{arm['peak_memory_bytes'] / gib:.2f} GiB"
        compiled = (f"{arm['compile_seconds']:.1f} ({arm['graphs']} graphs, {arm['warmup_iterations']} warm-up"
                    f"{', ' + str(arm['graphs_while_timed']) + ' while timed' if arm['graphs_while_timed'] else ''})"
                    if "compile_seconds" in arm else "")
        rows.append([*key.split("/"), arm["batch"], f"{arm['seconds_per_iteration']:.3f}", peak,
                     f"{arm['flops_per_iteration'] / 1e12:.4g}", f"{arm['mfu']:.3g}", compiled,
                     f"{arm['config']} ({arm['trainer_strategy']})"])
    lines = [f"# GPU check: {result['device_name']}", "",
             f"Command: `{result['command']}` ({result['date_utc']} UTC, torch {result['torch']}). Raw numbers: "
             f"`{stem}.json`. Random weights at the real configs (`benchmarks/gpu_check.py` docstring), "
             f"{'tiny sizes' if result['tiny'] else 'SDXL and SD3-Medium at 1024 px'}; each arm is the shipped "
             "config with its teacher folder replaced and `mode` set; the config's precision. Strategy on one "
             "device: `ddp` the config's own (DDP over one process), `fsdp2` / `fsdp1` the class and options of "
             "`configs/trainer/fsdp2.yaml` / `fsdp.yaml`; compile `on`: `model.init_args.compile: "
             f"{{backend: {result['compile_backend']}}}`.", "",
             f"bf16 matmul peak measured here: {result['matmul_peak_flops'] / 1e12:.4g} TFLOP/s. MFU = FLOPs of one "
             "iteration (FlopCounterMode, forward + backward of every player; run eagerly in compiled arms) / "
             "median seconds / that peak. Peak memory: `torch.cuda.max_memory_allocated` over the arm, loading "
             "and compiling included (CPU: -). Compile s: the warm-up iterations' seconds minus as many timed "
             "medians (warm-up runs until an iteration compiles no new graph); timed iterations exclude it.", "",
             markdown_table(["family", "method", "mode", "strategy", "compile", "batch", "s / iteration (median)",
                             "peak memory", "TFLOP / iteration", "MFU", "compile s", "config (Trainer strategy)"],
                            rows), ""]
    (out / f"{stem}.md").write_text("\n".join(lines))


def plan_arms(arms: str, strategies: list[str], compiles: list[str]) -> list[str]:
    """The arm keys (``family/method/mode/strategy/compile``) to run, in order.

    ``arms`` given: in its order; a ``family/method/mode`` key stands for itself under each of
    ``strategies`` and ``compiles``, a five-part key for itself. Otherwise every combination, the
    :data:`FIRST` ones first, then compile setting by compile setting, strategy by strategy, the
    LoRA arms (the shipped mode) before the full ones."""
    if arms:
        keys = []
        for key in (a for a in arms.split(",") if a):
            parts = key.split("/")
            keys += [f"{key}/{s}/{c}" for c in compiles for s in strategies] if len(parts) == 3 else [key]
    else:
        every = [f"{f}/{m}/{mode}/{s}/{c}" for c in compiles for s in strategies for mode in MODES for f, m in CONFIGS]
        keys = [k for k in FIRST if k in every] + [k for k in every if k not in FIRST]
    for key in keys:
        parts = key.split("/")
        if (len(parts) != 5 or tuple(parts[:2]) not in CONFIGS or parts[2] not in MODES or parts[3] not in STRATEGIES
                or parts[4] not in COMPILE):
            raise ValueError(f"arm {key!r}: expected family/method/mode[/strategy/compile] with family/method in "
                             f"{sorted('/'.join(k) for k in CONFIGS)}, mode in {MODES}, strategy in {STRATEGIES}, "
                             f"compile in {COMPILE}")
    return list(dict.fromkeys(keys))


def _choices(parser, value: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    chosen = [v for v in value.split(",") if v]
    if not chosen or set(chosen) - set(allowed):
        parser.error(f"{flag}: a comma list of {', '.join(allowed)} (got {value!r})")
    return chosen


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny random models (the CPU test of this script)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--batch", type=int, default=1, help="samples per iteration (the configs train at 4 per GPU)")
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations per arm (after warm-up + counted)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first (CUDA: kernel selection, "
                        "allocator growth); compiled arms: at least 2, then until one compiles no new graph")
    parser.add_argument("--max-warmup", type=int, default=8, help="most warm-up iterations of a compiled arm")
    parser.add_argument("--strategies", default="ddp", help=f"comma list of {', '.join(STRATEGIES)} (default: ddp)")
    parser.add_argument("--compile", default="off", help="comma list of off, on (default: off)")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend of the compiled arms (default: inductor on CUDA, aot_eager on CPU)")
    parser.add_argument("--arms", default="", help="comma-separated arms in the order to run: family/method/mode "
                        "(under each --strategies and --compile) or family/method/mode/strategy/compile "
                        "(default: all, module docstring's order)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (use --device cpu --tiny for the CPU dry run)")
    strategies = _choices(parser, args.strategies, STRATEGIES, "--strategies")
    compiles = _choices(parser, args.compile, COMPILE, "--compile")
    try:
        keys = plan_arms(args.arms, strategies, compiles)
    except ValueError as e:
        parser.error(f"--arms: {e}")
    backend = args.compile_backend or ("inductor" if args.device == "cuda" else "aot_eager")
    name = device_name(args.device)
    stem = f"gpu_{re.sub(r'[^a-z0-9]+', '_', name.lower()).strip('_')}_{time.strftime('%Y-%m-%d', time.gmtime())}"
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"command": "python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "device_name": name, "tiny": args.tiny, "torch": torch.__version__,
              "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "batch": args.batch,
              "compile_backend": backend, "planned_arms": keys,
              "matmul_peak_flops": matmul_peak(args.device, args.tiny), "folders": {}, "arms": {}}
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    runs = [k for k in keys if skip_reason(k.split("/")[0], k.split("/")[3], args.device) is None]
    sam = scratch / "sam"
    if any(k.split("/")[1] == "adp" for k in runs):  # ADP's pixel discriminator: SAM ViT-B
        sam_folder(sam, args.tiny, args.device)
    folders = {}
    for family in dict.fromkeys(k.split("/")[0] for k in runs):  # only the families an arm runs
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
    for key in keys:  # in plan order: a timeout loses the arm in progress and those after it
        family, method, mode, strategy, compiled = key.split("/")
        config = CONFIGS[(family, method)]
        started = time.perf_counter()
        reason = skip_reason(family, strategy, args.device)
        try:
            if reason is not None:
                arm = {"skipped": reason}
            else:
                if "error" in result["folders"][family]:
                    raise RuntimeError(f"no {family} folder: {result['folders'][family]['error']}")
                path, full = arm_config(config, folders[family], sam, mode, args.tiny, scratch,
                                        compile={"backend": backend} if compiled == "on" else None)
                arm = run_arm(path, str(full["trainer"].get("precision", "32-true")), args.device, args.batch,
                              args.iterations, args.warmup, strategy=trainer_strategy(strategy, full, args.device),
                              compiled=compiled == "on", max_warmup=args.max_warmup)
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
