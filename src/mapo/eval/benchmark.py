"""A benchmark manifest read for evaluation: its records, layout and the counted warnings to report."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mapo.data.adapters import hidden_answers_allowed, layout_notes
from mapo.data.schema import Record
from mapo.data.validate import read_manifest
from mapo.evaluate import evenly_by_task


@dataclass
class Benchmark:
    path: Path
    layout: str
    records: list[Record]
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.stem


def load_benchmark(
    path: str | Path, layout: str = "auto", *, skip_bad: bool = False, limit: int = 0, check_audio: bool = True,
    is_main: bool = True, share: Callable[[list[int]], list[int]] | None = None,
) -> Benchmark:
    """Read and validate `path` in any layout (hidden answers allowed: evaluation only).

    limit > 0 keeps limit // tasks items of every task, at least one each (`mapo.evaluate.evenly_by_task`).
    check_audio=False skips the audio files (rescoring needs none). Bad rows stop the read with every
    one listed, unless skip_bad (then they are counted in the notes). Several processes: only rank 0
    (`is_main`) decodes the audio and `share` (an all-gather, as in training) gives every rank its verdict.
    """
    with hidden_answers_allowed():
        result = read_manifest(path, layout=layout, skip_bad=skip_bad, check_audio=check_audio and is_main,
                               share=share, report=is_main)
    records = evenly_by_task(result.records, limit)
    notes = layout_notes(records)
    if result.skipped:
        notes.append(f"{result.skipped} bad row(s) of {result.n_rows} skipped (`make check DATA={result.path}` lists them)")
    if len(records) < len(result.records):
        notes.append(f"limited to {len(records)} of {len(result.records)} items, evenly over tasks")
    return Benchmark(Path(path), result.layout, records, notes)
