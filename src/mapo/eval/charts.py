"""PNG charts of an evaluation: accuracy per condition, per breakdown group, and against training step."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mapo.report import CONDITION_LABELS



def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def condition_chart(summary: Mapping[str, Any], path: Path) -> Path:
    """Bars of overall accuracy (%) per condition: benchmark matching and strict matching side by side."""
    plt = _pyplot()
    order = summary["conditions"]
    x = np.arange(len(order))
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(order), 3.5))
    for offset, key, label in ((-0.2, "accuracy", "benchmark matching"), (0.2, "accuracy_strict", "strict")):
        values = [100 * summary["by_condition"][c]["overall"][key] for c in order]
        bars = ax.bar(x + offset, values, width=0.4, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize="small")
    ax.set_xticks(x, [CONDITION_LABELS.get(c, c) for c in order])
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"{summary['benchmark']}: accuracy by condition")
    ax.legend(fontsize="small")
    return _save(fig, path)


def breakdown_chart(summary: Mapping[str, Any], name: str, path: Path) -> Path:
    """Horizontal bars of accuracy (%) per group of one breakdown, one bar per condition."""
    plt = _pyplot()
    order = summary["conditions"]
    groups = list(summary["by_condition"][order[0]]["breakdowns"][name])
    y = np.arange(len(groups))
    height = 0.8 / len(order)
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.35 * len(groups) * max(1, len(order) / 2)))
    for k, condition in enumerate(order):
        cells = summary["by_condition"][condition]["breakdowns"][name]
        ax.barh(y + (k - (len(order) - 1) / 2) * height, [100 * cells[g]["accuracy"] for g in groups],
                height=height, label=CONDITION_LABELS.get(condition, condition))
    ax.set_yticks(y, [f"{g} (n={summary['by_condition'][order[0]]['breakdowns'][name][g]['n']})" for g in groups],
                  fontsize="small")
    ax.invert_yaxis()
    ax.set_xlabel("accuracy (%)")
    ax.set_xlim(0, 100)
    ax.set_title(f"{summary['benchmark']}: accuracy by {name}")
    ax.legend(fontsize="small")
    return _save(fig, path)


def step_chart(steps: Sequence[int], series: Mapping[str, Sequence[float | None]], path: Path, title: str) -> Path:
    """Accuracy (%) against training step, one line per series (None = not evaluated)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, values in series.items():
        ax.plot(steps, [np.nan if v is None else 100 * v for v in values], marker="o", label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)
