"""Run groups: several finished runs (e.g. seeds) of the same setting and algorithm, summarised as
mean ± sample standard deviation per metric, written as Markdown and CSV.

A run folder (TEAM paths) holds `config.json` ({"config": the resolved run config, ...}),
`final_metrics.json` (flat eval metrics after the main phase), `metrics.jsonl` (one line per logged
step) and, when `mapo.collapse_curve` ran on it, `collapse.json`. A run's metrics are:

- every numeric value of final_metrics.json ("test/audio/accuracy", "counter_prior/flip_rate", …);
- derived: `gap/test_minus_counter_prior` (test minus counter_prior accuracy with audio: how much the
  policy relies on the wording; 0 for a fully grounded policy);
- training tail: `train/<key>` = mean of `<key>` over the last `tail` logged RL steps, for the keys in
  TAIL_KEYS ("reward/mean", "audio_mass/q1".."q4", …) the run logged;
- eval-time collapse curve (collapse.json): `collapse/<split>/q<k>` (mass in bin k) and
  `collapse/<split>/late_minus_early` (last bin minus first: negative when attention to the audio fades
  as the completion goes on).

Groups are keyed by config values (`--by experiment_name,algorithm`; dotted paths such as
`algo.attn.eta` work); the pseudo-key `algorithm` names the objective from the config: grpo, mapo,
mask_only (η = 0), attn_only (ω̃ ≡ 1), sft. A metric's std is the sample standard deviation
(n − 1 in the denominator); with one run it is undefined and shown as "n=1".

    python -m mapo.run_groups ROOT [ROOT ...] [--by experiment_name,algorithm] [--metrics a,b] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mapo.report import read_metrics

#: The evaluation-time collapse curve of a run folder (written by mapo.collapse_curve).
COLLAPSE_FILE = "collapse.json"

#: Columns of the default table, in order (a run lacking one leaves its cell empty).
DEFAULT_METRICS = (
    "test/audio/accuracy",
    "test/no_audio/accuracy",
    "test/shuffled/accuracy",
    "counter_prior/audio/accuracy",
    "counter_prior/no_audio/accuracy",
    "counter_prior/shuffled/accuracy",
    "counter_prior/flip_rate",
    "gap/test_minus_counter_prior",
    "collapse/counter_prior/q1",
    "collapse/counter_prior/q4",
    "collapse/counter_prior/late_minus_early",
    "train/reward/mean",
)
#: Training metrics averaged over the last `tail` logged steps.
TAIL_KEYS = ("reward/mean", "reward/accuracy", "completion/length", "audio_mass/q1", "audio_mass/q2",
             "audio_mass/q3", "audio_mass/q4", "mapo/abs_delta_h", "kl/mean", "policy/entropy")
DEFAULT_TAIL = 20


@dataclass
class Run:
    """One finished (or partly finished) run folder, read."""

    path: Path
    config: dict[str, Any]
    final: dict[str, float]  # numeric final metrics (empty when the run has no final_metrics.json)
    history: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl rows, in order
    collapse: dict[str, Any] | None = None  # collapse.json content

    @property
    def finished(self) -> bool:
        return bool(self.final)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None


def read_run(run_dir: str | Path) -> Run:
    """Read one run folder. Raises FileNotFoundError without config.json, ValueError on broken JSON."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: not a run folder (no config.json)")
    config = _read_json(config_path)
    if not isinstance(config, dict) or not isinstance(config.get("config"), dict):
        raise ValueError(f"{config_path}: expected an object with a 'config' object")
    final: dict[str, float] = {}
    final_path = run_dir / "final_metrics.json"
    if final_path.is_file():
        raw = _read_json(final_path)
        if not isinstance(raw, dict):
            raise ValueError(f"{final_path}: expected an object of metrics")
        final = {k: float(v) for k, v in raw.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    collapse_path = run_dir / COLLAPSE_FILE
    collapse = _read_json(collapse_path) if collapse_path.is_file() else None
    return Run(run_dir, config["config"], final, read_metrics(run_dir), collapse)


def find_runs(roots: Iterable[str | Path]) -> list[Path]:
    """Every folder at or under `roots` that holds a config.json and a metrics.jsonl, sorted by path
    (a folder reached twice, e.g. as a root and through a link, is listed once)."""
    found: set[Path] = set()
    for root in map(Path, roots):
        if not root.exists():
            raise FileNotFoundError(f"{root}: no such folder")
        for marker in [root / "config.json", *root.rglob("config.json")]:
            if marker.is_file() and (marker.parent / "metrics.jsonl").is_file():
                found.add(marker.parent)
    unique: dict[Path, Path] = {}  # a folder reached twice (e.g. through a link) counts once
    for path in sorted(found):
        unique.setdefault(path.resolve(), path)
    return sorted(unique.values())


# ------------------------------------------------------------------------------------------ labels


def algorithm_label(config: Mapping[str, Any]) -> str:
    """grpo | mapo | mask_only | attn_only | sft, from the algo section of a run config."""
    algo = config["algo"]
    if algo["name"] in ("grpo", "sft"):
        return algo["name"]
    mask_on = bool(algo["mask"]["enabled"])
    attn_on = float(algo["attn"]["eta"]) > 0
    if mask_on and attn_on:
        return "mapo"
    if mask_on:
        return "mask_only"
    if attn_on:
        return "attn_only"
    return "grpo"  # MAPO with both parts off is the GRPO step


def config_value(config: Mapping[str, Any], key: str) -> Any:
    """A group key of a run config: "algorithm" (see `algorithm_label`) or a dotted path ("algo.attn.eta")."""
    if key == "algorithm":
        return algorithm_label(config)
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(f"run config has no {key!r} (missing {part!r})")
        node = node[part]
    return node


# ------------------------------------------------------------------------------------------ metrics


def run_metrics(run: Run, tail: int = DEFAULT_TAIL) -> dict[str, float]:
    """Final, derived, training-tail and collapse metrics of one run (see the module docstring)."""
    out = dict(run.final)
    if "test/audio/accuracy" in out and "counter_prior/audio/accuracy" in out:
        out["gap/test_minus_counter_prior"] = out["test/audio/accuracy"] - out["counter_prior/audio/accuracy"]
    rl_rows = [r for r in run.history if "reward/mean" in r]
    for key in TAIL_KEYS:
        values = [float(r[key]) for r in rl_rows if isinstance(r.get(key), (int, float))]
        if values:
            last = values[-tail:]
            out[f"train/{key}"] = sum(last) / len(last)
    if run.collapse:
        for split, curve in run.collapse.get("splits", {}).items():
            mass = curve["audio_mass"]
            for k, value in enumerate(mass, start=1):
                if value is not None:
                    out[f"collapse/{split}/q{k}"] = float(value)
            if mass and mass[0] is not None and mass[-1] is not None:
                out[f"collapse/{split}/late_minus_early"] = float(mass[-1]) - float(mass[0])
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, sample std with n − 1, n) of the finite values; std is NaN for n < 2, mean NaN for n = 0."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(finite)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(finite) / n
    if n < 2:
        return mean, math.nan, n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in finite) / (n - 1)), n


@dataclass
class Group:
    """Runs that share the values of the group keys."""

    key: tuple[Any, ...]
    runs: list[Run]


def group_runs(runs: Sequence[Run], by: Sequence[str]) -> list[Group]:
    """Runs grouped by the values of `by` (config keys), groups in first-seen order."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        try:
            key = tuple(config_value(run.config, k) for k in by)
        except KeyError as err:
            raise KeyError(f"{run.path}: {err.args[0]}") from None
        groups.setdefault(tuple(json.dumps(v, sort_keys=True) if isinstance(v, (list, dict)) else v for v in key), []).append(run)
    return [Group(k, v) for k, v in groups.items()]


def summary_rows(groups: Sequence[Group], by: Sequence[str], metrics: Sequence[str], tail: int = DEFAULT_TAIL) -> list[dict[str, Any]]:
    """One row per group: the group keys, "runs" (count), and per metric (mean, std, n)."""
    rows = []
    for group in groups:
        row: dict[str, Any] = dict(zip(by, group.key))
        row["runs"] = len(group.runs)
        per_run = [run_metrics(r, tail) for r in group.runs]
        for metric in metrics:
            row[metric] = mean_std([m[metric] for m in per_run if metric in m])
        rows.append(row)
    return rows


def format_mean_std(cell: tuple[float, float, int], digits: int = 3) -> str:
    """"0.912 ± 0.013"; "0.912 (n=1)" for a single run; "" for none."""
    mean, std, n = cell
    if n == 0:
        return ""
    if n == 1 or math.isnan(std):
        return f"{mean:.{digits}f} (n=1)"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def to_markdown(rows: Sequence[Mapping[str, Any]], by: Sequence[str], metrics: Sequence[str],
                labels: Mapping[str, str] | None = None, digits: int = 3) -> str:
    """A Markdown table: group keys, runs, then "mean ± std" per metric (headers renamed by `labels`)."""
    labels = labels or {}
    header = [*(labels.get(k, k) for k in by), "runs", *(labels.get(m, m) for m in metrics)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        cells = [str(row[k]) for k in by] + [str(row["runs"])] + [format_mean_std(row[m], digits) for m in metrics]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[Mapping[str, Any]], by: Sequence[str], metrics: Sequence[str], path: str | Path) -> None:
    """CSV: group keys, runs, then <metric>_mean, <metric>_std, <metric>_n (full precision; NaN cells empty)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([*by, "runs", *(f"{m}_{s}" for m in metrics for s in ("mean", "std", "n"))])
        for row in rows:
            cells: list[Any] = [row[k] for k in by] + [row["runs"]]
            for m in metrics:
                mean, std, n = row[m]
                cells += ["" if math.isnan(mean) else repr(mean), "" if math.isnan(std) else repr(std), n]
            writer.writerow(cells)


def summarize(roots: Sequence[str | Path], by: Sequence[str] = ("experiment_name", "algorithm"),
              metrics: Sequence[str] = DEFAULT_METRICS, out_dir: str | Path | None = None,
              tail: int = DEFAULT_TAIL) -> tuple[list[Group], list[dict[str, Any]]]:
    """Read every run under `roots`, group, and (with `out_dir`) write summary.md and summary.csv there.

    Unfinished runs (no final_metrics.json) are left out of the statistics and named on stderr.
    Raises FileNotFoundError when no finished run is found.
    """
    runs = [read_run(p) for p in find_runs(roots)]
    unfinished = [r.path for r in runs if not r.finished]
    for path in unfinished:
        print(f"[mapo] run_groups: {path} has no final_metrics.json; left out", file=sys.stderr)
    runs = [r for r in runs if r.finished]
    if not runs:
        raise FileNotFoundError(f"no finished run (config.json + metrics.jsonl + final_metrics.json) under {list(map(str, roots))}")
    groups = group_runs(runs, by)
    rows = summary_rows(groups, by, metrics, tail)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.md").write_text(to_markdown(rows, by, metrics), encoding="utf-8")
        write_csv(rows, by, metrics, out / "summary.csv")
    return groups, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mapo.run_groups", description=__doc__.splitlines()[0])
    parser.add_argument("roots", nargs="+", type=Path, help="run folders or folders holding them (searched recursively)")
    parser.add_argument("--by", default="experiment_name,algorithm", help="group keys: config paths or 'algorithm'")
    parser.add_argument("--metrics", default=",".join(DEFAULT_METRICS), help="comma-separated metric columns")
    parser.add_argument("--tail", type=int, default=DEFAULT_TAIL, help="training metrics: mean of the last N steps")
    parser.add_argument("--out", type=Path, default=None, help="write summary.md / summary.csv (and plots/) here")
    parser.add_argument("--plots", action="store_true", help="also write accuracy, collapse and reward PNGs to OUT/plots")
    args = parser.parse_args(argv)
    by = [k.strip() for k in args.by.split(",") if k.strip()]
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    try:
        groups, rows = summarize(args.roots, by, metrics, args.out, args.tail)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(to_markdown(rows, by, metrics), end="")
    if args.plots:
        if args.out is None:
            print("error: --plots needs --out", file=sys.stderr)
            return 2
        from mapo.group_plots import write_group_plots

        for name, path in write_group_plots(groups, args.out / "plots").items():
            print(f"[mapo] {name}: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
