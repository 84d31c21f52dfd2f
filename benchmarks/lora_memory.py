"""Resident parameter bytes of the three roles (real score, fake score, student): LoRA vs full mode.

    python benchmarks/lora_memory.py            # writes benchmarks/results/lora_memory.{md,json}

1. Measured: an SD3Teacher is loaded in each mode from a random SD3 folder of SD3-Medium's width
   (24 heads x 64 = 1536, bf16) with 4 of its 24 joint blocks, LoRA rank 64 as configs/sd3/adm_4step.yaml.
   Resident bytes = the sizes of the DISTINCT parameter storages (by data pointer) reachable from
   the three role networks, so shared weights count once.
2. Counted: the same sums for the real SD3-Medium and SD3.5-Large transformer configs, built on
   the meta device (no memory), with the same adapters.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
RANK = 64  # configs/sd3/adm_4step.yaml
ROLES = ("real", "fake", "student")

SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                  attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                  caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192)
SD35_LARGE = dict(SD3_MEDIUM, num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                  qk_norm="rms_norm")


def storages(modules) -> dict[int, int]:
    seen: dict[int, int] = {}
    for m in modules:
        for p in m.parameters():
            s = p.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return seen


def measured(folder: Path) -> dict:
    from diffusers import SD3Transformer2DModel

    from dmdx_lightning.teachers.sd3 import SD3Teacher

    base = SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=torch.bfloat16)
    teacher_bytes = sum(s for s in storages([base]).values())
    out = {"teacher_transformer_bytes": teacher_bytes,
           "teacher_transformer_params": sum(p.numel() for p in base.parameters())}
    del base
    for mode in ("lora", "full"):
        t0 = time.perf_counter()
        teacher = SD3Teacher(str(folder), mode=mode, torch_dtype="bfloat16", lora_rank=RANK, lora_alpha=RANK,
                             drop_t5=True, resolution=256)
        roles = storages([teacher.network(r) for r in ROLES])
        everything = storages([teacher])
        out[mode] = {
            "role_bytes": sum(roles.values()),
            "role_storages": len(roles),
            "ratio_to_teacher": sum(roles.values()) / teacher_bytes,
            "teacher_module_bytes_incl_text_encoders_vae": sum(everything.values()),
            "trainable_params": {r: sum(p.numel() for p in teacher.trainable_parameters(r)) for r in ("student", "fake")},
            "load_seconds": round(time.perf_counter() - t0, 1),
        }
        del teacher
    return out


def counted(config: dict) -> dict:
    """Parameter bytes of the real architectures on the meta device (bf16 base, fp32 adapters)."""
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig, inject_adapter_in_model

    from dmdx_lightning.teachers.sd3 import SD3Teacher

    with torch.device("meta"):
        net = SD3Transformer2DModel(**config)
    base = sum(p.numel() for p in net.parameters())
    lora_cfg = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=list(SD3Teacher.default_lora_targets))
    for role in ("student", "fake"):
        inject_adapter_in_model(lora_cfg, net, adapter_name=role)
    adapters = sum(p.numel() for n, p in net.named_parameters() if "lora_" in n)
    return {"base_params": base, "adapter_params_two_roles": adapters,
            "teacher_bytes_bf16": 2 * base,
            "lora_bytes": 2 * base + 4 * adapters, "lora_ratio": (2 * base + 4 * adapters) / (2 * base),
            "full_bytes_bf16": 3 * 2 * base, "full_ratio": 3.0}


def main() -> None:
    from dmdx_lightning.teachers.sd3_random import save_random_sd3

    with tempfile.TemporaryDirectory() as tmp:
        folder = save_random_sd3(Path(tmp) / "mid", num_layers=4, num_heads=24, head_dim=64, latent_size=32,
                                 latent_channels=16, clip_dim=64, joint_dim=256, with_t5=False)
        # the random folder is float32; the teacher loads it in bf16 as configs/sd3/adm_4step.yaml does
        result = {"measured_mid_size": measured(folder),
                  "mid_size_config": {"num_layers": 4, "heads": 24, "head_dim": 64, "width": 1536,
                                      "lora_rank": RANK, "dtype": "bfloat16"}}
    result["counted_sd3_medium"] = counted(SD3_MEDIUM)
    result["counted_sd35_large"] = counted(SD35_LARGE)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "lora_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["measured_mid_size"]
    gib = 2**30
    lines = [
        "# Resident parameter bytes: LoRA mode vs full mode",
        "",
        "Command: `python benchmarks/lora_memory.py` (CPU). Bytes of the distinct parameter storages",
        "reachable from the three role networks (real score, fake score, student); shared weights count once.",
        "",
        f"## Measured: random SD3, SD3-Medium width (1536), 4 joint blocks, bf16, LoRA rank {RANK}",
        "",
        "| mode | resident role bytes | x teacher transformer | distinct storages |",
        "|---|---|---|---|",
        f"| teacher alone | {m['teacher_transformer_bytes'] / gib:.3f} GiB | 1.00 | |",
    ]
    for mode in ("lora", "full"):
        lines.append(f"| {mode} | {m[mode]['role_bytes'] / gib:.3f} GiB | {m[mode]['ratio_to_teacher']:.3f} | "
                     f"{m[mode]['role_storages']} |")
    lines += ["", f"## Counted on the meta device: the real architectures, LoRA rank {RANK} (bf16 base, fp32 adapters)",
              "", "| model | teacher | LoRA mode | x teacher | full mode | x teacher |", "|---|---|---|---|---|---|"]
    for name, key in (("SD3-Medium", "counted_sd3_medium"), ("SD3.5-Large", "counted_sd35_large")):
        c = result[key]
        lines.append(f"| {name} ({c['base_params'] / 1e9:.2f}B) | {c['teacher_bytes_bf16'] / gib:.2f} GiB | "
                     f"{c['lora_bytes'] / gib:.2f} GiB | {c['lora_ratio']:.3f} | {c['full_bytes_bf16'] / gib:.2f} GiB | 3.000 |")
    lines += ["", "Text encoders and VAE are shared by every role in both modes and are not counted above",
              "(`teacher_module_bytes_incl_text_encoders_vae` in the JSON has the whole module)."]
    (RESULTS / "lora_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
