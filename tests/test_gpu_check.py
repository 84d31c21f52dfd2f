"""benchmarks/gpu_check.py end to end on CPU at tiny sizes: the code path of the GPU run
(`--device cuda` changes only the device, the sizes and the CUDA timers)."""

import json
from pathlib import Path

import pytest

from tests.helpers import load_benchmark

ROOT = Path(__file__).resolve().parent.parent


def load():
    return load_benchmark("gpu_check")


@pytest.mark.slow
def test_gpu_check_runs_every_arm_on_cpu(tmp_path):
    gpu_check = load()
    result = gpu_check.main(["--device", "cpu", "--tiny", "--out", str(tmp_path), "--warmup", "0", "--iterations", "1"])
    arms = {f"{family}/{method}/{mode}" for family, method in gpu_check.CONFIGS for mode in gpu_check.MODES}
    assert len(arms) == 12 and set(result["arms"]) == arms
    (json_file,) = tmp_path.glob("gpu_cpu_*.json")
    (md_file,) = tmp_path.glob("gpu_cpu_*.md")
    written = json.loads(json_file.read_text())
    assert written["arms"].keys() == arms and written["matmul_peak_flops"] > 0
    for key, arm in written["arms"].items():
        assert "error" not in arm, (key, arm.get("error"))
        assert arm["seconds_per_iteration"] > 0 and arm["flops_per_iteration"] > 0 and arm["mfu"] > 0, key
        assert arm["peak_memory_bytes"] is None and arm["batch"] == 1  # CPU: no CUDA peak
        # every player of the method ran: ADM / DMD2 train a fake score, ADP a discriminator
        assert "generator" in arm["players"] and len(arm["players"]) >= 2
    rows = [line.split("|")[1:-1] for line in md_file.read_text().splitlines() if line.startswith("| sd")]
    assert {"/".join(c.strip() for c in row[:3]) for row in rows} == arms
    for row in rows:
        seconds, flops, mfu = float(row[4]), float(row[6]), float(row[7])
        assert seconds > 0 and flops > 0 and mfu > 0, row


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
