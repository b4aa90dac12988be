"""The one internal record every adapter produces (DESIGN §5)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

#: Fields every record must carry, in the order they are checked.
REQUIRED_FIELDS = ("id", "question", "choices", "answer")


@dataclass
class Record:
    """One multiple-choice audio question.

    id:       unique id within its manifest.
    audio:    path of the clip (absolute once read by `mapo.data.adapters.read_manifest`; manifests may
              store it relative to their own folder), or None for a text-only item.
    question: the question text (no options; the prompt builder adds them).
    choices:  option texts, in the order shown to the model.
    answer:   text of the right option; always one of `choices`.
    task:     task family (e.g. "tone_count"; MMAU: sound / music / speech); "unknown" when absent.
    split:    "train", "test", "counter_prior", … .
    category: optional finer grouping (MMAU: the skill category).
    trace:    optional reference reasoning (no answer tag), used by the supervised warm start.
    meta:     anything else the source carried (kept, never interpreted).
    """

    id: str
    audio: str | None
    question: str
    choices: list[str]
    answer: str
    task: str = "unknown"
    split: str = "train"
    category: str | None = None
    trace: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def answer_index(self) -> int:
        return self.choices.index(self.answer)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
