"""Answering a list of records under three audio conditions, sharded over ranks (DESIGN §6).

Training's evaluation (`evaluate_split`: strict accuracy per task) and the benchmark evaluation
(`mapo.eval`: benchmark matching, breakdowns, collapse diagnostics) share `answer_sharded`, which
generates greedily by default (sampling with per-item seeds on request) and can run a per-batch
function on each rollout (`item_extras`) while the completions are at hand.

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
from typing import Any

import numpy as np
import torch

from mapo.data.schema import Record
from mapo.models.loader import generation_suppressed_token_ids
from mapo.rewards import predicted_choice
from mapo.rollout import Rollout, generate_rollout

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
    """About `max_items` records: max_items // tasks of every task (at least one each, in file order); 0 keeps all."""
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
    eos_token_id: int | Sequence[int],
    pad_token_id: int,
    suppress_token_ids: Sequence[int],
    sync_finished: Callable[[bool], bool] | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seeds: Sequence[int] | None = None,
    cuda_graph: bool | str | None = None,
    compile_decoder: bool | str = False,
    on_batch: Callable[[Sequence[Record], Rollout], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Completions (decoded, special tokens skipped) for `records`, in order; greedy unless `do_sample`.

    seeds: one per record (sampling draws of record i come from seeds[i], whatever its batch);
    cuda_graph: the decode's CUDA-graph option (`mapo.rollout.generate_rollout`; None = "auto");
    compile_decoder: decode through a compiled text decoder (`rollout.compile`, `mapo.decode_compile`);
    on_batch(batch_records, rollout) runs after each batch is generated (e.g. collapse diagnostics on
    the same completions); progress(n) is told how many records each batch finished.
    """
    if seeds is not None and len(seeds) != len(records):
        raise ValueError(f"got {len(seeds)} seeds for {len(records)} records")
    tokenizer = collator.processor.tokenizer
    texts: list[str] = []
    for start in range(0, len(records), batch_size):
        part = records[start : start + batch_size]
        rollout = generate_rollout(
            model,
            collator.prompts(part),
            group_size=1,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            temperature=temperature,
            top_p=top_p,
            do_sample=do_sample,
            suppress_token_ids=suppress_token_ids,
            seeds=None if seeds is None else seeds[start : start + batch_size],
            drop_audio=drop_audio,
            sync_finished=sync_finished,
            cuda_graph=cuda_graph,
            compile_decoder=compile_decoder,
        )
        ids = rollout.completion_ids.masked_fill(rollout.completion_mask == 0, pad_token_id)
        texts.extend(tokenizer.batch_decode(ids.cpu(), skip_special_tokens=True))
        if on_batch is not None:
            on_batch(part, rollout)
        if progress is not None:
            progress(len(part))
    return texts


def generation_tokens(processor, vocab_size: int | None = None) -> dict[str, Any]:
    """Stop, pad and suppressed token ids for decoding with a chat model's processor.

    The assistant turn ends at `<|im_end|>`; the pad token and the audio/turn markers are suppressed
    (`mapo.models.loader.generation_suppressed_token_ids`), and with the model's `vocab_size` the LM-head
    rows past the tokenizer (a padded vocabulary) too.
    """
    tokenizer = processor.tokenizer
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if eos is None or eos == tokenizer.unk_token_id:
        raise ValueError("the tokenizer has no <|im_end|> token to stop the assistant turn at")
    return {
        "eos_token_id": eos,
        "pad_token_id": tokenizer.pad_token_id,
        "suppress_token_ids": generation_suppressed_token_ids(processor, vocab_size),
    }


def item_seed(seed: int, index: int) -> int:
    """Sampling seed of item `index` of an evaluated list: fixed by (seed, index), not by rank or batch."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def answer_sharded(
    model: torch.nn.Module,
    collator,
    records: Sequence[Record],
    condition: str,
    *,
    seed: int = 0,
    shard: tuple[int, int] = (0, 1),
    gather: Callable[[list], list] | None = None,
    item_extras: Callable[[Sequence[Record], Rollout], list[Any]] | None = None,
    **generation,
) -> tuple[list[str], list[Any] | None]:
    """Completions of `records` under `condition` (one of CONDITIONS), in order, on every rank.

    shard = (rank, world): this process answers items rank, rank + world, … of the list padded to a
    multiple of `world` (every rank then runs the same number of batches, as FSDP needs); `gather`
    collects each rank's list of (index, completion, extra) into one list on every rank (an all-gather
    the caller supplies; this module never touches torch.distributed). The shuffle of the `shuffled`
    condition and the sampling seeds are drawn over the whole list, so results do not depend on the
    number of ranks. item_extras(batch_records, rollout) returns one value per record of a batch
    (e.g. collapse diagnostics); they come back aligned with the completions (None when not asked).
    generation: the keyword arguments of `generate_answers`.
    """
    if condition not in CONDITIONS:
        raise ValueError(f"unknown eval condition {condition!r}; valid: {', '.join(CONDITIONS)}")
    shown = shuffled_audio(records, seed) if condition == "shuffled" else list(records)
    rank, world = shard
    padded = -(-len(shown) // world) * world
    mine = list(range(rank, padded, world))
    extras: list[Any] = []
    if item_extras is not None:
        generation["on_batch"] = lambda part, rollout: extras.extend(item_extras(part, rollout))
    if generation.get("do_sample"):
        generation["seeds"] = [item_seed(seed, min(i, len(shown) - 1)) for i in mine]
    texts = generate_answers(
        model, collator, [shown[min(i, len(shown) - 1)] for i in mine], drop_audio=condition == "no_audio", **generation
    )
    if item_extras is None:
        extras = [None] * len(texts)
    triples = [(i, t, e) for i, t, e in zip(mine, texts, extras) if i < len(shown)]
    if gather is not None:
        triples = [t for part in gather(triples) for t in part]
    triples.sort(key=lambda t: t[0])
    if [t[0] for t in triples] != list(range(len(records))):
        raise RuntimeError(f"evaluation under {condition}: gathered {len(triples)} answers for {len(records)} items")
    completions = [t for _, t, _ in triples]
    return completions, (None if item_extras is None else [e for _, _, e in triples])


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
    """Accuracy (strict option matching) of `records` under `condition`; sharding as in `answer_sharded`."""
    completions, _ = answer_sharded(model, collator, records, condition, seed=seed, shard=shard, gather=gather, **generation)
    predictions = [predicted_choice(text, r.choices) for text, r in zip(completions, records)]
    accuracy, per_task = accuracy_by_task(records, predictions)
    return EvalResult(split, condition, accuracy, per_task, predictions, completions, n=len(records))


def flip_rate(with_audio: EvalResult, without_audio: EvalResult) -> float:
    """Fraction of items whose chosen option changes when the audio is ablated."""
    pairs = list(zip(with_audio.predictions, without_audio.predictions))
    return float(np.mean([a != b for a, b in pairs])) if pairs else float("nan")
