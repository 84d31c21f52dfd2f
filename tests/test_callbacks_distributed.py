"""The callbacks on two CPU processes (gloo), through the real ``dmdx fit`` CLI, under DDP and FSDP2.

One run per strategy carries every callback at once on the digits teacher (a two-step student, so
the metrics' re-noising depends on how their samples are batched): the sample grid, the end-of-fit
summary, the validation metrics (CLIP score with a tiny local CLIP, LPIPS diversity with a local
backbone file, the digits metrics), the generator budget and the progress bar. Each rank reports
what it wrote and logged (``tests.helpers.CallbackProbe``); a one-process run of the same config is
the reference for what must not depend on the world size. A deadlock fails the run's timeout.

- Files are written once, by rank 0: each sample grid once per interval (and not again at fit end
  when the last interval ended there), the teacher grid once, the summary and its grid once.
- Under FSDP2 every forward is a collective: the grid, the summary and the metrics sample on every
  rank, and ranks with fewer prompts to score than others still join every forward.
- Metrics gathered over ranks equal the one-process values on the same weights (the sanity check,
  before training: CLIP score and LPIPS diversity over prompts split across the ranks, digits
  metrics scored whole on every rank), and every logged ``val/`` scalar is equal on both ranks.
- The summary has the run's iteration count, the teacher's row of the one-process run, and the
  training diagnostics averaged over the ranks; the budget stops both ranks at the same iteration;
  the progress bar shows on rank 0 only.

Regressions: the summary's Frechet distance synced over ranks from rank 0 alone (DDP: a crash at
the end of fit) and under FSDP2 rank 0 sampled alone; the digits metrics counted their samples once
per rank; CLIP score regrouped a multi-step student's samples into other batches per world size
(another value) and, like LPIPS diversity, hung under FSDP2 when the prompts did not split evenly;
the last grid was drawn twice when the fit ended on an interval.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import dmdx_fit
from tests.test_metrics import save_tiny_clip

TINY = "tests/configs/adm_tiny.yaml"
FSDP2 = ["--config", "configs/trainer/fsdp2.yaml", "--trainer.strategy.init_args.param_dtype", "null",
         "--trainer.strategy.init_args.reduce_dtype", "null"]
STRATEGIES = {"ddp": ["--config", "configs/trainer/ddp_cpu.yaml"], "fsdp2": FSDP2}
#: 5 CLIP prompts in batches of 2: 3 batches, 2 on rank 0 and 1 on rank 1; 3 LPIPS prompts: 2 and 1
CLIP_PROMPTS = ["a handwritten digit zero", "the digit 1", "a handwritten digit two", "the digit 3",
                "a handwritten digit four"]
LPIPS_PROMPTS = ["the digit 5", "a handwritten digit six", "the digit 7"]
BUDGET = 4  # generator updates (= iterations: ADM steps the generator in every one); max_steps is 6
GRID_EVERY = 2
#: the summary's fields that depend on sampling speed, not on the samples
TIMING = {"seconds_per_sample"}


def overlay(tmp_path, name: str, clip: str, alexnet: str) -> list[str]:
    out = tmp_path / name
    config = {
        "model": {"init_args": {"student_steps": 2}},
        "data": {"init_args": {"val_file": "configs/prompts/digits.txt"}},
        "trainer": {
            "max_steps": 6, "check_val_every_n_epoch": None, "val_check_interval": BUDGET, "num_sanity_val_steps": 1,
            "enable_checkpointing": False, "enable_progress_bar": True, "logger": True,
            "default_root_dir": str(out),
            "callbacks": [
                {"class_path": "dmdx_lightning.callbacks.samples.SampleGrid",
                 "init_args": {"prompts": ["the digit 0", "the digit 7"], "samples_per_prompt": 2,
                               "every_n_steps": GRID_EVERY, "teacher_steps": 4, "progress": False}},
                {"class_path": "dmdx_lightning.evaluation.digits.DigitsSummary",
                 "init_args": {"path": str(out / "summary.json"), "samples_per_digit": 5, "diversity_k": 2,
                               "grid": str(out / "summary_grid.png"), "teacher_steps": 4}},
                {"class_path": "dmdx_lightning.evaluation.digits.DigitsMetricsCallback",
                 "init_args": {"samples_per_digit": 3, "diversity_samples": 2, "run_on_sanity_check": True}},
                {"class_path": "dmdx_lightning.callbacks.metrics.CLIPScoreCallback",
                 "init_args": {"model_name_or_path": clip, "prompts": CLIP_PROMPTS, "batch_size": 2,
                               "run_on_sanity_check": True}},
                {"class_path": "dmdx_lightning.callbacks.metrics.LPIPSDiversityCallback",
                 "init_args": {"prompts": LPIPS_PROMPTS, "samples_per_prompt": 2, "backbone_weights": alexnet,
                               "min_size": 32, "batch_size": 2, "run_on_sanity_check": True}},
                {"class_path": "dmdx_lightning.callbacks.budget.GeneratorBudget", "init_args": {"updates": BUDGET}},
                {"class_path": "tests.helpers.CallbackProbe", "init_args": {"dir": str(out / "probe")}},
            ],
        },
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return ["--config", TINY, "--config", str(path)]


@pytest.fixture(scope="module")
def scoring_models(tmp_path_factory):
    """A tiny CLIP folder and an AlexNet backbone file (fixed random weights: the same on every rank)."""
    import torchvision

    root = tmp_path_factory.mktemp("scoring")
    clip = save_tiny_clip(root / "clip")
    torch.manual_seed(0)
    alexnet = root / "alexnet.pth"
    torch.save({f"features.{k}": v for k, v in torchvision.models.alexnet().features.state_dict().items()}, alexnet)
    return str(clip), str(alexnet)


def fit(tmp_path, name: str, models, *args: str, devices: int) -> tuple[list[dict], dict]:
    result = dmdx_fit(*overlay(tmp_path, name, *models), *args, "--trainer.devices", str(devices), timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    out = tmp_path / name
    ranks = [json.loads((out / "probe" / f"rank{r}.json").read_text()) for r in range(devices)]
    return ranks, json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def single(tmp_path_factory, scoring_models):
    """The one-process reference: its sanity check and its summary's teacher row (one iteration is enough)."""
    return fit(tmp_path_factory.mktemp("single"), "single", scoring_models, "--trainer.max_steps", "1", devices=1)


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_callbacks_on_two_processes(strategy, tmp_path, scoring_models, single):
    ranks, summary = fit(tmp_path, strategy, scoring_models, *STRATEGIES[strategy], devices=2)
    (reference,), reference_summary = single
    assert [r["world_size"] for r in ranks] == [2, 2]

    # GeneratorBudget stopped both ranks at the same iteration, before max_steps
    assert [r["global_step"] for r in ranks] == [BUDGET, BUDGET]

    # every file written once, by rank 0: the grids at the first iteration and every GRID_EVERY-th
    # (the last one, where the fit ends, not again at fit end), the teacher's once, the summary and its grid
    assert ranks[1]["writes"] == []
    writes = [p.removeprefix(str(tmp_path / strategy)) for p in ranks[0]["writes"]]
    assert len(writes) == len(set(writes)), writes
    grids = sorted(p.rsplit("/", 1)[1] for p in writes if "/samples/" in p)
    assert grids == ["student_step0000001.png", "student_step0000002.png", "student_step0000004.png",
                     "teacher_step0000001.png"]
    assert sorted(p for p in writes if "/samples/" not in p) == ["/summary.json", "/summary_grid.png"]

    # the progress bar shows on rank 0 only
    assert ranks[0]["progress_bars"] == {"IterationProgressBar": False}
    assert ranks[1]["progress_bars"] == {"IterationProgressBar": True}

    # validation: the sanity check (initial weights, the same whatever the world size), then at the last iteration
    assert [(v["step"], v["sanity"]) for v in reference["validations"]] == [(0, True)]
    for r in ranks:
        assert [(v["step"], v["sanity"]) for v in r["validations"]] == [(0, True), (BUDGET, False)]
    keys = {f"val/{k}" for k in ("clip_score", "lpips_diversity", "fd", "precision", "recall", "class_accuracy",
                                 "class_coverage", "diversity")}
    for mine, theirs in zip(ranks[0]["validations"], ranks[1]["validations"]):
        assert set(mine["metrics"]) == keys
        assert mine["metrics"] == pytest.approx(theirs["metrics"], rel=1e-6, abs=1e-9)  # synced: equal on both ranks
    # gathered over both ranks' shares (CLIP score, LPIPS diversity) or scored whole on each (digits):
    # the one-process values on the same weights
    assert ranks[0]["validations"][0]["metrics"] == pytest.approx(reference["validations"][0]["metrics"],
                                                                    rel=1e-4, abs=1e-6)

    # the summary: the run's length, and the teacher's row as one process scores it
    arm = "adm_2step"
    assert set(summary) == {"teacher", arm}
    assert summary[arm]["iterations"] == summary[arm]["generator_updates"] == BUDGET
    # the training diagnostics: the mean over the ranks of each rank's mean (each logs its own share)
    for name in ("logit_gap", "dmd_alignment"):
        per_rank = [[d[name] for d in r["diagnostics"] if name in d] for r in ranks]
        if not all(per_rank):
            assert name not in summary[arm]
            continue
        assert summary[arm][name] == pytest.approx(sum(sum(v) / len(v) for v in per_rank) / 2, rel=1e-6)
        assert per_rank[0] != per_rank[1]  # the ranks' shares differ: rank 0's alone would be another value
    teacher = {k: v for k, v in summary["teacher"].items() if k not in TIMING}
    assert teacher == pytest.approx({k: v for k, v in reference_summary["teacher"].items() if k not in TIMING},
                                    rel=1e-4, abs=1e-6)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_mixture_summary_under_fsdp2_scores_on_every_rank_and_writes_once(tmp_path):
    """MixtureSummary samples on every rank under FSDP2 (rank 0 alone waited forever for the others)
    and writes the one-process rows: the teacher's and the untrained student's do not depend on the
    world size."""

    def fit(name, *args):
        out = tmp_path / name
        result = dmdx_fit("--config", "configs/mixture/adm.yaml", "--trainer.default_root_dir", str(out),
                          "--trainer.max_steps", "2", "--trainer.logger", "false", "--data.init_args.batch_size", "4",
                          "--trainer.callbacks.init_args.samples_per_class", "50", *args, timeout=300)
        assert result.returncode == 0, result.stderr[-4000:]
        return json.loads((out / "summary.json").read_text())

    one = fit("one")
    two = fit("fsdp2", *FSDP2, "--trainer.devices", "2")
    assert set(two) == set(one) == {"teacher", "adm_1step@init", "adm_1step"}
    for row in ("teacher", "adm_1step@init"):
        scalars = {k for k, v in one[row].items() if isinstance(v, (int, float))}
        assert {k: two[row][k] for k in scalars} == pytest.approx({k: one[row][k] for k in scalars}, rel=1e-5,
                                                                    abs=1e-6), row
