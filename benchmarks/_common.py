"""Helpers shared by the CPU benchmarks: machine facts, mean/std, tables, optional imports."""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from dmdx_lightning.atomic import write_json_atomic

RESULTS = Path(__file__).resolve().parent / "results"


def set_threads(threads: int | None) -> int:
    """One intra-op thread by default: the networks here are small, and on a busy 2-core machine
    two OpenMP threads fight the other processes (measured: an ADM iteration took 8x longer with
    2 threads than with 1 under a load of 8)."""
    threads = threads or 1
    torch.set_num_threads(threads)
    return threads


def machine(threads: int) -> dict[str, Any]:
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": threads,
            "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    values = [float(v) for v in values]
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Path, data: Any) -> None:
    write_json_atomic(path, data)


class Stopwatch:
    """``with Stopwatch() as sw: ...``; ``sw.seconds`` afterwards."""

    def __enter__(self) -> "Stopwatch":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start


def random_batches(module, n: int, batch: int, seed: int = 0) -> list[dict]:
    """``n`` training batches for ``module``: prompts plus random ODE-pair latents of its teacher's
    shape (``x0``, ``x_T``: what the pair data would serve; methods that read neither ignore them)."""
    g = torch.Generator().manual_seed(seed)
    shape = module.teacher.latent_shape(batch)
    return [{"prompt": [f"a photo of object number {i * batch + j}" for j in range(batch)],
             "index": torch.arange(i * batch, (i + 1) * batch),
             "x0": torch.randn(shape, generator=g), "x_T": torch.randn(shape, generator=g)} for i in range(n)]
