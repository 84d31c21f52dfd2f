"""Bad configs stop at setup: before any weight loads or any step, with one paragraph that names the
key, the value and the fix, exit status 2, no traceback, and nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

from dmdx_lightning.cli import main as dmdx
from dmdx_lightning.teachers.cogvideox import tiled_decode_size

ADM = "configs/quickstart/adm.yaml"
ADP = "configs/quickstart/adp.yaml"
SD3 = "configs/sd3/adm_4step.yaml"
SD15 = "configs/sd15/dmd_1step_full.yaml"
FLUX = "configs/flux/adm_dev_4step.yaml"
WAN = "configs/wan/adm_14b_4step.yaml"


def _file(text: str):
    """A config file of the case's own, written into the test's folder."""
    return ("file", text)


# (id, base config, extra arguments, what the message must say)
CASES = [
    ("misspelt key in a YAML file", ADM, ["--config", _file("model:\n  init_args:\n    dtt: 0.1\n")],
     "model.init_args.dtt: ADMModule has no option 'dtt'. Did you mean model.init_args.dt?"),
    ("misspelt key on the command line", ADM, ["--model.init_args.real_cfg_scal", "2"],
     "Did you mean model.init_args.real_cfg_scale?"),
    ("misspelt teacher key", ADM, ["--model.init_args.teacher.init_args.modee", "lora"],
     "DigitsTeacher has no option 'modee'. Did you mean model.init_args.teacher.init_args.mode?"),
    ("misspelt Trainer key", ADM, ["--config", _file("trainer:\n  max_step: 3\n")],
     "trainer.max_step: Trainer has no option 'max_step'. Did you mean trainer.max_steps"),
    ("misspelt Trainer key on the command line", ADM, ["--trainer.max_stepz", "3"],
     "trainer.max_stepz: Trainer has no option 'max_stepz'. Did you mean trainer.max_steps"),
    ("a study variant at its old place", ADM, ["--config", _file("model:\n  init_args:\n    adm_pairing: paired\n")],
     "It moved: use model.init_args.variants.adm_pairing"),
    ("YAML syntax error", ADM, ["--config", _file("model:\n  init_args:\n    dt: [0.1\n  x: 1\n")],
     "line 4, column 4: not valid YAML"),
    ("config file missing", ADM, ["--config", "configs/no_such.yaml"],
     "--config configs/no_such.yaml: no such file in"),
    ("value of the wrong type", ADM, ["--model.init_args.dt", "abc"], "model.init_args.dt = 'abc': expected a float"),
    ("unknown loss", ADM, ["--model.init_args.loss", "dmx"], "model.init_args.loss = 'dmx': choose one of adm | dmd | dmd2"),
    ("unknown variant value", ADM, ["--model.init_args.variants.adm_pairing", "both"],
     "model.init_args.variants.adm_pairing = 'both': choose one of independent | paired | paired_discriminator"),
    ("negative variant weight", ADM, ["--model.init_args.variants.dmd_weight", "-1"],
     "model.init_args.variants.dmd_weight = -1.0: it must be >= 0"),
    ("dt out of range", ADM, ["--model.init_args.dt", "2"], "model.init_args.dt = 2.0: the real and fake moves"),
    ("update ratio 0", ADM, ["--model.init_args.update_ratio", "0"], "model.init_args.update_ratio = 0"),
    ("t_min above t_max", ADM, ["--model.init_args.t_min", "0.9", "--model.init_args.t_max", "0.1"],
     "model.init_args.t_min / t_max = (0.9, 0.1)"),
    ("unknown t sampler", ADM, ["--model.init_args.t_sampler", "bogus"], "model.init_args.t_sampler = 'bogus': unknown density"),
    ("first trained step vs student steps", ADM, ["--model.init_args.first_trained_step", "1"],
     "model.init_args.first_trained_step = 1: the student has 1 step(s)"),
    ("student times not decreasing", ADM, ["--model.init_args.student_timesteps", "[0.5, 0.9]"],
     "model.init_args.student_timesteps = [0.5, 0.9]: must be decreasing"),
    ("EMA decay out of range", ADM, ["--model.init_args.ema_decay", "1.5"], "model.init_args.ema_decay = 1.5"),
    ("teacher mode", ADM, ["--model.init_args.teacher.init_args.mode", "half"],
     "model.init_args.teacher.init_args.mode = 'half': choose one of full | lora"),
    ("LoRA rank 0", ADM, ["--model.init_args.teacher.init_args.mode", "lora",
                          "--model.init_args.teacher.init_args.lora_rank", "0"],
     "model.init_args.teacher.init_args.lora_rank = 0"),
    ("DMD2 without real latents", ADM, ["--model.init_args.loss", "dmd2"],
     "data.class_path = 'PromptDataModule': serves batches with prompt, but the method needs x0"),
    ("regression variant without pairs", ADM, ["--model.init_args.variants.regression_weight", "1"],
     "the method needs x0, x_T"),
    ("ADP on prompts instead of pairs", ADP, ["--data", "PromptDataModule", "--data.init_args.train_file",
                                              "configs/prompts/digits.txt"], "the method needs x0, x_T"),
    ("ADP before its pairs exist", ADP, ["--data.init_args.path", "{tmp}/no_pairs"], "ODE-pair manifest"),
    ("ADP pixel weight without a pixel discriminator", ADP, ["--model.init_args.pixel_discriminator", "null"],
     "model.init_args.pixel_discriminator = None: lambda2 > 0"),
    ("ADP without any loss", ADP, ["--model.init_args.lambda1", "0", "--model.init_args.lambda2", "0"],
     "model.init_args.lambda1 / lambda2 / mse_weight = (0.0, 0.0, 0.0): all 0"),
    ("prompt file missing", ADM, ["--data.init_args.train_file", "{tmp}/prompts.txt"],
     "(data.init_args.train_file) not found"),
    ("init_from missing", ADM, ["--model.init_args.init_from", "{tmp}/adp.ckpt"],
     "model.init_args.init_from = '{tmp}/adp.ckpt': no such checkpoint. Run the stage that writes it first"),
    ("ckpt_path missing", ADM, ["--ckpt_path", "{tmp}/last.ckpt"], "ckpt_path = '{tmp}/last.ckpt': no such checkpoint"),
    ("output root is a file", ADM, ["--trainer.default_root_dir", "{tmp}/a_file/run"], "is a file, not a folder"),
    ("pipeline folder missing", SD3, ["--model.init_args.teacher.init_args.pretrained_model_name_or_path",
                                      "{tmp}/no_such_pipeline"], "pretrained_model_name_or_path = '{tmp}/no_such_pipeline': no such folder"),
    ("scheduler of another family", SD3, ["--model.init_args.teacher.init_args.pretrained_model_name_or_path",
                                          "{tmp}/sdxl_pipeline"],
     "its scheduler/ is a EulerDiscreteScheduler; SD3Teacher trains flow-matching pipelines"),
    ("UNet of another family", SD15, ["--model.init_args.teacher.init_args.pretrained_model_name_or_path",
                                      "{tmp}/sdxl_pipeline"],
     "its unet/ has addition_embed_type='text_time'; SD 1.x / 2.x UNets have none"),
    ("FLUX.1-dev guidance on a schnell transformer", FLUX, [
        "--model.init_args.teacher.init_args.pretrained_model_name_or_path", "{tmp}/schnell_pipeline"],
     "guidance = 'embedded': this transformer has no guidance embedding"),
    ("a pipeline of another class", FLUX, ["--model.init_args.teacher.init_args.pretrained_model_name_or_path",
                                           "{tmp}/wan21_pipeline"],
     "is a WanPipeline folder; FluxTeacher trains FluxPipeline folders"),
    ("Wan boundary_ratio without transformer_2", WAN, [
        "--model.init_args.teacher.init_args.pretrained_model_name_or_path", "{tmp}/half_a14b_pipeline"],
     "has no transformer_2 but boundary_ratio 0.875"),
    ("cfg_scale_2 on a one-transformer Wan", WAN, [
        "--model.init_args.teacher.init_args.pretrained_model_name_or_path", "{tmp}/wan21_pipeline",
        "--model.init_args.teacher.init_args.cfg_scale_2", "3.0"],
     "cfg_scale_2 is the guidance of a two-expert pipeline's low-noise expert"),
]


@pytest.mark.parametrize("base, extra, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config_stops_at_setup(base, extra, expected, tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    scheduler = tmp_path / "sdxl_pipeline" / "scheduler"  # an SDXL pipeline's scheduler (config files suffice)
    scheduler.mkdir(parents=True)
    (scheduler / "scheduler_config.json").write_text('{"_class_name": "EulerDiscreteScheduler", "prediction_type": "epsilon"}')
    (tmp_path / "sdxl_pipeline" / "unet").mkdir()  # and its UNet's config (SDXL's added embedding)
    (tmp_path / "sdxl_pipeline" / "unet" / "config.json").write_text('{"addition_embed_type": "text_time"}')
    (tmp_path / "schnell_pipeline" / "transformer").mkdir(parents=True)  # FLUX.1-schnell: no guidance embedding
    (tmp_path / "schnell_pipeline" / "transformer" / "config.json").write_text('{"guidance_embeds": false}')
    for name, index in (("half_a14b_pipeline", '{"_class_name": "WanPipeline", "boundary_ratio": 0.875}'),
                        ("wan21_pipeline", '{"_class_name": "WanPipeline"}')):  # Wan's model_index.json alone
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text(index)
    args = []
    for i, arg in enumerate(extra):
        if isinstance(arg, tuple):  # a config file of the case's own
            path = tmp_path / f"case_{i}.yaml"
            path.write_text(arg[1])
            arg = str(path)
        args.append(arg.replace("{tmp}", str(tmp_path)))
    root = tmp_path / "run"
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as exit:
        dmdx(["fit", "--config", base, "--trainer.default_root_dir", str(root), *args])
    err = capsys.readouterr().err
    assert exit.value.code == 2
    assert expected.replace("{tmp}", str(tmp_path)) in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 2  # the paragraph + the DMDX_DEBUG hint
    assert sorted(tmp_path.rglob("*")) == before  # nothing written: no run folder, no config.yaml


def test_table_has_at_least_twenty_cases():
    assert len(CASES) >= 20


def test_debug_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("DMDX_DEBUG", "1")
    with pytest.raises(ValueError, match="model.init_args.dt = 2.0"):
        dmdx(["fit", "--config", ADM, "--model.init_args.dt", "2"])


@pytest.mark.parametrize("latent, tile, scale, factor, expected", [
    (60, 240, 8, 1 / 6, 480),  # CogVideoX-2b/5b at 480 x 720: the tiles fit
    (90, 360, 8, 1 / 5, 720),
    (4, 8, 4, 1 / 6, 25),  # a tiny VAE whose tiles are sized for 16 px: 16 px decodes to 25
])
def test_tiled_decode_size_follows_diffusers(latent, tile, scale, factor, expected):
    assert tiled_decode_size(latent, tile, scale, factor) == expected


def test_vae_tiling_on_a_small_cogvideox_is_refused_from_its_config_files(tmp_path):
    """The config files alone (no weights) show that the tiled decode would give the wrong size."""
    import json

    from dmdx_lightning.errors import ConfigError
    from dmdx_lightning.teachers.cogvideox import CogVideoXTeacher

    for sub, config in (("vae", {"block_out_channels": [8, 8, 8], "sample_height": 32, "sample_width": 32}),
                        ("transformer", {"sample_height": 8, "sample_width": 8})):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "config.json").write_text(json.dumps(config))
    options = {"pretrained_model_name_or_path": str(tmp_path), "vae_tiling": True}
    with pytest.raises(ConfigError, match="vae_tiling = True: diffusers' tiled VAE decode of a 32 px height gives"):
        CogVideoXTeacher.check_options(options)
    CogVideoXTeacher.check_options({**options, "vae_tiling": False})
    assert Path(tmp_path / "vae" / "config.json").exists()


def test_a_config_without_optimizers_trains_with_the_defaults(tmp_path):
    """A player's optimizer left out of a config is the module's default AdamW (LightningCLI passes
    a function default on by its dotted name)."""
    config = tmp_path / "no_optimizers.yaml"
    config.write_text("model:\n  class_path: ADMModule\n  init_args: {teacher: DigitsTeacher, loss: dmd}\n"
                      "data:\n  class_path: PromptDataModule\n"
                      "  init_args: {train_file: configs/prompts/digits.txt, batch_size: 4}\n"
                      "trainer: {max_steps: 1, accelerator: cpu, logger: false, enable_checkpointing: false,\n"
                      "          enable_progress_bar: false}\n")
    from dmdx_lightning.training_cli import DMDXCLI

    cli = DMDXCLI(args=["--config", str(config), "--trainer.default_root_dir", str(tmp_path / "run")], run=False)
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 1
    assert [type(o).__name__ for o in cli.trainer.optimizers] == ["AdamW", "AdamW"]
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == 1e-5
