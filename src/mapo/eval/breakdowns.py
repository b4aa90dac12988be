"""Which groupings each benchmark reports its accuracy by, read from the records of its layout.

- MMAU: task (sound / music / speech), difficulty, sub-category (its script reports task and difficulty);
- MMAR: modality, category, sub-category (as its script does);
- MMSU: task, category, sub-category;
- AVQA: question type and question relation;
- our layout (the built-in benchmark): task.
A record without the field counts in the group "(none)", so every breakdown covers every item.
"""

from __future__ import annotations

from collections.abc import Callable

from mapo.data.schema import Record

MISSING_GROUP = "(none)"

Getter = Callable[[Record], object]


def _meta(key: str) -> Getter:
    return lambda record: record.meta.get(key)


def _task(record: Record) -> object:
    return record.task


def _category(record: Record) -> object:
    return record.category


#: layout -> ((breakdown name, value of a record), ...), in the order the summary lists them.
BREAKDOWNS: dict[str, tuple[tuple[str, Getter], ...]] = {
    "mmau": (("task", _task), ("difficulty", _meta("difficulty")), ("sub-category", _meta("sub-category"))),
    "mmar": (("modality", _task), ("category", _category), ("sub-category", _meta("sub-category"))),
    "mmsu": (("task", _task), ("category", _category), ("sub-category", _meta("sub-category"))),
    "avqa": (("question type", _meta("question_type")), ("question relation", _meta("question_relation"))),
    "ours": (("task", _task),),
}


def _label(value: object) -> str:
    if value is None or value == "":
        return MISSING_GROUP
    if isinstance(value, list):
        return "; ".join(map(str, value)) or MISSING_GROUP
    return str(value)


def record_groups(layout: str, record: Record) -> dict[str, str]:
    """{breakdown name: group label} of one record under its layout's breakdowns."""
    if layout not in BREAKDOWNS:
        raise ValueError(f"no breakdowns defined for layout {layout!r}; known: {', '.join(BREAKDOWNS)}")
    return {name: _label(get(record)) for name, get in BREAKDOWNS[layout]}
