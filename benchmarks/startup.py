"""How long `dmdx --help` and the light verbs' help take, against importing Lightning.

    python benchmarks/startup.py [--pairs 10] [--out benchmarks/results]

Issue 22's target: at most half the time of ``python -c "import lightning.pytorch"``. Each command
is timed as a whole process (start-up included): wall time, and the user + system CPU time the
operating system accounts to the finished child. Every round runs the yardstick once and then each
command once, and the ratio is taken within the round, so the ratios hold when a shared machine's
speed drifts; one round is run first and not counted. Writes ``startup.md`` and ``startup.json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dmdx_lightning.atomic import write_json_atomic  # noqa: E402 (no torch: this script must stay light)
from dmdx_lightning.cli import LIGHT_VERBS  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PYTHON = sys.executable
DMDX = str(Path(sys.executable).with_name("dmdx"))
YARDSTICK = ("import lightning.pytorch", [PYTHON, "-c", "import lightning.pytorch"])


def commands() -> list[tuple[str, list[str]]]:
    found = [("dmdx --help", [DMDX, "--help"])]
    return found + [(f"dmdx {verb} --help", [DMDX, verb, "--help"]) for verb in LIGHT_VERBS]


def run_once(argv: list[str]) -> dict[str, float]:
    """Wall and CPU seconds of one whole process (its output discarded)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {proc.returncode}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime}


def measure(pairs: int) -> dict:
    cases = commands()
    rounds = []
    for i in range(pairs + 1):  # round 0 warms the file cache and is not counted
        row = {"yardstick": run_once(YARDSTICK[1])}
        row.update({name: run_once(argv) for name, argv in cases})
        if i:
            rounds.append(row)
    result = {"yardstick": YARDSTICK[0], "pairs": pairs, "commands": {}}
    for name, _ in [("yardstick", None), *cases]:
        entry = {f"{k}_s": statistics.median(r[name][k] for r in rounds) for k in ("wall", "cpu")}
        if name != "yardstick":
            entry.update({f"{k}_ratio": statistics.median(r[name][k] / r["yardstick"][k] for r in rounds)
                          for k in ("wall", "cpu")})
        result["commands"][name] = entry
    return result


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine() -> dict:
    return {"platform": platform.platform(), "processor": cpu_model(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "lightning": metadata.version("lightning"), "torch": metadata.version("torch"),
            "load_average_1min": round(os.getloadavg()[0], 2),
            "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}


def report(result: dict, argv: list[str]) -> str:
    m = result["machine"]
    lines = [
        "# `dmdx` start-up: help and light verbs against importing Lightning",
        "",
        f"Command: `python benchmarks/startup.py{''.join(' ' + a for a in argv)}`",
        "",
        f"Machine: {m['cpu_count']}-core CPU ({m['processor']}, {m['platform']}), Python {m['python']}, "
        f"lightning {m['lightning']}, torch {m['torch']}; shared with other jobs (1-minute load average "
        f"{m['load_average_1min']} at the start), so only the ratios are meant to carry over to another machine.",
        "",
        f"Each command is a whole process, start-up included. {result['pairs']} rounds after one uncounted: "
        f"every round runs the yardstick (`python -c \"{result['yardstick']}\"`) and then each command; a ratio "
        "is taken within its round and the table gives medians. Issue 22's target: ratio at most 0.5.",
        "",
        "| command | wall s | CPU s | wall ratio | CPU ratio |",
        "|---|---|---|---|---|",
    ]
    for name, e in result["commands"].items():
        label = f"`python -c \"{result['yardstick']}\"` (yardstick)" if name == "yardstick" else f"`{name}`"
        ratios = ("1", "1") if name == "yardstick" else (f"{e['wall_ratio']:.4f}", f"{e['cpu_ratio']:.4f}")
        lines.append(f"| {label} | {e['wall_s']:.3f} | {e['cpu_s']:.3f} | {ratios[0]} | {ratios[1]} |")
    worst = max(e["wall_ratio"] for n, e in result["commands"].items() if n != "yardstick")
    lines += ["", f"Largest wall ratio: {worst:.4f} ({'within' if worst <= 0.5 else 'over'} the target of 0.5)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=10, help="counted rounds (one more runs first, uncounted)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for startup.md / startup.json")
    args = parser.parse_args(argv)
    info = machine()
    result = measure(args.pairs)
    result["machine"] = info
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "startup.json", result)
    shown = [] if args.pairs == 10 else ["--pairs", str(args.pairs)]
    (args.out / "startup.md").write_text(report(result, shown))
    print((args.out / "startup.md").read_text())
    return result


if __name__ == "__main__":
    main()
