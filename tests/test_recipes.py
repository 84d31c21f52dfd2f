"""The recipe configs of docs/recipes.md train as shipped: DMD, DMD2 and our best ADM on the SD3, SDXL
and CogVideoX teachers, each run in this process on its tiny random teacher for two iterations
(DMD2 on pairs written first by the teacher's own ODE-pair config), with the method the header says."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from tests.test_configs import OVERRIDES

ROOT = Path(__file__).resolve().parent.parent
TEACHER = "--model.init_args.teacher.init_args."
#: CPU, one process, fp32, no validation (its metric callbacks would fetch CLIP / LPIPS networks)
TINY_RUN = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
            "--trainer.precision", "32-true", "--trainer.num_sanity_val_steps", "0",
            "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]
FIXTURES = {"{tiny_sd3}": "tiny_sd3_dir", "{tiny_sdxl}": "tiny_sdxl_dir", "{tiny_cogvideox}": "tiny_cogvideox_dir",
            "{tiny_flux}": "tiny_flux_dir", "{tiny_flux_schnell}": "tiny_flux_schnell_dir"}
FIXTURES["{tiny_wan}"] = "tiny_wan_dir"
#: recipe config -> (loss, the ODE-pair config its DMD2 run reads, or None)
RECIPES = {
    "sd3/dmd_4step.yaml": ("dmd", None),
    "sd3/dmd2_4step.yaml": ("dmd2", "sd3/ode_pairs.yaml"),
    "sd3/adm_best_4step.yaml": ("adm", None),
    "sdxl/dmd_1step.yaml": ("dmd", None),
    "sdxl/dmd_4step.yaml": ("dmd", None),
    "sdxl/dmd2_4step.yaml": ("dmd2", "sdxl/ode_pairs.yaml"),
    "sdxl/adm_best_4step.yaml": ("adm", None),
    "cogvideox/dmd_2b_8step.yaml": ("dmd", None),
    "cogvideox/dmd2_2b_8step.yaml": ("dmd2", "cogvideox/ode_pairs_2b.yaml"),
    "cogvideox/adm_best_2b_8step.yaml": ("adm", None),
    "wan/adm_1_3b_4step.yaml": ("adm", None),
    "wan/dmd2_1_3b_4step.yaml": ("dmd2", "wan/ode_pairs_1_3b.yaml"),
    "flux/adm_dev_4step.yaml": ("adm", None),
    "flux/dmd2_dev_4step.yaml": ("dmd2", "flux/ode_pairs_dev.yaml"),
    "flux/adm_schnell_2step.yaml": ("adm", None),
}


def tiny_args(name: str, request) -> list[str]:
    """The config's tiny substitutes (tests/test_configs.py), with the session's random folders."""
    args = []
    for arg in OVERRIDES[name]:
        for placeholder, fixture in FIXTURES.items():
            if placeholder in arg:
                arg = arg.replace(placeholder, str(request.getfixturevalue(fixture)))
        args.append(arg)
    return args + [TEACHER + "lora_rank", "4"]


def run(verb: str, name: str, root: Path, request, *extra: str):
    from dmdx_lightning.training_cli import DMDXCLI

    torch.manual_seed(0)
    return DMDXCLI(args=[verb, "--config", str(ROOT / "configs" / name), *tiny_args(name, request),
                         "--trainer.default_root_dir", str(root), *extra])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_config_trains_as_its_header_says(name, request, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    loss, pairs_config = RECIPES[name]
    raw = yaml.safe_load((ROOT / "configs" / name).read_text())["model"]["init_args"]
    extra = [*TINY_RUN, "--trainer.max_steps", "2"]
    if "discriminator" in raw:
        extra += ["--model.init_args.discriminator.init_args.head_channels", "8"]
    if pairs_config:  # the teacher's own pair config writes DMD2's real latents (2 ODE steps, 8 pairs)
        pairs = tmp_path / "pairs"
        run("predict", pairs_config, tmp_path / "pairs_run", request, "--model.init_args.num_steps", "2",
            "--data.init_args.output_dir", str(pairs), "--data.init_args.num_pairs", "8",
            "--data.init_args.shard_size", "4", "--data.init_args.batch_size", "4",
            "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true")
        extra += ["--data.init_args.path", str(pairs), "--data.init_args.batch_size", "2"]
    else:
        extra += ["--data.init_args.batch_size", "2"]
    module = run("fit", name, tmp_path / "run", request, *extra).model

    assert module.loss == loss and (module.discriminator is None) == (loss == "dmd")
    # 2 iterations: the generator steps in both at TTUR 1, in the first only at DMD2's TTUR 5
    assert int(module.generator_updates) == (1 if loss == "dmd2" else 2) and int(module.nonfinite_streak) == 0
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    student = [p for n, p in module.teacher.named_parameters() if "lora_B" in n and ".student" in n]
    assert student and any(p.abs().sum() > 0 for p in student)  # the generator stepped (lora_B starts at 0)
    if loss == "dmd2":  # DMD2's settings: TTUR 5, GAN head on the fake score
        assert module.update_ratio == 5 and module.discriminator.backbone_role == "fake"
        assert module.players_for_step(1) == ["fake_score", "discriminator"]
    if name.startswith("adm_best"):  # the measured arm adm_4step_skip1_paired_slowd
        lrs = {p: raw[f"{p}_optimizer"]["init_args"]["lr"] for p in ("generator", "fake_score", "discriminator")}
        assert module.variants.adm_pairing == "paired" and module.first_trained_step == 1
        assert module.update_ratio == 1 and lrs["discriminator"] < lrs["fake_score"]
        assert lrs["fake_score"] == pytest.approx(10 * lrs["generator"])
        assert lrs["discriminator"] == pytest.approx(3 * lrs["generator"])
