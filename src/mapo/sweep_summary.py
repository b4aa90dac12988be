"""One table of the final metrics of every run of a Hydra multirun sweep (CSV and Markdown).

A Hydra multirun directory holds one folder per run (`0/`, `1/`, ... or names set by
`hydra.sweep.subdir`), each with `.hydra/overrides.yaml` (a YAML list of "key=value" strings, the
overrides of that run) and our trainer's `metrics.jsonl` and, when the run finished,
`final_metrics.json`. A run folder is any folder holding `.hydra/overrides.yaml`, at any depth.

Final metrics of a run: the numeric values of `final_metrics.json` (nested dicts flattened with "/"),
else those of the last complete line of `metrics.jsonl` (a run stopped mid-write leaves a partial last
line, which is skipped). Status is "ok" when final metrics were found, "failed" otherwise; every run
is listed, failed ones included, with the reason in the `note` column.

Columns: run, status, one per override key (first-seen order), one per metric, note.

Metric columns: every numeric metric of any run (default); the ones named (`--metrics a,b`); or the
evaluation columns (`--eval-columns`, what `make sweep` shows): `step`, then for every split the runs
evaluated, in first-seen order, its accuracy under each condition found (audio, no_audio, shuffled) and
its flip rate, then `train_seconds`. The splits come from the runs' own metrics (keys
"<split>/<condition>/accuracy" and "<split>/flip_rate"), so a sweep over MMAU shows MMAU columns and
one over the built-in benchmark shows test / counter_prior, with no list to keep up to date.

    python -m mapo.sweep_summary SWEEP_DIR [--metrics reward/mean,eval/accuracy | --eval-columns]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

FIXED_LEADING = ("run", "status")
FIXED_TRAILING = ("note",)


def parse_overrides_file(path: Path) -> dict[str, str]:
    """Hydra's overrides.yaml -> {key: value as written}. "+key"/"++key" count as "key"; "~key" -> "~deleted".

    Raises ValueError naming the file (and entry) when it is not a YAML list of "key=value" strings.
    """
    try:
        entries = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from None
    if entries is None:
        return {}
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a YAML list of 'key=value' strings, got {type(entries).__name__}")
    overrides: dict[str, str] = {}
    for index, entry in enumerate(entries):
        if not isinstance(entry, str):
            raise ValueError(f"{path}: entry {index} is {entry!r}, expected a 'key=value' string")
        if entry.startswith("~"):
            # Deletion override: "~key" or "~key=value"; the column says the key was removed.
            overrides[entry[1:].split("=", 1)[0]] = "~deleted"
            continue
        if "=" not in entry:
            raise ValueError(f"{path}: entry {index} {entry!r} has no '='")
        key, value = entry.split("=", 1)
        overrides[key.lstrip("+")] = value
    return overrides


def _flatten_numeric(record: Mapping[str, Any], prefix: str = "") -> dict[str, float | int]:
    """Numeric leaves of a (nested) dict, keys joined with "/"; text, lists and nulls are dropped."""
    flat: dict[str, float | int] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten_numeric(value, prefix=f"{name}/"))
        elif isinstance(value, bool):
            flat[name] = int(value)
        elif isinstance(value, (int, float)):
            flat[name] = value
    return flat


def read_final_metrics(run_dir: Path) -> tuple[dict[str, float | int] | None, str]:
    """(final metrics, note) of one run; metrics is None when the run has none (a failed run).

    The note says where the metrics came from, or why there are none.
    """
    final_path = run_dir / "final_metrics.json"
    problems: list[str] = []
    if final_path.is_file():
        try:
            record = json.loads(final_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            problems.append(f"final_metrics.json unreadable (line {err.lineno}: {err.msg})")
        else:
            if isinstance(record, Mapping):
                return _flatten_numeric(record), ""
            problems.append(f"final_metrics.json holds a {type(record).__name__}, not an object")
    metrics_path = run_dir / "metrics.jsonl"
    if metrics_path.is_file():
        lines = metrics_path.read_text(encoding="utf-8").splitlines()
        # Walk back from the end: a run killed mid-write leaves a partial last line.
        for line in reversed(lines):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, Mapping):
                return _flatten_numeric(record), "; ".join([*problems, "from last line of metrics.jsonl"])
        problems.append("metrics.jsonl has no complete line")
    elif not problems:
        problems.append("no final_metrics.json or metrics.jsonl")
    return None, "; ".join(problems)


EVAL_CONDITIONS = ("audio", "no_audio", "shuffled")
_SPLIT_METRIC = re.compile(rf"^(?P<split>.+)/(?:(?P<condition>{'|'.join(EVAL_CONDITIONS)})/accuracy|flip_rate)$")


def eval_columns(finals: Sequence[Mapping[str, Any]]) -> list[str]:
    """The evaluation columns of the module docstring, from the final metrics of the runs (in order)."""
    splits: list[str] = []
    present: set[str] = set()
    for final in finals:
        for key in final:
            match = _SPLIT_METRIC.match(key)
            if match:
                present.add(key)
                if match["split"] not in splits:
                    splits.append(match["split"])
    columns = ["step"]
    for split in splits:
        columns += [key for c in EVAL_CONDITIONS if (key := f"{split}/{c}/accuracy") in present]
        columns += [key for key in (f"{split}/flip_rate",) if key in present]
    return columns + ["train_seconds"]


def _natural_key(text: str) -> list[Any]:
    """Sort key that orders "2" before "10" (Hydra numbers its run folders 0, 1, ..., 10, ...)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def find_run_dirs(sweep_dir: Path) -> list[Path]:
    """Every folder under `sweep_dir` holding `.hydra/overrides.yaml`, in natural order of their paths."""
    runs = {marker.parent.parent for marker in sweep_dir.rglob(".hydra/overrides.yaml")}
    return sorted(runs, key=lambda p: _natural_key(p.relative_to(sweep_dir).as_posix()))


def summarize_sweep(
    sweep_dir: str | Path,
    out_csv: str | Path | None = None,
    out_md: str | Path | None = None,
    metrics: Sequence[str] | None = None,
    eval_only: bool = False,
) -> list[dict[str, Any]]:
    """Summarise a Hydra multirun folder: one row per run; writes CSV and Markdown tables.

    sweep_dir: the multirun folder (e.g. multirun/2026-01-01/12-00-00).
    out_csv / out_md: default `sweep_dir/summary.csv` and `sweep_dir/summary.md`.
    metrics:   metric columns to keep (in this order); default every numeric metric of any run.
    eval_only: the evaluation columns (`eval_columns`) instead; not together with `metrics`.
    Returns the rows: {"run": folder relative to sweep_dir, "status": "ok"|"failed", <override key>: str,
    <metric>: number, "note": str}; a cell a run does not have is None.
    Raises FileNotFoundError when sweep_dir is missing or holds no run folder.
    """
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep folder not found: {sweep_dir}")
    run_dirs = find_run_dirs(sweep_dir)
    if not run_dirs:
        raise FileNotFoundError(f"no run folders (with .hydra/overrides.yaml) under {sweep_dir}")

    if eval_only and metrics is not None:
        raise ValueError("choose metric columns or the evaluation columns (eval_only), not both")
    override_cols: list[str] = []
    metric_cols: list[str] = list(metrics) if metrics is not None else []
    per_run = []
    for run_dir in run_dirs:
        overrides = parse_overrides_file(run_dir / ".hydra" / "overrides.yaml")
        final, note = read_final_metrics(run_dir)
        override_cols.extend(k for k in overrides if k not in override_cols)
        if metrics is None and not eval_only and final is not None:
            metric_cols.extend(k for k in final if k not in metric_cols)
        per_run.append((run_dir, overrides, final, note))
    if eval_only:
        metric_cols = eval_columns([final for _, _, final, _ in per_run if final is not None])

    fixed = {*FIXED_LEADING, *FIXED_TRAILING}
    clash = (set(override_cols) & set(metric_cols)) | ((set(override_cols) | set(metric_cols)) & fixed)
    if clash:
        raise ValueError(f"column names used twice (override vs metric vs fixed): {sorted(clash)}")

    rows = []
    for run_dir, overrides, final, note in per_run:
        row: dict[str, Any] = {"run": run_dir.relative_to(sweep_dir).as_posix(),
                               "status": "ok" if final is not None else "failed"}
        row.update({key: overrides.get(key) for key in override_cols})
        row.update({key: (final or {}).get(key) for key in metric_cols})
        row["note"] = note
        rows.append(row)

    columns = [*FIXED_LEADING, *override_cols, *metric_cols, *FIXED_TRAILING]
    write_csv(rows, columns, Path(out_csv) if out_csv is not None else sweep_dir / "summary.csv")
    md_path = Path(out_md) if out_md is not None else sweep_dir / "summary.md"
    md_path.write_text(to_markdown(rows, columns), encoding="utf-8")
    return rows


def write_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], path: Path) -> None:
    """CSV with full-precision numbers (repr of floats) and empty cells for None."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row.get(c) is None else row.get(c) for c in columns])


def format_cell(value: Any) -> str:
    """Markdown cell text: floats to 4 significant digits, ints as they are, None empty, "|" escaped."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def to_markdown(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub-flavoured Markdown table of `rows` (one header line, one separator, one line per row)."""
    lines = ["| " + " | ".join(format_cell(c) for c in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(format_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mapo.sweep_summary", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="Hydra multirun folder")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--metrics", default=None, help="comma-separated metric columns (default: all numeric)")
    which.add_argument("--eval-columns", action="store_true",
                       help="step, accuracy per evaluated split and condition, flip rates, train_seconds")
    args = parser.parse_args(argv)
    chosen = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    try:
        rows = summarize_sweep(args.sweep_dir, metrics=chosen, eval_only=args.eval_columns)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print((args.sweep_dir / "summary.md").read_text(encoding="utf-8"), end="")
    failed = sum(row["status"] == "failed" for row in rows)
    print(f"{len(rows)} runs ({failed} failed); wrote {args.sweep_dir / 'summary.csv'} and "
          f"{args.sweep_dir / 'summary.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
