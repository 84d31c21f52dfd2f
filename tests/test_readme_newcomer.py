"""The newcomer test: README's "Distill your own model (SD3)" commands, as written, end to end.

The ```bash block under that heading is read from README.md and each ``dmdx`` line runs in an
empty folder that links only ``configs/`` to the checkout's (the README's relative ``runs/...``
and ``samples/...`` paths land there), in this process through
:func:`dmdx_lightning.cli.main`. The teacher is the tiny random SD3 folder the other tests use
(``tiny_sd3_dir``, written by :func:`dmdx_lightning.teachers.sd3_random.save_random_sd3`); the only
arguments added are those in :data:`TINY`, appended to the commands that name a config. ``dmdx
export`` and ``dmdx sample`` run exactly as written; ``dmdx evaluate`` reads two COCO-format captions
and scores with a tiny CLIP and a tiny FID feature network (its metric models are GBs on the Hub).
Edit the README block and this test follows it, or fails naming what changed.
"""

import json
import re
import shlex
from pathlib import Path

import pytest

from tests.test_configs import SD3_TINY, TINY_HEADS

ROOT = Path(__file__).resolve().parent.parent
HEADING = "## Distill your own model (SD3)"

_TRAINER = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
            "--trainer.precision", "32-true", "--trainer.enable_progress_bar", "false"]
#: what this test appends to a README command, by the config it names: the tiny SD3 folder at
#: 16 px, 16 T5 tokens and fp32 (SD3_TINY), latent heads on blocks the 2-block transformer has
#: (TINY_HEADS), one CPU process in fp32 without a progress bar, 2 iterations, and smaller batches
#: and pair counts.
#: "{tiny_sd3}" / "{tiny_sam}" are replaced by the session's folders (tests/conftest.py), "{coco_captions}" /
#: "{tiny_metrics}" by :func:`tiny_evaluation`'s files.
TINY: dict[str, list[str]] = {
    "configs/sd3/ode_pairs.yaml": SD3_TINY + _TRAINER + [
        "--data.init_args.num_pairs", "4", "--data.init_args.shard_size", "4", "--data.init_args.batch_size", "2"],
    "configs/sd3/adp_4step.yaml": SD3_TINY + TINY_HEADS + _TRAINER + [
        # the SAM ViT-B pixel discriminator -> a random 3-block SAM
        "--model.init_args.pixel_discriminator.init_args.backbone.init_args.pretrained", "{tiny_sam}",
        "--model.init_args.pixel_discriminator.init_args.backbone.init_args.dtype", "float32",
        "--model.init_args.pixel_discriminator.init_args.layers", "[1, 2]",
        "--data.init_args.batch_size", "2", "--trainer.max_steps", "2"],
    "configs/sd3/adm_4step.yaml": SD3_TINY + TINY_HEADS + _TRAINER + [
        # no validation: its CLIP-score and LPIPS callbacks would fetch networks from the hub
        "--trainer.num_sanity_val_steps", "0", "--trainer.limit_val_batches", "0",
        "--data.init_args.batch_size", "2", "--trainer.max_steps", "2"],
}
TINY["configs/eval/sd3_coco_10k.yaml"] = [
    # COCO's caption annotations -> 2 captions in the same format; the metric models -> a tiny CLIP and
    # a tiny FID feature network over a folder of reference images (an overlay config, written below)
    "--prompts", "{coco_captions}", "--config", "{tiny_metrics}", "--no-progress"]
#: the README block's commands, in order: (verb, config or None)
EXPECTED = [("predict", "configs/sd3/ode_pairs.yaml"), ("fit", "configs/sd3/adp_4step.yaml"),
            ("fit", "configs/sd3/adm_4step.yaml"), ("export", None), ("sample", None),
            ("evaluate", "configs/eval/sd3_coco_10k.yaml")]


def readme_commands() -> list[list[str]]:
    """The ``dmdx`` lines of the bash block under :data:`HEADING`, without their trailing comments."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert HEADING in text, f"README.md has no heading {HEADING!r}"
    section = text.split(HEADING, 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, f"no ```bash block under {HEADING!r}"
    lines = [re.sub(r"\s+#.*$", "", line).strip() for line in block.group(1).splitlines()]
    commands = [shlex.split(line) for line in lines if line]
    assert all(c[0] == "dmdx" for c in commands), commands
    return [c[1:] for c in commands]


def config_of(argv: list[str]) -> str | None:
    return argv[argv.index("--config") + 1] if "--config" in argv else None


@pytest.mark.slow
def test_readme_distill_your_own_model_runs_as_written(tiny_sd3_dir, tiny_sam_path, tmp_path, monkeypatch):
    from dmdx_lightning.cli import main
    from dmdx_lightning.data.ode_pairs import MANIFEST

    commands = readme_commands()
    assert [(c[0], config_of(c)) for c in commands] == EXPECTED, (
        "README's SD3 block changed: update EXPECTED, TINY and the outputs checked below")
    # from an empty folder, as after `pip install`: configs and prompt files resolve as shipped ones
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DMDX_DEBUG", "1")  # a failing step raises with its traceback, not SystemExit(2)
    places = {"{tiny_sd3}": str(tiny_sd3_dir), "{tiny_sam}": tiny_sam_path,
              **tiny_evaluation(tmp_path / "tiny_eval")}
    for argv in commands:
        extra = [places.get(a, a) for a in TINY.get(config_of(argv), [])]
        main([*argv, *extra])

    manifest = json.loads((tmp_path / "runs/sd3/pairs" / MANIFEST).read_text())
    assert manifest["complete"] and manifest["num_pairs"] == 4
    for run in ("adp_sd3", "adm_sd3"):
        assert (tmp_path / "runs" / run / "checkpoints" / "last.ckpt").is_file(), run
    assert (tmp_path / "runs/adm_sd3/pipeline/model_index.json").is_file()
    assert (tmp_path / "samples/sd3/grid.png").is_file()
    record = json.loads((tmp_path / "samples/sd3/sample.json").read_text())
    assert record["command"] == "dmdx " + shlex.join(commands[-2])  # the README's line, nothing added
    assert record["prompts"] and len(record["images"]) == len(record["prompts"])
    results = json.loads((tmp_path / "runs/eval/sd3_coco_10k/results.json").read_text())
    assert [row["label"] for row in results["rows"]] == ["teacher", "adm_4step"]
    assert results["num_prompts"] == 2 and all({"clip_score", "fid"} <= set(row["metrics"]) for row in results["rows"])
    assert (tmp_path / "runs/eval/sd3_coco_10k/contact_sheet.png").is_file()


def tiny_evaluation(folder: Path) -> dict[str, str]:
    """What `dmdx evaluate --config configs/eval/sd3_coco_10k.yaml` reads, tiny: COCO-format caption
    annotations (2 images), and an overlay config whose metrics are CLIP score on a tiny CLIP and
    FID on a tiny feature network against 4 reference images."""
    import numpy as np
    import yaml
    from PIL import Image

    from tests.test_metrics import save_tiny_clip

    folder.mkdir()
    captions = {"annotations": [{"image_id": 2, "id": 7, "caption": "a blue sphere"},
                                {"image_id": 1, "id": 9, "caption": "a red cube, again"},
                                {"image_id": 1, "id": 3, "caption": "a red cube"}]}
    (folder / "captions_val2014.json").write_text(json.dumps(captions))
    save_tiny_clip(folder / "clip")
    reference = folder / "val2014"
    reference.mkdir()
    rng = np.random.default_rng(0)
    for k in range(4):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(reference / f"{k}.png")
    metrics = [{"name": "clip_score", "init_args": {"model_name_or_path": str(folder / "clip")}},
               {"name": "fid", "init_args": {"reference": str(reference), "batch_size": 4,
                                             "feature_extractor": {"class_path": "tests.test_evaluate.TinyFeatures"}}}]
    (folder / "metrics.yaml").write_text(yaml.safe_dump({"metrics": metrics}))
    return {"{coco_captions}": str(folder / "captions_val2014.json"), "{tiny_metrics}": str(folder / "metrics.yaml")}
