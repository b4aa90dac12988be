"""Next-token choice for the rollout: the logits processors and warpers of transformers' `generate`, applied
the same way and in the same order, without a full-vocabulary sort where a cheaper exact method exists, and
with counter-based random numbers (one uniform per row and step from a hash of (seed, row, step)).

Order (as `GenerationMixin._get_logits_processor` builds it): repetition penalty → suppressed tokens (-inf)
→ [sampling only] temperature → top-k → top-p. Greedy decoding takes the argmax after the first two (the
warpers do not change it).

- Repetition penalty (`RepetitionPenaltyLogitsProcessor`): every token id that occurs in the row so far,
  prompt included but left padding excluded (`generate` passes `prompt_ignore_length` = the padding
  length), has its logit divided by the penalty when positive and multiplied by it when negative; at most
  once per token id.
- Top-k (`TopKLogitsWarper`): tokens whose logit is below the k-th largest are dropped. transformers also
  keeps tokens whose logit is bit-identical to the k-th; here exactly k are kept (topk's choice among such
  ties), which differs only when two logits are equal at the boundary.
- Top-p (`TopPLogitsWarper`): a token is dropped when the tokens ranked strictly above it already hold
  ≥ top_p of the (top-k renormalised) mass, so the most likely token is always kept. transformers' test
  `cumsum ascending ≤ 1 − top_p` is the same condition.

Cost: with neither top-k nor top-p the draw runs over the vocabulary in id order (a cumulative sum, no
sort). Otherwise `torch.topk` takes K candidates (K = top_k, or `NUCLEUS_CANDIDATES` for top-p alone)
and the nucleus is computed exactly inside them; for top-p alone, a row whose candidates hold less than
top_p of the mass (its nucleus may be larger than K) sends that step to the full sort; knowing that costs
one device→host read per step, in that configuration only.

Random numbers: `row_uniforms(keys, step)` hashes a per-row 32-bit key and the step with a 32-bit integer
mixer (`_mix32`, the "lowbias32" constants), computed in int64 so that it is the same on every device and
needs no generator state. A prompt's rows get keys from (seed, index within the group), so its samples do
not depend on the batch or the rank it lands in, and the whole batch draws with one vectorised call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

#: Candidates taken by `torch.topk` when top-p runs without top-k; the exact full sort is used on the steps
#: where some row's nucleus does not fit in them.
NUCLEUS_CANDIDATES = 64

_M32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplerSettings:
    """How the next token is chosen. top_k = 0 and top_p = 1 are off; repetition_penalty = 1 is off."""

    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"top_k must be an integer ≥ 0 (0 = off), got {self.top_k!r}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1.0 = off), got {self.repetition_penalty}")

    @property
    def uses_penalty(self) -> bool:
        return self.repetition_penalty != 1.0


# ----------------------------------------------------------------------------------------- random numbers
def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x · constant) mod 2^32 for x in [0, 2^32), in int64 without overflow (constant split in 16-bit halves)."""
    low, high = constant & 0xFFFF, constant >> 16
    return ((x * low) + (((x * high) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply, lowbias32 constants) of int64 values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def row_keys(seeds: Sequence[int], group_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[B·G] int64 keys in [0, 2^32): row b·G + g gets a hash of (seeds[b], g). Seeds may be any Python ints."""
    # A seed may be any Python int: its low and high 32-bit halves are hashed together.
    low = torch.tensor([int(s) & _M32 for s in seeds], dtype=torch.int64, device=device)
    high = torch.tensor([(int(s) >> 32) & _M32 for s in seeds], dtype=torch.int64, device=device)
    base = _mix32(low ^ _mix32(high ^ 0x9E3779B9))  # [B]
    index = torch.arange(group_size, dtype=torch.int64, device=device)
    return _mix32(base[:, None] ^ _mix32(index[None, :] + 0x632BE5AB)).reshape(-1)


def row_uniforms(keys: torch.Tensor, steps: int | torch.Tensor) -> torch.Tensor:
    """float32 uniforms in [0, 1) from row keys and decode steps (broadcast together: keys [R] with an int
    step gives [R]; keys [R, 1] with steps [T] gives the whole table [R, T] in one call)."""
    steps = torch.as_tensor(steps, device=keys.device, dtype=torch.int64)
    x = _mix32(keys ^ _mix32((steps + 0x5BD1E995) & _M32))
    return (x >> 8).to(torch.float32) * (1.0 / (1 << 24))


# ----------------------------------------------------------------------------------------- processors
def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits [R, V], seen [R, V] bool (token ids present in the row) -> penalised logits [R, V]."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def seen_table(token_ids: torch.Tensor, keep: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, V + 1] bool: column v is True when token v occurs where keep is True in the row.

    token_ids, keep: [R, S]. Column V is a spare that absorbs the ids of the kept-out positions, so later
    tokens can be added with one `scatter_` (`seen.scatter_(1, tokens[:, None], True)`); pass
    `seen[:, :V]` to the penalty.
    """
    seen = torch.zeros(token_ids.shape[0], vocab_size + 1, dtype=torch.bool, device=token_ids.device)
    return seen.scatter_(1, token_ids.masked_fill(~keep.bool(), vocab_size), True)


def processed_logits(
    logits: torch.Tensor, settings: SamplerSettings, suppress: torch.Tensor | None, seen: torch.Tensor | None
) -> torch.Tensor:
    """The processors that also apply to greedy decoding: repetition penalty, then suppressed tokens -> -inf.

    logits [R, V] fp32; suppress [V] bool or None; seen [R, V] bool (needed when the penalty is on).
    """
    if settings.uses_penalty:
        if seen is None:
            raise ValueError("repetition_penalty needs the tokens seen so far")
        logits = apply_repetition_penalty(logits, seen, settings.repetition_penalty)
    if suppress is not None:
        logits = logits.masked_fill(suppress, float("-inf"))
    return logits


# ----------------------------------------------------------------------------------------- warpers
def _nucleus_keep(probs_sorted: torch.Tensor, top_p: float) -> torch.Tensor:
    """probs_sorted [R, K] descending -> keep [R, K]: the mass strictly above the token is < top_p."""
    mass_above = probs_sorted.cumsum(dim=-1) - probs_sorted
    return mass_above < top_p


def candidates(logits: torch.Tensor, settings: SamplerSettings) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The sampling distribution after temperature, top-k and top-p.

    logits [R, V] (processed, before temperature). Returns (probs [R, K], ids [R, K] or None): probabilities
    renormalised over the kept tokens (0 for dropped ones) and the token id of each column; ids is None when
    the columns are the vocabulary itself (no top-k, no top-p).
    """
    scaled = logits / settings.temperature if settings.temperature != 1.0 else logits
    vocab = scaled.shape[-1]
    top_k, top_p = min(settings.top_k, vocab), settings.top_p
    if top_k == 0 and top_p >= 1.0:
        return scaled.softmax(dim=-1), None
    if top_k > 0:
        values, ids = scaled.topk(top_k, dim=-1)  # sorted descending
        probs = values.softmax(dim=-1)
        if top_p < 1.0:
            probs = probs * _nucleus_keep(probs, top_p)
        return probs, ids
    # top-p alone: the K most likely tokens, exact when they hold ≥ top_p of the mass in every row.
    k = min(NUCLEUS_CANDIDATES, vocab)
    values, ids = scaled.topk(k, dim=-1)
    probs = (values - scaled.logsumexp(dim=-1, keepdim=True)).exp()
    if k < vocab and not bool((probs.sum(-1) >= top_p).all()):
        return _full_sort(scaled, top_p)
    return probs * _nucleus_keep(probs, top_p), ids


def _full_sort(scaled: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole vocabulary, sorted: [R, V] nucleus probabilities in descending order and their ids."""
    values, ids = scaled.sort(dim=-1, descending=True)
    probs = values.softmax(dim=-1)
    if top_p < 1.0:
        probs = probs * _nucleus_keep(probs, top_p)
    return probs, ids


def draw(probs: torch.Tensor, ids: torch.Tensor | None, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: probs [R, K] (any non-negative weights), ids [R, K] or None, uniforms [R] in [0, 1).

    Returns token ids [R] long: the first column whose cumulative weight exceeds u · (row total); a column of
    zero weight is never drawn.
    """
    cdf = probs.cumsum(dim=-1)
    targets = uniforms.to(cdf.dtype)[:, None] * cdf[:, -1:]
    column = torch.searchsorted(cdf, targets, right=True).clamp_(max=probs.shape[-1] - 1)
    return column.squeeze(-1) if ids is None else ids.gather(-1, column).squeeze(-1)


def next_tokens(
    logits: torch.Tensor,
    settings: SamplerSettings,
    *,
    suppress: torch.Tensor | None,
    seen: torch.Tensor | None,
    uniforms: torch.Tensor | None,
) -> torch.Tensor:
    """logits [R, V] fp32 -> the next token of each row [R] long (argmax when not sampling)."""
    logits = processed_logits(logits, settings, suppress, seen)
    if not settings.do_sample:
        return logits.argmax(dim=-1)
    if uniforms is None:
        uniforms = torch.rand(logits.shape[0], device=logits.device)
    probs, ids = candidates(logits, settings)
    return draw(probs, ids, uniforms)
