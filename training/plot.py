"""Loss curves from metrics.jsonl to a PNG."""

from __future__ import annotations

import json
from pathlib import Path


def plot_metrics(metrics_path: str | Path, out_png: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=False)  # files only; never needs a display
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax_loss.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax_loss.set(xlabel="step", ylabel="loss", yscale="log", title="training loss")
    ax_lr.plot([r["step"] for r in rows], [r["lr"] for r in rows])
    ax_lr.set(xlabel="step", ylabel="learning rate", title="schedule")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)
