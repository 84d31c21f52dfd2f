"""`make quickstart`: the main job on the built-in digits teacher, end to end on a CPU.

Runs each stage as the same ``dmdx`` command a user would type, then prints the summary table
(``runs/quickstart/summary.json``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from dmdx_lightning.callbacks.summary import format_table
from dmdx_lightning.cli import main as dmdx

SUMMARY = Path("runs/quickstart/summary.json")

STAGES: list[tuple[str, list[str]]] = [
    ("ADM, one-step student from the teacher's weights",
     ["fit", "--config", "configs/quickstart/adm.yaml"]),
]


def run(stages=STAGES) -> dict:
    if SUMMARY.exists():
        SUMMARY.unlink()  # a fresh table: every arm below is re-measured
    for title, args in stages:
        start = time.perf_counter()
        print(f"\n=== {title}\n$ dmdx {' '.join(args)}", flush=True)
        dmdx(args)
        print(f"=== done in {time.perf_counter() - start:.0f} s", flush=True)
    summary = json.loads(SUMMARY.read_text())
    print(f"\nQuickstart summary ({SUMMARY}):\n{format_table(summary)}")
    return summary


if __name__ == "__main__":
    run()
    sys.exit(0)
