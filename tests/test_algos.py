"""Tests for mapo.algos: hand-worked values (arithmetic in comments), edge cases, loop references.

The loop references below are deliberately naive Python (lists, math, one element at a time) so a
mistake in the vectorised code cannot be repeated in the reference.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from mapo.algos.advantages import group_advantages
from mapo.algos.losses import AGGREGATION_MODES, aggregate, clip_fractions, clip_token_counts, kl_penalty, policy_loss
from mapo.algos.mapo import (
    attention_loss,
    build_content_vocab_mask,
    content_token_gate,
    relevance_weights,
    sequence_gate,
    softmax_temperature,
    targeting_weights,
    temporal_weights,
)

torch.set_num_threads(1)
SEEDS = (0, 1, 2, 3, 4)


def close(actual: torch.Tensor, expected, atol: float = 1e-6) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def random_mask(generator: torch.Generator, batch: int, width: int, allow_empty: bool = True) -> torch.Tensor:
    """Left-aligned completion mask [B, T] with random lengths (0..T when allow_empty)."""
    low = 0 if allow_empty else 1
    lengths = torch.randint(low, width + 1, (batch,), generator=generator)
    return torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)


# ---------------------------------------------------------------- advantages


def test_group_advantages_hand_values_each_scale():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.1, 0.1, 0.1, 0.1])
    # group 1: mean 0.5, centred ±0.5, unbiased var = 4·0.25/3 = 1/3 → std = 0.57735
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)  # = 0.865876
    close(group_advantages(rewards, 4, "group"), [a, -a, -a, a, 0, 0, 0, 0])
    # batch: mean 0.3; squared deviations 0.49+0.09+0.09+0.49+4·0.04 = 1.32; /7 = 0.188571 → std 0.434248
    b = 0.5 / (math.sqrt(1.32 / 7) + 1e-4)  # = 1.151161
    close(group_advantages(rewards, 4, "batch"), [b, -b, -b, b, 0, 0, 0, 0])
    close(group_advantages(rewards, 4, "none"), [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_identical_rewards_give_exactly_zero(scale):
    # float32 mean of seven 0.3s is 0.3 − 3e-8, so R − mean ≠ 0 and /(0 + 1e-4) would give 3e-4.
    rewards = torch.cat([torch.full((7,), 0.3), torch.tensor([0.0, 1, 0, 1, 1, 0, 0])])
    advantages = group_advantages(rewards, 7, scale)
    assert torch.equal(advantages[:7], torch.zeros(7))
    assert advantages[7:].abs().min() > 0.1


def test_group_of_one_is_zero_not_nan():
    # unbiased std of one value is undefined; we use 0, and the centred reward is 0 anyway
    for scale in ("group", "batch", "none"):
        assert torch.equal(group_advantages(torch.tensor([3.0]), 1, scale), torch.zeros(1))
        assert torch.equal(group_advantages(torch.tensor([3.0, -1.0]), 1, scale), torch.zeros(2))


def test_group_advantages_rejects_bad_input():
    with pytest.raises(ValueError, match="not a multiple of group_size=4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="group, batch, none"):
        group_advantages(torch.zeros(4), 4, scale="global")


def loop_group_advantages(rewards: list[float], group_size: int, scale: str, eps: float) -> list[float]:
    out = []
    batch_std = statistics.stdev(rewards) if len(rewards) > 1 else 0.0
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        mean = sum(group) / len(group)
        std = statistics.stdev(group) if len(group) > 1 else 0.0
        for r in group:
            if max(group) == min(group):
                out.append(0.0)
            elif scale == "group":
                out.append((r - mean) / (std + eps))
            elif scale == "batch":
                out.append((r - mean) / (batch_std + eps))
            else:
                out.append(r - mean)
    return out


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_loop(seed, scale):
    g = torch.Generator().manual_seed(seed)
    group_size = int(torch.randint(2, 9, (1,), generator=g))
    binary = torch.randint(0, 2, (5 * group_size,), generator=g).double()  # some groups all-equal
    continuous = torch.randn(5 * group_size, generator=g, dtype=torch.float64)
    rewards = torch.where(torch.rand(5 * group_size, generator=g) < 0.5, binary, continuous)
    expected = loop_group_advantages(rewards.tolist(), group_size, scale, 1e-4)
    close(group_advantages(rewards, group_size, scale), expected, atol=1e-9)


# ---------------------------------------------------------------- policy loss


def ratios_to_logprobs(ratios: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.5, -2.5]], dtype=torch.float64)
    return old + torch.tensor(ratios, dtype=torch.float64).log(), old


def test_policy_loss_hand_values_and_gradient():
    logprobs, old = ratios_to_logprobs([[1.5, 0.9, 0.5], [0.5, 1.1, 1.5]])
    logprobs.requires_grad_(True)
    advantages = torch.tensor([1.0, -2.0], dtype=torch.float64)
    loss = policy_loss(logprobs, old, advantages, eps_low=0.2, eps_high=0.2)
    # row 0, Â = +1:  r=1.5: −min(1.5, 1.2) = −1.2 (clipped)   r=0.9: −min(0.9, 0.9) = −0.9   r=0.5: −min(0.5, 0.8) = −0.5
    # row 1, Â = −2:  r=0.5: −min(−1.0, −1.6) = 1.6 (clipped)  r=1.1: −min(−2.2, −2.2) = 2.2  r=1.5: −min(−3.0, −2.4) = 3.0
    close(loss, [[-1.2, -0.9, -0.5], [1.6, 2.2, 3.0]])
    loss.sum().backward()
    # unclipped: dℓ/dlogπ = −Â·r (dr/dlogπ = r); clipped: 0
    # row 0: [0, −0.9, −0.5]; row 1: [0, +2·1.1, +2·1.5] = [0, 2.2, 3.0]
    close(logprobs.grad, [[0.0, -0.9, -0.5], [0.0, 2.2, 3.0]])


def test_policy_loss_asymmetric_clip_and_on_policy_gradient():
    logprobs, old = ratios_to_logprobs([[1.5, 1.25, 1.0], [0.75, 0.5, 1.0]])
    advantages = torch.tensor([1.0, -1.0], dtype=torch.float64)
    loss = policy_loss(logprobs, old, advantages, eps_low=0.2, eps_high=0.28)
    # row 0 (Â=+1): 1.5 → clip 1.28 → −1.28; 1.25 < 1.28 unclipped → −1.25; r=1 → −1
    # row 1 (Â=−1): 0.75 → −min(−0.75, −0.8) = 0.8 (clipped at 1−0.2); 0.5 → 0.8 (clipped); r=1 → 1
    close(loss, [[-1.28, -1.25, -1.0], [0.8, 0.8, 1.0]])
    # first step on-policy (logπ = logπ_old exactly): gradient is −Â for every token
    same = old.clone().requires_grad_(True)
    policy_loss(same, old, torch.tensor([0.7, -1.3], dtype=torch.float64)).sum().backward()
    close(same.grad, [[-0.7] * 3, [1.3] * 3])


def test_clip_statistics_hand_values():
    logprobs, old = ratios_to_logprobs([[1.5, 0.9, 0.5], [0.5, 1.1, 1.5]])
    advantages = torch.tensor([1.0, -2.0], dtype=torch.float64)
    mask = torch.ones(2, 3, dtype=torch.bool)
    # clipped high: (0,0) Â>0, r=1.5>1.2; clipped low: (1,0) Â<0, r=0.5<0.8; 6 tokens
    fractions = clip_fractions(logprobs, old, advantages, mask)
    close(fractions["clip_frac_high"], 1 / 6)
    close(fractions["clip_frac_low"], 1 / 6)
    close(fractions["clip_frac"], 2 / 6)
    mask[1, 0] = False  # the low-clipped token is padding now: 0 low of 5 tokens
    counts = clip_token_counts(logprobs, old, advantages, mask)
    assert [float(counts[k]) for k in ("clipped_high", "clipped_low", "tokens")] == [1.0, 0.0, 5.0]
    empty = clip_fractions(logprobs, old, advantages, torch.zeros(2, 3, dtype=torch.bool))
    assert float(empty["clip_frac"]) == 0.0


def loop_policy_loss(logprobs, old, advantages, eps_low, eps_high):
    rows = []
    for lp_row, old_row, adv in zip(logprobs, old, advantages):
        row = []
        for lp, o in zip(lp_row, old_row):
            r = math.exp(lp - o)
            clipped = min(max(r, 1 - eps_low), 1 + eps_high)
            row.append(-min(r * adv, clipped * adv))
        rows.append(row)
    return rows


@pytest.mark.parametrize("seed", SEEDS)
def test_policy_loss_matches_loop_and_definition_gradient(seed):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(6, 7, generator=g, dtype=torch.float64) * 3
    logprobs = (old + 0.4 * torch.randn(6, 7, generator=g, dtype=torch.float64)).requires_grad_(True)
    advantages = torch.randn(6, generator=g, dtype=torch.float64)
    loss = policy_loss(logprobs, old, advantages, 0.2, 0.28)
    expected = loop_policy_loss(logprobs.tolist(), old.tolist(), advantages.tolist(), 0.2, 0.28)
    close(loss, expected, atol=1e-12)
    loss.sum().backward()
    # definition: the gradient is −Â·r unless the clipped branch is active, then 0
    ratio = (logprobs - old).exp().detach()
    adv = advantages.unsqueeze(-1)
    clipped = ((adv > 0) & (ratio > 1.28)) | ((adv < 0) & (ratio < 0.8))
    assert clipped.any() and (~clipped).any()  # both regimes are exercised
    close(logprobs.grad, torch.where(clipped, 0.0, -adv * ratio), atol=1e-12)


# ---------------------------------------------------------------- KL


def test_kl_penalty_hand_values():
    p = torch.tensor([[math.log(0.5), math.log(0.3)]], dtype=torch.float64)
    q = torch.tensor([[math.log(0.25), math.log(0.3)]], dtype=torch.float64)
    # token 0: q − p = log 0.5 = −0.693147
    #   k3 = e^{−0.693147} − (−0.693147) − 1 = 0.5 + 0.693147 − 1 = 0.193147
    #   k1 = p − q = 0.693147;  k2 = ½·0.693147² = 0.240227
    # token 1: p = q → all three 0
    close(kl_penalty(p, q, "k3"), [[0.5 + math.log(2) - 1, 0.0]])
    close(kl_penalty(p, q, "k1"), [[math.log(2), 0.0]])
    close(kl_penalty(p, q, "k2"), [[0.5 * math.log(2) ** 2, 0.0]])
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalty(p, q, "k4")


@pytest.mark.parametrize("seed", SEEDS)
def test_kl_penalty_matches_loop(seed):
    g = torch.Generator().manual_seed(seed)
    p = -torch.rand(4, 5, generator=g, dtype=torch.float64) * 4
    q = -torch.rand(4, 5, generator=g, dtype=torch.float64) * 4
    formulas = {
        "k1": lambda a, b: a - b,
        "k2": lambda a, b: 0.5 * (a - b) ** 2,
        "k3": lambda a, b: math.exp(b - a) - (b - a) - 1,
    }
    for kind, formula in formulas.items():
        expected = [[formula(a, b) for a, b in zip(ra, rb)] for ra, rb in zip(p.tolist(), q.tolist())]
        close(kl_penalty(p, q, kind), expected, atol=1e-12)
    assert (kl_penalty(p, q, "k3") >= 0).all()


# ---------------------------------------------------------------- aggregation


LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)


def test_aggregate_hand_values_mask_weights():
    weights = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    # per sequence: (1+2)/2 = 1.5 and 4/1 = 4 → mean 2.75
    close(aggregate(LOSS, weights, "seq_mean_token_mean"), 2.75)
    # global token mean: (1+2+4)/3 = 7/3
    close(aggregate(LOSS, weights, "token_mean"), 7 / 3)
    # sequence sums 3 and 4 → mean 3.5
    close(aggregate(LOSS, weights, "seq_mean_token_sum"), 3.5)
    # Dr.GRPO: 7 / (B·T) = 7/6; with max_len 7: 7/14
    close(aggregate(LOSS, weights, "dr_grpo"), 7 / 6)
    close(aggregate(LOSS, weights, "dr_grpo", max_len=7), 0.5)
    # explicit global normalisers: token_mean 7/10, per-sequence modes over 4 sequences
    close(aggregate(LOSS, weights, "token_mean", num_tokens=10), 0.7)
    close(aggregate(LOSS, weights, "seq_mean_token_mean", num_seqs=4), 5.5 / 4)
    close(aggregate(LOSS, weights, "dr_grpo", num_seqs=4, max_len=7), 7 / 28)


def test_aggregate_hand_values_omega_weights_and_nonfinite_padding():
    weights = torch.tensor([[2.0, 0.5, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    loss = LOSS.clone()
    loss[0, 2], loss[1, 1] = math.inf, math.nan  # padded columns: must not leak through 0·inf
    # row 0: (2·1 + 0.5·2)/(2 + 0.5) = 3/2.5 = 1.2; row 1: 4/1 = 4 → mean 2.6
    close(aggregate(loss, weights, "seq_mean_token_mean"), 2.6)
    # Σ w·ℓ = 2 + 1 + 4 = 7 over Σ w = 3.5 → 2
    close(aggregate(loss, weights, "token_mean"), 2.0)
    close(aggregate(loss, weights, "seq_mean_token_sum"), 3.5)


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_aggregate_all_masked_is_zero_with_finite_grad(mode):
    loss = LOSS.clone().requires_grad_(True)
    value = aggregate(loss, torch.zeros(2, 3, dtype=torch.float64), mode)
    value.backward()
    assert float(value.detach()) == 0.0 and torch.equal(loss.grad, torch.zeros(2, 3, dtype=torch.float64))


def test_aggregate_rejects_unknown_mode_and_bad_shape():
    with pytest.raises(ValueError, match="seq_mean_token_mean, token_mean, seq_mean_token_sum, dr_grpo"):
        aggregate(LOSS, torch.ones_like(LOSS), "mean")
    with pytest.raises(ValueError, match="weights must have shape"):
        aggregate(LOSS, torch.ones(2, 2), "token_mean")


def loop_aggregate(loss, weights, mode, num_tokens, num_seqs, max_len):
    total, per_seq_means = 0.0, 0.0
    for loss_row, weight_row in zip(loss, weights):
        row_sum = sum(w * l for w, l in zip(weight_row, loss_row) if w != 0)
        row_weight = sum(weight_row)
        total += row_sum
        per_seq_means += row_sum / row_weight if row_weight > 0 else 0.0
    return {
        "seq_mean_token_mean": per_seq_means / num_seqs,
        "token_mean": total / num_tokens,
        "seq_mean_token_sum": total / num_seqs,
        "dr_grpo": total / (num_seqs * max_len),
    }[mode]


def make_aggregation_case(seed: int):
    """Random left-aligned batch: policy loss from a logprob leaf, ω̃-style weights with an empty row."""
    g = torch.Generator().manual_seed(seed)
    batch, width = 8, 6
    mask = random_mask(g, batch, width, allow_empty=False)
    mask[int(torch.randint(0, batch, (1,), generator=g))] = False  # one empty completion
    old = -torch.rand(batch, width, generator=g, dtype=torch.float64) * 3
    logprobs = (old + 0.3 * torch.randn(batch, width, generator=g, dtype=torch.float64)).requires_grad_(True)
    advantages = torch.randn(batch, generator=g, dtype=torch.float64)
    omega = torch.rand(batch, width, generator=g, dtype=torch.float64) * 2
    return logprobs, old, advantages, mask.double() * omega


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_aggregate_matches_loop(seed, mode):
    logprobs, old, advantages, weights = make_aggregation_case(seed)
    loss = policy_loss(logprobs, old, advantages).detach()
    num_tokens, num_seqs, max_len = float(weights.sum()), 8, 10
    value = aggregate(loss, weights, mode, num_tokens=num_tokens, max_len=max_len, num_seqs=num_seqs)
    expected = loop_aggregate(loss.tolist(), weights.tolist(), mode, num_tokens, num_seqs, max_len)
    close(value, expected, atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_micro_batches_with_global_normaliser_equal_whole_batch(seed, mode):
    logprobs, old, advantages, weights = make_aggregation_case(seed)
    # global normalisers of the step (what the trainer sums over ranks and micro-batches)
    normalisers = dict(num_tokens=weights.sum(), num_seqs=weights.shape[0], max_len=10)

    whole = aggregate(policy_loss(logprobs, old, advantages), weights, mode, **normalisers)
    (whole_grad,) = torch.autograd.grad(whole, logprobs)

    parts = []
    for rows in (slice(0, 3), slice(3, 4), slice(4, 8)):
        # each micro-batch is trimmed to its own longest completion, as a collator would pad it
        width = max(int((weights[rows] != 0).sum(-1).max()), 1)
        lp, o, w = logprobs[rows, :width], old[rows, :width], weights[rows, :width]
        parts.append(aggregate(policy_loss(lp, o, advantages[rows]), w, mode, **normalisers))
    summed = torch.stack(parts).sum()
    (summed_grad,) = torch.autograd.grad(summed, logprobs)
    close(summed, whole.detach())
    close(summed_grad, whole_grad)
    assert whole_grad.abs().sum() > 0


# ---------------------------------------------------------------- relevance weights ω̃


def test_softmax_temperature_uses_log_two_for_short_rows():
    # τ = τ_base·log(max(n, 2)): n = 0, 1, 2 → log 2; n = 8 → log 8
    close(softmax_temperature(torch.tensor([0, 1, 2, 8]), 1.5), [1.5 * math.log(2)] * 3 + [1.5 * math.log(8)])


def test_soft_relevance_hand_values():
    ln2, ln3 = math.log(2), math.log(3)
    delta_h = torch.tensor(
        [
            [0.0, -ln2 * ln3, float("nan")],  # T = 2, τ = log 2 → |Δh|/τ = [0, ln 3]
            [7.0, float("nan"), 1.0],  # one-token completion (only column 0 valid)
            [1.0, 2.0, 3.0],  # no valid token
        ]
    )
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    # row 0: softmax([0, ln 3]) = [1/4, 3/4] → ×T=2 → [0.5, 1.5]
    # row 1: T = 1 → τ = log max(1, 2) = log 2 (log 1 = 0 would give 7/0 → NaN); softmax of one → 1
    # row 2: all masked → zeros
    close(relevance_weights(delta_h, mask, "soft"), [[0.5, 1.5, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])


def test_soft_relevance_cap_binds():
    delta_h = torch.tensor([[10.0] + [0.0] * 7])
    mask = torch.ones(1, 8, dtype=torch.bool)
    # τ = log 8 = 2.0794; e^{10/2.0794} = e^{4.8090} = 122.62
    # token 0: 8·122.62/(122.62 + 7) = 7.568 > C_mask = 5 → 5;  others: 8/129.62 = 0.0617 each
    big = math.exp(10 / math.log(8))
    expected = [5.0] + [8 / (big + 7)] * 7
    close(relevance_weights(delta_h, mask, "soft", cap=5.0), [expected], atol=1e-5)
    close(relevance_weights(delta_h, mask, "soft", cap=None)[0, 0], 8 * big / (big + 7), atol=1e-5)
    # tau_base scales the temperature: τ = 2·log 8 → e^{10/(2 log 8)} = 11.07 → 8·11.07/18.07 = 4.90 (cap not binding)
    mild = math.exp(10 / (2 * math.log(8)))
    close(relevance_weights(delta_h, mask, "soft", tau_base=2.0)[0, 0], 8 * mild / (mild + 7), atol=1e-5)


def test_hard_relevance_kinds_hand_values():
    delta_h = torch.tensor([[0.1, -0.9, 0.3, 0.7, -0.2], [1.0, 2.0, -3.0, 4.0, 99.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]], dtype=torch.bool)
    f = 0.1
    # threshold 0.5: |Δh| ≥ 0.5 → 1 else floor; the masked 99 → 0
    close(
        relevance_weights(delta_h, mask, "threshold", threshold=0.5, floor=f),
        [[f, 1, f, 1, f], [1, 1, 1, 1, 0]],
    )
    # topk ρ = 0.5: row 0 keeps ceil(2.5) = 3 (0.9, 0.7, 0.3); row 1 keeps ceil(2) = 2 (4, 3)
    close(
        relevance_weights(delta_h, mask, "topk", rho=0.5, floor=f),
        [[f, 1, 1, 1, f], [f, f, 1, 1, 0]],
    )
    # topk ρ = 0.2, T = 5: 0.2·5 is 1 up to rounding → exactly 1 token (0.9), not 2
    close(relevance_weights(delta_h, mask, "topk", rho=0.2, floor=0.0)[0], [0, 1, 0, 0, 0])
    # ρ = 0.28, T = 25: 0.28·25 = 7.000000000000001 in floating point → still exactly 7 tokens, not 8
    row = torch.arange(25.0).unsqueeze(0)
    assert int(relevance_weights(row, torch.ones(1, 25), "topk", rho=0.28, floor=0.0).sum()) == 7
    # quantile ρ = 0.5 over the 9 valid tokens: ceil(4.5) = 5 → 4, 3, 2, 1, 0.9
    close(
        relevance_weights(delta_h, mask, "quantile", rho=0.5, floor=f),
        [[f, 1, f, f, f], [1, 1, 1, 1, 0]],
    )


def test_relevance_rejects_unknown_kind():
    with pytest.raises(ValueError, match="soft, threshold, topk, quantile"):
        relevance_weights(torch.zeros(1, 2), torch.ones(1, 2), kind="hard")


@pytest.mark.parametrize("kind", ["soft", "threshold", "topk", "quantile"])
def test_relevance_all_masked_is_zero_with_finite_grad(kind):
    delta_h = torch.randn(3, 4, requires_grad=True)
    weights = relevance_weights(delta_h, torch.zeros(3, 4, dtype=torch.bool), kind)
    assert torch.equal(weights, torch.zeros(3, 4))
    if weights.requires_grad:
        (weights * torch.randn(3, 4)).sum().backward()
        assert torch.isfinite(delta_h.grad).all()


def loop_capped_softmax(scores, valid, tau_base, cap, tau_counts=None):
    """n·softmax over the valid entries of each row, τ from tau_counts[i] (default n), capped."""
    rows = []
    for i, (score_row, valid_row) in enumerate(zip(scores, valid)):
        n = sum(valid_row)
        tau = tau_base * math.log(max(n if tau_counts is None else tau_counts[i], 2))
        exps = [math.exp(s / tau) if v else 0.0 for s, v in zip(score_row, valid_row)]
        z = sum(exps)
        rows.append([min(n * e / z, cap) if v else 0.0 for e, v in zip(exps, valid_row)])
    return rows


def loop_top_fraction(values, valid, rho):
    """Indices (into `values`) of the ceil(ρ·n) largest valid values; ties → earlier index."""
    candidates = [i for i, v in enumerate(valid) if v]
    keep = math.ceil(round(rho * len(candidates), 9))
    return set(sorted(candidates, key=lambda i: (-values[i], i))[:keep])


def loop_relevance(delta_h, mask, kind, tau_base, cap, threshold, floor, rho):
    magnitude = [[abs(x) for x in row] for row in delta_h]
    if kind == "soft":
        return loop_capped_softmax(magnitude, mask, tau_base, cap)
    width = len(mask[0])
    if kind == "quantile":
        flat = loop_top_fraction(sum(magnitude, []), sum(mask, []), rho)
        chosen = [{j for j in range(width) if i * width + j in flat} for i in range(len(mask))]
    elif kind == "topk":
        chosen = [loop_top_fraction(m, v, rho) for m, v in zip(magnitude, mask)]
    else:
        chosen = [{j for j in range(width) if m[j] >= threshold} for m in magnitude]
    return [
        [(1.0 if j in chosen[i] else floor) if mask[i][j] else 0.0 for j in range(width)]
        for i in range(len(mask))
    ]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", ["soft", "threshold", "topk", "quantile"])
def test_relevance_matches_loop(seed, kind):
    g = torch.Generator().manual_seed(seed)
    delta_h = torch.randn(6, 9, generator=g, dtype=torch.float64) * 2
    mask = random_mask(g, 6, 9)
    mask[0, :1], mask[0, 1:] = True, False  # always one one-token row
    options = dict(tau_base=0.7, cap=2.5, threshold=0.8, floor=0.15, rho=0.3)
    expected = loop_relevance(delta_h.tolist(), mask.tolist(), kind, **options)
    close(relevance_weights(delta_h, mask, kind, **options), expected, atol=1e-12)


# ---------------------------------------------------------------- targeting weights ν̃


def test_targeting_hand_values_and_cap():
    ln3, ln4 = math.log(3), math.log(4)
    delta_h = torch.tensor([[0.0, ln4 * ln3, 5.0, 5.0], [7.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    gate = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    # row 0: T = 4 valid → τ = log 4; N = 2 gated: −|Δh|/τ = [0, −ln 3] → softmax [3/4, 1/4] → ×N=2 → [1.5, 0.5]
    # row 1: T = 1 → τ = log max(1, 2) = log 2; one gated token → softmax of one = 1 → ×1 → 1
    # row 2: nothing gated → zeros (τ = log 3 is irrelevant)
    close(targeting_weights(delta_h, gate, mask), [[1.5, 0.5, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    # without mask τ comes from N = 2 (log 2): row 0 −[0, ln4·ln3/ln2] = −[0, 2 ln 3] → softmax [9/10, 1/10]
    # → ×2 → [1.8, 0.2]: the old (wrong for a partial gate) temperature gives a different answer
    close(targeting_weights(delta_h, gate)[0], [1.8, 0.2, 0, 0])
    # the gate never selects padding: a gated column outside the mask gets 0 and does not count in N
    close(targeting_weights(delta_h, torch.ones(3, 4), mask)[1], [1, 0, 0, 0])
    # cap: T = 16 valid, 8 gated with Δh = [0, 10 × 7], τ = log 16 = 2.7726: e^{−10/2.7726} = e^{−3.6067} = 0.027140
    # gated token 0: 8/(1 + 7·0.027140) = 8/1.18998 = 6.723 > C_mask 5 → 5; the others 8·0.027140/1.18998 = 0.18246
    far = math.exp(-10 / math.log(16))
    delta_h = torch.tensor([[0.0] + [-10.0] * 7 + [3.0] * 8])
    gate = torch.tensor([[1] * 8 + [0] * 8], dtype=torch.bool)
    nu = targeting_weights(delta_h, gate, torch.ones(1, 16))
    close(nu, [[5.0] + [8 * far / (1 + 7 * far)] * 7 + [0.0] * 8], atol=1e-5)
    assert nu[0, 1] == pytest.approx(0.18246, abs=1e-5)
    # tau_base scales τ: τ = 2·log 16 → e^{−10/5.5452} = e^{−1.8034} = 0.16474 → 8/(1 + 7·0.16474) = 3.7154 (cap not binding)
    mild = math.exp(-10 / (2 * math.log(16)))
    close(targeting_weights(delta_h, gate, torch.ones(1, 16), tau_base=2.0)[0, 0], 8 / (1 + 7 * mild), atol=1e-5)
    assert 8 / (1 + 7 * mild) == pytest.approx(3.7154, abs=1e-4)


def test_targeting_all_ungated_zero_with_finite_grad():
    delta_h = torch.randn(2, 3, requires_grad=True)
    nu = targeting_weights(delta_h, torch.zeros(2, 3), torch.ones(2, 3))
    (nu * torch.randn(2, 3)).sum().backward()
    assert torch.equal(nu, torch.zeros(2, 3)) and torch.isfinite(delta_h.grad).all()


@pytest.mark.parametrize("seed", SEEDS)
def test_targeting_matches_loop(seed):
    g = torch.Generator().manual_seed(seed)
    delta_h = torch.randn(5, 8, generator=g, dtype=torch.float64)
    mask = random_mask(g, 5, 8)
    gate = mask & (torch.rand(5, 8, generator=g) < 0.7)  # content tokens among valid
    scores = [[-abs(x) for x in row] for row in delta_h.tolist()]
    expected = loop_capped_softmax(scores, gate.tolist(), 1.3, 1.8, tau_counts=[sum(m) for m in mask.tolist()])
    close(targeting_weights(delta_h, gate, mask, tau_base=1.3, cap=1.8), expected, atol=1e-12)


# ---------------------------------------------------------------- temporal weights


TEMPORAL_MASK = torch.tensor([[1, 1, 1, 1, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)


def test_temporal_hand_values():
    m = TEMPORAL_MASK
    # row 0: T = 4, t/T = 0.25, 0.5, 0.75, 1; row 1: T = 1 → 1; row 2: empty → 0
    close(temporal_weights(m, "power", 1.0), [[0.25, 0.5, 0.75, 1, 0], [1, 0, 0, 0, 0], [0] * 5])
    close(temporal_weights(m, "power", 2.0)[0], [1 / 16, 1 / 4, 9 / 16, 1, 0])
    # exp κ=1: (e^x − 1)/(e − 1): x = 0.25 → 0.284025/1.718282 = 0.165297; 0.5 → 0.377541; 0.75 → 0.650378
    e1 = math.e - 1
    close(
        temporal_weights(m, "exp", 1.0)[0],
        [math.expm1(0.25) / e1, math.expm1(0.5) / e1, math.expm1(0.75) / e1, 1, 0],
    )
    close(temporal_weights(m, "exp", 0.0)[0], [0.25, 0.5, 0.75, 1, 0])  # κ → 0 limit is linear
    # step: 1[t/T ≥ ½] → 0.25 no, 0.5 yes; step_at 0.75 → last two
    close(temporal_weights(m, "step")[0], [0, 1, 1, 1, 0])
    close(temporal_weights(m, "step", step_at=0.75)[0], [0, 0, 1, 1, 0])
    close(temporal_weights(m, "constant"), m.float())
    with pytest.raises(ValueError, match="power, exp, step, constant"):
        temporal_weights(m, "linear")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("schedule", ["power", "exp", "step", "constant"])
def test_temporal_matches_loop(seed, schedule):
    g = torch.Generator().manual_seed(seed)
    mask = random_mask(g, 6, 10)
    kappa = float(torch.rand(1, generator=g)) * 3 + 0.2
    formulas = {
        "power": lambda x: x**kappa,
        "exp": lambda x: (math.exp(kappa * x) - 1) / (math.exp(kappa) - 1),
        "step": lambda x: 1.0 if x >= 0.4 else 0.0,
        "constant": lambda x: 1.0,
    }
    expected = []
    for row in mask.tolist():
        length = sum(row)
        expected.append([formulas[schedule]((t + 1) / length) if valid else 0.0 for t, valid in enumerate(row)])
    close(temporal_weights(mask, schedule, kappa, step_at=0.4), expected, atol=1e-5)


# ---------------------------------------------------------------- sequence gate


def test_sequence_gate_hand_values_and_cap():
    failed = torch.tensor([True, True, False, False, True, False])
    advantages = torch.tensor([-1.5, 0.0, 0.8, 0.0, -4.0, 40.0])
    # failed −1.5  → 1·max(1.5, 0.02) = 1.5
    # failed  0    → 1·max(0, 0.02)   = 0.02   (ε_A keeps an all-failed group in the loss)
    # passed  0.8  → 0.1·0.8          = 0.08   (f_floor)
    # passed  0    → 0.1·0            = 0
    # failed −4    → min(4, C_pref=3) = 3
    # passed 40    → min(0.1·40, 3)   = 3
    close(sequence_gate(failed, advantages), [1.5, 0.02, 0.08, 0.0, 3.0, 3.0])
    close(sequence_gate(failed.float(), advantages, floor=0.5, adv_eps=0.1, cap=10.0), [1.5, 0.1, 0.4, 0, 4, 10])


@pytest.mark.parametrize("seed", SEEDS)
def test_sequence_gate_matches_loop(seed):
    g = torch.Generator().manual_seed(seed)
    failed = torch.rand(16, generator=g) < 0.5
    advantages = torch.randn(16, generator=g, dtype=torch.float64) * 2
    advantages[::5] = 0.0
    expected = []
    for f, a in zip(failed.tolist(), advantages.tolist()):
        s = max(abs(a), 0.05) if f else abs(a)
        expected.append(min(min(max(float(f), 0.2), 1.0) * s, 2.5))
    close(sequence_gate(failed, advantages, floor=0.2, adv_eps=0.05, cap=2.5), expected, atol=1e-12)


# ---------------------------------------------------------------- attention loss


def attention_case():
    audio_mass = torch.tensor([[0.5, 0.25, -1.0], [0.1, 0.2, 0.3]], requires_grad=True)  # −1.0: padding garbage
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    gate = torch.tensor([[1, 1, 1], [0, 0, 0]], dtype=torch.bool)  # row 1: no content token
    nu = torch.tensor([[2.0, 0.5, 7.0], [1.0, 1.0, 1.0]])
    w = torch.tensor([[0.5, 1.0, 9.0], [1.0, 1.0, 1.0]])
    g = torch.tensor([2.0, 5.0])
    return audio_mass, mask, nu, w, gate, g


def test_attention_loss_hand_values_and_gradient():
    audio_mass, mask, nu, w, gate, g = attention_case()
    loss = attention_loss(audio_mass, mask, nu, w, gate, g)
    # p row 0 = gate ∧ mask = [1, 1, 0], Σp = 2; row 1: Σp = 0 → contributes 0
    # row 0: [2·0.5·2·(−log 0.500001) + 2·1·0.5·(−log 0.250001)] / 2 = [1.386292 + 1.386290]/2 = 1.386291
    # mean over B = 2 → 0.693146
    row0 = (2 * 0.5 * 2 * -math.log(0.5 + 1e-6) + 2 * 1 * 0.5 * -math.log(0.25 + 1e-6)) / 2
    close(loss, row0 / 2)
    loss.backward()
    # d/da = −g·w·ν / (a + 1e−6) / Σp / B: a00 → −2/0.500001/4 = −0.999998; a01 → −1/0.250001/4 = −0.999996
    close(audio_mass.grad, [[-2 / 0.500001 / 4, -1 / 0.250001 / 4, 0.0], [0.0, 0.0, 0.0]])
    # a global number of sequences (e.g. 4 over two micro-batches) divides by it instead of B
    close(attention_loss(audio_mass, mask, nu, w, gate, g, num_seqs=4), row0 / 4)


def test_attention_loss_nothing_gated_is_zero_with_finite_grad():
    audio_mass, mask, nu, w, gate, g = attention_case()
    loss = attention_loss(audio_mass, mask, nu, w, torch.zeros_like(gate), g)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(audio_mass.grad, torch.zeros(2, 3))


def loop_attention_loss(audio_mass, mask, nu, w, gate, g, num_seqs):
    total = 0.0
    for i in range(len(audio_mass)):
        gated = [t for t in range(len(mask[i])) if mask[i][t] and gate[i][t]]
        if gated:
            row = sum(g[i] * w[i][t] * nu[i][t] * -math.log(audio_mass[i][t] + 1e-6) for t in gated)
            total += row / len(gated)
    return total / num_seqs


@pytest.mark.parametrize("seed", SEEDS)
def test_attention_loss_matches_loop_and_micro_batches_sum(seed):
    g = torch.Generator().manual_seed(seed)
    batch, width = 6, 7
    mask = random_mask(g, batch, width)
    gate = torch.rand(batch, width, generator=g) < 0.6
    audio_mass = torch.rand(batch, width, generator=g, dtype=torch.float64).requires_grad_(True)
    delta_h = torch.randn(batch, width, generator=g, dtype=torch.float64)
    nu = targeting_weights(delta_h, gate, mask)
    w = temporal_weights(mask).double()
    gates = sequence_gate(torch.rand(batch, generator=g) < 0.5, torch.randn(batch, generator=g, dtype=torch.float64))
    loss = attention_loss(audio_mass, mask, nu, w, gate, gates)
    expected = loop_attention_loss(
        audio_mass.tolist(), mask.tolist(), nu.tolist(), w.tolist(), gate.tolist(), gates.tolist(), batch
    )
    close(loss, expected, atol=1e-12)
    (whole_grad,) = torch.autograd.grad(loss, audio_mass)
    parts = [
        attention_loss(audio_mass[r], mask[r], nu[r], w[r], gate[r], gates[r], num_seqs=batch)
        for r in (slice(0, 2), slice(2, 6))
    ]
    (parts_grad,) = torch.autograd.grad(sum(parts), audio_mass)
    close(sum(parts).detach(), loss.detach())
    close(parts_grad, whole_grad)


# ---------------------------------------------------------------- content token gate


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = ["The first tone is higher. <answer>higher</answer>", "I count 3 beeps, so <answer>three</answer>"]
    backend.train_from_iterator(corpus * 50, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", additional_special_tokens=specials[1:]
    )


def test_content_vocab_mask_and_gate(tiny_tokenizer):
    tok = tiny_tokenizer
    flags = build_content_vocab_mask(tok, vocab_size=len(tok) + 5)
    assert flags.shape == (len(tok) + 5,) and not flags[len(tok) :].any()  # ids past the tokenizer
    assert not flags[tok.all_special_ids].any()  # <|im_end|>, <|AUDIO|>, … contain letters but are special

    def ids(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False)

    assert tok.convert_ids_to_tokens(ids("<answer>higher</answer>")) == ["<", "answer", ">", "higher", "</", "answer", ">"]
    # tag pieces ('<', 'answer', '>', '</') are not content; the answer word is
    token_ids = torch.tensor([ids("<answer>higher</answer>") + [tok.pad_token_id, -100, len(tok) + 50]])
    expected = [[False, False, False, True, False, False, False, False, False, False]]
    assert content_token_gate(token_ids, flags).tolist() == expected
    # words and digits are content; punctuation and spaces are not
    for text, content in ((" tone", True), (" 3", True), ("3", True), (",", False), (".", False), (" ", False)):
        (token,) = ids(text)
        assert bool(flags[token]) is content, text
    # out-of-range ids are not content even when the clamped neighbour (id 0 / id V−1) is
    everything = torch.ones(5, dtype=torch.bool)
    assert content_token_gate(torch.tensor([[-100, 0, 4, 5, 17]]), everything).tolist() == [[False, True, True, False, False]]
    with pytest.raises(ValueError, match="vocab_size=10 < len"):
        build_content_vocab_mask(tok, vocab_size=10)
