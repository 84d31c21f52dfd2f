"""A normal run prints no library message the user cannot act on (dmdx_lightning/quiet.py says which, and why)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dmdx_lightning.quiet import SILENCED_WARNINGS

ROOT = Path(__file__).resolve().parent.parent
DMDX = str(Path(sys.executable).with_name("dmdx"))

#: each silenced message as a run printed it (lightning 2.6.6, torch 2.14, peft 0.21, diffusers 0.42),
#: and a neighbour of it that must still be shown
SEEN = {
    r"Found \d+ module\(s\) in eval mode": (
        "Found 34 module(s) in eval mode at the start of training. This may lead to unexpected behavior during "
        "training. If this is intentional, you can ignore this warning.", None),
    "`isinstance\\(treespec, LeafSpec\\)`": (
        "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and treespec.is_leaf()` "
        "instead.", None),
    "Total length of `list`": (
        "Total length of `list` across ranks is zero. Please make sure this was your intention.",
        "Total length of `DataLoader` across ranks is zero. Please make sure this was your intention."),
    "You defined a `validation_step`": (
        "You defined a `validation_step` but have no `val_dataloader`. Skipping val loop.",
        "You passed in a `val_dataloader` but have no `validation_step`. Skipping val loop."),
    "Your `IterableDataset`": (
        "Your `IterableDataset` has `__len__` defined. In combination with multi-process data loading (when "
        "num_workers > 1), `__len__` could be inaccurate if each worker is not configured independently to avoid "
        "having duplicate data.", None),
    "Couldn't infer the batch indices": ("Couldn't infer the batch indices fetched from your dataloader: `DataLoader`",
                                         None),
    "Already found a `peft_config`": (
        "Already found a `peft_config` attribute in the model. This will lead to having multiple adapters in the "
        "model. Make sure to know what you are doing!", None),
    "There are modules in": (
        "There are modules in SD3Transformer2DModel that should be kept in float32: []. Casting directly with `to()` "
        "can lead to inconsistent results; set `torch_dtype` in `from_pretrained()` instead to keep these modules "
        "in float32.",
        "There are modules in SD3Transformer2DModel that should be kept in float32: ['norm_out']. Casting directly "
        "with `to()` can lead to inconsistent results."),
    "\N{ELECTRIC LIGHT BULB} Tip": (
        "\N{ELECTRIC LIGHT BULB} Tip: For seamless cloud logging and experiment tracking, try installing "
        "[litlogger](https://pypi.org/project/litlogger/) to enable LitLogger, which logs metrics and artifacts "
        "automatically to the Lightning Experiments platform.", "GPU available: False, used: False"),
}

#: in a fresh interpreter: install, then emit every case from its own module / logger; print what got through
EMIT = """
import builtins, json, logging, sys, warnings
warnings.simplefilter("always")  # the interpreter's defaults would hide some categories anyway
shown = []
warnings.showwarning = lambda message, *a, **k: shown.append(str(message))
logging.basicConfig(handlers=[type("H", (logging.Handler,), {"emit": lambda s, r: shown.append(r.getMessage())})()])
from dmdx_lightning import quiet
quiet.install()
for source, category, text in json.loads(sys.argv[1]):
    if category is None:
        logging.getLogger(source).warning(text)
    else:
        warnings.warn_explicit(text, getattr(builtins, category), "x.py", 1, module=source)
print(json.dumps(shown))
"""


def emit(cases: list[tuple[str, str | None, str]], env: dict | None = None) -> list[str]:
    out = subprocess.run([sys.executable, "-c", EMIT, json.dumps(cases)], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env={**os.environ, **(env or {})})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def source_module(pattern: str) -> str:
    return pattern.replace("\\", "")


def cases(which: int) -> list[tuple[str, str | None, str]]:
    found = []
    for s in SILENCED_WARNINGS:
        key = next(k for k in SEEN if re.match(k, SEEN[k][0]) and re.match(s.message, SEEN[k][0]))
        text = SEEN[key][which]
        if text is not None:
            found.append((source_module(s.source), s.category.__name__ if s.category else None, text))
    return found


def test_every_silenced_message_has_a_seen_example():
    for s in SILENCED_WARNINGS:
        assert sum(bool(re.match(s.message, seen)) for seen, _ in SEEN.values()) == 1, s.message


def test_silenced_messages_are_not_shown_and_their_neighbours_are():
    tip = SEEN["\N{ELECTRIC LIGHT BULB} Tip"][0]
    # Lightning's rank-zero infos go through fabric's logger when lightning.pytorch is not imported
    assert emit(cases(0) + [("lightning.fabric.utilities.rank_zero", None, tip)]) == []
    neighbours = cases(1)
    assert len(neighbours) == 4 and emit(neighbours) == [text for _, _, text in neighbours]


def test_dmdx_debug_shows_everything():
    assert len(emit(cases(0), env={"DMDX_DEBUG": "1"})) >= len(SILENCED_WARNINGS)


@pytest.mark.slow
def test_a_digits_run_prints_no_silenced_message(tmp_path):
    """ODE pairs (dmdx predict), then 2 DMD2 iterations on them (dmdx fit), as a user types them."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")  # the configs' relative paths; outputs go to tmp_path
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    runs = [[DMDX, "predict", "--config", "configs/quickstart/ode_pairs.yaml", "--data.init_args.num_pairs", "32",
             "--data.init_args.batch_size", "32"],
            # 2 iterations; no sample grids or summary (each runs the 16-step teacher)
            [DMDX, "fit", "--config", "configs/quickstart/adm.yaml", "--config", "configs/digits/dmd2.yaml",
             "--trainer.max_steps", "2", "--trainer.callbacks", "[]", "--data.init_args.batch_size", "8"]]
    output = ""
    for argv in runs:
        out = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        output += out.stdout + out.stderr
    assert "`Trainer.fit` stopped: `max_steps=2` reached." in output  # the run happened, and Lightning's
    assert "GPU available:" in output  # informative lines are still printed
    for s in SILENCED_WARNINGS:
        assert not re.search(s.message, output), f"shown although silenced: {s.message}\n{output[-3000:]}"
