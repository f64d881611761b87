"""Shared by the benchmark scripts: timing with warm-up and medians, a printed table, a JSON file."""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def arguments(
    doc: str, *, repeat: int | None = None, model: bool = False, dtype: str = "auto"
) -> argparse.ArgumentParser:
    """A benchmark's command line: its docstring's first line, and the options every benchmark of its kind shares."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    if repeat is not None:
        parser.add_argument("--repeat", type=int, default=repeat, help="timed runs after one warm-up")
    if model:
        parser.add_argument("--device", default="cpu")
        parser.add_argument("--dtype", default=dtype)
    return parser


def timeit(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> dict:
    """Run `fn` `warmup` times untimed, then `repeat` times; seconds as median, min and all runs."""
    return timeit_in_turns({"": fn}, repeat, warmup)[""]


def timeit_in_turns(fns: dict[str, Callable[[], object]], repeat: int = 5, warmup: int = 1) -> dict[str, dict]:
    """`timeit` for several functions run in turns (a, b, a, b, ...): a shared machine's slow spells fall on each
    alike, so their ratios stay fair. Returns each name's timing."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(r), "min_s": min(r), "runs_s": r} for name, r in runs.items()}


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def machine() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def report(name: str, rows: list[dict], columns: list[str], extra: dict | None = None) -> Path:
    """Print `rows` as a table and write them, with the machine, to benchmarks/results/NAME.json."""
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(_fmt(row.get(c)).ljust(w) for c, w in zip(columns, widths)))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), "rows": rows, **(extra or {})}, indent=2))
    print(f"\nwrote {path}")
    return path


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "" if value is None else str(value)
