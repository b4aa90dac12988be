"""Answer matching as the benchmarks' own scoring scripts do it, next to our strict option matching.

Benchmark matching (MMAU's and MMAR's released scripts; re-implemented from their description):

1. The prediction is the text inside the last `<answer>…</answer>` pair when the output has one, else the
   whole output (`extract_prediction`; the scripts receive what the model wrote, and R1-AQA-style
   evaluations hand them the tagged answer).
2. Text becomes a set of lower-cased word tokens: `set(re.findall(r"\\b\\w+\\b", text.lower()))`.
3. A prediction with no token fails.
4. The "incorrect tokens" are the union, over every choice whose token set differs from the answer's,
   of that choice's tokens minus the answer's tokens (choices that read the same as the answer, e.g.
   duplicates or reordered words, add nothing).
5. The prediction is correct iff it holds every answer token and none of the incorrect tokens.

This is more lenient than ours in some ways ("the dog is barking" names "dog barking") and stricter in
others: a letter prefix "(A) dog" fails when another choice holds the word "a". Both are the
benchmarks' behaviour, kept on purpose so our numbers sit next to published ones.

Strict matching is `mapo.rewards.predicted_choice` (and `accuracy_reward` for correct_strict): the last complete answer tag must
name one option by its text or its letter (the accuracy reward of training). It is reported as a second
column.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from mapo.rewards import extract_answer

_WORD = re.compile(r"\b\w+\b")


def benchmark_tokens(text: str) -> set[str]:
    """The scripts' tokenisation: the set of lower-cased `\\b\\w+\\b` words of `text`."""
    return set(_WORD.findall(text.lower()))


def extract_prediction(output: str) -> str:
    """The content of the last complete `<answer>…</answer>` pair, else the whole output."""
    answer = extract_answer(output)
    return output if answer is None else answer


def incorrect_tokens(answer: str, choices: Sequence[str]) -> set[str]:
    """Union over choices whose token set differs from the answer's of (choice tokens − answer tokens)."""
    answer_tokens = benchmark_tokens(answer)
    bad: set[str] = set()
    for choice in choices:
        tokens = benchmark_tokens(choice)
        if tokens != answer_tokens:
            bad |= tokens - answer_tokens
    return bad


def benchmark_correct(prediction: str, answer: str, choices: Sequence[str]) -> bool:
    """True iff `prediction` holds every token of `answer` and no incorrect token (module docstring)."""
    predicted = benchmark_tokens(prediction)
    if not predicted:
        return False
    return benchmark_tokens(answer) <= predicted and predicted.isdisjoint(incorrect_tokens(answer, choices))


def benchmark_choice(prediction: str, choices: Sequence[str]) -> int | None:
    """Index of the option the prediction names under benchmark matching, or None.

    An option is named when `benchmark_correct(prediction, option, choices)` holds. When options with
    different texts are all named (their token sets are equal, e.g. "dog barking" / "barking dog"), the
    prediction is ambiguous and None is returned; equal texts (duplicated options) give the first index.
    """
    named = [i for i, choice in enumerate(choices) if benchmark_correct(prediction, choice, choices)]
    if not named or len({choices[i] for i in named}) > 1:
        return None
    return named[0]


def match_answer_to_choice(answer: str, choices: Sequence[str]) -> int | None:
    """Where a source's answer text is not literally a choice: the choice it names by the tokenisation.

    First a unique choice with the same token set as `answer`, else the unique choice that `answer`,
    read as a prediction, is benchmark-correct for. None when neither is unique.
    """
    answer_tokens = benchmark_tokens(answer)
    if not answer_tokens:
        return None
    same = [i for i, choice in enumerate(choices) if benchmark_tokens(choice) == answer_tokens]
    if len({choices[i] for i in same}) == 1:
        return same[0]
    if same:
        return None
    return benchmark_choice(answer, choices)
