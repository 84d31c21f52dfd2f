"""What Wan 2.2 A14B's two experts cost over one network: routing, the idle expert's token, memory.

    python benchmarks/wan_experts.py            # ~2 min on 2 CPU cores
    python benchmarks/wan_experts.py --quick    # smoke run (tests): 2 repeats, written to --out

Every role of a two-expert teacher is :class:`~dmdx_lightning.teachers.wan.WanExperts`: each sample
runs the expert of its time, and an expert no sample needs runs on ONE token (so FSDP2 ranks stay in
step). What that costs, measured side by side in one process on the real topology (two
``WanTransformer3DModel`` of 40 blocks, A14B's depth) at a narrow width, where per-module overheads
show as they would on a GPU (launches, not FLOPs):

- **one network**: one expert, batch 2 (what Wan 2.1 14B costs);
- **two experts, mixed**: batch 2, one sample on each side of the boundary (two half-batch forwards);
- **two experts, one idle**: batch 2, both above the boundary (one full-batch forward + the other
  expert's one-token forward).

Each arm: forward + backward of a LoRA student (rank 4 on the attention projections, as the configs),
median over repeats. And counted at REAL size on the meta device (A14B's experts have Wan 2.1 14B's
architecture, ``benchmarks/architectures/wan21_14b.json``): the idle token's FLOPs against one
sample's at 81 frames x 480 x 832 (32760 video tokens, 512 text tokens), and the bf16 weight bytes
the idle forward reads (its floor on a GPU is those bytes over the memory bandwidth).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import RESULTS, machine, markdown_table, set_threads, write_json  # noqa: E402
from dmdx_lightning.teachers.wan import WanExperts  # noqa: E402

#: HBM bandwidth of the cards the plan names (bytes/s): H100 SXM, H200
BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}


def narrow_expert(layers: int, seed: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                                 out_channels=16, text_dim=32, freq_dim=32, ffn_dim=48, num_layers=layers,
                                 cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64)


def with_lora(net):
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]), net,
                            adapter_name="student")
    for name, p in net.named_parameters():
        p.requires_grad_("lora_" in name)
    return net


def time_arm(net, x, timestep, text, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        out = net(hidden_states=x, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]
        out.square().mean().backward()
        times.append(time.perf_counter() - start)
        net.zero_grad(set_to_none=True)
    return times[1:]


def measure(layers: int, repeats: int) -> dict:
    one = with_lora(narrow_expert(layers, 0))
    two = with_lora(WanExperts(narrow_expert(layers, 0), narrow_expert(layers, 1), boundary_timestep=875.0))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 5, 16, 16, generator=g)  # 5 x 8 x 8 = 320 video tokens per sample
    text = torch.randn(2, 32, 32, generator=g)
    arms = {"one network": (one, torch.tensor([900.0, 300.0])),
            "two experts, mixed": (two, torch.tensor([900.0, 300.0])),
            "two experts, one idle": (two, torch.tensor([950.0, 900.0]))}
    # interleaved rounds, so that a load change on the machine hits every arm alike
    samples = {name: [] for name in arms}
    for _ in range(repeats):
        for name, (net, timestep) in arms.items():
            samples[name] += time_arm(net, x, timestep, text, 1)
    base = statistics.median(samples["one network"])
    return {name: {"median_s": statistics.median(v), "ratio": statistics.median(v) / base, "repeats": len(v)}
            for name, v in samples.items()}


def count_real_size() -> dict:
    """FLOPs of the idle token's forward vs one real sample's (the linear layers and attention, counted
    on the meta device), and the weight bytes one expert's forward reads in bf16."""
    from diffusers import WanTransformer3DModel
    from diffusers.utils import logging as diffusers_logging
    from torch.utils.flop_counter import FlopCounterMode

    diffusers_logging.set_verbosity_error()  # its advice on fp32 modules concerns loading; here nothing runs
    config = json.loads((ROOT / "benchmarks" / "architectures" / "wan21_14b.json").read_text())
    config = {k: v for k, v in config["components"]["transformer"]["config"].items() if not k.startswith("_")}
    with torch.device("meta"):
        expert = WanTransformer3DModel(**config).to(torch.bfloat16)
    params = sum(p.numel() for p in expert.parameters())

    def flops(frames: int, height: int, width: int, text_tokens: int) -> float:
        x = torch.empty(1, 16, frames, height, width, device="meta", dtype=torch.bfloat16)
        text = torch.empty(1, text_tokens, config["text_dim"], device="meta", dtype=torch.bfloat16)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            expert(hidden_states=x, timestep=torch.zeros(1, device="meta"), encoder_hidden_states=text,
                   return_dict=False)
        return float(counter.get_total_flops())

    idle = flops(1, 2, 2, 1)  # one patch of the first frame, one text token (WanExperts' idle run)
    sample = flops(21, 60, 104, 512)  # 81 frames at 480 x 832: 21 x 30 x 52 = 32760 video tokens
    weight_bytes = 2 * params
    return {"expert_params": params, "idle_forward_flops": idle, "sample_forward_flops": sample,
            "idle_over_sample_flops": idle / sample, "expert_bf16_weight_bytes": weight_bytes,
            "idle_forward_floor_s": {card: weight_bytes / bw for card, bw in BANDWIDTH.items()}}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 repeats and 4 blocks (the tests' smoke run)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS / "wan_experts", help="results stem (.md and .json)")
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)
    layers, repeats = (4, 2) if args.quick else (40, args.repeats)
    timed = measure(layers, repeats)
    counted = count_real_size()
    result = {"command": "python benchmarks/wan_experts.py" + (" --quick" if args.quick else ""), "blocks": layers,
              "machine": machine(threads), "timed_cpu": timed, "counted_real_size": counted}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out.with_suffix(".json"), result)
    rows = [(name, f"{v['median_s'] * 1e3:.1f}", f"{v['ratio']:.2f}x") for name, v in timed.items()]
    floor = counted["idle_forward_floor_s"]
    md = "\n".join([
        "# Wan 2.2 A14B: what two experts cost over one network",
        "",
        f"`{result['command']}` ({result['machine']['date_utc']} UTC, {threads} thread, "
        f"{result['machine']['cpu_count']} CPU cores). Method: the docstring of `benchmarks/wan_experts.py`.",
        "",
        f"## Timed side by side on CPU: {layers} blocks per expert (A14B's depth), narrow width, LoRA student, "
        "forward + backward, batch 2",
        "",
        markdown_table(("arm", "median ms", "vs one network"), rows),
        "",
        "## Counted at real size (meta device; each A14B expert = Wan 2.1 14B's transformer)",
        "",
        markdown_table(("quantity", "value"), [
            ("parameters of one expert", f"{counted['expert_params'] / 1e9:.2f} B"),
            ("forward FLOPs, one sample (81 x 480 x 832, 512 text tokens)", f"{counted['sample_forward_flops']:.3e}"),
            ("forward FLOPs, the idle expert's token", f"{counted['idle_forward_flops']:.3e}"),
            ("idle / sample FLOPs", f"{counted['idle_over_sample_flops']:.1e}"),
            ("weights the idle forward reads (bf16)", f"{counted['expert_bf16_weight_bytes'] / 2**30:.1f} GiB"),
            ("its floor on an H100 / H200 (bytes / HBM bandwidth)",
             f"{floor['H100'] * 1e3:.1f} / {floor['H200'] * 1e3:.1f} ms"),
        ]),
        "",
        "Reading: a mixed batch costs the two half-batch forwards plus one more prologue and epilogue; a batch on "
        "one side adds the idle expert's one-token pass, whose FLOPs are negligible and whose GPU floor is one "
        "read of an expert's weights (milliseconds, against the seconds one 81-frame sample takes). On CPU at a "
        "narrow width the per-module overheads dominate, so the timed ratios are an upper bound of what the "
        "routing adds on a GPU.",
        "",
    ])
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return result


if __name__ == "__main__":
    main()
