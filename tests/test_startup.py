"""`dmdx --help` and the light verbs' help answer without importing Lightning, torch or diffusers.

Importing Lightning takes seconds (benchmarks/results/startup.md); a user asking for help, or for a
verb that needs no Trainer, should not wait for it. Each case runs in a fresh interpreter, because
this test process has long imported everything.
"""

from pathlib import Path

import pytest

from dmdx_lightning.cli import LIGHT_VERBS
from tests.helpers import HEAVY_PACKAGES, dmdx_in_fresh_interpreter

ROOT = Path(__file__).resolve().parent.parent
def imports_of(*argv: str) -> tuple[int, set[str], str]:
    """(exit code, top-level packages imported, stdout) of ``dmdx ARGV`` in a fresh interpreter."""
    return dmdx_in_fresh_interpreter(*argv)


@pytest.mark.parametrize("argv", [(), ("--help",), ("-h",)] + [(v, "--help") for v in sorted(LIGHT_VERBS)],
                         ids=lambda argv: " ".join(argv) or "no-args")
def test_help_imports_no_heavy_library(argv):
    code, modules, stdout = imports_of(*argv)
    assert code == 0 and stdout.strip(), stdout
    assert "dmdx_lightning.cli" in modules  # the probe sees what the command imported
    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY_PACKAGES)
    assert not heavy, f"`dmdx {' '.join(argv)}` imported {heavy[:8]}{' ...' if len(heavy) > 8 else ''}"


def test_startup_report_reads_the_ratios():
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmarks_startup", ROOT / "benchmarks" / "startup.py")
    startup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(startup)
    result = {"yardstick": "import lightning.pytorch", "pairs": 3,
              "machine": {"cpu_count": 2, "processor": "cpu", "platform": "linux", "python": "3.11",
                          "lightning": "2.6", "torch": "2.9", "load_average_1min": 1.0},
              "commands": {"yardstick": {"wall_s": 10.0, "cpu_s": 6.0},
                           "dmdx --help": {"wall_s": 0.1, "cpu_s": 0.05, "wall_ratio": 0.01, "cpu_ratio": 0.008},
                           "dmdx export --help": {"wall_s": 6.0, "cpu_s": 4.0, "wall_ratio": 0.6, "cpu_ratio": 0.66}}}
    text = startup.report(result, ["--pairs", "3"])
    assert "Command: `python benchmarks/startup.py --pairs 3`" in text and "2-core CPU" in text
    assert "| `dmdx --help` | 0.100 | 0.050 | 0.0100 | 0.0080 |" in text
    assert "Largest wall ratio: 0.6000 (over the target of 0.5)." in text
    assert [name for name, _ in startup.commands()][0] == "dmdx --help"
