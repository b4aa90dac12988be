"""The prompt and target text shown to the model; one place so data, rewards and training agree.

User turn: the audio (when the record has one), then the question, the options as `(A) text`, and
the instruction to reason then answer inside `<answer>…</answer>`. The reference completion (used
by the supervised warm start) is the record's trace followed by the answer tag with the option text.
"""

from __future__ import annotations

import string

from mapo.data.schema import Record

ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
INSTRUCTION = "Think step by step, then give the answer in <answer></answer>."


def option_letter(index: int) -> str:
    return string.ascii_uppercase[index]


def user_text(record: Record) -> str:
    """Question, lettered options and instruction, e.g. 'Is the second tone higher or lower?\\n(A) higher (B) lower\\n…'."""
    options = " ".join(f"({option_letter(i)}) {c}" for i, c in enumerate(record.choices))
    return f"{record.question}\n{options}\n{INSTRUCTION}"


def messages(record: Record) -> list[dict]:
    """Chat messages for the processor's chat template (the audio entry only when there is a clip)."""
    content: list[dict] = []
    if record.audio is not None:
        content.append({"type": "audio", "audio_url": record.audio})
    content.append({"type": "text", "text": user_text(record)})
    return [{"role": "user", "content": content}]


def reference_completion(record: Record) -> str:
    """Target text for the warm start: '<trace> <answer>option text</answer>'."""
    answer = f"{ANSWER_OPEN}{record.answer}{ANSWER_CLOSE}"
    return f"{record.trace} {answer}" if record.trace else answer
