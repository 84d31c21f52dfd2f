"""`dmdx sample`: a checkpoint, an export or the teacher -> PNG / GIF / MP4 files, a labelled grid and
sample.json; the pictures are our samplers' for the same seeds; user errors are one message, exit 2."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dmdx_lightning.cli import main as dmdx
from dmdx_lightning.export import EXPORT_INFO, build_module, build_teacher, export, load_export
from dmdx_lightning.rng import fixed_noise
from dmdx_lightning.sample import GRID, SAMPLE_INFO, to_pil
from dmdx_lightning.teachers.digits import DIGIT_PROMPTS
from tests.conftest import prompt_loader
from tests.helpers import ROOT, dmdx_env

SEVEN, THREE = "a handwritten digit seven", "the digit 3"


def digits_config() -> dict:
    """The quickstart's ADM on digits, with a 2-step student (re-noising between steps) and an EMA."""
    model = yaml.safe_load((ROOT / "configs" / "quickstart" / "adm.yaml").read_text())["model"]
    args = model["init_args"]
    args.update(student_steps=2, ema_decay=0.5)
    args["discriminator"]["init_args"]["head_channels"] = 16
    args["generator_optimizer"]["init_args"]["lr"] = 1e-3  # a few steps move the student visibly
    return {"model": model}


def train_digits_run(run):
    """``(module, checkpoint)`` of a run folder as `dmdx fit` leaves it (config.yaml,
    checkpoints/last.ckpt) after 2 ADM iterations of :func:`digits_config`, seed 0."""
    (run / "config.yaml").write_text(yaml.safe_dump(digits_config()))
    torch.manual_seed(0)
    module = build_module(run / "config.yaml")
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=run)
    trainer.fit(module, prompt_loader(list(DIGIT_PROMPTS), batch_size=4))
    ckpt = run / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    return module.eval(), ckpt


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    return train_digits_run(tmp_path_factory.mktemp("digits_run"))


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image).astype(int)


def expected(images: torch.Tensor) -> list[np.ndarray]:
    return [np.asarray(to_pil(x)).astype(int) for x in images]


def run_sample(*args: str) -> dict:
    dmdx(["sample", *args, "--no-progress"])
    return json.loads((Path(args[args.index("--output") + 1]) / SAMPLE_INFO).read_text())


def files(record: dict, out) -> list[list[np.ndarray]]:
    return [[pixels(out / name) for name in row] for row in record["images"]]


# ------------------------------------------------------------------------------------ --help is light
@pytest.mark.parametrize("verb", ["sample", "export"])
def test_help_imports_neither_torch_nor_lightning(verb):
    code = ("import sys\nfrom dmdx_lightning.cli import main\ntry:\n    main([%r, '--help'])\nexcept SystemExit:\n"
            "    pass\nprint(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'lightning', 'diffusers', 'transformers', 'PIL', 'numpy', 'jsonargparse')))") % verb
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dmdx_env(), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--output" in out.stdout and out.stdout.strip().endswith("[]"), out.stdout[-500:]


# ------------------------------------------------------------------------------------ digits
def test_sample_a_digits_checkpoint(digits_run, tmp_path):
    module, ckpt = digits_run
    out = tmp_path / "student"
    record = run_sample(str(ckpt), "--output", str(out), "--prompt", SEVEN, "--prompt", THREE, "-n", "3",
                        "--seed", "5")
    assert record["prompts"] == [SEVEN, THREE] and record["samples_per_prompt"] == 3
    assert record["source"]["kind"] == "checkpoint" and record["source"]["ema"] is True
    assert record["source"]["config"] == str(ckpt.parent.parent / "config.yaml")  # found near the checkpoint
    assert record["sampling"]["student_timesteps"] == module.student_timesteps
    assert record["command"].startswith(f"dmdx sample {ckpt}")
    assert record["images"][0] == [f"000_a-handwritten-digit-seven_seed{s}.png" for s in (5, 6, 7)]
    got = files(record, out)
    # the student's own sampler (EMA weights) on the noise of seeds 5, 6, 7, one row per prompt
    teacher = module.teacher
    for row, prompt in zip(got, (SEVEN, THREE)):
        cond = teacher.encode_prompts([prompt] * 3)
        images = teacher.decode(module.sample(cond, fixed_noise(teacher.latent_shape(3), [5, 6, 7]),
                                              generator=torch.Generator().manual_seed(5)))
        for a, b in zip(row, expected(images)):
            assert a.shape == (8, 8) and np.abs(a - b).max() <= 1
    assert not np.array_equal(got[0][0], got[1][0])  # other prompt, other digit
    with Image.open(out / GRID) as grid:  # 2 rows x 3 columns of 64 px cells after the prompt column
        assert grid.mode == "RGB" and grid.width > 3 * 64 and grid.height > 2 * 64
    assert sorted(p.name for p in out.iterdir()) == sorted([GRID, SAMPLE_INFO, *sum(record["images"], [])])

    raw = run_sample(str(ckpt.parent.parent), "--output", str(tmp_path / "raw"), "--prompt", SEVEN, "-n", "3",
                     "--seed", "5", "--no-ema")  # the run folder names its last checkpoint
    assert raw["source"]["ema"] is False and raw["source"]["checkpoint"] == str(ckpt)
    cond = teacher.encode_prompts([SEVEN] * 3)
    images = teacher.decode(module.sample(cond, fixed_noise(teacher.latent_shape(3), [5, 6, 7]), use_ema=False,
                                          generator=torch.Generator().manual_seed(5)))
    raw_files = files(raw, tmp_path / "raw")[0]
    assert all(np.abs(a - b).max() <= 1 for a, b in zip(raw_files, expected(images)))
    assert any(not np.array_equal(a, b) for a, b in zip(raw_files, got[0]))  # EMA and raw weights differ


def test_sample_the_digits_teacher_side_by_side(digits_run, tmp_path):
    module, ckpt = digits_run
    record = run_sample(str(ckpt), "--teacher", "--output", str(tmp_path / "t"), "--prompt", SEVEN, "-n", "2",
                        "--seed", "5", "--steps", "4", "--cfg", "1.5")
    assert record["source"]["kind"] == "teacher" and record["sampling"] == {
        "sampler": "teacher ODE", "steps": 4, "cfg_scale": 1.5}
    teacher = module.teacher
    with torch.no_grad():
        ode = teacher.sample_ode(fixed_noise(teacher.latent_shape(2), [5, 6]), teacher.encode_prompts([SEVEN] * 2),
                                 4, 1.5)
    got = files(record, tmp_path / "t")[0]
    assert all(np.abs(a - b).max() <= 1 for a, b in zip(got, expected(teacher.decode(ode))))

    # from an experiment config, no checkpoint: its sampler settings and example prompts
    record = run_sample(str(ROOT / "configs" / "quickstart" / "adm.yaml"), "--teacher", "--output",
                        str(tmp_path / "q"), "-n", "1", "--steps", "2")
    assert record["prompts"] == list(DIGIT_PROMPTS) and len(record["images"]) == 10
    assert record["sampling"] == {"sampler": "teacher ODE", "steps": 2, "cfg_scale": 2.0}  # the config's CFG


def test_digits_export_round_trip(digits_run, tmp_path, capsys):
    """`dmdx export` of a digits checkpoint: a safetensors student that load_export and `dmdx sample`
    read back, giving the checkpoint's samples."""
    module, ckpt = digits_run
    out = tmp_path / "export"
    dmdx(["export", "--ckpt_path", str(ckpt), "--output", str(out)])  # safetensors: the family's default
    assert "load_export" in capsys.readouterr().out
    info = json.loads((out / EXPORT_INFO).read_text())
    assert info["format"] == "safetensors" and info["weights"] == "student.safetensors" and info["ema"]
    assert info["teacher_class"] == "dmdx_lightning.teachers.digits.DigitsTeacher"
    assert info["latent_shape"] == [1, 8, 8] and info["example_prompts"] == list(DIGIT_PROMPTS)
    teacher, timesteps = load_export(out)
    assert timesteps == module.student_timesteps and teacher.build_roles == ("student",)
    noise = fixed_noise(teacher.latent_shape(4), range(4))
    cond = teacher.encode_prompts([SEVEN, THREE] * 2)
    with torch.no_grad():
        loaded = teacher.sample_student(noise, cond, timesteps, generator=torch.Generator().manual_seed(0))
    trained = module.sample(module.teacher.encode_prompts([SEVEN, THREE] * 2), noise,
                            generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded, trained, rtol=0, atol=0)

    a = run_sample(str(out), "--output", str(tmp_path / "from_export"), "--prompt", SEVEN, "-n", "2")
    b = run_sample(str(ckpt), "--output", str(tmp_path / "from_ckpt"), "--prompt", SEVEN, "-n", "2")
    assert a["source"]["kind"] == "safetensors export"
    for x, y in zip(files(a, tmp_path / "from_export")[0], files(b, tmp_path / "from_ckpt")[0]):
        assert np.array_equal(x, y)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_mixture_export_round_trip(mode, tmp_path):
    """The exported student (lora: merged into its base) is the trained one: same samples."""
    from dmdx_lightning.teachers.mixture import MixtureTeacher

    tiny = dict(shape=(2, 4, 4), num_classes=3, modes_per_class=4, std=0.3, channels=8, num_blocks=2,
                offset_gain=5.0, sample_steps=8, mode=mode, lora_rank=4)
    torch.manual_seed(0)
    teacher = MixtureTeacher(**tiny, build_roles=["student"])
    with torch.no_grad():  # a student away from the teacher (lora: its B matrices start at zero)
        g = torch.Generator().manual_seed(1)
        for p in teacher.trainable_parameters("student"):
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    prompts = ["mixture class 0", "mixture class 2", "mixture class 1"]
    noise, timesteps = fixed_noise(teacher.latent_shape(3), [0, 1, 2]), [1.0, 0.5]

    def draw(t):
        with torch.no_grad():
            return t.sample_student(noise, t.encode_prompts(prompts), timesteps,
                                    generator=torch.Generator().manual_seed(3))

    before = draw(teacher)
    with torch.no_grad():
        exact = MixtureTeacher(**{**tiny, "mode": "full"}).sample_student(
            noise, teacher.encode_prompts(prompts), timesteps, generator=torch.Generator().manual_seed(3),
            role="real")
    assert (before - exact).abs().max() > 1e-3  # the check can fail: the exact teacher samples otherwise
    info = export(teacher, timesteps, tmp_path)
    assert info["format"] == "safetensors" and info["teacher_init_args"]["shape"] == [2, 4, 4]
    loaded, loaded_times = load_export(tmp_path)
    assert loaded.mode == "full" and loaded_times == timesteps
    torch.testing.assert_close(draw(loaded), before, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ errors
def error_of(*argv: str, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        dmdx(list(argv))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "DMDX_DEBUG=1" in err
    return err


def test_errors_say_what_is_missing(digits_run, tmp_path, capsys):
    module, ckpt = digits_run
    missing = tmp_path / "runs" / "nothing" / "last.ckpt"
    for verb in (["sample", str(missing)], ["export", "--ckpt_path", str(missing)]):
        err = error_of(*verb, "--output", str(tmp_path / "o"), capsys=capsys)
        assert f"{missing} does not exist" in err and "config.yaml" not in err, err  # the checkpoint, not its config

    lonely = tmp_path / "lonely" / "deep" / "x.ckpt"  # a checkpoint away from its run's config.yaml
    lonely.parent.mkdir(parents=True)
    lonely.write_bytes(ckpt.read_bytes())
    for verb in (["sample", str(lonely)], ["export", "--ckpt_path", str(lonely)]):
        err = error_of(*verb, "--output", str(tmp_path / "o"), capsys=capsys)
        assert "no config.yaml found" in err and "--config" in err
    err = error_of("sample", str(lonely), "--config", str(tmp_path / "nope.yaml"), "--output", str(tmp_path / "o"),
                   capsys=capsys)
    assert f"--config {tmp_path / 'nope.yaml'} does not exist" in err

    broken = tmp_path / "broken" / "last.ckpt"  # a truncated checkpoint next to a good config
    broken.parent.mkdir()
    (broken.parent / "config.yaml").write_text((ckpt.parent.parent / "config.yaml").read_text())
    broken.write_bytes(ckpt.read_bytes()[:1000])
    err = error_of("sample", str(broken), "--output", str(tmp_path / "o"), capsys=capsys)
    assert f"could not read the student from checkpoint {broken}" in err

    err = error_of("sample", str(ckpt), "--prompts", str(tmp_path / "prompts.txt"), "--output", str(tmp_path / "o"),
                   capsys=capsys)
    assert f"prompt file {tmp_path / 'prompts.txt'} (--prompts) not found" in err
    (tmp_path / "prompts.md").write_text("a handwritten digit one\n")
    err = error_of("sample", str(ckpt), "--prompts", str(tmp_path / "prompts.md"), "--output", str(tmp_path / "o"),
                   capsys=capsys)
    assert "unsupported extension '.md'" in err
    (tmp_path / "prompts.txt").write_text("# digits\na handwritten digit one\na cat\n")
    err = error_of("sample", str(ckpt), "--prompts", str(tmp_path / "prompts.txt"), "--output", str(tmp_path / "o"),
                   capsys=capsys)
    assert "cannot read prompt 'a cat'" in err
    assert not (tmp_path / "o").exists()  # nothing was written: the prompts are read before sampling

    err = error_of("sample", str(ROOT / "configs" / "quickstart" / "adm.yaml"), "--output", str(tmp_path / "o"),
                   capsys=capsys)
    assert "holds no student weights" in err and "--teacher" in err
    err = error_of("sample", str(ckpt), "--cfg", "2", "--output", str(tmp_path / "o"), capsys=capsys)
    assert "without guidance" in err
    err = error_of("sample", str(tmp_path), "--output", str(tmp_path / "o"), capsys=capsys)
    assert "is a folder without checkpoints/last.ckpt or last.ckpt" in err
    err = error_of("export", "--ckpt_path", str(ckpt), "--format", "pipeline", "--output", str(tmp_path / "o"),
                   capsys=capsys)
    assert "'digits'" in err and "no diffusers pipeline export" in err and "--format safetensors" in err
    bad = tmp_path / "bad.yaml"
    config = digits_config()
    config["model"]["init_args"]["teacher"]["init_args"]["sample_stepz"] = 3
    bad.write_text(yaml.safe_dump(config))
    err = error_of("sample", str(bad), "--teacher", "--output", str(tmp_path / "o"), capsys=capsys)
    assert f"{bad}: model.init_args.teacher.init_args.sample_stepz: DigitsTeacher has no option" in err
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / EXPORT_INFO).write_text(json.dumps({"format": "safetensors"}))
    err = error_of("sample", str(tmp_path / "half"), "--output", str(tmp_path / "o"), capsys=capsys)
    assert "lacks teacher_class, teacher_init_args, weights, student_timesteps" in err


def test_errors_in_a_fresh_process_and_with_dmdx_debug(tmp_path):
    missing = str(tmp_path / "last.ckpt")
    cmd = [sys.executable, "-m", "dmdx_lightning.cli", "sample", missing, "--output", str(tmp_path / "o")]
    quiet = subprocess.run(cmd, cwd=ROOT, env=dmdx_env(), capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr
    assert f"dmdx sample: error: SOURCE {missing} does not exist" in quiet.stderr
    loud = subprocess.run(cmd, cwd=ROOT, env={**dmdx_env(), "DMDX_DEBUG": "1"}, capture_output=True, text=True,
                          timeout=120)
    assert loud.returncode != 0 and "Traceback" in loud.stderr and "FileNotFoundError" in loud.stderr


# ------------------------------------------------------------------------------------ SD3: checkpoint and pipeline
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_sd3_checkpoint_and_its_exports_sample_alike(mode, tiny_sd3_dir, tmp_path):
    """A tiny SD3 run's checkpoint through our sampler, and its `dmdx export` folders through
    diffusers' StableDiffusion3Pipeline (lora: the teacher's pipeline with the adapter and the
    exported scheduler): the same pictures for the same seeds."""
    from tests.test_export import PROMPTS, train_run

    run = tmp_path / "run"
    run.mkdir()
    module, ckpt = train_run(run, tiny_sd3_dir, mode, 3)
    common = ["--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "-n", "2", "--seed", "3"]
    ours = run_sample(str(ckpt), "--output", str(tmp_path / "ckpt"), *common)
    a = files(ours, tmp_path / "ckpt")
    assert a[0][0].shape == (16, 16, 3) and not np.array_equal(a[0][0], a[0][1])  # other seed, other picture

    for fmt in ("pipeline", "lora") if mode == "lora" else ("pipeline",):
        dmdx(["export", "--ckpt_path", str(ckpt), "--output", str(tmp_path / fmt), "--format", fmt])
        info = json.loads((tmp_path / fmt / EXPORT_INFO).read_text())
        assert info["call"]["max_sequence_length"] == 16  # not the pipeline default (256): in the call
        assert info["torch_dtype"] == "float32" and info["latent_shape"] == [4, 8, 8]
        theirs = run_sample(str(tmp_path / fmt), "--output", str(tmp_path / f"from_{fmt}"), *common)
        assert theirs["source"]["kind"] == f"{fmt} export"
        assert theirs["sampling"]["sampler"] == "diffusers StableDiffusion3Pipeline"
        for row_a, row_b in zip(a, files(theirs, tmp_path / f"from_{fmt}")):
            for x, y in zip(row_a, row_b):
                assert np.abs(x - y).max() <= 1, (fmt, np.abs(x - y).max())

    teacher = run_sample(str(tmp_path / "pipeline"), "--teacher", "--steps", "2", "--output", str(tmp_path / "t"),
                         *common)  # the export names its run's config: the teacher beside the student
    assert teacher["source"]["config"] == str(run / "config.yaml") and teacher["sampling"]["steps"] == 2
    assert not np.array_equal(files(teacher, tmp_path / "t")[0][0], a[0][0])
    if mode == "full":  # a plain diffusers folder (the teacher's own) samples with the pipeline's defaults
        plain = run_sample(str(tiny_sd3_dir), "--steps", "2", "--prompt", PROMPTS[0], "-n", "1", "--output",
                           str(tmp_path / "plain"))
        assert plain["source"]["kind"] == "diffusers folder" and plain["sampling"]["call"] == {"num_inference_steps": 2}
        assert pixels(tmp_path / "plain" / plain["images"][0][0]).shape == (16, 16, 3)


# ------------------------------------------------------------------------------------ video
@pytest.mark.slow
def test_video_teacher_writes_gif_and_mp4(tiny_cogvideox_dir, tmp_path):
    from tests.test_cogvideox_adm import run_config

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(run_config(tiny_cogvideox_dir)))
    record = run_sample(str(config), "--teacher", "--steps", "2", "--prompt", "waves on a beach", "-n", "2",
                        "--output", str(tmp_path / "v"), "--fps", "4")
    videos = record["videos"][0]
    assert [v["gif"] for v in videos] == ["000_waves-on-a-beach_seed0.gif", "000_waves-on-a-beach_seed1.gif"]
    for v in videos:
        with Image.open(tmp_path / "v" / v["gif"]) as gif:
            assert gif.n_frames == 9 and gif.size == (32, 32)
    assert pixels(tmp_path / "v" / record["images"][0][0]).shape == (32, 32, 3)  # the middle frame
    if importlib.util.find_spec("av") is None:
        assert "mp4" not in videos[0] and "PyAV" in record["mp4"]
    else:
        import av

        with av.open(str(tmp_path / "v" / videos[0]["mp4"])) as container:
            assert sum(1 for _ in container.decode(video=0)) == 9

    # a pipeline export (the student as built: the teacher's weights) through CogVideoXPipeline
    teacher, timesteps = build_teacher(config)
    export(teacher, timesteps, tmp_path / "pipeline", "pipeline")
    record = run_sample(str(tmp_path / "pipeline"), "--prompt", "waves on a beach", "-n", "1", "--output",
                        str(tmp_path / "p"))
    assert record["sampling"]["call"]["num_frames"] == 9 and record["sampling"]["call"]["max_sequence_length"] == 8
    with Image.open(tmp_path / "p" / record["videos"][0][0]["gif"]) as gif:
        assert gif.n_frames == 9 and gif.size == (32, 32)
    student, _ = build_teacher(config)
    with torch.no_grad():
        video = student.decode(student.sample_student(fixed_noise(student.latent_shape(1), [0]),
                                                      student.encode_prompts(["waves on a beach"]), timesteps,
                                                      generator=torch.Generator().manual_seed(0)))
    middle = np.asarray(to_pil(video[0][:, 4])).astype(int)
    assert np.abs(pixels(tmp_path / "p" / record["images"][0][0]) - middle).max() <= 1
