"""Rows of results, the table printed, the JSON written and the throughput plot."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Row:
    """One figure of the fast path beside the reference's, measured in the same run.

    better: "higher" (throughput) or "lower" (latency, memory); `ratio` is always the
    fast path's advantage (>1: the fast path is better)."""

    suite: str
    metric: str
    unit: str
    batch: int | None
    fast: float
    reference: float | None
    better: str = "higher"
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.reference is None or not self.reference or not self.fast:
            return None
        return self.fast / self.reference if self.better == "higher" else self.reference / self.fast

    def to_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio}


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}"


def format_table(rows: list[Row]) -> str:
    """A markdown table: suite | metric | batch | fast | reference | ratio | notes."""
    lines = ["| suite | metric | batch | fast | reference | fast/ref | notes |", "| --- " * 7 + "|"]
    for r in rows:
        notes = ", ".join(f"{k}={_num(v) if isinstance(v, float) else v}" for k, v in r.extra.items())
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
        lines.append(f"| {r.suite} | {r.metric} ({r.unit}) | {'-' if r.batch is None else r.batch} | "
                     f"{_num(r.fast)} | {_num(r.reference)} | {ratio} | {notes} |")
    return "\n".join(lines)


def write_json(path: Path, *, machine: dict, options: dict, rows: list[Row], skipped: dict[str, str],
               setup: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"machine": machine, "options": options, "setup": setup, "skipped": skipped,
            "results": [r.to_dict() for r in rows]}
    # Whole or not at all: the JSON is rewritten while a suite runs, and a run stopped from
    # outside mid-write must leave the last whole one.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def plot_throughput(path: Path, rows: list[Row], title: str) -> Path | None:
    """PNG of throughput vs batch size, fast and reference, one panel per throughput metric.
    None when matplotlib is not installed (an optional dependency)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    series: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        if r.better == "higher" and r.batch is not None:
            series.setdefault((r.suite, f"{r.metric} ({r.unit})"), []).append(r)
    series = {k: sorted(v, key=lambda r: r.batch) for k, v in series.items() if len(v) > 1}
    if not series:
        return None
    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 4), squeeze=False)
    for ax, ((suite, metric), rs) in zip(axes[0], series.items()):
        xs = [r.batch for r in rs]
        ax.plot(xs, [r.fast for r in rs], "o-", label="fast path")
        if any(r.reference is not None for r in rs):
            ax.plot(xs, [r.reference or float("nan") for r in rs], "s--", label="reference")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel(metric)
        ax.set_title(suite)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
