"""Reward functions on decoded completions, selected by name (DESIGN §2 "rewards").

Every reward function is pure: `fn(completion: str, record: Record) -> float`, no model, no tensors,
no state. `completion` is the decoded completion text only (no prompt), decoded with special tokens
skipped, so a trailing `<|im_end|>` does not count as text after the answer.

Built-in functions (register more with `@register_reward("name")`):

- `accuracy`: 1.0 when the LAST complete innermost `<answer>…</answer>` pair names the right option,
  else 0.0. An answer names option k when, after normalisation (NFKC, case-folded, whitespace runs
  collapsed, trailing periods dropped), it equals
    1. option k's text exactly (whole text, so "1" never matches "10"); option text wins over a
       letter when the two disagree (choices ["B", "A"]: "A" is option text 2, not letter A), because
       the reference completion writes the option text;
    2. option k's letter: "B", "(B)", "B)", "B.", " b ";
    3. letter and text together as the prompt shows them: "(B) lower", "B) lower", "B. lower",
       "B: lower" (the text must be option k's text).
  Garbage, empty, truncated ("<answer>hig") or unmatched answers score 0.0; nothing raises on text.
  "Innermost" means the pair's content holds no tag, so "<answer><answer>B</answer></answer>" reads
  "B"; the format reward is the one that punishes such output. Reading the LAST pair means a model
  cannot hedge by listing several tagged answers.
- `format`: 1.0 when the completion is non-empty reasoning, then exactly one `<answer>`, then a
  non-empty answer, then exactly one `</answer>`, then nothing but whitespace; else 0.0.

Batches: `completions[i]` is scored against `records[i]`. With G samples per prompt, repeat each
record G times consecutively (`[r for r in prompts for _ in range(G)]`), so group j is rows
j*G … j*G+G-1, the layout the advantage functions expect.

MAPO's failed-completion gate reads `RewardResult.accuracy` (f_i = 1[accuracy ≤ 0]); list
"accuracy" among the names even when it should not shape the reward (give it weight 0).

A reward function that raises (or returns NaN/inf) on one completion must not end a multi-day run:
that completion gets 0 from that function, the failure is counted in `RewardResult.errors`, and the
first failure of each function is logged once per process with the completion and the error.
KeyboardInterrupt and other non-`Exception`s still propagate.
"""

from __future__ import annotations

import logging
import math
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from mapo.data.prompt import ANSWER_CLOSE, ANSWER_OPEN
from mapo.data.schema import Record

RewardFn = Callable[[str, Record], float]

log = logging.getLogger(__name__)

#: name -> reward function; fill it with `register_reward`.
REWARDS: dict[str, RewardFn] = {}


class UnknownRewardError(ValueError, KeyError):
    """An unknown reward name; a ValueError and a KeyError, so callers may catch either."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0])


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator adding `fn(completion, record) -> float` to `REWARDS` under `name` (names are unique)."""

    def add(fn: RewardFn) -> RewardFn:
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is already registered (by {REWARDS[name].__qualname__})")
        REWARDS[name] = fn
        return fn

    return add


def get_reward_fns(names: Sequence[str]) -> list[RewardFn]:
    """The registered functions for `names`, in order; an unknown name raises listing the valid ones."""
    unknown = [n for n in names if n not in REWARDS]
    if unknown:
        raise UnknownRewardError(
            f"unknown reward function(s) {', '.join(map(repr, unknown))}; valid: {', '.join(sorted(REWARDS))}"
        )
    return [REWARDS[n] for n in names]


# --------------------------------------------------------------------------------------------------
# Parsing the answer
# --------------------------------------------------------------------------------------------------

_OPEN, _CLOSE = re.escape(ANSWER_OPEN), re.escape(ANSWER_CLOSE)
# An innermost tag pair: content that contains neither tag (a "tempered" dot), shortest match.
_INNERMOST_PAIR = re.compile(rf"{_OPEN}((?:(?!{_OPEN}|{_CLOSE}).)*?){_CLOSE}", re.DOTALL)
# On normalised text: "(b)", "b)", "b" (a trailing "." was already dropped by `normalise_answer`).
_LETTER_ONLY = re.compile(r"^(?:\(([a-z])\)|([a-z])\)?)$")
# On normalised text: "(b) lower", "b) lower", "b. lower", "b: lower".
_LETTER_AND_TEXT = re.compile(r"^(?:\(([a-z])\)|([a-z])[).:])\s*(.+)$", re.DOTALL)


def normalise_answer(text: str) -> str:
    """Comparable form of an answer or option: NFKC, case-folded, single spaces, no trailing periods.

    NFKC makes full-width "Ｂ" equal "B" and a composed "é" equal a decomposed one; the trailing
    period goes because models often end a short answer with one ("higher.").
    """
    folded = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(folded.split()).rstrip(".").rstrip()


def extract_answer(completion: str) -> str | None:
    """Content of the last complete innermost `<answer>…</answer>` pair, raw; None when there is none."""
    if not isinstance(completion, str):
        raise TypeError(f"completion must be decoded text (str), got {type(completion).__name__}")
    contents = _INNERMOST_PAIR.findall(completion)
    return contents[-1] if contents else None


def match_choice(answer: str, choices: Sequence[str]) -> int | None:
    """Index of the option that `answer` names (rules in the module docstring), or None."""
    said = normalise_answer(answer)
    if not said:
        return None
    options = [normalise_answer(c) for c in choices]
    if said in options:  # option text first: see the module docstring
        return options.index(said)
    letter = _LETTER_ONLY.match(said)
    if letter:
        index = _letter_index(letter.group(1) or letter.group(2))
        return index if index < len(options) else None
    both = _LETTER_AND_TEXT.match(said)
    if both:
        index = _letter_index(both.group(1) or both.group(2))
        if index < len(options) and normalise_answer(both.group(3)) == options[index]:
            return index
    return None


def _letter_index(letter: str) -> int:
    """'a' -> 0, 'b' -> 1, … (letters are case-folded, the prompt shows them as A, B, …)."""
    return ord(letter) - ord("a")


def predicted_choice(completion: str, choices: Sequence[str]) -> int | None:
    """Index of the option the completion answers, or None (no complete tag, or no option named)."""
    answer = extract_answer(completion)
    return None if answer is None else match_choice(answer, choices)


# --------------------------------------------------------------------------------------------------
# Built-in reward functions
# --------------------------------------------------------------------------------------------------


@register_reward("accuracy")
def accuracy_reward(completion: str, record: Record) -> float:
    """1.0 when the last complete answer names `record.answer`, else 0.0."""
    index = predicted_choice(completion, record.choices)
    if index is None:
        return 0.0
    # Compare texts, not indices: a record with duplicate option texts still scores by meaning.
    return float(normalise_answer(record.choices[index]) == normalise_answer(record.answer))


@register_reward("format")
def format_reward(completion: str, record: Record) -> float:
    """1.0 for 'reasoning <answer>answer</answer>' with one tag pair and only whitespace after, else 0.0."""
    if not isinstance(completion, str):
        raise TypeError(f"completion must be decoded text (str), got {type(completion).__name__}")
    if completion.count(ANSWER_OPEN) != 1 or completion.count(ANSWER_CLOSE) != 1:
        return 0.0
    reasoning, _, rest = completion.partition(ANSWER_OPEN)
    answer, closed, after = rest.partition(ANSWER_CLOSE)
    ok = bool(closed) and reasoning.strip() and answer.strip() and not after.strip()
    return 1.0 if ok else 0.0


# --------------------------------------------------------------------------------------------------
# Batch scoring
# --------------------------------------------------------------------------------------------------


@dataclass
class RewardResult:
    """Rewards for N completions.

    total:        [N] float32, Σ_k weight_k · per_function[k].
    per_function: name -> [N] float32, each function's own values (for logging and gates).
    weights:      name -> weight used in `total`.
    errors:       name -> how many completions that function failed on (raised or gave NaN/inf; they
                  scored 0); only functions that failed at least once appear.
    """

    total: torch.Tensor
    per_function: dict[str, torch.Tensor]
    weights: dict[str, float]
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def accuracy(self) -> torch.Tensor:
        """[N] values of the "accuracy" function (MAPO's gate f_i = 1[accuracy ≤ 0] reads them)."""
        if "accuracy" not in self.per_function:
            raise KeyError(
                "the 'accuracy' reward was not computed; add it to the reward names "
                f"(weight 0 keeps it out of the total). Computed: {', '.join(self.per_function)}"
            )
        return self.per_function["accuracy"]

    def means(self, prefix: str = "reward/") -> dict[str, float]:
        """Batch means for logging: '<prefix><name>' per function and '<prefix>total' (host sync)."""
        out = {f"{prefix}{name}": values.mean().item() for name, values in self.per_function.items()}
        out[f"{prefix}total"] = self.total.mean().item()
        return out


def compute_rewards(
    completions: Sequence[str],
    records: Sequence[Record],
    names: Sequence[str],
    weights: Sequence[float] | Mapping[str, float] | None = None,
    device: torch.device | str | None = None,
) -> RewardResult:
    """Score `completions[i]` against `records[i]` with each named function and sum with weights.

    completions: N decoded completion texts.
    records:     N records aligned with `completions` (repeat each prompt's record G times).
    names:       reward function names (unique, at least one).
    weights:     one weight per name (a sequence in `names` order, or a mapping with exactly those
                 keys); None weighs every function 1.0.
    Returns a RewardResult with `total: [N]` and `per_function[name]: [N]`, float32 on `device`.
    """
    if len(completions) != len(records):
        raise ValueError(f"completions and records must align: got {len(completions)} completions, {len(records)} records")
    names = list(names)
    if not names:
        raise ValueError("at least one reward function name is required")
    if len(set(names)) != len(names):
        raise ValueError(f"reward names must be unique, got {names}")
    fns = get_reward_fns(names)
    weight_of = _weights_by_name(names, weights)

    per_function: dict[str, torch.Tensor] = {}
    errors: dict[str, int] = {}
    for name, fn in zip(names, fns):
        values = []
        for text, record in zip(completions, records):
            value, failure = _call_reward(fn, text, record)
            if failure is not None:
                errors[name] = errors.get(name, 0) + 1
                _log_first_failure(name, failure, text, record)
            values.append(value)
        per_function[name] = torch.tensor(values, dtype=torch.float32, device=device)

    total = torch.zeros(len(completions), dtype=torch.float32, device=device)
    for name in names:
        total = total + weight_of[name] * per_function[name]
    return RewardResult(total=total, per_function=per_function, weights=weight_of, errors=errors)


def _call_reward(fn: RewardFn, text: str, record: Record) -> tuple[float, str | None]:
    """(value, None), or (0.0, what went wrong) when `fn` raised or gave something not a finite number."""
    try:
        value = float(fn(text, record))
    except Exception as err:  # noqa: BLE001 — any bug in a user's reward: score 0, log, count, go on
        return 0.0, f"raised {type(err).__name__}: {err}"
    if not math.isfinite(value):
        return 0.0, f"returned {value}"
    return value, None


#: Reward names whose first failure this process has logged (each is logged once, then only counted).
_LOGGED_FAILURES: set[str] = set()


def _log_first_failure(name: str, failure: str, completion: str, record: Record) -> None:
    if name in _LOGGED_FAILURES:
        return
    _LOGGED_FAILURES.add(name)
    log.warning("reward %r %s on record %r; that completion scores 0 from it (later failures of %r are only "
                "counted: faults/reward_errors/%s in the run's metrics). The completion was:\n%s", name, failure,
                record.id, name, name, completion)


def _weights_by_name(names: list[str], weights: Sequence[float] | Mapping[str, float] | None) -> dict[str, float]:
    if weights is None:
        return {name: 1.0 for name in names}
    if isinstance(weights, Mapping):
        if set(weights) != set(names):
            raise ValueError(f"reward weights must name exactly the reward functions {names}, got keys {list(weights)}")
        return {name: float(weights[name]) for name in names}
    weights = list(weights)
    if len(weights) != len(names):
        raise ValueError(f"got {len(weights)} reward weights for {len(names)} reward functions {names}")
    return {name: float(w) for name, w in zip(names, weights)}
