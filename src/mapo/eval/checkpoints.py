"""Checkpoint-wise evaluation of a run: which model folders a run holds, and accuracy against step.

A run folder (TEAM paths) holds Hugging Face exports `exports/step_<6 digits>/` (written every
`trainer.export_every` steps) and `final_model/` (the final export; its step is read from
`final_metrics.json` when there). Each is evaluated into `<out>/<label>/`; the table and plot of accuracy
against step go to `<out>/accuracy_vs_step.{json,md,png}`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mapo.atomic import write_json_atomic, write_text_atomic
from mapo.report import CONDITION_LABELS

_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass(frozen=True)
class Checkpoint:
    label: str  # "step_000010" or "final_model"
    step: int | None
    path: Path


def run_checkpoints(run_dir: str | Path) -> list[Checkpoint]:
    """Every exported model folder of a run (exports by step, then final_model); raises if there is none."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: run folder not found")
    found = []
    exports = run_dir / "exports"
    if exports.is_dir():
        for folder in exports.iterdir():
            match = _STEP_DIR.match(folder.name)
            if match and (folder / "config.json").is_file():
                found.append(Checkpoint(folder.name, int(match.group(1)), folder))
    found.sort(key=lambda c: c.step)
    final = run_dir / "final_model"
    if (final / "config.json").is_file():
        step = None
        metrics = run_dir / "final_metrics.json"
        if metrics.is_file():
            try:
                step = json.loads(metrics.read_text()).get("step")
            except json.JSONDecodeError:
                step = None
        found.append(Checkpoint("final_model", step if isinstance(step, int) else None, final))
    if not found:
        raise FileNotFoundError(
            f"{run_dir}: no exported model folders (exports/step_XXXXXX/ with config.json, or final_model/); "
            "train with trainer.export_every=N to write exports"
        )
    return found


def step_table(entries: Sequence[tuple[Checkpoint, Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """One row per checkpoint: label, step, n, accuracy per condition, strict accuracy, flip rates."""
    rows = []
    for checkpoint, summary in entries:
        row: dict[str, Any] = {"checkpoint": checkpoint.label, "step": checkpoint.step, "n": summary["overall"]["n"]}
        for condition in summary["conditions"]:
            overall = summary["by_condition"][condition]["overall"]
            row[f"{condition}/accuracy"] = overall["accuracy"]
            row[f"{condition}/accuracy_strict"] = overall["accuracy_strict"]
        for condition, value in summary["flip_rate"].items():
            row[f"{condition}/flip_rate"] = value
        rows.append(row)
    return rows


def step_markdown(rows: Sequence[Mapping[str, Any]], title: str) -> str:
    columns = [c for c in rows[0] if c not in ("checkpoint", "step", "n")] if rows else []
    for row in rows[1:]:
        columns += [c for c in row if c not in columns and c not in ("checkpoint", "step", "n")]
    head = ["checkpoint", "step", "n"] + [
        f"{CONDITION_LABELS.get(c.split('/')[0], c.split('/')[0])} {c.split('/')[1].replace('_', ' ')}" for c in columns
    ]
    lines = [f"# {title}", "", "Accuracy in % (benchmark matching); flip rate as a fraction.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["checkpoint"], "–" if row["step"] is None else str(row["step"]), str(row["n"])]
        for c in columns:
            value = row.get(c)
            cells.append("–" if value is None else (f"{value:.3f}" if c.endswith("flip_rate") else f"{100 * value:.2f}"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_step_outputs(out_dir: Path, entries: Sequence[tuple[Checkpoint, Mapping[str, Any]]], title: str) -> dict[str, Path]:
    """accuracy_vs_step.json / .md / .png (the plot only for checkpoints with a step and computable accuracy)."""
    from mapo.eval.charts import step_chart

    rows = step_table(entries)
    written = {"json": out_dir / "accuracy_vs_step.json", "md": out_dir / "accuracy_vs_step.md"}
    write_json_atomic(written["json"], rows)
    write_text_atomic(written["md"], step_markdown(rows, title))
    # Exports by step; the final model too when its step is known and no export has that step.
    stepped = [r for r in rows if r["step"] is not None and r["checkpoint"] != "final_model"]
    steps = {r["step"] for r in stepped}
    stepped += [r for r in rows if r["checkpoint"] == "final_model" and r["step"] is not None and r["step"] not in steps]
    if stepped and any(v is not None for r in stepped for k, v in r.items() if k.endswith("/accuracy")):
        conditions = [k.split("/")[0] for k in stepped[0] if k.endswith("/accuracy")]
        series = {CONDITION_LABELS.get(c, c): [r.get(f"{c}/accuracy") for r in stepped] for c in conditions}
        written["png"] = step_chart([r["step"] for r in stepped], series, out_dir / "accuracy_vs_step.png", title)
    return written
