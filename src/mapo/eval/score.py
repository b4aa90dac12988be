"""`python -m mapo.eval.score PRED --data MANIFEST [--out DIR]` (what `make score` runs): rescoring, no model.

PRED is our predictions.jsonl, a JSON list of {"id", "model_output"} (as the benchmarks' scripts take),
or a benchmark submission file (rows with `model_prediction`); see `mapo.eval.predictions`. Every item
of the manifest is scored under every condition PRED holds; an item without a prediction counts as
wrong (and is counted in the notes), a prediction whose id the manifest lacks is ignored (counted too).
Writes predictions.jsonl, summary.json, summary.md, charts and submission*.json to OUT (default: a
`rescored/` folder next to PRED, so the original files are never overwritten) and prints OUT.
The audio files are not needed.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from mapo.data.validate import ManifestError
from mapo.eval.benchmark import load_benchmark
from mapo.eval.predictions import PredictionsError, read_predictions
from mapo.eval.results import score_rows, summarize, write_evaluation


def rescore(
    pred_path: str | Path, data: str | Path, out: str | Path | None = None, layout: str = "auto",
    predicted_only: bool = False,
) -> dict:
    """Score `pred_path` against the manifest `data`, write OUT's files, return the summary.

    predicted_only: score only the items that have a prediction under every condition (as the
    benchmarks' scripts skip rows without `model_prediction`); the default counts them as wrong.
    """
    bench = load_benchmark(data, layout, check_audio=False)
    predictions = read_predictions(pred_path)
    if not predictions:
        raise PredictionsError(f"{pred_path}: holds no predictions")
    if predicted_only:
        conditions = {p["condition"] for p in predictions}
        answered = {(p["id"], p["condition"]) for p in predictions if p["model_output"] is not None}
        kept = [r for r in bench.records if all((r.id, c) in answered for c in conditions)]
        bench.notes.append(f"scored only the {len(kept)} of {len(bench.records)} items with a prediction (--predicted-only)")
        bench.records = kept
    by_condition: dict[str, dict[str, str | None]] = defaultdict(dict)
    for p in predictions:
        by_condition[p["condition"]][p["id"]] = p["model_output"]
    known = {r.id for r in bench.records}
    notes = list(bench.notes)
    outputs = {}
    for condition, answers in by_condition.items():
        stray = sorted(set(answers) - known)
        missing = [r.id for r in bench.records if answers.get(r.id) is None]
        if stray:
            notes.append(f"{condition}: {len(stray)} prediction(s) with ids not in the manifest ignored (e.g. {stray[0]!r})")
        if missing:
            notes.append(f"{condition}: {len(missing)} item(s) without a prediction counted as wrong (e.g. {missing[0]!r})")
        outputs[condition] = [answers.get(r.id) for r in bench.records]
    rows = score_rows(bench.records, outputs)
    summary = summarize(bench.records, rows, bench.layout, notes=notes, manifest=str(bench.path),
                        predictions=str(pred_path), n_items=len(bench.records))
    out_dir = Path(out) if out is not None else Path(pred_path).parent / "rescored"
    write_evaluation(out_dir, bench.records, rows, summary, manifest=bench.path)
    summary["out"] = str(out_dir)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mapo.eval.score", description=__doc__.split("\n\n")[0])
    parser.add_argument("predictions", help="predictions.jsonl, or a JSON list of {id, model_output}")
    parser.add_argument("--data", required=True, help="the benchmark manifest the predictions answer")
    parser.add_argument("--out", default=None, help="output folder (default: <predictions folder>/rescored)")
    parser.add_argument("--layout", default="auto", help="manifest layout (default: detected)")
    parser.add_argument("--predicted-only", action="store_true",
                        help="score only items with a prediction (default: a missing prediction counts as wrong)")
    args = parser.parse_args(argv)
    try:
        summary = rescore(args.predictions, args.data, args.out, args.layout, args.predicted_only)
    except (ManifestError, PredictionsError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(summary["out"])
    print((out / "summary.md").read_text())
    print(f"[mapo] scores written to: {out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
