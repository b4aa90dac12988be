"""Score model outputs against a benchmark's records and write the files of one evaluation.

`score_rows` turns raw outputs into prediction rows (one per item and condition):
    id, condition, model_output (raw; null when a rescored file had no output for the item),
    extracted_answer (the text scored: last <answer>…</answer> content, else the whole output),
    matched_choice (the option the prediction names under benchmark matching, or null),
    correct (benchmark matching; null when the answer is hidden),
    strict_choice, correct_strict (our strict option matching, the second column),
    answer (null when hidden), and optional collapse bins (see `mapo.eval.collapse.item_means`).
`summarize` aggregates them into summary.json's dict:
    {"overall": {"accuracy", "accuracy_strict", "n", "correct", "correct_strict"},
     "breakdowns": {name: {group: {... same keys ...}}},        # of the main condition
     "by_condition": {condition: {"overall": …, "breakdowns": …}},
     "flip_rate": {condition: fraction of items whose matched choice differs from the audio condition's},
     "benchmark", "manifest", "model", "conditions", "main_condition", "accuracy_computable", "notes", …}
The main condition is `audio` when it was evaluated (the number to put next to published ones).
Accuracies are fractions in [0, 1]; summary.md shows percentages as the benchmarks print them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mapo.atomic import write_json_atomic, write_jsonl_atomic, write_text_atomic
from mapo.data.schema import Record
from mapo.eval.breakdowns import record_groups
from mapo.eval.matching import benchmark_choice, benchmark_correct, extract_prediction
from mapo.evaluate import CONDITIONS
from mapo.rewards import accuracy_reward, predicted_choice
from mapo.report import CONDITION_LABELS



def score_rows(
    records: Sequence[Record],
    outputs: Mapping[str, Sequence[str | None]],
    extras: Mapping[str, Sequence[Mapping[str, Any] | None]] | None = None,
) -> list[dict[str, Any]]:
    """Prediction rows for outputs[condition][i] answering records[i] (module docstring).

    extras[condition][i]: further keys merged into that row (e.g. collapse bins), or None.
    """
    rows = []
    for condition, texts in outputs.items():
        if len(texts) != len(records):
            raise ValueError(f"{condition}: {len(texts)} outputs for {len(records)} records")
        more = (extras or {}).get(condition) or [None] * len(records)
        for record, output, extra in zip(records, texts, more):
            prediction = extract_prediction(output or "")
            matched = benchmark_choice(prediction, record.choices)
            strict = None if output is None else predicted_choice(output, record.choices)
            hidden = bool(record.meta.get("answer_hidden"))
            # The benchmark's script scores against the answer as the file writes it.
            scored_answer = record.meta.get("source_answer", record.answer)
            row = {
                "id": record.id,
                "condition": condition,
                "model_output": output,
                "extracted_answer": prediction,
                "matched_choice": None if matched is None else record.choices[matched],
                "correct": None if hidden else benchmark_correct(prediction, scored_answer, record.choices),
                "strict_choice": None if strict is None else record.choices[strict],
                "correct_strict": None if hidden else accuracy_reward(output or "", record) == 1.0,  # the training reward
                "answer": None if hidden else record.answer,
            }
            row.update(extra or {})
            rows.append(row)
    return rows


def _accuracy(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    if n == 0 or any(r["correct"] is None for r in rows):
        return {"accuracy": None, "accuracy_strict": None, "n": n, "correct": None, "correct_strict": None}
    correct = sum(bool(r["correct"]) for r in rows)
    strict = sum(bool(r["correct_strict"]) for r in rows)
    return {"accuracy": correct / n, "accuracy_strict": strict / n, "n": n, "correct": correct, "correct_strict": strict}


def _condition_summary(records: Sequence[Record], rows: Sequence[Mapping[str, Any]], layout: str) -> dict[str, Any]:
    by_id = {r["id"]: r for r in rows}
    groups: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        for name, label in record_groups(layout, record).items():
            groups[name][label].append(by_id[record.id])
    return {
        "overall": _accuracy(rows),
        "breakdowns": {name: {label: _accuracy(part) for label, part in sorted(g.items())} for name, g in groups.items()},
    }


def summarize(
    records: Sequence[Record],
    rows: Sequence[Mapping[str, Any]],
    layout: str,
    *,
    notes: Sequence[str] = (),
    **info: Any,
) -> dict[str, Any]:
    """summary.json's dict (module docstring). info: extra top-level keys (manifest, model, options, …)."""
    by_condition: dict[str, list] = defaultdict(list)
    for row in rows:
        by_condition[row["condition"]].append(row)
    order = [c for c in CONDITIONS if c in by_condition] + [c for c in by_condition if c not in CONDITIONS]
    if not order:
        raise ValueError("no prediction rows to summarise")
    main = "audio" if "audio" in by_condition else order[0]
    per_condition = {c: _condition_summary(records, by_condition[c], layout) for c in order}
    flips = {}
    if main in by_condition:
        reference = {r["id"]: r["matched_choice"] for r in by_condition[main]}
        for condition in order:
            if condition != main:
                part = by_condition[condition]
                flips[condition] = sum(reference[r["id"]] != r["matched_choice"] for r in part) / len(part)
    computable = per_condition[main]["overall"]["accuracy"] is not None
    notes = list(notes)
    if not computable:
        notes.append("answers are hidden: accuracy cannot be computed here; submit submission.json to the benchmark")
    return {
        "benchmark": layout,
        **info,
        "conditions": order,
        "main_condition": main,
        "accuracy_computable": computable,
        "overall": per_condition[main]["overall"],
        "breakdowns": per_condition[main]["breakdowns"],
        "by_condition": per_condition,
        "flip_rate": flips,
        "notes": notes,
    }


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """summary.md: the overall table per condition, the flip rates, one table per breakdown, the notes."""
    order = summary["conditions"]
    lines = [f"# {summary['benchmark']} evaluation", ""]
    for key in ("model", "manifest", "n_items"):
        if key in summary:
            lines.append(f"- {key}: `{summary[key]}`")
    lines += ["", "Accuracy in % (benchmark matching; strict option matching in the second column).", ""]
    lines += ["| condition | n | accuracy | strict |", "|---|---|---|---|"]
    for condition in order:
        o = summary["by_condition"][condition]["overall"]
        lines.append(f"| {CONDITION_LABELS.get(condition, condition)} | {o['n']} | {_pct(o['accuracy'])} | {_pct(o['accuracy_strict'])} |")
    if summary["flip_rate"]:
        lines += ["", "| flip rate (matched choice differs from the audio condition's) | fraction |", "|---|---|"]
        for condition, value in summary["flip_rate"].items():
            lines.append(f"| {CONDITION_LABELS.get(condition, condition)} | {value:.3f} |")
    first = summary["by_condition"][order[0]]["breakdowns"]
    for name in first:
        header = " | ".join(f"{CONDITION_LABELS.get(c, c)}" for c in order)
        lines += ["", f"## by {name}", "", f"| {name} | n | {header} |", "|---|---|" + "---|" * len(order)]
        for group in first[name]:
            cells = [_pct(summary["by_condition"][c]["breakdowns"][name][group]["accuracy"]) for c in order]
            lines.append(f"| {group} | {first[name][group]['n']} | {' | '.join(cells)} |")
    if summary.get("notes"):
        lines += ["", "## notes", ""] + [f"- {note}" for note in summary["notes"]]
    return "\n".join(lines) + "\n"


def write_evaluation(
    out_dir: Path,
    records: Sequence[Record],
    rows: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Any],
    *,
    manifest: str | Path | None = None,
    collapse: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """predictions.jsonl, summary.json, summary.md, charts/*.png, submission*.json, collapse.* in out_dir."""
    from mapo.eval.charts import breakdown_chart, condition_chart
    from mapo.eval.predictions import source_rows, write_submission

    out_dir.mkdir(parents=True, exist_ok=True)
    written = {"predictions": out_dir / "predictions.jsonl", "summary": out_dir / "summary.json", "summary_md": out_dir / "summary.md"}
    write_jsonl_atomic(written["predictions"], rows)
    write_json_atomic(written["summary"], summary)
    write_text_atomic(written["summary_md"], summary_markdown(summary))
    if summary["accuracy_computable"]:
        written["chart_conditions"] = condition_chart(summary, out_dir / "charts" / "accuracy_by_condition.png")
        for name in summary["breakdowns"]:
            slug = name.replace(" ", "_").replace("/", "_")
            written[f"chart_{slug}"] = breakdown_chart(summary, name, out_dir / "charts" / f"accuracy_by_{slug}.png")
    if manifest is not None:
        source = source_rows(manifest)  # one read for every condition's submission
        for condition in summary["conditions"]:
            name = "submission.json" if condition == summary["main_condition"] else f"submission_{condition}.json"
            outputs = {r["id"]: r["model_output"] for r in rows if r["condition"] == condition}
            write_submission(source, outputs, out_dir / name)
            written[name] = out_dir / name
    if collapse:
        from mapo.eval.collapse import plot_collapse

        write_json_atomic(out_dir / "collapse.json", collapse)
        written["collapse"] = plot_collapse(collapse, out_dir / "collapse.png", title=str(summary.get("benchmark")))
    return written
