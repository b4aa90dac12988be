"""Greedy evaluation: accuracy per task and split under three audio conditions (DESIGN §6).

Conditions:
- `audio`:    the item's own clip.
- `no_audio`: the audio features dropped; the placeholder tokens keep their bare embeddings (the same
              ablation as the MAPO reference's default), so the prompt layout is unchanged. This is the
              language-prior floor.
- `shuffled`: every item gets another item's clip (a fixed derangement within the evaluated set), so a
              model that reads the audio is misled while one that ignores it is not.
The flip rate compares the `audio` and `no_audio` answers: how often ablating the audio changes them.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from mapo.data.schema import Record
from mapo.rewards import predicted_choice
from mapo.rollout import generate_rollout

CONDITIONS = ("audio", "no_audio", "shuffled")


@dataclass
class EvalResult:
    """Accuracy of one split under one condition. `predictions[i]` is the chosen option index or None."""

    split: str
    condition: str
    accuracy: float
    per_task: dict[str, float]
    predictions: list[int | None] = field(repr=False)
    completions: list[str] = field(repr=False)
    n: int = 0


def shuffled_audio(records: Sequence[Record], seed: int) -> list[Record]:
    """Copies of `records` whose clips are permuted so that no item keeps its own (a derangement)."""
    n = len(records)
    if n < 2:
        return list(records)
    rng = np.random.default_rng(seed)
    shift = 1 + int(rng.integers(n - 1))  # a cyclic shift of a random order is a derangement
    order = rng.permutation(n)
    target = np.empty(n, dtype=np.int64)
    target[order] = order[(np.arange(n) + shift) % n]
    return [dataclasses.replace(r, audio=records[int(j)].audio) for r, j in zip(records, target)]


def evenly_by_task(records: Sequence[Record], max_items: int) -> list[Record]:
    """At most `max_items` records, taking the same share of every task (in file order); 0 keeps all."""
    if max_items <= 0 or len(records) <= max_items:
        return list(records)
    by_task: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_task[r.task].append(r)
    per_task = max(1, max_items // len(by_task))
    return [r for task in sorted(by_task) for r in by_task[task][:per_task]]


def accuracy_by_task(records: Sequence[Record], predictions: Sequence[int | None]) -> tuple[float, dict[str, float]]:
    hits: dict[str, list[bool]] = defaultdict(list)
    for r, p in zip(records, predictions):
        hits[r.task].append(p is not None and p == r.answer_index)
    every = [h for v in hits.values() for h in v]
    return float(np.mean(every)) if every else float("nan"), {t: float(np.mean(v)) for t, v in sorted(hits.items())}


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    collator,
    records: Sequence[Record],
    *,
    drop_audio: bool,
    batch_size: int,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    suppress_token_ids: Sequence[int],
    sync_finished: Callable[[bool], bool] | None = None,
) -> list[str]:
    """Greedy completions (decoded, special tokens skipped) for `records`, in order."""
    tokenizer = collator.processor.tokenizer
    texts: list[str] = []
    for start in range(0, len(records), batch_size):
        batch = collator.prompts(records[start : start + batch_size])
        rollout = generate_rollout(
            model,
            batch,
            group_size=1,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            do_sample=False,
            suppress_token_ids=suppress_token_ids,
            drop_audio=drop_audio,
            sync_finished=sync_finished,
        )
        ids = rollout.completion_ids.masked_fill(rollout.completion_mask == 0, pad_token_id)
        texts.extend(tokenizer.batch_decode(ids.cpu(), skip_special_tokens=True))
    return texts


def evaluate_split(
    model: torch.nn.Module,
    collator,
    records: Sequence[Record],
    split: str,
    condition: str,
    *,
    seed: int = 0,
    shard: tuple[int, int] = (0, 1),
    gather: Callable[[list], list] | None = None,
    **generation,
) -> EvalResult:
    """Accuracy of `records` under `condition` (one of CONDITIONS); see `generate_answers` for the rest.

    shard = (rank, world): this process answers items rank, rank + world, … of the list padded to a
    multiple of `world` (every rank then runs the same number of batches, as FSDP needs); `gather`
    collects each rank's list of (index, completion) into one list on every rank (an all-gather the
    caller supplies; this module never touches torch.distributed). The shuffle of the `shuffled`
    condition is drawn over the whole list first, so results do not depend on the number of ranks.
    """
    if condition not in CONDITIONS:
        raise ValueError(f"unknown eval condition {condition!r}; valid: {', '.join(CONDITIONS)}")
    shown = shuffled_audio(records, seed) if condition == "shuffled" else list(records)
    rank, world = shard
    padded = -(-len(shown) // world) * world
    mine = list(range(rank, padded, world))
    texts = generate_answers(
        model, collator, [shown[min(i, len(shown) - 1)] for i in mine], drop_audio=condition == "no_audio", **generation
    )
    pairs = [(i, t) for i, t in zip(mine, texts) if i < len(shown)]
    if gather is not None:
        pairs = [p for part in gather(pairs) for p in part]
    completions = [t for _, t in sorted(pairs)]
    if len(completions) != len(records):
        raise RuntimeError(f"evaluation of {split}/{condition}: gathered {len(completions)} answers for {len(records)} items")
    predictions = [predicted_choice(text, r.choices) for text, r in zip(completions, records)]
    accuracy, per_task = accuracy_by_task(records, predictions)
    return EvalResult(split, condition, accuracy, per_task, predictions, completions, n=len(records))


def flip_rate(with_audio: EvalResult, without_audio: EvalResult) -> float:
    """Fraction of items whose chosen option changes when the audio is ablated."""
    pairs = list(zip(with_audio.predictions, without_audio.predictions))
    return float(np.mean([a != b for a, b in pairs])) if pairs else float("nan")
