"""The sampler: counter-based random numbers, and transformers' processors (repetition penalty, suppressed
tokens, temperature, top-k, top-p) reproduced exactly, against hand-worked cases and transformers itself."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mapo import sampling
from mapo.sampling import (
    SamplerSettings,
    apply_repetition_penalty,
    candidates,
    draw,
    next_tokens,
    row_keys,
    row_uniforms,
    seen_table,
)

torch.set_num_threads(1)


def lowbias32(x: int) -> int:
    """Pure-Python reference of the 32-bit mixer (plain modular arithmetic)."""
    m = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def dense(probs: torch.Tensor, ids: torch.Tensor | None, vocab: int) -> torch.Tensor:
    """Candidate probabilities [R, K] with their ids -> [R, V]."""
    if ids is None:
        return probs
    return torch.zeros(probs.shape[0], vocab, dtype=probs.dtype).scatter(1, ids, probs)


def test_mixer_equals_the_modular_reference():
    values = [0, 1, 2, 0xFFFFFFFF, 0x80000000, 123456789, 0xDEADBEEF] + torch.randint(0, 2**32, (50,)).tolist()
    got = sampling._mix32(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [lowbias32(v) for v in values]
    assert lowbias32(1) != lowbias32(2)  # the reference itself mixes


def test_row_uniforms_are_per_prompt_and_uniform():
    keys = row_keys([7, 8, 9], group_size=4)
    table = row_uniforms(keys[:, None], torch.arange(500))  # [12, 500]
    assert table.shape == (12, 500) and table.dtype == torch.float32
    assert (table >= 0).all() and (table < 1).all()
    # Whole table at once equals step by step, and a prompt's rows do not depend on the other prompts.
    assert torch.equal(table[:, 37], row_uniforms(keys, 37))
    alone = row_uniforms(row_keys([8], group_size=4)[:, None], torch.arange(500))
    assert torch.equal(alone, table[4:8])
    # Different seeds, rows of a group and steps differ; the values look uniform.
    assert len(set(keys.tolist())) == 12
    assert not torch.equal(table[0], table[1])
    flat = table.flatten()
    assert abs(flat.mean().item() - 0.5) < 0.01 and abs(flat.var().item() - 1 / 12) < 0.005
    counts = torch.histc(flat, bins=10, min=0, max=1)
    assert counts.min() > 0.9 * len(flat) / 10
    # Seeds beyond 32 bits use their high half too.
    assert not torch.equal(row_keys([5], 2), row_keys([5 + 2**32], 2))


def test_repetition_penalty_hand_worked():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[True, True, False, False]])
    # Seen positive logits are divided by the penalty, seen negative ones multiplied.
    assert torch.equal(apply_repetition_penalty(logits, seen, 2.0), torch.tensor([[1.0, -2.0, 0.5, 3.0]]))
    # The seen table counts kept positions only (padding excluded), each id once.
    table = seen_table(torch.tensor([[0, 0, 3, 3, 1]]), torch.tensor([[0, 0, 1, 1, 1]]), vocab_size=4)
    assert table[:, :4].tolist() == [[False, True, False, True]]


def test_top_k_top_p_hand_worked():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    logits = probs.log()
    # top-k 2: tokens 1 and 3, renormalised over 0.8.
    p, ids = candidates(logits, SamplerSettings(top_k=2))
    assert torch.allclose(dense(p, ids, 4), torch.tensor([[0.0, 0.625, 0.0, 0.375]]))
    # top-p 0.7: mass strictly above 0.5, 0.3, 0.15, 0.05 is 0, 0.5, 0.8, 0.95 -> keep 0.5 and 0.3.
    p, ids = candidates(logits, SamplerSettings(top_p=0.7))
    kept = dense(p, ids, 4)
    assert (kept > 0).tolist() == [[False, True, False, True]]
    assert torch.allclose(kept / kept.sum(), torch.tensor([[0.0, 0.625, 0.0, 0.375]]))
    # top-p 0.45: 0.3's mass above is 0.5 ≥ 0.45 -> only the top token.
    p, ids = candidates(logits, SamplerSettings(top_p=0.45))
    assert (dense(p, ids, 4) > 0).tolist() == [[False, True, False, False]]
    # top-k 3 then top-p 0.8: renormalised 0.5/0.95, 0.3/0.95, 0.15/0.95; mass above 0, 0.526, 0.842 -> {1, 3}.
    p, ids = candidates(logits, SamplerSettings(top_k=3, top_p=0.8))
    kept = dense(p, ids, 4)
    assert (kept > 0).tolist() == [[False, True, False, True]]
    assert torch.allclose(kept / kept.sum(), torch.tensor([[0.0, 0.625, 0.0, 0.375]]))
    # Temperature 2 flattens before the warpers: p ∝ sqrt(probs).
    p, ids = candidates(logits, SamplerSettings(temperature=2.0))
    assert ids is None and torch.allclose(p, probs.sqrt() / probs.sqrt().sum())


def test_draw_is_inverse_cdf():
    probs = torch.tensor([[0.1, 0.2, 0.0, 0.7]] * 3 + [[0.25, 0.25, 0.25, 0.25]])
    uniforms = torch.tensor([0.05, 0.29, 0.31, 0.6])
    # cdf 0.1, 0.3, 0.3, 1.0: u=0.05 -> 0, 0.29 -> 1, 0.31 -> 3 (never the zero-mass token 2); 0.6 -> 2.
    assert draw(probs, None, uniforms).tolist() == [0, 1, 3, 2]
    ids = torch.tensor([[9, 8, 7, 6]] * 4)
    assert draw(probs, ids, uniforms).tolist() == [9, 8, 6, 7]
    # Frequencies follow the probabilities over the counter-based stream.
    many = draw(torch.tensor([[0.5, 0.0, 0.5]]).expand(4000, 3), None, row_uniforms(row_keys(range(4000), 1), 3))
    assert (many != 1).all() and abs((many == 0).float().mean().item() - 0.5) < 0.03


def hf_distribution(logits, input_ids, pad_lengths, settings, suppress_ids):
    """transformers' processors in `generate`'s order, then softmax."""
    scores = logits.clone()
    if settings.repetition_penalty != 1.0:
        # One row at a time without its left padding (what generate passes as prompt_ignore_length in
        # transformers ≥ 5.2x; earlier releases take no per-row lengths).
        penalty = RepetitionPenaltyLogitsProcessor(settings.repetition_penalty)
        scores = torch.cat([penalty(input_ids[r : r + 1, int(pad_lengths[r]):], scores[r : r + 1]) for r in range(len(scores))])
    scores = SuppressTokensLogitsProcessor(suppress_ids)(input_ids, scores)
    if settings.temperature != 1.0:
        scores = TemperatureLogitsWarper(settings.temperature)(input_ids, scores)
    if settings.top_k:
        scores = TopKLogitsWarper(settings.top_k)(input_ids, scores)
    if settings.top_p < 1.0:
        scores = TopPLogitsWarper(settings.top_p)(input_ids, scores)
    return scores.softmax(-1)


@pytest.mark.parametrize(
    "settings",
    [
        SamplerSettings(temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.3),
        SamplerSettings(temperature=1.3, top_p=0.6),  # top-p alone: candidates suffice for peaked rows
        SamplerSettings(temperature=1.3, top_p=0.999),  # top-p alone: nucleus > NUCLEUS_CANDIDATES -> full sort
        SamplerSettings(temperature=1.0, top_k=50, top_p=0.99, repetition_penalty=1.2),  # the release's sampler
        SamplerSettings(temperature=0.9, repetition_penalty=0.8),
    ],
)
def test_distribution_equals_transformers_processors(settings):
    gen = torch.Generator().manual_seed(0)
    rows, vocab, length = 6, 300, 12
    logits = torch.randn(rows, vocab, generator=gen) * torch.linspace(0.5, 4.0, rows)[:, None]  # flat to peaked
    input_ids = torch.randint(vocab, (rows, length), generator=gen)
    pad = torch.tensor([0, 3, 0, 5, 1, 0])
    keep = torch.arange(length)[None, :] >= pad[:, None]
    suppress_ids = [4, 17]
    suppress = torch.zeros(vocab, dtype=torch.bool)
    suppress[suppress_ids] = True
    seen = seen_table(input_ids, keep, vocab)[:, :vocab]
    processed = sampling.processed_logits(logits, settings, suppress, seen)
    probs, ids = candidates(processed, settings)
    ours = dense(probs, ids, vocab)
    ours = ours / ours.sum(-1, keepdim=True)
    expected = hf_distribution(logits, input_ids, pad, settings, suppress_ids)
    assert torch.allclose(ours, expected, atol=1e-6, rtol=0)
    assert (ours[:, suppress_ids] == 0).all()
    if settings.top_p == 0.999:  # the test reaches the fallback, and the fast path elsewhere
        assert ((expected > 0).sum(-1) > sampling.NUCLEUS_CANDIDATES).any()


def test_greedy_ignores_warpers_and_applies_the_penalty():
    logits = torch.tensor([[1.0, 3.0, 2.9, -1.0]])
    seen = torch.tensor([[False, True, False, False]])
    settings = SamplerSettings(do_sample=False, temperature=0.1, top_k=1, top_p=0.1)
    assert next_tokens(logits, settings, suppress=None, seen=None, uniforms=None).tolist() == [1]
    penalised = SamplerSettings(do_sample=False, repetition_penalty=1.2)  # 3.0 / 1.2 = 2.5 < 2.9
    assert next_tokens(logits, penalised, suppress=None, seen=seen, uniforms=None).tolist() == [2]


def test_settings_are_validated():
    for bad in (dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5), dict(repetition_penalty=0.0), dict(temperature=0.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplerSettings(**bad)
    SamplerSettings(do_sample=False, temperature=0.0)  # greedy needs no temperature
