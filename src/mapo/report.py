"""End-of-run outputs: the before/after accuracy table and PNG plots of the run's curves (DESIGN §6)."""

from __future__ import annotations

import json
from pathlib import Path

CONDITION_LABELS = {"audio": "with audio", "no_audio": "audio removed", "shuffled": "audio shuffled"}


def final_table(before: dict[str, float], after: dict[str, float], splits: list[str], phase_name: str = "rl") -> str:
    """Markdown table: one row per split × condition, accuracy before and after the main phase.

    before/after: flat eval metrics as written by the trainer ("{split}/{condition}/accuracy",
    "{split}/flip_rate"); a missing entry shows as "–".
    """
    label = {"rl": "RL", "sft": "SFT"}.get(phase_name, phase_name)
    lines = [f"| split | condition | before {label} | after {label} |", "|---|---|---|---|"]

    def cell(d: dict[str, float], key: str) -> str:
        return f"{d[key]:.3f}" if key in d else "–"

    for split in splits:
        for cond, text in CONDITION_LABELS.items():
            key = f"{split}/{cond}/accuracy"
            lines.append(f"| {split} | {text} | {cell(before, key)} | {cell(after, key)} |")
        key = f"{split}/flip_rate"
        lines.append(f"| {split} | flip rate (audio removed changes the answer) | {cell(before, key)} | {cell(after, key)} |")
    return "\n".join(lines)


def read_metrics(run_dir: Path) -> list[dict]:
    """Rows of the run's metrics.jsonl; a line cut by a crash (not valid JSON, or not an object) is skipped."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def write_plots(run_dir: Path) -> dict[str, str]:
    """reward.png (reward and accuracy per step) and audio_mass.png (mass by relative position, early vs late
    training: the collapse curve). Returns {name: path} of the plots written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(run_dir) if "reward/mean" in r]
    out_dir = run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}

    def save(fig, ax, name: str, xlabel: str, ylabel: str) -> None:
        """Label, legend and grid `ax`, write `fig` to plots/<name>.png, close it and record the path."""
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written[name] = str(path)

    if rows:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        steps = [r["step"] for r in rows]
        for key in ("reward/mean", "reward/accuracy", "reward/format"):
            if key in rows[0]:
                ax.plot(steps, [r.get(key, float("nan")) for r in rows], label=key, lw=1)
        save(fig, ax, "reward", "step", "reward")
        buckets = sorted(k for k in rows[0] if k.startswith("audio_mass/q"))
        if buckets:
            half = max(1, len(rows) // 2)
            fig, ax = plt.subplots(figsize=(5, 3.5))
            for name, part in (("first half", rows[:half]), ("second half", rows[half:] or rows)):
                means = [sum(r.get(b, 0.0) for r in part) / len(part) for b in buckets]
                ax.plot(range(1, len(buckets) + 1), means, marker="o", label=name)
            save(fig, ax, "audio_mass", "relative position in the completion (quarter)", "audio attention mass")
    return written
