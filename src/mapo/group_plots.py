"""Plots of run groups (`mapo.run_groups`): small PNGs comparing settings/algorithms over seeds.

- `accuracy_bars`: one cluster per metric (e.g. test / counter_prior accuracy with audio, audio
  removed, audio shuffled), one bar per group at the mean over its runs, error bar = sample std.
- `collapse_curves`: audio attention mass against relative position in the completion (bins), one
  line per group (mean over runs, error bars = std); from collapse.json (evaluation, greedy) or from
  the training metric `audio_mass/q*` averaged over each run's last logged steps.
- `step_curves`: a training metric (e.g. `reward/mean`) against RL step, one line per group (mean over
  runs at each step, smoothed by a moving average, shaded ± std).

Every function returns the plotted numbers so callers and tests can check them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mapo.run_groups import DEFAULT_TAIL, Group, mean_std, run_metrics


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    _pyplot().close(fig)
    return path


def group_label(group: Group) -> str:
    return " / ".join(str(k) for k in group.key)


def accuracy_bars(groups: Sequence[Group], metrics: Mapping[str, str], path: str | Path,
                  title: str | None = None, tail: int = DEFAULT_TAIL) -> dict[str, list[tuple[float, float, int]]]:
    """Grouped bars: x = metrics (label shown = metrics[key]), one bar per group (mean ± std).

    Returns {group label: [(mean, std, n) per metric]}.
    """
    plt = _pyplot()
    keys = list(metrics)
    stats = {}
    for group in groups:
        per_run = [run_metrics(r, tail) for r in group.runs]
        stats[group_label(group)] = [mean_std([m[k] for m in per_run if k in m]) for k in keys]
    x = np.arange(len(keys))
    width = 0.8 / max(1, len(stats))
    fig, ax = plt.subplots(figsize=(1.4 + 1.3 * len(keys), 3.4))
    for i, (label, cells) in enumerate(stats.items()):
        means = [c[0] for c in cells]
        errs = [0.0 if np.isnan(c[1]) else c[1] for c in cells]
        ax.bar(x + (i - (len(stats) - 1) / 2) * width, means, width, yerr=errs, capsize=2, label=label)
    ax.set_xticks(x, [metrics[k] for k in keys], fontsize="small")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.05)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="x-small", ncol=2)
    if title:
        ax.set_title(title, fontsize="medium")
    _save(fig, path)
    return stats


def _run_curve(run, source: str, tail: int) -> list[float] | None:
    """Bins of one run's collapse curve: source "train" (audio_mass/q* tail means) or an eval split name."""
    if source == "train":
        metrics = run_metrics(run, tail)
        keys = sorted((k for k in metrics if k.startswith("train/audio_mass/q")), key=lambda k: int(k.rsplit("q", 1)[1]))
        return [metrics[k] for k in keys] or None
    if not run.collapse or source not in run.collapse.get("splits", {}):
        return None
    values = run.collapse["splits"][source]["audio_mass"]
    return None if any(v is None for v in values) else [float(v) for v in values]


def collapse_curves(groups: Sequence[Group], path: str | Path, source: str = "counter_prior",
                    title: str | None = None, tail: int = DEFAULT_TAIL) -> dict[str, tuple[list[float], list[float]]]:
    """Audio mass by relative-position bin, one line per group (mean over runs, error bars = std).

    source: an eval split of collapse.json ("test", "counter_prior") or "train" (the training metric
    audio_mass/q* over the last `tail` steps). Runs without the curve are left out; a group with none
    is not drawn. Returns {group label: (means [K], stds [K])}.
    """
    plt = _pyplot()
    out: dict[str, tuple[list[float], list[float]]] = {}
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    for group in groups:
        curves = [c for c in (_run_curve(r, source, tail) for r in group.runs) if c is not None]
        if not curves:
            continue
        if len({len(c) for c in curves}) != 1:
            raise ValueError(f"group {group_label(group)}: runs have different numbers of bins")
        cells = [mean_std(column) for column in zip(*curves)]
        means = [c[0] for c in cells]
        stds = [0.0 if np.isnan(c[1]) else c[1] for c in cells]
        k = len(means)
        centres = (np.arange(k) + 0.5) * 100.0 / k
        ax.errorbar(centres, means, yerr=stds, marker="o", ms=3, lw=1.2, capsize=2, label=group_label(group))
        out[group_label(group)] = (means, stds)
    ax.set_xlabel("relative position in the completion (%)")
    ax.set_ylabel("audio attention mass")
    ax.set_xlim(0, 100)
    ax.grid(alpha=0.3)
    if out:
        ax.legend(fontsize="x-small")
    ax.set_title(title or f"collapse curve ({'training, last steps' if source == 'train' else source + ', greedy'})", fontsize="medium")
    _save(fig, path)
    return out


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average (the first points average what exists so far): [len(values)]."""
    v = np.asarray(values, dtype=np.float64)
    if window <= 1 or len(v) == 0:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, len(v) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def step_curves(groups: Sequence[Group], key: str, path: str | Path, window: int = 10,
                title: str | None = None) -> dict[str, tuple[list[int], list[float], list[float]]]:
    """`key` against RL step, one line per group: mean over runs at each step (steps every run logged),
    smoothed by a trailing moving average of `window` steps, shaded ± std. Returns {label: (steps, mean, std)}."""
    plt = _pyplot()
    out: dict[str, tuple[list[int], list[float], list[float]]] = {}
    fig, ax = plt.subplots(figsize=(5.6, 3.4))
    for group in groups:
        series = [{int(r["step"]): float(r[key]) for r in run.history if key in r and "step" in r} for run in group.runs]
        series = [s for s in series if s]
        if not series:
            continue
        steps = sorted(set.intersection(*(set(s) for s in series)))
        matrix = np.array([moving_average([s[t] for t in steps], window) for s in series])  # [runs, steps]
        mean = matrix.mean(0)
        std = matrix.std(0, ddof=1) if len(series) > 1 else np.zeros_like(mean)
        line, = ax.plot(steps, mean, lw=1.2, label=group_label(group))
        ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.15, lw=0)
        out[group_label(group)] = (steps, mean.tolist(), std.tolist())
    ax.set_xlabel("RL step")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    if out:
        ax.legend(fontsize="x-small")
    if title:
        ax.set_title(title, fontsize="medium")
    _save(fig, path)
    return out


ACCURACY_PANELS = {
    "test/audio/accuracy": "test\naudio",
    "test/no_audio/accuracy": "test\nno audio",
    "counter_prior/audio/accuracy": "counter_prior\naudio",
    "counter_prior/no_audio/accuracy": "counter_prior\nno audio",
    "counter_prior/shuffled/accuracy": "counter_prior\nshuffled",
}


def write_group_plots(groups: Sequence[Group], out_dir: str | Path, prefix: str = "",
                      tail: int = DEFAULT_TAIL) -> dict[str, Path]:
    """The standard set into `out_dir`: accuracy.png, collapse_counter_prior.png, collapse_test.png,
    collapse_train.png, reward.png (each only when some run has its data). Returns {name: path}."""
    out_dir = Path(out_dir)
    written: dict[str, Path] = {}
    runs = [r for g in groups for r in g.runs]
    accuracy_bars(groups, ACCURACY_PANELS, out_dir / f"{prefix}accuracy.png", tail=tail)
    written["accuracy"] = out_dir / f"{prefix}accuracy.png"
    for split in ("counter_prior", "test"):
        if any(r.collapse and split in r.collapse.get("splits", {}) for r in runs):
            collapse_curves(groups, out_dir / f"{prefix}collapse_{split}.png", source=split, tail=tail)
            written[f"collapse_{split}"] = out_dir / f"{prefix}collapse_{split}.png"
    if any("audio_mass/q1" in row for r in runs for row in r.history):
        collapse_curves(groups, out_dir / f"{prefix}collapse_train.png", source="train", tail=tail)
        written["collapse_train"] = out_dir / f"{prefix}collapse_train.png"
    if any("reward/mean" in row for r in runs for row in r.history):
        step_curves(groups, "reward/mean", out_dir / f"{prefix}reward.png", title="reward (mean over seeds, ± std)")
        written["reward"] = out_dir / f"{prefix}reward.png"
    return written
