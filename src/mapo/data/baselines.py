"""Blind baselines for a multiple-choice benchmark: what can be scored without listening.

Each baseline fits "majority answer per key" on the training records and scores another split:

- `majority_text_baseline`: key = (task, question wording). High accuracy means the text alone gives
  the answer away (the language prior); on the synthetic `counter_prior` split it must fall to chance.
- `clip_length_baseline`: key = (task, number of audio tokens of the clip). Above chance means the clip
  length leaks the answer (FIELD-NOTES: a tiny model learns to "count beeps" from the length alone).
- `content_duration_baseline`: key = (task, seconds of sound in the clip, binned). A stronger blind
  check: it sees how long the clip is *non-silent*, which a model could read off the energy envelope.

Ties in a majority are broken by the option order of the record (first option wins), so a perfectly
balanced key predicts the first option and scores exactly chance on balanced data. A key never seen in
training falls back to the task's majority answer.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Mapping, Sequence

from mapo.data.schema import Record

#: Audio samples per mel frame of the Whisper feature extractor at 16 kHz (10 ms hop).
MEL_HOP = 160


def audio_token_count(n_samples: int, hop: int = MEL_HOP) -> int:
    """Number of Qwen2-Audio audio tokens for a clip of `n_samples` samples.

    mel frames L = n_samples // hop; tokens = ((L - 1) // 2 + 1 - 2) // 2 + 1 (conv stride 2, then
    pooling stride 2), e.g. 3 s at 16 kHz: L = 300, ((299 // 2) + 1 - 2) // 2 + 1 = 148 // 2 + 1 = 75.
    """
    if n_samples < hop:
        raise ValueError(f"n_samples={n_samples}: a clip needs at least one mel frame ({hop} samples)")
    frames = n_samples // hop
    return ((frames - 1) // 2 + 1 - 2) // 2 + 1


def chance_accuracy(records: Sequence[Record]) -> float:
    """Expected accuracy of a uniform random guess: mean over records of 1 / len(choices)."""
    if not records:
        raise ValueError("chance_accuracy: no records")
    return sum(1.0 / len(r.choices) for r in records) / len(records)


def _majority(answers: Counter, choices: Sequence[str]) -> str:
    """Most frequent answer; ties go to the option that comes first in `choices`."""
    best = max(answers.values())
    return next(c for c in choices if answers.get(c, 0) == best)


def _fit_and_score(
    train_records: Sequence[Record],
    eval_records: Sequence[Record],
    key: Callable[[Record], Hashable],
) -> float:
    """Accuracy on `eval_records` of "majority training answer for (task, key(record))"."""
    if not train_records:
        raise ValueError("baseline: train_records is empty")
    if not eval_records:
        raise ValueError("baseline: eval_records is empty")
    by_key: dict[tuple[str, Hashable], Counter] = defaultdict(Counter)
    by_task: dict[str, Counter] = defaultdict(Counter)
    task_choices: dict[str, list[str]] = {}
    for r in train_records:
        by_key[(r.task, key(r))][r.answer] += 1
        by_task[r.task][r.answer] += 1
        task_choices.setdefault(r.task, r.choices)
    correct = 0
    for r in eval_records:
        counts = by_key.get((r.task, key(r))) or by_task.get(r.task)
        guess = _majority(counts, task_choices[r.task]) if counts else r.choices[0]
        correct += guess == r.answer
    return correct / len(eval_records)


def majority_text_baseline(train_records: Sequence[Record], eval_records: Sequence[Record]) -> float:
    """Accuracy of predicting the training majority answer for each (task, question wording)."""
    return _fit_and_score(train_records, eval_records, key=lambda r: r.question)


def clip_length_baseline(
    train_records: Sequence[Record], eval_records: Sequence[Record], lengths: Mapping[str, int]
) -> float:
    """Accuracy of predicting the training majority answer for each (task, clip length in audio tokens).

    lengths: record id -> clip length in samples at 16 kHz, for every train and eval record.
    """

    def tokens(r: Record) -> int:
        if r.id not in lengths:
            raise KeyError(f"clip_length_baseline: no clip length for record id {r.id!r}")
        return audio_token_count(lengths[r.id])

    return _fit_and_score(train_records, eval_records, key=tokens)


def content_duration_baseline(
    train_records: Sequence[Record],
    eval_records: Sequence[Record],
    durations: Mapping[str, float],
    bin_seconds: float = 0.1,
) -> float:
    """Accuracy of predicting the training majority answer for each (task, binned seconds of sound).

    durations: record id -> seconds of non-silent content in the clip (sum of its events).
    """
    if bin_seconds <= 0:
        raise ValueError(f"content_duration_baseline: bin_seconds must be > 0, got {bin_seconds}")

    def binned(r: Record) -> int:
        if r.id not in durations:
            raise KeyError(f"content_duration_baseline: no content duration for record id {r.id!r}")
        return int(durations[r.id] // bin_seconds)

    return _fit_and_score(train_records, eval_records, key=binned)


def baseline_table(
    splits: Mapping[str, Sequence[Record]],
    lengths: Mapping[str, int],
    durations: Mapping[str, float] | None = None,
    train_split: str = "train",
) -> dict[str, dict[str, float]]:
    """{baseline name: {split: accuracy}} for every split, each baseline fit on `splits[train_split]`.

    Rows: "chance", "text majority", "clip length" and, when `durations` is given, "content duration".
    """
    if train_split not in splits:
        raise KeyError(f"baseline_table: no split {train_split!r} (have {sorted(splits)})")
    train = splits[train_split]
    table: dict[str, dict[str, float]] = {"chance": {}, "text majority": {}, "clip length": {}}
    if durations is not None:
        table["content duration"] = {}
    for name, records in splits.items():
        table["chance"][name] = chance_accuracy(records)
        table["text majority"][name] = majority_text_baseline(train, records)
        table["clip length"][name] = clip_length_baseline(train, records, lengths)
        if durations is not None:
            table["content duration"][name] = content_duration_baseline(train, records, durations)
    return table


def format_baseline_table(table: Mapping[str, Mapping[str, float]]) -> str:
    """Plain-text table: one row per baseline, one column per split, accuracies with 3 decimals."""
    split_names = list(next(iter(table.values())).keys()) if table else []
    name_width = max([len("baseline")] + [len(n) for n in table])
    col_width = max([8] + [len(s) for s in split_names])
    lines = ["baseline".ljust(name_width) + "".join(f"  {s:>{col_width}}" for s in split_names)]
    for name, row in table.items():
        lines.append(name.ljust(name_width) + "".join(f"  {row[s]:>{col_width}.3f}" for s in split_names))
    return "\n".join(lines)
