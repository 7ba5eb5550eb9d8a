"""Training metrics: one JSON object per line in ``metrics.jsonl``, and a plot of a run's curves."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Appends metric records to ``folder/metrics.jsonl``; on resume, drops records after the step
    resumed from, so the log matches the weights."""

    def __init__(self, folder: str | Path, resume_step: int = 0) -> None:
        self.path = Path(folder) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step] if resume_step else []
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (or of the run folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(
    runs: str | Path | dict[str, str | Path],
    keys: Sequence[str] = ("loss", "lr"),
    smooth: int = 1,
    log_y: Sequence[str] = ("loss",),
) -> plt.Figure:
    """Curves of ``keys`` against the step, one panel per key, for one run folder or a dict
    ``{label: folder}`` of runs; ``smooth`` > 1 adds a moving average over that many records."""
    runs = {Path(runs).name: runs} if not isinstance(runs, dict) else runs
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
    for label, folder in runs.items():
        records = read_metrics(folder)
        if not records:
            raise ValueError(f"no metrics in {folder!r} (expected {METRICS_FILE})")
        for ax, key in zip(axes[0], keys, strict=True):
            points = [(r["step"], r[key]) for r in records if key in r]
            if not points:
                continue
            steps, values = map(np.asarray, zip(*points, strict=True))
            line = ax.plot(
                steps, values, alpha=0.35 if smooth > 1 else 1.0, label=None if smooth > 1 else label
            )
            if smooth > 1 and len(values) >= smooth:
                kernel = np.ones(smooth) / smooth
                ax.plot(
                    steps[smooth - 1 :],
                    np.convolve(values, kernel, "valid"),
                    color=line[0].get_color(),
                    label=label,
                )
    for ax, key in zip(axes[0], keys, strict=True):
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(key)
        ax.set_title(key)
        if key in log_y:
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
