"""Predictions files in and out.

Read (`read_predictions`), one of:
- our `predictions.jsonl`: one JSON object per line with `id`, `condition`, `model_output` (other keys
  are ignored: scoring is redone from the manifest);
- a JSON list of `{"id", "model_output"}` objects (what the benchmarks' own scripts are given), or of the
  benchmark's rows with `model_prediction` (MMAU's / MMAR's submission layout); rows without a condition
  are the `audio` condition.
The file is parsed by the manifest reader's container parser (`mapo.data.validate.read_rows`): the same
JSON array / JSONL rules (a leading "[" is an array unless the name ends in .jsonl), byte-order mark
and UTF-8 handling, and every error names the file and line.

Written: `predictions.jsonl` (rows from `mapo.eval.results`), and `submission.json`: the manifest's own
rows, as released, each with `model_prediction` set to the model's raw output, the file MMAU's and
MMAR's scripts (and MMAU's test-split leaderboard) take.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mapo.atomic import write_text_atomic

OUTPUT_KEYS = ("model_output", "model_prediction")


class PredictionsError(ValueError):
    """A predictions file that cannot be used; the message names the file and line."""


def _output_of(row: Mapping[str, Any], where: str) -> str | None:
    for key in OUTPUT_KEYS:
        if key in row:
            value = row[key]
            if value is not None and not isinstance(value, str):
                raise PredictionsError(f"{where}: '{key}' is {type(value).__name__}, expected a string")
            return value
    raise PredictionsError(f"{where}: no {' or '.join(OUTPUT_KEYS)} field")


def _prediction(row: Any, where: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise PredictionsError(f"{where}: expected an object, got {type(row).__name__}")
    if row.get("id") is None:
        raise PredictionsError(f"{where}: no 'id' field")
    condition = row.get("condition") or "audio"
    return {"id": str(row["id"]), "condition": str(condition), "model_output": _output_of(row, where)}


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """[{"id", "condition", "model_output"}] from any layout of the module docstring, in file order."""
    from mapo.data.adapters import RowError
    from mapo.data.validate import ManifestFormatError, read_rows

    path = Path(path)
    try:
        rows = read_rows(path, what="predictions file")
    except ManifestFormatError as err:
        raise PredictionsError(str(err)) from None
    out = []
    for line, row in rows:
        if isinstance(row, RowError):  # a JSONL line that is not JSON: one bad prediction stops the read
            raise PredictionsError(f"{path}:{line}: {row}")
        out.append(_prediction(row, f"{path}:{line}"))
    seen: set[tuple[str, str]] = set()
    for row in out:
        key = (row["id"], row["condition"])
        if key in seen:
            raise PredictionsError(f"{path}: id {row['id']!r} has two predictions under condition {row['condition']!r}")
        seen.add(key)
    return out


def source_rows(manifest: str | Path) -> list[dict[str, Any]]:
    """The manifest's rows as released (objects only), read the way the manifest reader reads them."""
    from mapo.data.validate import read_rows

    return [row for _, row in read_rows(Path(manifest)) if isinstance(row, dict)]


def write_submission(source: Sequence[Mapping[str, Any]], outputs: Mapping[str, str | None], path: Path) -> int:
    """The manifest's rows as released (`source_rows(manifest)`, read once by the caller for all its
    submissions) with `model_prediction` = outputs[id]; rows without an output are left out.

    Returns how many rows were written.
    """
    rows = []
    for row in source:
        key = str(row.get("id"))
        if key in outputs and outputs[key] is not None:
            rows.append({**row, "model_prediction": outputs[key]})
    write_text_atomic(path, json.dumps(rows, ensure_ascii=False, indent=2, default=str) + "\n")
    return len(rows)
