"""The results of several benchmarks side by side: one table (Markdown and CSV) with the published numbers next to
this run's, and a per-class IoU chart per benchmark (matplotlib, the `eval` extra)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from ..io.outputs import atomic_path
from .datasets import BENCHMARKS
from .harness import Summary

CHART = "per_class_iou.png"


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def results_table(summaries: list[Summary], label: str) -> list[list[str]]:
    """Rows of mIoU (percent): a header of benchmarks, every published method in the order first met, this run."""
    names = [s.dataset for s in summaries]
    methods: list[str] = []
    for s in summaries:
        methods += [p["method"] for p in s.published if p["method"] not in methods]
    header = ["method", *(BENCHMARKS[n].title if n in BENCHMARKS else n for n in names)]
    rows = [header]
    for method in methods:
        cells = []
        for s in summaries:
            found = [p["miou"] for p in s.published if p["method"] == method]
            cells.append(_cell(found[0] if found else None))
        rows.append([method, *cells])
    rows.append([label, *(_cell(100 * s.miou if s.images else None) for s in summaries)])
    rows.append(["images scored", *(str(s.images) for s in summaries)])
    return rows


def write_table(summaries: list[Summary], output: Path, label: str) -> tuple[Path, Path]:
    """`output/results.md` and `output/results.csv`, each written whole (temp file, then rename)."""
    rows = results_table(summaries, label)
    markdown = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    markdown += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    protocols = sorted({s.settings.get("protocol", "diffseg") for s in summaries})
    note = (
        f"\nmIoU (%), unsupervised, per-image Hungarian matching; this run under the {', '.join(protocols)} "
        "protocol. Published rows as their papers report them (see each benchmark's summary.json for sources).\n"
    )
    paths = output / "results.md", output / "results.csv"
    with atomic_path(paths[0]) as tmp:
        tmp.write_text("\n".join(markdown) + "\n" + note, encoding="utf-8")
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    with atomic_path(paths[1]) as tmp:
        tmp.write_text(buffer.getvalue(), encoding="utf-8")
    return paths


def write_chart(summary: Summary, path: Path) -> Path:
    """A horizontal bar chart of per-class IoU, sorted, classes never seen left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = sorted(
        ((iou, name) for iou, name in zip(summary.iou, summary.classes) if iou is not None), key=lambda p: p[0]
    )
    height = max(2.5, 0.22 * len(pairs) + 1.2)
    figure, axes = plt.subplots(figsize=(7, height), dpi=100)
    axes.barh(range(len(pairs)), [100 * iou for iou, _ in pairs], color="#3b7dd8")
    axes.set_yticks(range(len(pairs)), [name for _, name in pairs], fontsize=8)
    axes.set_xlim(0, 100)
    axes.set_xlabel("IoU (%)")
    title = BENCHMARKS[summary.dataset].title if summary.dataset in BENCHMARKS else summary.dataset
    axes.set_title(f"{title}: per-class IoU, mIoU {100 * summary.miou:.1f} ({summary.images} images)", fontsize=10)
    axes.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
    return path
