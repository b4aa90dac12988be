"""One adapter per manifest layout: a parsed row (a JSON object) in, a `Record` out (DESIGN §5).

Layouts (field names as the source spells them):

- ``ours``: `Record.to_json()` per row: `id, audio, question, choices, answer` and optional
  `task, split, category, trace, meta`. `audio` must be present but may be null (a text-only item):
  requiring the key means a misspelt audio field is reported instead of silently training without audio.
  Keys the schema does not know go into `meta`.
- ``mmau``: MMAU's test-mini / test JSON: `id, audio_id` (e.g. "./test-mini-audios/<id>.wav", relative to
  the folder holding the JSON), `question, choices, answer` (the text of the right choice), `task`
  (sound / music / speech) and optional `category` (a string, or in some rows a list: joined with "; ",
  the list kept in meta["category_list"]), `split` (default "test"); `sub-category`, `difficulty`,
  `dataset` and any other keys go into `meta`.
- ``mmar``: MMAR's `MMAR-meta.json`: `id, audio_path` (relative to the folder holding the JSON),
  `question, choices, answer`, optional `modality` (→ `task`), `category`; `sub-category, language,
  source, url, timestamp` and the rest go into `meta`.
- ``mmsu``: MMSU's `question/mmsu.jsonl`: `id, audio_path` written "/audio/<id>.wav" and meaning the
  MMSU folder (the parent of `question/`), `question, choice_a … choice_d` (null = no such option;
  numbers become text), `answer_gt` (the text of the right choice, or its letter), `task_name` (→ `task`),
  `category`; `sub-category` and the rest go into `meta`. The Hugging Face parquet files (audio
  embedded) read into the same rows (`mapo.data.parquet`).
- ``avqa``: `id, question_text, multi_choice, answer` (0-based index into `multi_choice`),
  `audio_path`; `question_type`, `question_relation`, `video_name` and any other keys go into `meta`.
  AVQA has no task field, so `task` is "avqa". (`make prep BENCH=avqa` writes this layout from the
  original annotations and videos: `mapo.data.prep`.)

Benchmark files are as released, so the benchmark layouts (mmau, mmar, mmsu) accept what the released
files hold and mark it in `meta` for a counted warning (`layout_notes`), where our layout and AVQA refuse:
- duplicated choice strings (27 rows of MMAU test-mini, some duplicating the answer): kept,
  meta["duplicate_choices"] lists them (scoring compares texts, so either copy counts);
- an answer that is not literally a choice (a few MMAR rows): matched to the choice it names by the
  benchmarks' tokenisation (`mapo.eval.matching.match_answer_to_choice`), the source text kept in
  meta["source_answer"] (benchmark scoring uses it, as the benchmark's script does);
- an empty answer (the MMAU test split hides its answers): accepted only inside
  `hidden_answers_allowed()` (evaluation, which then writes a submission file), with answer "" and
  meta["answer_hidden"] = True; anywhere else it is a bad row, so nothing trains on it.

Adapters only look at one row; the reader (validate.py) adds file and line, duplicate ids and the audio
check. A bad row raises `RowError` whose message is the problem alone, e.g. "missing field(s): answer".
Relative audio paths resolve against the manifest's folder; the record holds the absolute path.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections import Counter
from collections.abc import Iterable, Iterator
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


def _choices(row: dict[str, Any], key: str, allow_duplicates: bool = False) -> list[str]:
    value = row[key]
    if not isinstance(value, list):
        raise RowError(f"wrong type: '{key}' is {_type_name(value)}, expected a list of strings")
    if not value:
        raise RowError(f"empty choices: '{key}' is []")
    for position, choice in enumerate(value):
        if not isinstance(choice, str):
            raise RowError(f"wrong type: '{key}'[{position}] is {_type_name(choice)}, expected a string")
    if allow_duplicates:  # benchmark files as released (see the module docstring)
        return list(value)
    # Two equal options make "the text of the right choice" ambiguous for scoring.
    seen: set[str] = set()
    for choice in value:
        if choice in seen:
            raise RowError(f"duplicate choice {choice!r} in '{key}'")
        seen.add(choice)
    return list(value)


def _matching_choice(answer: str, choices: list[str]) -> str | None:
    """The choice `answer` names as text: itself, else the one choice equal to it but for surrounding
    spaces (hand-edited files often differ only in stray spaces); None when there is no such choice.
    Equal choice strings count once (benchmark files may repeat a choice; scoring compares texts)."""
    if answer in choices:
        return answer
    stripped = {choice for choice in choices if choice.strip() == answer.strip()}
    return stripped.pop() if len(stripped) == 1 else None


def _answer_text(row: dict[str, Any], key: str, choices: list[str]) -> str:
    """The answer given as text; returned as the matching choice, so `choices.index` finds it."""
    answer = _text(row, key)
    match = _matching_choice(answer, choices)
    if match is None:
        raise RowError(f"answer {answer!r} is not among the choices {choices!r}")
    return match


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


# ------------------------------------------------------------------------------- benchmark layouts

#: Set by `hidden_answers_allowed()`: whether an empty answer is accepted (evaluation only).
_HIDDEN_ANSWERS_ALLOWED = contextvars.ContextVar("mapo_hidden_answers_allowed", default=False)


@contextlib.contextmanager
def hidden_answers_allowed() -> Iterator[None]:
    """Inside this block benchmark rows with an empty answer (MMAU's test split) read as hidden answers."""
    token = _HIDDEN_ANSWERS_ALLOWED.set(True)
    try:
        yield
    finally:
        _HIDDEN_ANSWERS_ALLOWED.reset(token)


def _scalar_text(row: dict[str, Any], key: str) -> str | None:
    """A text field that some releases write as a number (MMSU choices and answers); None stays None."""
    value = row.get(key)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise RowError(f"wrong type: '{key}' is {_type_name(value)}, expected a string or a number")


def _category(row: dict[str, Any], key: str, meta: dict[str, Any]) -> str | None:
    """A category that is a string or (some MMAU rows) a list of strings: the list is joined with "; "."""
    value = row.get(key)
    if isinstance(value, list):
        if not all(isinstance(v, str) for v in value):
            raise RowError(f"wrong type: '{key}' is a list holding non-strings, expected strings")
        meta[f"{key}_list"] = list(value)
        return "; ".join(value) if value else None
    return _optional_text(row, key)


def _benchmark_answer(
    answer: str, choices: list[str], key: str, meta: dict[str, Any], letters: list[str] | None = None
) -> str:
    """The right choice's text for a benchmark row (rules in the module docstring); notes go into `meta`.

    letters: the option letters of `choices` when the source may give the answer as a letter (MMSU).
    """
    if not answer.strip():
        if _HIDDEN_ANSWERS_ALLOWED.get():
            meta["answer_hidden"] = True
            return ""
        raise RowError(
            f"empty '{key}': the answer is hidden (as in the MMAU test split); such a file can only be "
            "evaluated (`make eval` writes a submission file), not trained on"
        )
    match = _matching_choice(answer, choices)
    if match is not None:
        return match
    if letters is not None and answer.strip().upper() in letters:
        return choices[letters.index(answer.strip().upper())]
    from mapo.eval.matching import match_answer_to_choice  # the benchmarks' tokenisation

    index = match_answer_to_choice(answer, choices)
    if index is None:
        raise RowError(f"answer {answer!r} is not among the choices {choices!r}")
    meta["source_answer"] = answer
    return choices[index]


def _duplicates(choices: list[str], meta: dict[str, Any]) -> None:
    repeated = sorted(text for text, n in Counter(choices).items() if n > 1)
    if repeated:
        meta["duplicate_choices"] = repeated


def _choices_and_answer_record(
    row: dict[str, Any], base_dir: Path, *, audio_key: str, mapped: set[str], task: str, split: str
) -> Record:
    """A row with a `choices` list and an `answer` text (MMAU, MMAR); the caller reads task and split."""
    choices = _choices(row, "choices", allow_duplicates=True)
    meta = _extras(row, mapped)
    category = _category(row, "category", meta)
    _duplicates(choices, meta)
    return Record(
        id=_row_id(row, "id"),
        audio=_audio_path(row, audio_key, base_dir),
        question=_text(row, "question"),
        choices=choices,
        answer=_benchmark_answer(_text(row, "answer"), choices, "answer", meta),
        task=task,
        split=split,
        category=category,
        meta=meta,
    )


_MMAU_MAPPED = {"id", "audio_id", "question", "choices", "answer", "task", "category", "split"}


def parse_mmau(row: dict[str, Any], base_dir: Path) -> Record:
    """An MMAU object (`audio_id` like "./test-mini-audios/x.wav", `answer` is the choice text)."""
    _require(row, ("id", "audio_id", "question", "choices", "answer", "task"))
    return _choices_and_answer_record(
        row, base_dir, audio_key="audio_id", mapped=_MMAU_MAPPED,
        task=_text(row, "task"), split=_optional_text(row, "split") or "test",
    )


_MMAR_MAPPED = {"id", "audio_path", "question", "choices", "answer", "modality", "category"}


def parse_mmar(row: dict[str, Any], base_dir: Path) -> Record:
    """An MMAR-meta.json object (`audio_path` like "./audio/x.wav"; `modality` is the task)."""
    _require(row, ("id", "audio_path", "question", "choices", "answer"))
    return _choices_and_answer_record(
        row, base_dir, audio_key="audio_path", mapped=_MMAR_MAPPED,
        task=_optional_text(row, "modality") or "unknown", split="test",
    )


def _choice_columns(row: dict[str, Any]) -> list[str]:
    """`choice_a`, `choice_b`, … as long as the row has them (MMSU has four)."""
    keys = []
    for letter in "abcdefghijklmnopqrstuvwxyz":
        if f"choice_{letter}" not in row:
            break
        keys.append(f"choice_{letter}")
    return keys


def _mmsu_audio_path(row: dict[str, Any], key: str, base_dir: Path) -> str:
    """MMSU writes "/audio/<id>.wav" meaning the MMSU folder, which holds `question/mmsu.jsonl`.

    A path that exists as written is kept. Otherwise the leading "/" is dropped and the path is looked
    up under the manifest's folder, then under its parent; if neither exists, the parent is assumed when
    the manifest sits in a folder named `question` (the release's layout), so the error names that path.
    """
    value = _text(row, key)
    if not value.strip():
        raise RowError(f"empty '{key}' (an audio path is required)")
    if os.path.isabs(value) and os.path.exists(value):
        return os.path.normpath(value)
    relative = value.lstrip("/\\")
    candidates = [base_dir / relative, base_dir.parent / relative]
    found = next((c for c in candidates if c.exists()), None)
    if found is None:
        found = candidates[1] if base_dir.name == "question" else candidates[0]
    return os.path.normpath(os.path.abspath(found))


_MMSU_MAPPED = {"id", "audio_path", "question", "answer_gt", "task_name", "category"}


def parse_mmsu(row: dict[str, Any], base_dir: Path) -> Record:
    """An MMSU object (`choice_a` … `choice_d`, `answer_gt`); see the module docstring."""
    _require(row, ("id", "audio_path", "question", "answer_gt"))
    columns = _choice_columns(row)
    letters, choices = [], []
    for column in columns:
        text = _scalar_text(row, column)
        if text is not None:  # a null option is no option
            letters.append(column[-1].upper())
            choices.append(text)
    if not choices:
        raise RowError("no choices: every choice_a … field is missing or null")
    meta = _extras(row, _MMSU_MAPPED | set(columns))
    category = _category(row, "category", meta)
    _duplicates(choices, meta)
    answer = _scalar_text(row, "answer_gt")
    return Record(
        id=_row_id(row, "id"),
        audio=_mmsu_audio_path(row, "audio_path", base_dir),
        question=_text(row, "question"),
        choices=choices,
        answer=_benchmark_answer(answer, choices, "answer_gt", meta, letters=letters),
        task=_optional_text(row, "task_name") or "unknown",
        split="test",
        category=category,
        meta=meta,
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


# Detection tries these in order; the first whose marker keys are all present wins. The benchmark layouts
# come first because their markers (audio_id, audio_path, question_text, choice_a) never appear in ours.
ADAPTERS: dict[str, Adapter] = {
    "mmau": Adapter("mmau", "id", parse_mmau, frozenset({"audio_id", "question", "choices"}), "audio_id"),
    "avqa": Adapter("avqa", "id", parse_avqa, frozenset({"question_text", "multi_choice"}), "audio_path"),
    "mmar": Adapter("mmar", "id", parse_mmar, frozenset({"audio_path", "question", "choices"}), "audio_path"),
    "mmsu": Adapter("mmsu", "id", parse_mmsu, frozenset({"question", "choice_a", "answer_gt"}), "audio_path"),
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


def layout_notes(records: Iterable[Record]) -> list[str]:
    """Counted warnings about what the benchmark layouts accepted (see the module docstring)."""
    records = list(records)
    duplicated = [r for r in records if r.meta.get("duplicate_choices")]
    notes = []
    if duplicated:
        of_answer = sum(r.answer in r.meta["duplicate_choices"] for r in duplicated)
        notes.append(
            f"{len(duplicated)} row(s) have duplicated choice strings ({of_answer} of them duplicate the "
            "answer); kept as released, scoring compares texts"
        )
    matched = sum("source_answer" in r.meta for r in records)
    if matched:
        notes.append(
            f"{matched} answer(s) are not literally a choice; matched to a choice by the benchmark "
            "tokenisation (benchmark scoring uses the source text, as the benchmark's script does)"
        )
    hidden = sum(bool(r.meta.get("answer_hidden")) for r in records)
    if hidden:
        notes.append(f"{hidden} row(s) have a hidden answer (e.g. the MMAU test split): accuracy cannot be computed")
    return notes
