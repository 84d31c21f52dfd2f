"""The CPU benchmarks: their report logic on hand-made results, and each `--quick` path end to end."""

import json
from pathlib import Path

import pytest

from tests.helpers import load_benchmark

ROOT = Path(__file__).resolve().parent.parent


load = load_benchmark


def arm(fd, recall, diversity):
    return {"status": "ok", "mean": {"fd": fd, "recall": recall, "diversity": diversity}}


def test_quality_verdict_reads_both_ways():
    q = load("quality")
    results = {"dmd": arm(30.0, 0.40, 0.10), "dmd2": arm(25.0, 0.50, 0.12), "dmdx": arm(28.0, 0.55, 0.15)}
    text = q.verdict(results)
    assert "DMDX beat DMD:" in text  # better FD, recall and diversity than DMD
    assert "DMDX did not beat DMD2: FD 28.00 vs 25.00 (worse)" in text
    assert q.verdict({"dmdx": {"status": "failed: boom"}}).startswith("No verdict: DMDX failed")


def test_quality_arms_are_configs_that_exist():
    q = load("quality")
    arms = q.runner.load_arms(q.ARMS_FILE)
    assert list(q.DEFAULT_ARMS) == ["teacher", "dmd", "dmd2", "adm", "a1_mse", "adp", "dmd_adp", "dmdx"]
    for name in q.DEFAULT_ARMS:
        arm = arms[name]
        assert arm.get("teacher") or all((ROOT / c).is_file() for c in arm["configs"]), name
    # the chained arms spend half the budget in the ADP stage they start from and half in their own
    for name in ("dmd_adp", "dmdx"):
        assert arms[name]["init_from"] == "adp_half" and arms[name]["updates"] == "half"
    assert arms["adp_half"]["updates"] == "half" and arms["adp_half"]["configs"] == arms["adp"]["configs"]


def test_study_budget_and_placeholders(tmp_path):
    study = load("study")
    arms = {"a": {"title": "a", "configs": [], "updates": "half"}, "b": {"title": "b", "configs": [], "updates": 7},
            "c": {"title": "c", "configs": []}}
    s = study.Study(arms, tmp_path, lambda d, a: {}, updates=301)
    assert [s.updates_of(a) for a in "abc"] == [150, 7, 301]
    s.shutdown()


@pytest.mark.slow
def test_quality_quick_writes_results(tmp_path):
    q = load("quality")
    report = q.main(["--quick", "--testbed", "digits", "--arms", "teacher,dmd,dmd2,adm,a1_mse,dmdx", "--budget", "2",
                     "--samples-per-digit", "8", "--diversity-k", "2", "--pairs", "32",
                     "--jobs", "2", "--out", str(tmp_path), "--work", str(tmp_path / "work")])
    saved = json.loads((tmp_path / "quality.json").read_text())
    assert saved["arms"].keys() == report["arms"].keys()
    assert "adp_half" in saved["arms"]  # dmdx pulled in the stage it starts from
    for name in ["teacher", "dmd", "dmd2", "adm", "a1_mse", "adp_half", "dmdx"]:
        r = saved["arms"][name]
        assert r["status"] == "ok" and len(r["runs"]) == 1, (name, r["status"])
        assert r["mean"]["fd"] > 0 and 0 <= r["mean"]["recall"] <= 1 and r["mean"]["diversity"] > 0
    assert saved["arms"]["teacher"]["mean"]["nfe"] == 32 and saved["arms"]["dmd"]["mean"]["nfe"] == 1
    assert -1 <= saved["arms"]["adm"]["mean"]["dmd_alignment"] <= 1  # ADM's diagnostic reaches the table
    assert saved["verdict"].startswith("DMDX ")
    table = (tmp_path / "quality.md").read_text()
    assert "| dmd2: DMD2 without ADP (TTUR 1) |" in table and "Verdict" in table
    assert (tmp_path / "quality_samples.png").stat().st_size > 1000
    # every run went through `dmdx fit` with the arm's configs (the resolved config is saved in its folder)
    config = (tmp_path / "work/runs/dmd2/lr0.0001/seed0/config.yaml").read_text()
    assert "loss: dmd2" in config and str(tmp_path / "work/pairs") in config


@pytest.mark.slow
def test_speed_quick_writes_results(tmp_path):
    s = load("speed")
    report = s.main(["--quick", "--iterations", "2", "--out", str(tmp_path), "--teachers", "digits"])
    digits = json.loads((tmp_path / "speed.json").read_text())["teachers"]["digits"]
    assert digits == json.loads(json.dumps(report["teachers"]["digits"]))
    assert digits["sampling"]["teacher_nfe"] == 32 and digits["sampling"]["speedup"] > 1
    t = digits["training"]
    assert set(t["parts_seconds"]) >= {"student sample", "generator forward", "discriminator backward"}
    assert t["overhead_ratio"] == pytest.approx(t["lightning_iteration_seconds"] / t["sum_of_parts_seconds"])
    assert "overhead ratio" in (tmp_path / "speed.md").read_text()


def test_speed_pass_counter_counts_teacher_passes_per_player():
    """One ADM iteration: student 1; generator: fake move 1 + discriminator 1 (+ the DMD
    diagnostic's real prediction, on the first iteration of each block); fake score 1;
    discriminator: real move 1 (CFG batched) + fake move 1 + ONE batched discriminator pass.
    DMD2: student 1; generator: real 1 + fake 1 + GAN head 1; fake score 1; discriminator 1."""
    import torch

    from dmdx_lightning.discriminators.latent import LatentDiscriminator
    from dmdx_lightning.teachers.digits import DIGIT_PROMPTS, DigitsTeacher

    s = load("speed")
    torch.manual_seed(0)
    teacher = DigitsTeacher()
    disc = LatentDiscriminator(layers=[1, 3], head_channels=16)
    batch = {"prompt": list(DIGIT_PROMPTS[:4]), "x0": torch.randn(4, 1, 8, 8)}
    expected = {"adm": [{"student sample": 1, "generator forward": 3, "fake_score forward": 1,
                         "discriminator forward": 3},
                        {"student sample": 1, "generator forward": 2, "fake_score forward": 1,
                         "discriminator forward": 3}],
                "dmd2": [{"student sample": 1, "generator forward": 3, "fake_score forward": 1,
                          "discriminator forward": 1}] * 2}
    for loss, per_iteration in expected.items():
        module = s.make_module(teacher, disc, loss)
        optimizers = dict(zip(module.players, module.configure_optimizers()))
        with s.PassCounter(teacher) as counter:
            for want in per_iteration:
                passes = {}
                s.bare_iteration(module, optimizers, batch, counter, passes)
                assert passes == want, loss
        assert len(counter.modules) == 3  # full mode: the real, fake and student networks


@pytest.mark.slow
def test_export_memory_quick_writes_results(tmp_path):
    e = load("export_memory")
    report = e.main(["--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "export_memory.json").read_text())
    m = saved["runs"]["tiny"]["lora"]["this"]
    assert m == report["runs"]["tiny"]["lora"]["this"]
    assert m["peak_rss"] >= m["import_rss"] > 0 and m["export_bytes"] > 0
    assert m["ratio"] == pytest.approx((m["peak_rss"] - m["import_rss"]) / m["export_bytes"])
    assert m["command"].startswith("dmdx export --ckpt_path last.ckpt")
    assert "| tiny | lora | this |" in (tmp_path / "export_memory.md").read_text()


@pytest.mark.slow
def test_topology_smoke(tmp_path):
    """One family x method, both modes, one round at the smallest widths: the benchmark's code path
    end to end (the numbers are benchmarks/results/topology.md's job)."""
    report = load("topology").main(["--families", "sdxl", "--methods", "dmd2", "--rounds", "1", "--iterations", "1",
                                    "--tiny", "--batch_size", "1", "--out", str(tmp_path)])
    (row,) = report["rows"]
    assert row["full"]["ms"] > 0 and row["lora"]["ms"] > 0 and row["lora"]["switches"] > 0 == row["full"]["switches"]
    assert "| sdxl | dmd2 |" in (tmp_path / "topology.md").read_text()


@pytest.mark.slow
def test_compile_smoke(tmp_path):
    """Both arms, eager vs compiled, one round at the smallest widths with dynamo's ``eager`` backend
    (tracing without code generation): the benchmark's code path end to end (the numbers are
    benchmarks/results/compile.md's job)."""
    report = load("compile").main(["--tiny", "--backend", "eager", "--rounds", "1", "--warmup", "2",
                                   "--iterations", "1", "--out", str(tmp_path)])
    rows = {row["arm"]: row for row in report["rows"]}
    assert rows.keys() == {"digits", "sd3"}
    assert rows["digits"]["blocks"] == 12 and rows["sd3"]["blocks"] == 24
    for row in rows.values():
        assert row["eager"]["ms"] > 0 and row["compiled"]["ms"] > 0 and row["graphs"] > 0 == row["not_compiled"]
        assert row["compiled"]["compiles_timed"] == 0 == row["eager"]["compiles_timed"]
    assert "| sd3 | `configs/sd3/adm_4step.yaml` |" in (tmp_path / "compile.md").read_text()


@pytest.mark.slow
def test_scale_plan_subset_rows_and_sharding(tmp_path):
    """One config, both modes, every strategy x GPU count; FSDP2 on 8 GPUs holds 1/8 of the sharded
    parameter bytes DDP holds (text encoders and VAE stay whole on every rank); the SD3-Medium
    transformer built on meta from the stored architecture has its published 2.03B parameters."""
    plan = load("scale_plan")
    plan.main(["--configs", "sdxl/dmd_1step.yaml", "--no_check", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "scale_plan.json").read_text())
    rows = {(r["mode"], r["strategy"], r["gpus"]): r for r in saved["rows"]}
    assert set(rows) == {(m, s, n) for m in ("lora", "full") for s in ("DDP", "FSDP2", "HSDP") for n in (1, 8, 64)}
    for mode in ("lora", "full"):
        ddp, fsdp = rows[mode, "DDP", 8]["memory"], rows[mode, "FSDP2", 8]["memory"]
        assert fsdp["sharded_params"] == pytest.approx(ddp["sharded_params"] / 8, rel=1e-6)
        assert fsdp["whole_params"] == ddp["whole_params"] > 0
        assert rows[mode, "HSDP", 64]["memory"]["total"] == pytest.approx(fsdp["total"])  # HSDP shards within a node
    assert rows["lora", "DDP", 1]["memory"]["total"] < rows["full", "DDP", 1]["memory"]["total"]
    assert "| `dmd_1step.yaml` | lora | DDP | 8 |" in (tmp_path / "scale_plan.md").read_text()
    transformer = plan.build(plan.architecture("sd3_medium")["components"]["transformer"])
    assert plan.count(transformer) == pytest.approx(2.03e9, rel=0.03)


@pytest.mark.slow
def test_scale_plan_two_experts_double_weights_not_work(tmp_path):
    """Wan 2.2 A14B (two denoiser experts, each Wan 2.1 14B's architecture) against Wan 2.1 14B at the
    same shapes: frozen weights, LoRA adapters and full copies doubled (AdamW states with them); FLOPs
    and activations per iteration equal (each sample runs one expert); FSDP2 still divides every
    sharded byte by the GPUs."""
    plan = load("scale_plan")
    one, two = "wan/adm_14b_4step.yaml", "wan/adm_a14b_4step.yaml"
    plan.main(["--configs", one, two, "--no_check", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "scale_plan.json").read_text())
    roles = {(r["config"], r["mode"]): r for r in saved["roles"]}
    work = {(r["config"], r["mode"]): r for r in saved["work"]}
    rows = {(r["config"], r["mode"], r["strategy"], r["gpus"]): r for r in saved["rows"]}
    for mode in ("lora", "full"):
        assert roles[two, mode]["real_score"] == 2 * roles[one, mode]["real_score"]
        assert roles[two, mode]["student"] == 2 * roles[one, mode]["student"] == 2 * roles[one, mode]["fake_score"]
        assert roles[two, mode]["text_encoders_and_vae"] == roles[one, mode]["text_encoders_and_vae"]
        assert work[two, mode]["tflop_per_iteration"] == pytest.approx(work[one, mode]["tflop_per_iteration"])
        assert work[two, mode]["activations_ckpt"] == pytest.approx(work[one, mode]["activations_ckpt"])
        a, b = rows[one, mode, "DDP", 8]["memory"], rows[two, mode, "DDP", 8]["memory"]
        assert b["sharded_params"] == pytest.approx(2 * a["sharded_params"] - roles[one, mode]["latent_heads"] * 4)
        assert b["optimizer"] == pytest.approx(2 * a["optimizer"] - 2 * roles[one, mode]["latent_heads"] * 4)
        assert b["activations"] == pytest.approx(a["activations"])
        fsdp = rows[two, mode, "FSDP2", 8]["memory"]
        assert fsdp["sharded_params"] == pytest.approx(b["sharded_params"] / 8, rel=1e-6)
    assert "| wan22_a14b | `Wan-AI/Wan2.2-T2V-A14B-Diffusers` | transformer_2 |" in (tmp_path / "scale_plan.md").read_text()


def test_scale_plan_results_cover_every_shipped_config():
    """benchmarks/results/scale_plan.json has the rows of every shipped config (a config added
    without regenerating the plan, e.g. a new teacher without its architecture file, fails here)."""
    plan = load("scale_plan")
    saved = json.loads((plan.RESULTS / "scale_plan.json").read_text())
    planned = {r["config"] for r in saved["rows"]} | {r["config"] for r in saved["inference"]}
    assert set(plan.shipped_configs()) <= planned
    for name in plan.shipped_configs():  # and each names a stored architecture
        plan.architecture_of(plan.yaml.safe_load((plan.ROOT / "configs" / name).read_text())["model"]["init_args"]
                             ["teacher"]["init_args"]["pretrained_model_name_or_path"])


def test_long_run_analysis_tells_growth_from_noise():
    """The verdict on hand-made samples: a 5 MiB / 1000-iteration leak grows, noise around a flat line
    does not; the census diff names the type that grew."""
    lr = load("long_run")

    def samples(rss_per_it):
        out = []
        for i in range(0, 2001, 100):
            noise = 0.5 * (-1) ** (i // 100)
            out.append({"iteration": i, "rss_mib": 900 + rss_per_it * i + noise, "allocated_blocks": 2_000_000,
                        "s_per_it": 0.4 + 0.01 * noise, "cpu_s_per_it": 0.25 + 0.01 * noise, "loadavg_1min": 2.0})
        for s, n in ((out[10], 100), (out[20], 150)):
            s.update(tensors=600 + n, objects=500_000 + n, types={"torch.Tensor": n, "builtins.dict": 7})
        return out

    leak = lr.analyse(samples(0.005))
    assert leak["verdict"] == "grows: rss_mib" and leak["fit_from"] == 1000
    assert leak["rss_mib"]["per_1000"] == pytest.approx(5.0, abs=0.5)
    assert leak["types_grown"] == {"torch.Tensor": 50}
    flat = lr.analyse(samples(0.0))
    assert flat["verdict"] == "no growth beyond noise" and abs(flat["rss_mib"]["per_1000"]) < 1


@pytest.mark.slow
def test_long_run_smoke(tmp_path):
    """30 iterations of the digits arm through `dmdx fit` in a child process, sampled every 10: the
    benchmark's code path end to end (the numbers are benchmarks/results/long_run.md's job)."""
    report = load("long_run").main(["--arms", "digits", "--iterations", "30", "--every", "10", "--objects-every", "10",
                                    "--out", str(tmp_path), "--work", str(tmp_path / "work")])
    saved = json.loads((tmp_path / "long_run.json").read_text())
    digits = saved["arms"]["digits"]
    assert digits["returncode"] == 0 and digits == json.loads(json.dumps(report["arms"]["digits"]))
    assert [s["iteration"] for s in digits["samples"]] == [0, 10, 20, 30]
    assert digits["torch_threads"] == 1 and all(s["rss_mib"] > 0 and s["tensors"] > 0 for s in digits["samples"])
    analysis = digits["analysis"]
    for key in ("rss_mib", "s_per_it", "cpu_s_per_it"):
        assert {"per_1000", "per_1000_se", "resid_std", "mean", "verdict"} <= analysis[key].keys()
    assert analysis["verdict"].startswith(("no growth beyond noise", "grows"))
    assert "| 30 |" in (tmp_path / "long_run.md").read_text()
    assert (tmp_path / "long_run.png").stat().st_size > 1000
    assert (tmp_path / "work/digits/checkpoints/last.ckpt").is_file()  # the arm checkpointed as a long run would


@pytest.mark.slow
def test_wan_experts_smoke(tmp_path):
    """The three arms timed and the real-size counts: the benchmark's code path end to end (the numbers
    are benchmarks/results/wan_experts.md's job). The idle token is a tiny share of one sample's FLOPs."""
    report = load("wan_experts").main(["--quick", "--out", str(tmp_path / "wan_experts")])
    assert set(report["timed_cpu"]) == {"one network", "two experts, mixed", "two experts, one idle"}
    assert all(arm["median_s"] > 0 for arm in report["timed_cpu"].values())
    counted = report["counted_real_size"]
    assert 13e9 < counted["expert_params"] < 15e9 and counted["idle_over_sample_flops"] < 1e-3
    assert "| two experts, one idle |" in (tmp_path / "wan_experts.md").read_text()
