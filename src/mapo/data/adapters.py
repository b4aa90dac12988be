"""One adapter per manifest layout: a parsed row (a JSON object) in, a `Record` out (DESIGN §5).

Layouts (field names as the source spells them):

- ``ours``: `Record.to_json()` per row: `id, audio, question, choices, answer` and optional
  `task, split, category, trace, meta`. `audio` must be present but may be null (a text-only item):
  requiring the key means a misspelt audio field is reported instead of silently training without audio.
  Keys the schema does not know go into `meta`.
- ``mmau``: `id, audio_id, question, choices, answer` (the text of the right choice), `task`
  (sound / music / speech) and optional `category`, `split` (default "test": MMAU is a benchmark);
  `sub-category`, `difficulty`, `dataset` and any other keys go into `meta`.
- ``avqa``: `id, question_text, multi_choice, answer` (0-based index into `multi_choice`),
  `audio_path`; `question_type`, `question_relation`, `video_name` and any other keys go into `meta`.
  AVQA has no task field, so `task` is "avqa".

Adapters only look at one row; the reader (validate.py) adds file and line, duplicate ids and the audio
check. A bad row raises `RowError` whose message is the problem alone, e.g. "missing field(s): answer".
Relative audio paths resolve against the manifest's folder; the record holds the absolute path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mapo.data.schema import Record


class RowError(ValueError):
    """The problem with one row, in words (no file or line: the reader adds them)."""


# ----------------------------------------------------------------------------------- field checks


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _require(row: dict[str, Any], fields: tuple[str, ...]) -> None:
    # null counts as missing: `"answer": null` is as unusable as no answer.
    missing = [name for name in fields if row.get(name) is None]
    if missing:
        raise RowError(f"missing field(s): {', '.join(missing)}")


def _text(row: dict[str, Any], key: str) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise RowError(f"wrong type: '{key}' is {_type_name(value)}, expected a string")
    return value


def _optional_text(row: dict[str, Any], key: str) -> str | None:
    return None if row.get(key) is None else _text(row, key)


def _row_id(row: dict[str, Any], key: str) -> str:
    # Sources use both string ids (MMAU) and integer ids (AVQA); bool is an int to Python, not an id.
    value = row[key]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RowError(f"wrong type: '{key}' is {_type_name(value)}, expected a string or an integer")
    if value == "":
        raise RowError(f"empty '{key}'")
    return str(value)


def _choices(row: dict[str, Any], key: str) -> list[str]:
    value = row[key]
    if not isinstance(value, list):
        raise RowError(f"wrong type: '{key}' is {_type_name(value)}, expected a list of strings")
    if not value:
        raise RowError(f"empty choices: '{key}' is []")
    for position, choice in enumerate(value):
        if not isinstance(choice, str):
            raise RowError(f"wrong type: '{key}'[{position}] is {_type_name(choice)}, expected a string")
    # Two equal options make "the text of the right choice" ambiguous for scoring.
    seen: set[str] = set()
    for choice in value:
        if choice in seen:
            raise RowError(f"duplicate choice {choice!r} in '{key}'")
        seen.add(choice)
    return list(value)


def _answer_text(row: dict[str, Any], key: str, choices: list[str]) -> str:
    """The answer given as text; returned as the matching choice, so `choices.index` finds it."""
    answer = _text(row, key)
    if answer in choices:
        return answer
    # Hand-edited benchmark files often differ only in stray spaces; accept a unique stripped match.
    stripped = [choice for choice in choices if choice.strip() == answer.strip()]
    if len(stripped) == 1:
        return stripped[0]
    raise RowError(f"answer {answer!r} is not among the choices {choices!r}")


def _answer_index(row: dict[str, Any], key: str, choices: list[str]) -> str:
    """The answer given as a 0-based index into `choices`; returned as that choice's text."""
    index = row[key]
    if isinstance(index, bool) or not isinstance(index, int):
        raise RowError(f"wrong type: '{key}' is {_type_name(index)}, expected an integer index")
    if not 0 <= index < len(choices):
        raise RowError(f"answer index {index} is out of range for {len(choices)} choices")
    return choices[index]


def _audio_path(row: dict[str, Any], key: str, base_dir: Path) -> str:
    value = _text(row, key)
    if not value.strip():
        raise RowError(f"empty '{key}' (an audio path is required)")
    path = os.path.expanduser(value)
    if not os.path.isabs(path):
        path = os.path.join(base_dir, path)
    # abspath + normpath (not resolve): drop "./" and ".." but keep the user's symlinks as laid out.
    return os.path.normpath(os.path.abspath(path))


def _extras(row: dict[str, Any], known: set[str]) -> dict[str, Any]:
    return {key: value for key, value in row.items() if key not in known}


# ----------------------------------------------------------------------------------- the adapters


_OURS_FIELDS = {f for f in Record.__dataclass_fields__}


def parse_ours(row: dict[str, Any], base_dir: Path) -> Record:
    """A row written by `Record.to_json()`; unknown keys are kept in `meta`."""
    _require(row, ("id", "question", "choices", "answer"))
    if "audio" not in row:
        raise RowError("missing field(s): audio (use null for a text-only item)")
    choices = _choices(row, "choices")
    meta = row.get("meta", {})
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise RowError(f"wrong type: 'meta' is {_type_name(meta)}, expected an object")
    return Record(
        id=_row_id(row, "id"),
        audio=None if row["audio"] is None else _audio_path(row, "audio", base_dir),
        question=_text(row, "question"),
        choices=choices,
        answer=_answer_text(row, "answer", choices),
        task=_optional_text(row, "task") or "unknown",
        split=_optional_text(row, "split") or "train",
        category=_optional_text(row, "category"),
        trace=_optional_text(row, "trace"),
        meta={**_extras(row, _OURS_FIELDS), **meta},
    )


_MMAU_MAPPED = {"id", "audio_id", "question", "choices", "answer", "task", "category", "split"}


def parse_mmau(row: dict[str, Any], base_dir: Path) -> Record:
    """An MMAU object (`audio_id` like "./test-mini-audios/x.wav", `answer` is the choice text)."""
    _require(row, ("id", "audio_id", "question", "choices", "answer", "task"))
    choices = _choices(row, "choices")
    return Record(
        id=_row_id(row, "id"),
        audio=_audio_path(row, "audio_id", base_dir),
        question=_text(row, "question"),
        choices=choices,
        answer=_answer_text(row, "answer", choices),
        task=_text(row, "task"),
        split=_optional_text(row, "split") or "test",
        category=_optional_text(row, "category"),
        meta=_extras(row, _MMAU_MAPPED),
    )


_AVQA_MAPPED = {"id", "question_text", "multi_choice", "answer", "audio_path"}


def parse_avqa(row: dict[str, Any], base_dir: Path) -> Record:
    """An AVQA object (`answer` is a 0-based index into `multi_choice`)."""
    _require(row, ("id", "question_text", "multi_choice", "answer", "audio_path"))
    choices = _choices(row, "multi_choice")
    return Record(
        id=_row_id(row, "id"),
        audio=_audio_path(row, "audio_path", base_dir),
        question=_text(row, "question_text"),
        choices=choices,
        answer=_answer_index(row, "answer", choices),
        task="avqa",
        meta=_extras(row, _AVQA_MAPPED),
    )


@dataclass(frozen=True)
class Adapter:
    """A layout: its name, the keys holding the row id and the audio path, the parser and the keys that
    identify it (the reader uses `audio_key` to tell a relative path that leaves the manifest's folder)."""

    name: str
    id_key: str
    parse: Callable[[dict[str, Any], Path], Record]
    marker_keys: frozenset[str]  # a row holding all of these is taken to be in this layout
    audio_key: str

    def peek_id(self, row: dict[str, Any]) -> str:
        """The row's id for a report, even when the row is otherwise bad ("?" when it has none)."""
        value = row.get(self.id_key)
        return str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else "?"


# Detection tries these in order; the first whose marker keys are all present wins. MMAU and AVQA
# come first because their markers (audio_id, question_text) never appear in our layout.
ADAPTERS: dict[str, Adapter] = {
    "mmau": Adapter("mmau", "id", parse_mmau, frozenset({"audio_id", "question", "choices"}), "audio_id"),
    "avqa": Adapter("avqa", "id", parse_avqa, frozenset({"question_text", "multi_choice"}), "audio_path"),
    "ours": Adapter("ours", "id", parse_ours, frozenset({"question", "choices", "answer"}), "audio"),
}
LAYOUTS = tuple(ADAPTERS)


def detect_layout(row: dict[str, Any]) -> str | None:
    """The layout whose marker keys the row holds, or None when none fits."""
    for name, adapter in ADAPTERS.items():
        if adapter.marker_keys <= row.keys():
            return name
    return None


def layout_help() -> str:
    """One line per layout with its marker keys, for error messages."""
    return "; ".join(f"{name} (keys {', '.join(sorted(a.marker_keys))})" for name, a in ADAPTERS.items())
