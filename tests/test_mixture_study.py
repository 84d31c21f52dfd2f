"""benchmarks/mixture_study.py: arms are configs, the --quick path end to end, reuse of finished runs."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load():
    spec = importlib.util.spec_from_file_location("benchmarks_mixture_study", ROOT / "benchmarks/mixture_study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_every_arm_names_existing_configs_and_stages():
    s = load()
    arms = s.load_arms()
    for name, arm in arms.items():
        for config in arm.get("configs", []):
            assert (ROOT / config).is_file(), (name, config)
        assert arm.get("teacher") or arm.get("configs"), name
    assert arms["dmdx"]["init_from"] == "adp"  # DMDX = ADP, then ADM


def test_bad_arm_file_is_refused(tmp_path):
    s = load()
    bad = tmp_path / "arms.yaml"
    bad.write_text("x:\n  title: t\n  configs: []\n  init_from: nowhere\n")
    with pytest.raises(ValueError, match="nowhere"):
        s.load_arms(bad)
    bad.write_text("x:\n  title: t\n  confgs: []\n")
    with pytest.raises(ValueError, match="confgs"):
        s.load_arms(bad)


@pytest.mark.slow
def test_quick_study_writes_results_and_reuses_finished_runs(tmp_path):
    s = load()
    root = tmp_path / "study"
    s.main(["--quick", "--root", str(root), "--jobs", "2"])
    out = root.with_name(root.name + "_quick")
    report = json.loads((out / "quality_mixture.json").read_text())
    for arm in ("dmd", "adm"):
        run = report["arms"][arm]["0.0001"]["runs"][0]
        assert run["final"]["modes_total"] == 64 and run["init"]["precision"] == 0.0  # collapsed start
    assert report["teacher"]["modes_covered"] >= 50 and "mixture" in (out / "quality_mixture.md").read_text()
    assert (out / "quality_mixture_modes.png").stat().st_size > 500
    stamp = out / "dmd/lr0.0001/seed0/arm.json"
    before = stamp.stat().st_mtime
    s.main(["--quick", "--root", str(root), "--jobs", "1"])  # everything finished: nothing runs again
    assert stamp.stat().st_mtime == before
