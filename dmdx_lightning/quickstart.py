"""`make quickstart`: the main job on the built-in digits teacher, end to end on a CPU.

Runs each stage as the same ``dmdx`` command a user would type (ODE pairs -> ADP -> ADM without
ADP -> DMDX = ADM from the ADP student), each in its own folder ``<root>/<stage>`` given as
``--trainer.default_root_dir`` (the stages' configs find an earlier stage's output beside their own
folder), then prints the summary table of all stages (``<root>/summary.json``: arms ``teacher``,
``adp_1step``, ``adm_1step``, ``dmdx_1step``; each stage's own row is in ``<root>/<stage>/summary.json``).

    python -m dmdx_lightning.quickstart [ROOT]        # default runs/quickstart
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from dmdx_lightning.atomic import write_json_atomic
from dmdx_lightning.callbacks.summary import format_table
from dmdx_lightning.cli import main as dmdx

ROOT = Path("runs/quickstart")

#: (title, stage folder under the root, dmdx arguments)
STAGES: list[tuple[str, str, list[str]]] = [
    ("ODE pairs: the teacher's PF-ODE with CFG from seeded noise (finished shards are kept)", "pairs",
     ["predict", "--config", "configs/quickstart/ode_pairs.yaml"]),
    ("ADP, one-step student pre-trained adversarially on the pairs (arm adp_1step)", "adp",
     ["fit", "--config", "configs/quickstart/adp.yaml"]),
    ("ADM, one-step student from the teacher's weights (arm adm_1step)", "adm",
     ["fit", "--config", "configs/quickstart/adm.yaml"]),
    ("DMDX: ADM from the ADP student (arm dmdx_1step)", "dmdx",
     ["fit", "--config", "configs/quickstart/adm.yaml", "--config", "configs/quickstart/dmdx.yaml"]),
]


def run(stages=STAGES, root: Path | str = ROOT) -> dict:
    root = Path(root)
    summaries = [root / folder / "summary.json" for _, folder, args in stages if args[0] == "fit"]
    for path in [root / "summary.json", *summaries]:
        path.unlink(missing_ok=True)  # a fresh table: every arm below is re-measured
    for title, folder, args in stages:
        args = [*args, "--trainer.default_root_dir", str(root / folder)]
        start = time.perf_counter()
        print(f"\n=== {title}\n$ dmdx {' '.join(args)}", flush=True)
        dmdx(args)
        print(f"=== done in {time.perf_counter() - start:.0f} s", flush=True)
    summary: dict = {}
    for path in summaries:  # the teacher's row once (every stage scores it), then each stage's arm
        summary.update(json.loads(path.read_text()))
    write_json_atomic(root / "summary.json", summary)
    print(f"\nQuickstart summary ({root / 'summary.json'}):\n{format_table(summary)}")
    return summary


if __name__ == "__main__":
    run(root=sys.argv[1] if len(sys.argv) > 1 else ROOT)
    sys.exit(0)
