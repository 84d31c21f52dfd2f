"""Every YAML in configs/ is parsed and instantiated through the real CLI (no training)."""

from pathlib import Path

import pytest
import torch
import yaml

from dmdx_lightning.training_cli import DMDXCLI

ROOT = Path(__file__).resolve().parent.parent
_TEACHER = "--model.init_args.teacher.init_args."
# configs that need hub weights substitute a tiny teacher via extra args; "{tiny_sd3}" is replaced
# by the session's random SD3 folder (tests/conftest.py), built only when a config asks for it
SD3_TINY = [_TEACHER + "pretrained_model_name_or_path", "{tiny_sd3}", _TEACHER + "resolution", "16",
            _TEACHER + "max_sequence_length", "16", _TEACHER + "torch_dtype", "float32"]
TINY_HEADS = ["--model.init_args.discriminator.init_args.layers", "[0, 1]"]
# the SDXL configs leave resolution to the UNet's sample_size and use block indices the tiny UNet
# also has (2 down, mid, 2 up), so only the folder and the dtype change
SDXL_TINY = [_TEACHER + "pretrained_model_name_or_path", "{tiny_sdxl}", _TEACHER + "torch_dtype", "float32"]
# the SD 1.5 configs: as SDXL's, the folder and the dtype ("{tiny_sd15}": the session's random SD 1.5 folder)
SD15_TINY = [_TEACHER + "pretrained_model_name_or_path", "{tiny_sd15}", _TEACHER + "torch_dtype", "float32"]
TINY_SAM = ["--model.init_args.pixel_discriminator.init_args.backbone.init_args.pretrained", "{tiny_sam}",
            "--model.init_args.pixel_discriminator.init_args.backbone.init_args.dtype", "float32",
            "--model.init_args.pixel_discriminator.init_args.layers", "[1, 2]"]
# "{tiny_cogvideox}": the session's random CogVideoX folder (9 frames of 32x32 px)
COGVIDEOX_TINY = [_TEACHER + "pretrained_model_name_or_path", "{tiny_cogvideox}", _TEACHER + "num_frames", "9",
                  _TEACHER + "height", "32", _TEACHER + "width", "32", _TEACHER + "max_sequence_length", "8",
                  _TEACHER + "torch_dtype", "float32",
                  # diffusers' tiled VAE assumes tiles smaller than the video: at 32 px it returns 36x34 frames
                  _TEACHER + "vae_tiling", "false"]
# "{tiny_wan}": the session's random Wan folder (9 frames of 32x32 px = 3 latent frames of 4x4, 16 UMT5 tokens)
WAN_TINY = [_TEACHER + "pretrained_model_name_or_path", "{tiny_wan}", _TEACHER + "num_frames", "9",
            _TEACHER + "height", "32", _TEACHER + "width", "32", _TEACHER + "max_sequence_length", "16",
            _TEACHER + "torch_dtype", "float32"]
# "{tiny_wan_a14b}": the session's random two-expert Wan 2.2 A14B folder (the tiny Wan's size)
WAN_A14B_TINY = [a.replace("{tiny_wan}", "{tiny_wan_a14b}") for a in WAN_TINY]
# "{tiny_flux}" / "{tiny_flux_schnell}": the session's random FLUX.1-dev / -schnell folders (16 px, 16 T5 tokens,
# 3 feature blocks)
FLUX_TINY = [_TEACHER + "pretrained_model_name_or_path", "{tiny_flux}", _TEACHER + "resolution", "16",
             _TEACHER + "max_sequence_length", "16", _TEACHER + "torch_dtype", "float32"]
FLUX_SCHNELL_TINY = [a.replace("{tiny_flux}", "{tiny_flux_schnell}") for a in FLUX_TINY]
OVERRIDES: dict[str, list[str]] = {
    "flux/adm_dev_4step.yaml": FLUX_TINY + TINY_HEADS,
    "flux/dmd2_dev_4step.yaml": FLUX_TINY + TINY_HEADS,
    "flux/ode_pairs_dev.yaml": FLUX_TINY,
    "flux/adm_schnell_2step.yaml": FLUX_SCHNELL_TINY + TINY_HEADS,
    "flux/adp_dev_4step.yaml": FLUX_TINY + TINY_HEADS + TINY_SAM,
    "cogvideox/adm_2b_8step.yaml": COGVIDEOX_TINY + TINY_HEADS,
    "cogvideox/adm_5b_8step.yaml": COGVIDEOX_TINY + TINY_HEADS,
    "sd3/adm_4step.yaml": SD3_TINY + TINY_HEADS,
    "sd3/adm_sd35_large_4step.yaml": SD3_TINY + TINY_HEADS,
    "sd3/adp_4step.yaml": SD3_TINY + TINY_HEADS + [
        "--model.init_args.pixel_discriminator.init_args.backbone.init_args.pretrained", "{tiny_sam}",
        "--model.init_args.pixel_discriminator.init_args.backbone.init_args.dtype", "float32",
        "--model.init_args.pixel_discriminator.init_args.layers", "[1, 2]"],
    "sd3/ode_pairs.yaml": SD3_TINY,
    "sdxl/ode_pairs.yaml": SDXL_TINY,
    "sdxl/adp_1step.yaml": SDXL_TINY + TINY_SAM,
    "sdxl/dmdx_1step.yaml": SDXL_TINY,
    "sdxl/adm_4step.yaml": SDXL_TINY,
    "sdxl/dmd2_1step_full.yaml": SDXL_TINY,
    "sd15/ode_pairs.yaml": SD15_TINY,
    "sd15/dmd_1step_full.yaml": SD15_TINY,
    "sd15/dmd2_1step_full.yaml": SD15_TINY,
    "sd15/adp_1step.yaml": SD15_TINY + TINY_SAM,
    "sd15/dmdx_1step.yaml": SD15_TINY,
    # docs/recipes.md: DMD, DMD2 and our best ADM beside the paper's configs, and the CogVideoX pairs
    "sd3/dmd_4step.yaml": SD3_TINY,
    "sd3/dmd2_4step.yaml": SD3_TINY + TINY_HEADS,
    "sd3/adm_best_4step.yaml": SD3_TINY + TINY_HEADS,
    "sdxl/dmd_1step.yaml": SDXL_TINY,
    "sdxl/dmd_4step.yaml": SDXL_TINY,
    "sdxl/dmd2_4step.yaml": SDXL_TINY,
    "sdxl/adm_best_4step.yaml": SDXL_TINY,
    "cogvideox/ode_pairs_2b.yaml": COGVIDEOX_TINY,
    "cogvideox/dmd_2b_8step.yaml": COGVIDEOX_TINY,
    "cogvideox/dmd2_2b_8step.yaml": COGVIDEOX_TINY + TINY_HEADS,
    "cogvideox/adm_best_2b_8step.yaml": COGVIDEOX_TINY + TINY_HEADS,
    "wan/ode_pairs_1_3b.yaml": WAN_TINY,
    "wan/adp_1_3b_4step.yaml": WAN_TINY + TINY_HEADS,
    "wan/adm_1_3b_4step.yaml": WAN_TINY + TINY_HEADS,
    "wan/dmd2_1_3b_4step.yaml": WAN_TINY + TINY_HEADS,
    "wan/adm_14b_4step.yaml": WAN_TINY + TINY_HEADS,
    "wan/adm_a14b_4step.yaml": WAN_A14B_TINY + TINY_HEADS,
}
# configs that train on ODE pairs read a small pair set written here instead of the quickstart's
PAIR_CONFIGS = {"quickstart/adp.yaml", "digits/a1.yaml", "digits/dmd2.yaml", "sd3/adp_4step.yaml", "sdxl/adp_1step.yaml",
                "sdxl/dmd2_1step_full.yaml", "mixture/adp.yaml", "mixture/a1.yaml", "mixture/dmd2.yaml", "mixture/regression.yaml",
                "sd3/dmd2_4step.yaml", "sdxl/dmd2_4step.yaml", "cogvideox/dmd2_2b_8step.yaml",
                "flux/dmd2_dev_4step.yaml", "flux/adp_dev_4step.yaml",
                "sd15/adp_1step.yaml", "sd15/dmd2_1step_full.yaml"}
PAIR_CONFIGS |= {"wan/adp_1_3b_4step.yaml", "wan/dmd2_1_3b_4step.yaml"}
#: pair sets of the mixture teacher hold its family and latent shape (the data module checks both)
MIXTURE_PAIRS = {"teacher_family": "mixture", "latent_shape": (16, 8, 8), "prompt": "mixture class 0"}


def write_tiny_pairs(directory, num_pairs=64, latent_shape=(1, 8, 8), teacher_family="digits", prompt="the digit 3"):
    """A valid pair directory (random latents) written with the real writer helpers."""
    from dmdx_lightning.data.ode_pairs import FORMAT, SEED_RULE, write_manifest, write_shard

    header = {"format": FORMAT, "teacher_family": teacher_family, "teacher_id": teacher_family,
              "latent_shape": list(latent_shape), "dtype": "float32", "sampler": "test", "num_steps": 1,
              "cfg_scale": 1.0, "seed_rule": SEED_RULE, "seed": 0, "num_pairs": num_pairs,
              "shard_size": num_pairs, "prompts_sha256": ""}
    x = torch.randn(num_pairs, *latent_shape)
    entry = write_shard(directory, 0, x, x.clone(), torch.arange(num_pairs), [prompt] * num_pairs)
    write_manifest(directory, header, {0: entry})
    return directory
# overlays: YAMLs that hold only what differs from a base config; parsed after their base
OVERLAY_BASES = {"quickstart/dmdx.yaml": "quickstart/adm.yaml", "digits/dmd.yaml": "quickstart/adm.yaml",
                 "digits/dmd2.yaml": "quickstart/adm.yaml", "digits/a1.yaml": "quickstart/adp.yaml", "mixture/regression.yaml": "mixture/adm.yaml", "mixture/dmd.yaml": "mixture/adm.yaml",
                 "mixture/dmd2.yaml": "mixture/adm.yaml", "mixture/dmdx.yaml": "mixture/adm.yaml",
                 "mixture/a1.yaml": "mixture/adp.yaml", "mixture/posterior_d.yaml": "mixture/adm.yaml"}
# eval/: `dmdx evaluate` configs, no LightningCLI model (test_packaged_configs parses them with their verb)
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if not {"trainer", "eval"} & set(p.parts))


def build_cli(config, tmp_path, request, drop=()):
    """The config through the real CLI (run=False) with its tiny substitutes, minus the ``drop`` keys."""
    name = str(config.relative_to(ROOT / "configs"))
    extra = list(OVERRIDES.get(name, []))
    for key in drop:  # options come in (key, value) pairs
        i = extra.index(key)
        del extra[i:i + 2]
    if "{tiny_sd3}" in extra:
        tiny = str(request.getfixturevalue("tiny_sd3_dir"))
        extra = [a.replace("{tiny_sd3}", tiny) for a in extra]
    if "{tiny_sdxl}" in extra:
        tiny = str(request.getfixturevalue("tiny_sdxl_dir"))
        extra = [a.replace("{tiny_sdxl}", tiny) for a in extra]
    if "{tiny_sd15}" in extra:
        tiny = str(request.getfixturevalue("tiny_sd15_dir"))
        extra = [a.replace("{tiny_sd15}", tiny) for a in extra]
    if "{tiny_cogvideox}" in extra:
        tiny = str(request.getfixturevalue("tiny_cogvideox_dir"))
        extra = [a.replace("{tiny_cogvideox}", tiny) for a in extra]
    for placeholder, fixture in (("{tiny_wan}", "tiny_wan_dir"), ("{tiny_wan_a14b}", "tiny_wan_a14b_dir"),
                                 ("{tiny_flux}", "tiny_flux_dir"), ("{tiny_flux_schnell}", "tiny_flux_schnell_dir")):
        if placeholder in extra:
            tiny = str(request.getfixturevalue(fixture))
            extra = [a.replace(placeholder, tiny) for a in extra]
    if "{tiny_sam}" in extra:
        extra = [a.replace("{tiny_sam}", request.getfixturevalue("tiny_sam_path")) for a in extra]
    if name in PAIR_CONFIGS:
        kind = MIXTURE_PAIRS if name.startswith("mixture/") else {}
        extra += ["--data.init_args.path", str(write_tiny_pairs(tmp_path / "pairs", **kind))]
    base = ["--config", str(ROOT / "configs" / OVERLAY_BASES[name])] if name in OVERLAY_BASES else []
    return DMDXCLI(args=[*base, "--config", str(config), *extra,
                         "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false"],
                   run=False)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_config_instantiates(config, monkeypatch, tmp_path, request):
    monkeypatch.chdir(ROOT)
    name = str(config.relative_to(ROOT / "configs"))
    cli = build_cli(config, tmp_path, request)
    assert cli.model is not None and cli.trainer is not None
    if cli.datamodule is not None:
        cli.datamodule.setup("fit")
    # what the run writes lies under its root (tests/test_output_root.py checks every printed config)
    for callback in cli.trainer.callbacks:
        for attr in ("dirpath", "path"):
            value = getattr(callback, attr, None)
            assert value is None or Path(value).resolve().is_relative_to(tmp_path.resolve()), (callback, value)
    if name == "quickstart/dmdx.yaml":  # the overlay's own values win over its base's
        overlay = yaml.safe_load(config.read_text())
        assert cli.trainer.max_steps == overlay["trainer"]["max_steps"]
        # derived from the run's root (the command line's): the ADP stage beside it
        assert cli.model.init_from == str(tmp_path.parent / "adp" / "checkpoints" / "last.ckpt")
        assert cli.trainer.checkpoint_callback.dirpath == str(tmp_path / "checkpoints")


def _teacher_args(config):
    model = yaml.safe_load(config.read_text()).get("model") or {}
    return ((model.get("init_args") or {}).get("teacher") or {}).get("init_args") or {}


LORA_CONFIGS = [p for p in CONFIGS if _teacher_args(p).get("mode") == "lora"]


@pytest.mark.parametrize("config", LORA_CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_lora_configs_train_fp32_adapters_on_their_frozen_dtype(config, monkeypatch, tmp_path, request):
    """Built with the config's own ``torch_dtype`` (bf16 for the SD3 configs): peft creates adapters
    in the base layer's dtype; every trainable parameter must still be fp32."""
    monkeypatch.chdir(ROOT)
    teacher = build_cli(config, tmp_path, request, drop=[_TEACHER + "torch_dtype"]).model.teacher
    frozen_dtype = getattr(torch, _teacher_args(config).get("torch_dtype", "float32"))
    keep = getattr(teacher.denoiser, "_keep_in_fp32_modules", None) or ()  # what diffusers keeps fp32 (Wan's norms)
    assert {p.dtype for n, p in teacher.denoiser.named_parameters()
            if "lora_" not in n and not set(keep) & set(n.split("."))} == {frozen_dtype}
    trainable = {n: p.dtype for n, p in teacher.named_parameters() if p.requires_grad}
    assert trainable and set(trainable.values()) == {torch.float32}, trainable


def test_fsdp_trainer_config_builds_its_strategy():
    """configs/trainer/fsdp.yaml needs GPUs to run; here its strategy block is built on its own."""
    from diffusers.models.attention import JointTransformerBlock
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import FSDPStrategy, Strategy

    raw = yaml.safe_load((ROOT / "configs" / "trainer" / "fsdp.yaml").read_text())
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(Strategy, "strategy")
    strategy = parser.instantiate(parser.parse_object({"strategy": raw["trainer"]["strategy"]})).strategy
    assert isinstance(strategy, FSDPStrategy) and strategy._state_dict_type == "full"
    assert JointTransformerBlock in strategy.kwargs["auto_wrap_policy"]._module_classes
    assert strategy.kwargs["use_orig_params"]  # frozen and trainable parameters may share the root unit
