"""Every YAML in configs/ is parsed and instantiated through the real CLI (no training)."""

from pathlib import Path

import pytest
import torch

from dmdx_lightning.cli import DMDXCLI

ROOT = Path(__file__).resolve().parent.parent
# configs that need hub weights substitute a tiny teacher via extra args (see the SD3 tests)
OVERRIDES: dict[str, list[str]] = {}
# configs that train on ODE pairs read a small pair set written here instead of the quickstart's
PAIR_CONFIGS = {"quickstart/adp.yaml"}


def write_tiny_pairs(directory, num_pairs=64, latent_shape=(1, 8, 8)):
    """A valid pair directory (random latents) written with the real writer helpers."""
    from dmdx_lightning.data.ode_pairs import FORMAT, SEED_RULE, write_manifest, write_shard

    header = {"format": FORMAT, "teacher_family": "digits", "teacher_id": "digits",
              "latent_shape": list(latent_shape), "dtype": "float32", "sampler": "test", "num_steps": 1,
              "cfg_scale": 1.0, "seed_rule": SEED_RULE, "seed": 0, "num_pairs": num_pairs,
              "shard_size": num_pairs, "prompts_sha256": ""}
    x = torch.randn(num_pairs, *latent_shape)
    entry = write_shard(directory, 0, x, x.clone(), torch.arange(num_pairs), ["the digit 3"] * num_pairs)
    write_manifest(directory, header, {0: entry})
    return directory
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "trainer" not in p.parts)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_config_instantiates(config, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    name = str(config.relative_to(ROOT / "configs"))
    extra = list(OVERRIDES.get(name, []))
    if name in PAIR_CONFIGS:
        extra += ["--data.init_args.path", str(write_tiny_pairs(tmp_path / "pairs"))]
    cli = DMDXCLI(args=["--config", str(config), *extra,
                        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false"],
                  run=False)
    assert cli.model is not None and cli.trainer is not None
    if cli.datamodule is not None:
        cli.datamodule.setup("fit")
