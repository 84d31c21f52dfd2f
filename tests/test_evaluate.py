"""`dmdx evaluate`: students beside their teacher on a prompt set, on tiny real models loaded from folders.

The digits teacher (shipped weights) and a 2-step student checkpoint trained here carry the
generation tests (determinism, resume after a kill, 2 ranks == 1 rank): they are fast, and a
2-step student re-noises between its steps, the case where a sample could depend on the batch it
was drawn in. The tiny random SD3 (tests/conftest.py) carries the end-to-end protocol with the
metric components (CLIP score on a tiny CLIP, FID on a tiny feature network and a folder of
reference images, LPIPS diversity on a random backbone).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from dmdx_lightning.cli import main as dmdx
from dmdx_lightning.errors import SetupError
from dmdx_lightning.evaluation.evaluate import (CONTACT_SHEET, PER_PROMPT, RECORDS, RESULTS_JSON, RESULTS_MD,
                                                PromptSpec, evaluate, parse_config, read_eval_prompts, writer_lock)
from dmdx_lightning.evaluation.metrics.base import Metric, MetricResult
from dmdx_lightning.evaluation.samples import SampleSet
from tests.helpers import ROOT, dmdx_env
from tests.test_sample import train_digits_run

TEACHER_CONFIG = str(ROOT / "configs" / "quickstart" / "adm.yaml")


class MeanPixel(Metric):
    """A real metric, trivially small: the mean pixel value of each sample (per prompt and overall).
    Plumbing tests use it where a scoring network would cost time and say nothing more."""

    name = "mean_pixel"

    def score(self, samples: SampleSet, device) -> MetricResult:
        per: dict[int, list[float]] = {}
        for pixels, batch in samples.batches(4):
            for x, s in zip(pixels, batch):
                per.setdefault(s.prompt_index, []).append(float(x.mean()))
        every = [v for values in per.values() for v in values]
        return MetricResult({"mean_pixel": sum(every) / len(every)},
                            {i: {"mean_pixel": sum(v) / len(v)} for i, v in per.items()})


class TinyFeatures(nn.Module):
    """A random feature network for FID: images in [0, 1] -> 8 features (pooled convolutions)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                 nn.Linear(32, 8))

    def forward(self, images):
        return self.net(images.float())


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory):
    """A 2-step digits student (re-noising between its steps) as `dmdx fit` leaves it."""
    return train_digits_run(tmp_path_factory.mktemp("digits_run"))[1]


def digits_eval(out, ckpt, prompts=3, per_prompt=3, batch=2, **more) -> dict:
    """An evaluation config: the digits teacher (4 ODE steps) beside the 2-step student."""
    return {"output": str(out), "prompts": {"source": str(ROOT / "configs/prompts/digits.txt"), "max_prompts": prompts},
            "samples_per_prompt": per_prompt, "batch_size": batch, "seed": 7,
            "models": [{"label": "teacher", "source": TEACHER_CONFIG, "teacher": True, "steps": 4},
                       {"label": "student", "source": str(ckpt)}],
            "metrics": [{"class_path": "tests.test_evaluate.MeanPixel"}], **more}


def snapshot(out: Path, labels=("teacher", "student")) -> dict:
    """Every merged record (without its timing) and the bytes of every sample file, per model."""
    found = {}
    for label in labels:
        records = [json.loads(line) for line in (out / label / RECORDS).read_text().splitlines()]
        for r in records:
            r.pop("seconds")
        found[label] = records
        found[label + "/files"] = {p.name: p.read_bytes() for p in sorted((out / label / "images").iterdir())}
    return found


class Stop(Exception):
    pass


# ------------------------------------------------------------------------------------ generation
def test_resume_after_a_kill_gives_the_files_of_an_uninterrupted_run(digits_ckpt, tmp_path):
    """Stopped after 5 samples, with a torn record line, a damaged image, a record its file does not
    match and a partial file left behind, the resumed run ends with exactly the files and records of
    a run never stopped, and a finished run generates nothing more."""
    whole = parse_config(digits_eval(tmp_path / "whole", digits_ckpt))
    result = evaluate(whole, progress=False)
    assert [r["label"] for r in result["rows"]] == ["teacher", "student"]
    assert [r["nfe"] for r in result["rows"]] == [8, 2]  # 4 ODE steps x CFG's two branches; 2 student steps

    cut = parse_config(digits_eval(tmp_path / "cut", digits_ckpt))
    drawn: list[dict] = []

    def stop_after_five(record):
        drawn.append(record)
        if len(drawn) == 5:
            raise Stop

    with pytest.raises(Stop):
        evaluate(cut, progress=False, on_sample=stop_after_five)
    teacher = tmp_path / "cut" / "teacher"
    shard = teacher / "records.rank0.jsonl"
    assert len(shard.read_text().splitlines()) == 5 and not (teacher / RECORDS).exists()
    lines = shard.read_text().splitlines()
    first = json.loads(lines[0])
    (teacher / first["file"]).write_bytes(b"not a png")  # a damaged file: its record no longer matches
    third = json.loads(lines[2])
    lines[2] = json.dumps({**third, "sha256": "0" * 64})  # a record its file does not match (e.g. a GPU's
    shard.write_text("\n".join(lines) + "\n")              # redraw differing in the last bit): drawn again
    with shard.open("a") as f:
        f.write('{"prompt_index": 2, "prompt": "a handw')  # a kill mid-append
    (teacher / "images" / ".partial-0123.tmp").write_bytes(b"half a png")  # a kill mid-write

    resumed: list[dict] = []
    evaluate(cut, progress=False, on_sample=resumed.append)
    # 9 teacher samples in chunks (7, 8), (9), (10, 11), ...: 3 of the 5 kept (not seeds 7 and 9); the
    # chunk of 7 is drawn whole (8 again), then the rest; then the 9 student samples
    assert [r["seed"] for r in resumed[:3]] == [7, 8, 9]
    assert len(resumed) == 9 - 3 + 1 + 9
    assert snapshot(tmp_path / "cut") == snapshot(tmp_path / "whole")
    assert not list(teacher.glob("images/.partial-*"))

    again: list[dict] = []
    evaluate(cut, progress=False, on_sample=again.append)
    assert again == []

    # a second run into a folder another run is writing stops (it would replace the record file the
    # first appends to); the lock is a flock, so a killed writer (above) never blocks the resume
    with writer_lock(teacher, 0), pytest.raises(SetupError, match="being written by another `dmdx evaluate`"):
        evaluate(cut, progress=False)


def test_samples_are_a_function_of_prompt_and_seed(digits_ckpt, tmp_path):
    """Teacher and student start from the same noise per (prompt, seed): the contact sheet's columns
    line up; another seed gives other pictures; a folder of other settings is not resumed."""
    out = tmp_path / "a"
    evaluate(parse_config(digits_eval(out, digits_ckpt, prompts=2, per_prompt=2)), progress=False)
    teacher, student = (SampleSet.from_records(out / label, verify=True) for label in ("teacher", "student"))
    assert [(s.prompt_index, s.seed) for s in teacher.samples] == [(0, 7), (0, 8), (1, 9), (1, 10)]
    assert [(s.prompt_index, s.seed) for s in student.samples] == [(0, 7), (0, 8), (1, 9), (1, 10)]
    assert teacher.load(teacher.samples[0]).shape == (3, 8, 8)
    with Image.open(out / CONTACT_SHEET) as sheet:
        assert sheet.size[0] > 4 * 64  # 2 models x 2 seeds of 64-px cells, after the prompt column

    # seed 8 starts prompt 0's chunk here; above it was the 2nd sample of chunk (7, 8): the teacher's
    # ODE draws nothing but that noise (the same picture), the 2-step student also draws its chunk's
    # fresh noise, seeded by the chunk's first seed (another picture)
    other = digits_eval(tmp_path / "b", digits_ckpt, prompts=2, per_prompt=2)
    other["seed"] = 8
    evaluate(parse_config(other), progress=False)
    teacher8, student8 = (SampleSet.from_records(tmp_path / "b" / label) for label in ("teacher", "student"))
    assert teacher8.samples[0].seed == 8 == teacher.samples[1].seed
    assert (teacher8.load(teacher8.samples[0]) - teacher.load(teacher.samples[1])).abs().max() <= 1 / 255
    assert (student8.load(student8.samples[0]) - student.load(student.samples[1])).abs().max() > 0.1

    changed = digits_eval(out, digits_ckpt, prompts=2, per_prompt=3)
    with pytest.raises(ValueError, match="other settings .*samples_per_prompt"):
        evaluate(parse_config(changed), progress=False)


def test_prompts_with_fewer_samples_than_a_batch_share_it(digits_ckpt, tmp_path):
    """One sample per prompt (COCO's protocol) at batch_size 4: consecutive prompts are drawn in one
    forward; the teacher's deterministic ODE gives the pictures of batch size 1, prompt for prompt,
    and the student every prompt its own picture."""
    from dmdx_lightning.evaluation.evaluate import plan

    assert [c.samples for c in plan(5, 1, 4, 7)] == [((0, 0, 7), (1, 0, 8), (2, 0, 9), (3, 0, 10)), ((4, 0, 11),)]
    assert [c.samples for c in plan(2, 3, 2, 0)] == [((0, 0, 0), (0, 1, 1)), ((0, 2, 2),), ((1, 0, 3), (1, 1, 4)),
                                                    ((1, 2, 5),)]  # a prompt with enough samples: its own chunks
    batched, single = tmp_path / "batched", tmp_path / "single"
    evaluate(parse_config(digits_eval(batched, digits_ckpt, prompts=5, per_prompt=1, batch=4)), progress=False)
    evaluate(parse_config(digits_eval(single, digits_ckpt, prompts=5, per_prompt=1, batch=1)), progress=False)
    a, b = (SampleSet.from_records(out / "teacher", verify=True) for out in (batched, single))
    assert [(x.prompt_index, x.seed) for x in a.samples] == [(i, 7 + i) for i in range(5)]
    for x, y in zip(a.samples, b.samples):
        assert (a.load(x) - b.load(y)).abs().max() <= 1 / 255
    student = SampleSet.from_records(batched / "student", verify=True)
    assert [x.prompt for x in student.samples] == [x.prompt for x in a.samples]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_ranks_give_what_one_rank_gives(digits_ckpt, tmp_path):
    """`dmdx evaluate` in 2 processes (RANK / WORLD_SIZE / MASTER_ADDR as torchrun sets them, gloo):
    each generates its chunks, rank 0 merges and scores: the same records, files and table as 1 process.
    FID and KID (torchmetrics, which syncs its states over an open process group unless told not to)
    score on rank 0 alone after the other rank has left: before the fix rank 0 waited for it."""
    reference = tmp_path / "reference"
    reference.mkdir()
    rng = np.random.default_rng(0)
    for k in range(8):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(reference / f"{k}.png")
    features = {"class_path": "tests.test_evaluate.TinyFeatures"}
    metrics = [{"class_path": "tests.test_evaluate.MeanPixel"},
               {"name": "fid", "init_args": {"reference": str(reference), "batch_size": 4, "feature_extractor": features}},
               {"name": "kid", "init_args": {"reference": str(reference), "batch_size": 4, "subsets": 4,
                                             "subset_size": 4, "feature_extractor": features}}]
    one = digits_eval(tmp_path / "one", digits_ckpt, prompts=3, per_prompt=3, metrics=metrics)
    evaluate(parse_config(one), progress=False)
    two = digits_eval(tmp_path / "two", digits_ckpt, prompts=3, per_prompt=3, metrics=metrics)
    config = tmp_path / "two.yaml"
    config.write_text(yaml.safe_dump(two))
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**dmdx_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "dmdx_lightning.cli", "evaluate", "--config", str(config),
                                       "--no-progress"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (stdout, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stderr
    assert "| teacher |" in outputs[0][0] and "| teacher |" not in outputs[1][0]  # rank 0 scores alone
    for label in ("teacher", "student"):
        shards = [len((tmp_path / "two" / label / f"records.rank{r}.jsonl").read_text().splitlines()) for r in (0, 1)]
        assert shards == [6, 3], shards  # chunks (prompt, 2 seeds) and (prompt, 1 seed): 6 chunks, 3 each
    assert snapshot(tmp_path / "two") == snapshot(tmp_path / "one")
    rows = {k: json.loads((tmp_path / k / RESULTS_JSON).read_text())["rows"] for k in ("one", "two")}
    assert [r["metrics"] for r in rows["two"]] == [r["metrics"] for r in rows["one"]]
    assert {"mean_pixel", "fid", "kid"} <= set(rows["two"][0]["metrics"])


def test_shards_without_a_rendezvous_then_one_scoring_job(digits_ckpt, tmp_path, monkeypatch):
    """`--stage generate` per shard (RANK / WORLD_SIZE, no MASTER_ADDR: e.g. a SLURM array), then one
    `--stage score`: the records and files of one process; scoring an incomplete set says what is missing."""
    evaluate(parse_config(digits_eval(tmp_path / "one", digits_ckpt, prompts=2, per_prompt=3)), progress=False)
    cfg = parse_config(digits_eval(tmp_path / "shards", digits_ckpt, prompts=2, per_prompt=3))
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert evaluate(cfg, stage="generate", progress=False) is None
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    # chunks (prompt 0: seeds 7, 8), (0: 9), (1: 10, 11), (1: 12); rank 1 drew the 2nd and the 4th
    with pytest.raises(SetupError, match=r"teacher: 4 of 6 samples are missing or damaged \(first: prompt 0, seed 7\)"):
        evaluate(cfg, stage="score", progress=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    evaluate(cfg, stage="generate", progress=False)
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    result = evaluate(cfg, stage="score", progress=False)
    assert snapshot(tmp_path / "shards") == snapshot(tmp_path / "one")
    one = json.loads((tmp_path / "one" / RESULTS_JSON).read_text())
    assert [r["metrics"] for r in result["rows"]] == [r["metrics"] for r in one["rows"]]


@pytest.mark.slow
def test_a_killed_process_resumes(digits_ckpt, tmp_path):
    """SIGKILL a `dmdx evaluate` process mid-generation; run it again: the files of an uninterrupted run."""
    cfg = digits_eval(tmp_path / "killed", digits_ckpt, prompts=4, per_prompt=3, batch=1)
    cfg["models"] = cfg["models"][:1]
    cfg["models"][0]["steps"] = 8
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "dmdx_lightning.cli", "evaluate", "--config", str(config), "--no-progress"]
    shard = tmp_path / "killed" / "teacher" / "records.rank0.jsonl"
    with subprocess.Popen(cmd, cwd=ROOT, env=dmdx_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          start_new_session=True) as proc:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if shard.is_file() and len(shard.read_text().splitlines()) >= 3:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    done = len(shard.read_text().splitlines())
    assert 3 <= done < 12 and not (tmp_path / "killed" / "teacher" / RECORDS).exists()

    rerun = subprocess.run(cmd, cwd=ROOT, env=dmdx_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    whole = dict(cfg, output=str(tmp_path / "whole"))
    evaluate(parse_config(whole), progress=False)
    assert snapshot(tmp_path / "killed", ("teacher",)) == snapshot(tmp_path / "whole", ("teacher",))


# ------------------------------------------------------------------------------------ prompt sets
def test_prompt_sets_coco_annotations_tsv_and_a_seeded_subset(tmp_path):
    """COCO caption annotations: one caption per image (the lowest annotation id), images in id order;
    PartiPrompts' .tsv by column; ``shuffle_seed`` + ``max_prompts``: a fixed random subset."""
    coco = tmp_path / "captions_val2014.json"
    coco.write_text(json.dumps({"images": [], "annotations": [
        {"image_id": 9, "id": 4, "caption": "A dog  on a\nsofa."}, {"image_id": 2, "id": 8, "caption": "a caption"},
        {"image_id": 2, "id": 5, "caption": "Two cats."}, {"image_id": 9, "id": 7, "caption": "another dog"}]}))
    assert read_eval_prompts(PromptSpec(str(coco))) == ["Two cats.", "A dog on a sofa."]
    tsv = tmp_path / "PartiPrompts.tsv"
    tsv.write_text("Prompt\tCategory\tChallenge\n" + "".join(f"prompt {k}\tAnimals\tBasic\n" for k in range(10)))
    every = read_eval_prompts(PromptSpec(str(tsv), field="Prompt"))
    assert every == [f"prompt {k}" for k in range(10)]
    subset = read_eval_prompts(PromptSpec(str(tsv), field="Prompt", max_prompts=4, shuffle_seed=0))
    assert len(subset) == 4 and set(subset) < set(every) and subset != every[:4]
    assert subset == read_eval_prompts(PromptSpec(str(tsv), field="Prompt", max_prompts=4, shuffle_seed=0))
    with pytest.raises(ValueError, match="no column 'prompt'.*Prompt, Category, Challenge"):
        read_eval_prompts(PromptSpec(str(tsv)))
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ValueError, match="COCO caption annotations"):
        read_eval_prompts(PromptSpec(str(tmp_path / "list.json")))


# ------------------------------------------------------------------------------------ errors
def error_of(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        dmdx(["evaluate", *argv, "--no-progress"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "DMDX_DEBUG=1" in err
    return err


def test_errors_name_the_key_and_the_path(digits_ckpt, tmp_path, capsys):
    def run(**change):
        cfg = digits_eval(tmp_path / "out", digits_ckpt)
        cfg.update(change)
        path = tmp_path / "eval.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return error_of(["--config", str(path)], capsys)

    missing = tmp_path / "nope" / "last.ckpt"
    err = run(models=[{"source": TEACHER_CONFIG, "teacher": True}, {"label": "student", "source": str(missing)}])
    assert f"models[1] (student): SOURCE {missing} does not exist" in err  # before the teacher drew a sample
    err = run(prompts={"source": str(tmp_path / "prompts.jsonl")})
    assert f"prompt file {tmp_path / 'prompts.jsonl'} (prompts.source) not found" in err
    err = run(metrics=[{"name": "clip_score", "init_args": {"model_name_or_path": str(tmp_path / "no_clip")}}])
    assert "metrics[0] (clip_score)" in err and str(tmp_path / "no_clip") in err
    tiny_features = {"class_path": "tests.test_evaluate.TinyFeatures"}
    err = run(metrics=[{"name": "fid", "init_args": {"reference": str(tmp_path / "coco_val"),
                                                     "feature_extractor": tiny_features}}])
    assert "metrics[0] (fid)" in err and f"reference={str(tmp_path / 'coco_val')!r}" in err
    err = run(metrics=[{"name": "clip_scor"}])
    assert "metrics[0].name = 'clip_scor': is no registered metric" in err and "clip_score" in err
    err = run(metrics=[{"name": "mps"}])
    assert "metrics[0] (mps)" in err
    err = run(samples_per_promt=2)
    assert "samples_per_promt" in err and "Did you mean samples_per_prompt?" in err
    err = run(models=[{"source": TEACHER_CONFIG, "teacher": True, "stepz": 3}])
    assert "models[0].stepz" in err
    err = run(models=[{"source": str(digits_ckpt), "cfg": 2.0}])
    assert "models[0] (last.ckpt): cfg = 2.0: a distilled student samples without guidance" in err
    err = run(models=[{"source": TEACHER_CONFIG}])
    assert "is a config: it holds no student weights (add teacher: true" in err
    # nothing was generated: every error above stops the run before its first sample
    assert not (tmp_path / "out").exists()
    err = error_of(["--config", str(tmp_path / "none.yaml")], capsys)
    assert str(tmp_path / "none.yaml") in err


def test_shipped_configs_print_from_any_folder(tmp_path, monkeypatch, capsys):
    """`--config eval/NAME.yaml` is a shipped config from any folder; its shipped prompt file resolves."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        dmdx(["evaluate", "--config", "eval/digits.yaml", "--max_prompts", "3", "--print_config"])
    assert stop.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert Path(printed["prompts"]["source"]).is_file() and printed["prompts"]["max_prompts"] == 3
    assert [m["label"] for m in printed["models"]] == ["teacher", "adp_1step", "adm_1step", "dmdx_1step"]


# ------------------------------------------------------------------------------------ the protocol on the tiny SD3
@pytest.mark.slow
def test_the_protocol_end_to_end_on_the_tiny_sd3(tiny_sd3_dir, tmp_path, capsys):
    """A tiny SD3 student (checkpoint and its `dmdx export` pipeline) beside its teacher: CLIP score,
    FID and LPIPS diversity from the metric components; the table, per-prompt values, contact sheet
    and TensorBoard scalars; the same command again generates nothing and writes the same table."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.test_export import train_run
    from tests.test_metrics import save_tiny_clip

    (tmp_path / "run").mkdir()
    _, ckpt = train_run(tmp_path / "run", tiny_sd3_dir, "lora", 2)
    dmdx(["export", "--ckpt_path", str(ckpt), "--output", str(tmp_path / "pipeline"), "--format", "pipeline"])
    clip = tmp_path / "clip"
    save_tiny_clip(clip)
    reference = tmp_path / "reference"
    reference.mkdir()
    rng = np.random.default_rng(0)
    for k in range(6):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(reference / f"{k}.png")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"caption": p}) + "\n" for p in ["a red cube", "a blue sphere", "a cat"]))
    cfg = {"output": str(tmp_path / "eval"), "prompts": {"source": str(prompts), "field": "caption"},
           "samples_per_prompt": 2, "seed": 0,
           "models": [{"label": "teacher", "source": str(ckpt), "teacher": True, "steps": 4, "cfg": 3.0},
                      {"label": "student", "source": str(ckpt)},
                      {"label": "pipeline", "source": str(tmp_path / "pipeline")}],
           "metrics": [{"name": "clip_score", "init_args": {"model_name_or_path": str(clip), "batch_size": 4}},
                       {"name": "fid", "init_args": {"reference": str(reference), "batch_size": 4, "feature_extractor":
                                                     {"class_path": "tests.test_evaluate.TinyFeatures"}}},
                       # a random backbone: no download (the number means nothing, the plumbing is real)
                       {"name": "lpips_diversity", "init_args": {"pnet_rand": True, "min_size": 32}}]}
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump(cfg))
    dmdx(["evaluate", "--config", str(config), "--no-progress"])
    out = tmp_path / "eval"
    result = json.loads((out / RESULTS_JSON).read_text())
    rows = {r["label"]: r for r in result["rows"]}
    assert list(rows) == ["teacher", "student", "pipeline"]
    assert rows["teacher"]["nfe"] == 8 and rows["student"]["nfe"] == 4 and rows["pipeline"]["nfe"] == 4
    assert rows["teacher"]["kind"] == "teacher" and rows["student"]["kind"] == "checkpoint"
    expected = {"clip_score", "fid", "lpips_diversity"}
    for row in rows.values():
        assert set(row["metrics"]) == expected and all(np.isfinite(v) for v in row["metrics"].values())
        assert row["samples"] == 6 and row["seconds_per_sample"] > 0
    # the checkpoint and its pipeline export are one student: the same pictures, up to float rounding
    student, pipeline = (SampleSet.from_records(out / label, verify=True) for label in ("student", "pipeline"))
    for a, b in zip(student.samples, pipeline.samples):
        assert (student.load(a) - pipeline.load(b)).abs().max() <= 2 / 255
    table = (out / RESULTS_MD).read_text()
    assert "| teacher | teacher | 8 |" in table and "clip_score" in table and "fid" in table
    per_prompt = json.loads((out / PER_PROMPT).read_text())
    assert set(per_prompt["student"]) == {"0", "1", "2"}
    assert per_prompt["student"]["2"]["prompt"] == "a cat" and "clip_score" in per_prompt["student"]["2"]
    assert (out / CONTACT_SHEET).is_file()
    events = EventAccumulator(str(out / "tensorboard" / "student"))
    events.Reload()
    assert {"eval/clip_score", "eval/fid", "eval/nfe"} <= set(events.Tags()["scalars"])
    assert events.Scalars("eval/fid")[0].value == pytest.approx(rows["student"]["metrics"]["fid"], rel=1e-5)

    before = {p: p.stat().st_mtime_ns for p in out.glob("*/images/*.png")}
    capsys.readouterr()
    dmdx(["evaluate", "--config", str(config), "--no-progress"])
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/images/*.png")} == before  # nothing drawn again
    again = json.loads((out / RESULTS_JSON).read_text())
    assert [r["metrics"] for r in again["rows"]] == [r["metrics"] for r in result["rows"]]



def test_teacher_args_sample_at_another_resolution(tiny_sd3_dir, tmp_path, capsys):
    """``teacher_args`` replace the config's teacher options (here the tiny SD3's 16 px -> 32 px); an
    option the teacher does not have, or teacher_args on an exported folder, is one clear error."""
    from tests.test_export import run_config

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run_config(tiny_sd3_dir, "lora")))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\n")

    def evaluate_with(teacher_args, output="eval"):
        cfg = {"output": str(tmp_path / output), "prompts": {"source": str(prompts)}, "samples_per_prompt": 1,
               "models": [{"label": "t32", "source": str(config), "teacher": True, "steps": 2,
                           "teacher_args": teacher_args}]}
        (tmp_path / "eval.yaml").write_text(yaml.safe_dump(cfg))
        return dmdx(["evaluate", "--config", str(tmp_path / "eval.yaml"), "--no-progress"])

    evaluate_with({"resolution": 32})
    (image,) = (tmp_path / "eval" / "t32" / "images").glob("*.png")
    assert Image.open(image).size == (32, 32)
    with pytest.raises(SystemExit) as exit_:
        evaluate_with({"resolutoin": 32}, "misspelt")
    assert exit_.value.code == 2 and "resolutoin" in capsys.readouterr().err


@pytest.mark.slow
def test_videos_are_stored_losslessly_and_scored_per_frame(tiny_cogvideox_dir, tmp_path):
    """A video teacher: each video is one lossless PNG strip of its frames (what the metrics read,
    frame for frame what `dmdx sample` draws for the same seed) and a GIF to look at."""
    from tests.test_cogvideox_adm import run_config
    from tests.test_metrics import save_tiny_clip

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(run_config(tiny_cogvideox_dir, "full")))
    save_tiny_clip(tmp_path / "clip")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("waves on a beach\n")
    cfg = {"output": str(tmp_path / "eval"), "prompts": str(prompts), "samples_per_prompt": 2, "fps": 4,
           "models": [{"label": "teacher", "source": str(config), "teacher": True, "steps": 2}],
           "metrics": [{"name": "video_clip_score", "init_args": {"model_name_or_path": str(tmp_path / "clip")}},
                       {"name": "lpips_diversity", "init_args": {"pnet_rand": True, "min_size": 32}}]}
    result = evaluate(parse_config(cfg), progress=False)
    assert set(result["rows"][0]["metrics"]) == {"video_clip_score", "lpips_diversity"}
    videos = SampleSet.from_records(tmp_path / "eval" / "teacher", verify=True)
    assert videos.modality == "video" and [s.extra["frames"] for s in videos.samples] == [9, 9]
    video = videos.load(videos.samples[0])
    assert video.shape == (9, 3, 32, 32)
    with Image.open(tmp_path / "eval" / "teacher" / videos.samples[0].file.replace(".png", ".gif")) as gif:
        assert gif.n_frames == 9

    dmdx(["sample", str(config), "--teacher", "--steps", "2", "--prompt", "waves on a beach", "-n", "2",
          "--output", str(tmp_path / "sample"), "--no-progress"])
    with Image.open(tmp_path / "sample" / "000_waves-on-a-beach_seed0.png") as middle:
        expected = torch.from_numpy(np.asarray(middle.convert("RGB")).copy()).permute(2, 0, 1).float() / 255
    assert (video[4] - expected).abs().max() <= 1 / 255
