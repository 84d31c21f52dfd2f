"""Video in the callbacks, on the tiny CogVideoX teacher: sample videos written and read back with the
right frame count, CLIP score averaged over frames, LPIPS diversity over aligned frames."""

import sys

import lightning.pytorch as pl
import pytest
import torch
from PIL import Image

from dmdx_lightning.callbacks.metrics import CLIPScoreCallback, LPIPSDiversityCallback, load_clip, sample_images
from dmdx_lightning.callbacks.samples import SampleGrid, to_grid, video_frames, write_video
from dmdx_lightning.methods.adm import ADMModule
from dmdx_lightning.teachers.cogvideox import CogVideoXTeacher
from tests.conftest import TINY_COGVIDEOX, prompt_loader
from tests.test_metrics import save_tiny_clip

PROMPTS = ["a cat playing piano", "waves on a beach"]


@pytest.fixture(scope="module")
def module(tiny_cogvideox_dir):
    torch.manual_seed(0)
    teacher = CogVideoXTeacher(str(tiny_cogvideox_dir), mode="lora", sample_steps=2, **TINY_COGVIDEOX)
    return ADMModule(teacher, loss="dmd", student_steps=2)  # any distillation module: the callbacks only sample


def validate(module, callback):
    trainer = pl.Trainer(accelerator="cpu", logger=False, callbacks=[callback], enable_progress_bar=False,
                         enable_model_summary=False)
    (metrics,) = trainer.validate(module, prompt_loader(PROMPTS, batch_size=2))
    return metrics


def test_sample_grid_writes_one_video_per_prompt_with_every_frame(module, tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    trainer = pl.Trainer(accelerator="cpu", default_root_dir=tmp_path, logger=TensorBoardLogger(tmp_path),
                         enable_progress_bar=False)
    callback = SampleGrid(prompts=PROMPTS, samples_per_prompt=2, fps=4)
    callback.setup(trainer, module, "fit")  # where a run finds its log folder (every rank)
    png = callback.draw(trainer, module)
    folder = png.parent
    for name in ("student", "teacher"):
        for i in range(len(PROMPTS)):
            with Image.open(folder / f"{name}_step0000000_p{i:02d}.gif") as gif:
                assert gif.n_frames == module.teacher.num_frames == 9
                assert gif.size == (2 * 32, 32)  # the prompt's 2 seeds side by side
        with Image.open(folder / f"{name}_step0000000.png") as grid:  # 4 rows (samples) x 9 frames
            assert grid.size == (9 * 33 + 1, 4 * 33 + 1)
    events = list(tmp_path.rglob("events.out.tfevents.*"))
    assert events and b"samples/student" in events[0].read_bytes()


def test_video_frames_and_grid_layout():
    videos = torch.linspace(-1, 1, 2 * 3 * 4 * 2 * 5).reshape(2, 3, 4, 2, 5)  # K=2, F=4, 2x5 px
    frames = video_frames(videos)
    assert frames.shape == (4, 2, 10, 3) and frames.dtype == torch.uint8
    # frame 1 of sample 1 sits right of frame 1 of sample 0
    expected = ((videos[1, :, 1].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8)
    assert torch.equal(frames[1, :, 5:], expected)
    assert to_grid(videos, nrow=1).shape == (3, 2 * 3 + 1, 4 * 6 + 1)  # rows: samples, columns: frames


def test_mp4_without_pyav_falls_back_to_gif(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` fails as if PyAV were not installed
    frames = torch.arange(3, dtype=torch.uint8).mul(80).view(3, 1, 1, 1).expand(3, 4, 4, 3).contiguous()
    with pytest.warns(UserWarning, match="PyAV"):
        path = write_video(frames, tmp_path / "v.mp4", fps=4)
    assert path.suffix == ".gif"
    with Image.open(path) as gif:
        assert gif.n_frames == 3


def test_clip_score_on_video_is_the_mean_over_frames(module, tmp_path):
    clip_dir = str(save_tiny_clip(tmp_path / "clip"))
    callback = CLIPScoreCallback(model_name_or_path=clip_dir, prompts=PROMPTS, seed=3, batch_size=2)
    logged = validate(module, callback)["val/clip_score"]
    videos = sample_images(module, PROMPTS, [3, 4], batch_size=2)
    assert videos.shape == (2, 3, 9, 32, 32)
    model, processor = load_clip(clip_dir)
    frames = ((videos.transpose(1, 2).flatten(0, 1) + 1) * 127.5).round().to(torch.uint8)
    inputs = processor(text=[p for p in PROMPTS for _ in range(9)], images=list(frames), return_tensors="pt",
                       padding=True)
    with torch.no_grad():
        out = model.model(**inputs)
    cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds)
    assert logged == pytest.approx(max(float(100 * cos.mean()), 0.0), abs=1e-3)
    # not the first frame alone (what the callback scored before video support)
    assert abs(float(100 * cos.view(2, 9)[:, 0].mean()) - logged) > 1e-3


def test_lpips_diversity_on_video_averages_aligned_frames(module):
    callback = LPIPSDiversityCallback(prompts=PROMPTS[:1], samples_per_prompt=2, pnet_rand=True, min_size=32)
    value = validate(module, callback)["val/lpips_diversity"]
    torch.manual_seed(0)
    videos = sample_images(module, PROMPTS[:1] * 2, [0, 1], 2)
    with torch.no_grad():
        per_frame = [float(callback.lpips(videos[0:1, :, f], videos[1:2, :, f])) for f in range(9)]
    assert value == pytest.approx(sum(per_frame) / 9, rel=1e-4)
    assert value > 0
