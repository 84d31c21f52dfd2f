"""Every YAML in configs/ is parsed and instantiated through the real CLI (no training)."""

from pathlib import Path

import pytest

from dmdx_lightning.cli import DMDXCLI

ROOT = Path(__file__).resolve().parent.parent
# configs that need hub weights substitute a tiny teacher via extra args (see the SD3 tests)
OVERRIDES: dict[str, list[str]] = {}
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "trainer" not in p.parts)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_config_instantiates(config, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    name = str(config.relative_to(ROOT / "configs"))
    cli = DMDXCLI(args=["--config", str(config), *OVERRIDES.get(name, []),
                        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false"],
                  run=False)
    assert cli.model is not None and cli.trainer is not None
    if cli.datamodule is not None:
        cli.datamodule.setup("fit")
