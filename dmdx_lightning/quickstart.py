"""`make quickstart`: the main job on the built-in digits teacher, end to end on a CPU.

Runs each stage as the same ``dmdx`` command a user would type (ODE pairs -> ADP -> ADM without
ADP -> DMDX = ADM from the ADP student), then prints the summary table
(``runs/quickstart/summary.json``: arms ``teacher``, ``adp_1step``, ``adm_1step``, ``dmdx_1step``).
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
    ("ODE pairs: the teacher's PF-ODE with CFG from seeded noise (finished shards are kept)",
     ["predict", "--config", "configs/quickstart/ode_pairs.yaml"]),
    ("ADP, one-step student pre-trained adversarially on the pairs (arm adp_1step)",
     ["fit", "--config", "configs/quickstart/adp.yaml"]),
    ("ADM, one-step student from the teacher's weights (arm adm_1step)",
     ["fit", "--config", "configs/quickstart/adm.yaml"]),
    ("DMDX: ADM from the ADP student (arm dmdx_1step)",
     ["fit", "--config", "configs/quickstart/adm.yaml", "--config", "configs/quickstart/dmdx.yaml"]),
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
