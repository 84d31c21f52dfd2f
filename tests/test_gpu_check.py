"""benchmarks/gpu_check.py end to end on CPU at tiny sizes: the code path of the GPU run
(`--device cuda` changes only the device, the sizes and the CUDA timers)."""

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import load_benchmark

ROOT = Path(__file__).resolve().parent.parent


def load():
    return load_benchmark("gpu_check")


def tiny_arms(gpu_check) -> list[str]:
    """Every family/method once, SD3 in full mode under FSDP2 and SDXL in LoRA mode under DDP (so
    every method runs in both modes), SD3's ADM compiled too (under FSDP2: the combination
    compile_blocks is built for) and an FSDP1 arm, which the CPU skips; 7 arms run (one more arm
    costs 10-30 s here, and CI runs this)."""
    each = [f"{family}/{method}/{'full/fsdp2' if family == 'sd3' else 'lora/ddp'}/off"
            for family, method in gpu_check.CONFIGS]
    return each + ["sd3/adm/full/fsdp2/on", "sd3/adm/full/fsdp1/off"]


@pytest.mark.slow
def test_gpu_check_runs_every_arm_on_cpu(tmp_path):
    gpu_check = load()
    arms = tiny_arms(gpu_check)
    result = gpu_check.main(["--device", "cpu", "--tiny", "--out", str(tmp_path), "--warmup", "0", "--iterations", "1",
                             "--arms", ",".join(arms)])
    assert len(arms) == 2 + len(gpu_check.CONFIGS) and list(result["arms"]) == arms  # in the order given
    (json_file,) = tmp_path.glob("gpu_cpu_*.json")
    (md_file,) = tmp_path.glob("gpu_cpu_*.md")
    written = json.loads(json_file.read_text())
    assert list(written["arms"]) == arms and written["matmul_peak_flops"] > 0
    assert written["compile_backend"] == "aot_eager"  # on CPU
    assert written["arms"]["sd3/adm/full/fsdp1/off"]["skipped"].startswith("FSDP1 needs CUDA")
    for key, arm in written["arms"].items():
        if key.endswith("/fsdp1/off"):
            continue
        assert "error" not in arm, (key, arm.get("error"))
        assert arm["seconds_per_iteration"] > 0 and arm["flops_per_iteration"] > 0 and arm["mfu"] > 0, key
        assert arm["peak_memory_bytes"] is None and arm["batch"] == 1  # CPU: no CUDA peak
        # every player of the method ran: ADM / DMD2 train a fake score, ADP a discriminator
        assert "generator" in arm["players"] and len(arm["players"]) >= 2
        strategy = key.split("/")[3]
        assert arm["trainer_strategy"] == {"ddp": "DDPStrategy", "fsdp2": "FSDP2Strategy"}[strategy], key
        assert ("compile_seconds" in arm) == key.endswith("/on"), key
    off, on = written["arms"]["sd3/adm/full/fsdp2/off"], written["arms"]["sd3/adm/full/fsdp2/on"]
    # compiled: warm-up until an iteration compiles no new graph, none compiled while timed, none run eagerly
    assert on["warmup_iterations"] >= 2 and on["warmup_new_graphs"][0] > 0 and on["warmup_new_graphs"][-1] == 0
    assert on["graphs"] > 0 and on["graphs_while_timed"] == 0 and on["frames_eager"] == 0
    assert on["compile_seconds"] > 0 and off["warmup_iterations"] == 0
    # the counted iteration ran eagerly and stepped the same players: the uncompiled arm's model FLOPs, up
    # to its own random draws (iteration 2 of the compiled arm, 0 of the other; the arms vary by 5%)
    assert on["timed_players"] == off["timed_players"]
    assert on["flops_per_iteration"] == pytest.approx(off["flops_per_iteration"], rel=0.1)
    rows = [line.split("|")[1:-1] for line in md_file.read_text().splitlines() if line.startswith("| sd")]
    assert ["/".join(c.strip() for c in row[:5]) for row in rows] == arms
    for row in rows:
        if row[3].strip() == "fsdp1":
            assert row[6].strip() == "skipped" and "FSDP1 needs CUDA" in row[-1]
            continue
        seconds, flops, mfu = float(row[6]), float(row[8]), float(row[9])
        assert seconds > 0 and flops > 0 and mfu > 0, row
        assert ("graphs" in row[10]) == (row[4].strip() == "on"), row


def test_arm_order_and_expansion():
    gpu_check = load()
    # --arms: in its order; family/method/mode under each strategy and compile setting
    assert gpu_check.plan_arms("sd3/dmd2/lora,sdxl/adm/full/fsdp1/on", ["ddp", "fsdp2"], ["off", "on"]) == [
        "sd3/dmd2/lora/ddp/off", "sd3/dmd2/lora/fsdp2/off", "sd3/dmd2/lora/ddp/on", "sd3/dmd2/lora/fsdp2/on",
        "sdxl/adm/full/fsdp1/on"]
    # the defaults: the 12 arms of the first version, LoRA first
    default = gpu_check.plan_arms("", ["ddp"], ["off"])
    assert len(default) == 12 and all(k.endswith("/ddp/off") for k in default)
    assert default[0] == "sdxl/adm/lora/ddp/off" and {k.split("/")[2] for k in default[-5:]} == {"full"}
    # every dimension: the FIRST arms first, then the rest, each once
    every = gpu_check.plan_arms("", list(gpu_check.STRATEGIES), list(gpu_check.COMPILE))
    assert len(every) == len(set(every)) == 72 and tuple(every[:len(gpu_check.FIRST)]) == gpu_check.FIRST
    with pytest.raises(ValueError, match="expected family/method/mode"):
        gpu_check.plan_arms("sd3/adm/full/zero3/off", ["ddp"], ["off"])
    assert gpu_check.skip_reason("sd3", "fsdp1", "cpu").startswith("FSDP1 needs CUDA")
    assert gpu_check.skip_reason("sd3", "fsdp1", "cuda") is None and gpu_check.skip_reason("sdxl", "fsdp1", "cuda")
    assert gpu_check.skip_reason("sdxl", "fsdp2", "cpu") is None


def test_arm_strategies_are_the_overlays_a_user_adds():
    import yaml

    from dmdx_lightning.strategies import FSDP2Strategy

    gpu_check = load()
    shipped = yaml.safe_load((ROOT / "configs/sd3/adm_4step.yaml").read_text())
    assert gpu_check.trainer_strategy("ddp", shipped, "cuda") == shipped["trainer"]["strategy"]
    overlay = FSDP2Strategy(**yaml.safe_load((ROOT / "configs/trainer/fsdp2.yaml").read_text())["trainer"]["strategy"][
        "init_args"])
    fsdp2 = gpu_check.trainer_strategy("fsdp2", shipped, "cuda")
    options = ("replicate_size", "param_dtype", "reduce_dtype", "master_dtype", "cpu_offload", "reshard_after_forward",
               "_save_distributed_checkpoint")
    assert type(fsdp2) is FSDP2Strategy and all(getattr(fsdp2, o) == getattr(overlay, o) for o in options)
    cpu = gpu_check.trainer_strategy("fsdp2", shipped, "cpu")  # as tests/test_fsdp2.py runs it on CPU
    assert cpu.param_dtype is None and cpu.reduce_dtype is None and cpu.master_dtype == overlay.master_dtype
    fsdp1 = gpu_check.trainer_strategy("fsdp1", shipped, "cuda")
    from diffusers.models.attention import JointTransformerBlock
    from lightning.pytorch.strategies import FSDPStrategy

    assert type(fsdp1) is FSDPStrategy and JointTransformerBlock in fsdp1.kwargs["auto_wrap_policy"]._module_classes


def test_a_compiled_arm_config_sets_the_module_compile_option(tmp_path):
    import yaml

    gpu_check = load()
    path, _ = gpu_check.arm_config("configs/sd3/adm_4step.yaml", tmp_path / "sd3", tmp_path / "sam", "full", True,
                                   tmp_path, compile={"backend": "inductor"})
    assert yaml.safe_load(path.read_text())["model"]["init_args"]["compile"] == {"backend": "inductor"}
    plain, _ = gpu_check.arm_config("configs/sd3/adm_4step.yaml", tmp_path / "sd3", tmp_path / "sam", "full", True,
                                    tmp_path)
    assert plain != path and "compile" not in yaml.safe_load(plain.read_text())["model"]["init_args"]


def test_an_arm_config_is_the_shipped_config_with_the_teacher_replaced(tmp_path):
    import yaml

    gpu_check = load()
    path, full = gpu_check.arm_config("configs/sdxl/adp_1step.yaml", tmp_path / "sdxl", tmp_path / "sam", "full",
                                      False, tmp_path)
    shipped = yaml.safe_load((ROOT / "configs/sdxl/adp_1step.yaml").read_text())["model"]
    model = yaml.safe_load(path.read_text())["model"]
    teacher = model["init_args"].pop("teacher")["init_args"]
    assert teacher["pretrained_model_name_or_path"] == str(tmp_path / "sdxl") and teacher["mode"] == "full"
    assert model["init_args"]["pixel_discriminator"]["init_args"]["backbone"]["init_args"]["pretrained"] == str(
        tmp_path / "sam")
    shipped["init_args"].pop("teacher")
    shipped["init_args"]["pixel_discriminator"]["init_args"]["backbone"]["init_args"]["pretrained"] = str(tmp_path / "sam")
    assert model == shipped  # everything else as shipped (the pixel path's memory options included)
    assert full["trainer"]["precision"] == "bf16-mixed"
