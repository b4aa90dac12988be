"""Options that must change what they claim to change, by the expected amount (issue 12 item 7).

Each test here was written against a deliberately planted bug that the rest of the suite missed:
sampling that ignores the temperature or never applies top-p; `mapo_step` with head/layer reduction,
`kl_kind` or the temporal schedule/κ hard-coded; high clips counted with eps_low. The expected values
come from independent computations (hand formulas, the eager attention weights reduced by hand), not
from the code under test.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from test_step import setup  # noqa: F401  (a module fixture: the tiny model and one rollout)
from toy_model import AUDIO, EOS, PAD, make_batch, tiny_model

from mapo.algos import losses, mapo
from mapo.capture import capture_audio_attention, completion_mass
from mapo.config import AlgoConfig
from mapo.rollout import generate_rollout
from mapo.scoring import hidden_states, sequence_inputs
from mapo.step import Normalisers, mapo_step, plain_call, prepare_batch

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------ sampling


def _first_token_probs(model, batch, temperature: float) -> torch.Tensor:
    """softmax(logits / T) of the first completion token of each prompt, <|AUDIO|> removed: [B, V]."""
    from mapo.models.embed import build_inputs_embeds, encode_audio, position_ids_from_mask, split_audio_by_row

    with torch.no_grad():
        clips = encode_audio(model, batch["input_features"], batch["feature_attention_mask"])
        rows = split_audio_by_row(clips, batch["input_ids"], AUDIO)
        out = model.model(inputs_embeds=build_inputs_embeds(model, batch["input_ids"], rows),
                          attention_mask=batch["attention_mask"], position_ids=position_ids_from_mask(batch["attention_mask"]))
        logits = model.lm_head(out.last_hidden_state[:, -1]).float()
    logits[:, AUDIO] = float("-inf")
    return (logits / temperature).softmax(-1)


def _sample(model, batch, **kwargs):
    return generate_rollout(model, batch, eos_token_id=EOS, pad_token_id=PAD, seeds=list(range(len(batch["input_ids"]))), **kwargs)


def test_temperature_and_top_p_near_zero_sample_the_greedy_tokens():
    model = tiny_model(seed=2, eos_bias=1.5)
    batch = make_batch()
    greedy = _sample(model, batch, group_size=1, max_new_tokens=8, do_sample=False).completion_ids
    cold = _sample(model, batch, group_size=4, max_new_tokens=8, temperature=1e-4).completion_ids
    narrow = _sample(model, batch, group_size=4, max_new_tokens=8, temperature=1.0, top_p=1e-6).completion_ids
    expected = greedy.repeat_interleave(4, dim=0)
    assert torch.equal(cold, expected)
    assert torch.equal(narrow, expected)
    # Non-vacuous: at temperature 1 without top-p the same seeds do not give the greedy tokens.
    hot = _sample(model, batch, group_size=4, max_new_tokens=8, temperature=1.0).completion_ids
    assert not torch.equal(hot[:, : expected.shape[1]], expected[:, : hot.shape[1]])


@pytest.mark.parametrize("temperature, top_p", [(2.0, 1.0), (0.7, 1.0), (1.0, 0.6)])
def test_first_token_frequencies_follow_the_tempered_nucleus(temperature, top_p):
    """4000 draws of the first token of one prompt: frequencies match softmax(logits / T), restricted to
    the smallest set of most likely tokens holding ≥ top_p of the mass and renormalised."""
    model = tiny_model(seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(15.0)  # random init is nearly uniform over the vocabulary; make it peaked
    batch = make_batch((0,))
    n = 4000
    tokens = _sample(model, batch, group_size=n, max_new_tokens=1, temperature=temperature, top_p=top_p).completion_ids[:, 0]
    probs = _first_token_probs(model, batch, temperature)[0]
    order = probs.argsort(descending=True)
    above = probs[order].cumsum(0) - probs[order]  # mass of the tokens ranked strictly above
    kept = torch.zeros_like(probs, dtype=torch.bool)
    kept[order[above < top_p]] = True
    expected = torch.where(kept, probs, torch.zeros_like(probs))
    expected = expected / expected.sum()
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    assert counts[~kept].sum() == 0, "a token outside the nucleus was drawn"
    # Each frequency within 4.5 binomial standard deviations (plus a small floor) of its probability.
    freq = counts / n
    sd = (expected * (1 - expected) / n).sqrt()
    assert ((freq - expected).abs() <= 4.5 * sd + 2e-3).all(), (freq - expected).abs().max()
    # Non-vacuous: the untempered full distribution is measurably different from the expected one.
    plain = _first_token_probs(model, batch, 1.0)[0]
    assert (plain - expected).abs().max() > 0.05
    assert 2 <= int(kept.sum()) and (top_p == 1.0 or int(kept.sum()) < probs.numel() // 2)


# ------------------------------------------------------------------------------------------ mapo_step options


@pytest.fixture(scope="module")
def step_setup(setup):
    """test_step's tiny model, rollout and content mask, with a reference that differs from the policy."""
    model, _, rollout, content = setup
    reference = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():  # a reference that differs from the policy, so every KL estimator is non-zero
        gen = torch.Generator().manual_seed(1)
        for p in reference.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return model, reference, rollout, content


def _algo(**changes) -> AlgoConfig:
    algo = AlgoConfig()
    algo.attn.layers = [-2, -1]
    for key, value in changes.items():
        node = algo
        *path, leaf = key.split(".")
        for part in path:
            node = getattr(node, part)
        setattr(node, leaf, value)
    return algo


def _prepare(step_setup, algo):
    model, reference, rollout, content = step_setup
    n = rollout.completion_ids.shape[0]
    adv = torch.randn(n, generator=torch.Generator().manual_seed(0))
    acc = (torch.arange(n) % 3 == 0).float()
    return prepare_batch(plain_call(model), rollout, adv, acc, algo, frozen_reference=plain_call(reference),
                         feature_extractor=None, content_vocab_mask=content, temperature=1.0, old_pass=True)


def _metrics(step_setup, algo, prepared):
    model, _, rollout, _ = step_setup
    n = rollout.completion_ids.shape[0]
    norms = Normalisers(num_tokens=rollout.completion_mask.sum().float(), num_seqs=n, max_len=10)
    loss, m = mapo_step(model, rollout, torch.arange(n), prepared, algo, norms, temperature=1.0)
    # (sum, count) pairs are means, except the loss shares and the maxima (see step.MetricSums)
    return loss, {k: float(v[0]) if k.startswith("loss/") or k.endswith("_max") else float(v[0] / v[1])
                  for k, v in m.items()}


def _audio_mass_by_hand(model, rollout, layers, head_reduce, layer_reduce) -> torch.Tensor:
    """a_t [N, T] from the eager per-head masses, reduced here with plain torch (not the capture's reducer)."""
    with torch.no_grad(), capture_audio_attention(model, rollout.audio_mask, layers=tuple(layers), method="eager") as cap:
        hidden_states(model, *sequence_inputs(model, rollout, "cached"))
    per_head = cap.head_mass  # [N, L, H, S]
    per_layer = per_head.max(dim=2).values if head_reduce == "max" else per_head.mean(dim=2)
    mass = per_layer.max(dim=1).values if layer_reduce == "max" else per_layer.mean(dim=1)
    return completion_mass(mass, rollout.prompt_len, rollout.completion_ids.shape[1])


def _expected_attention_loss(step_setup, algo, prepared) -> float:
    """L_attn of DESIGN §3 assembled from its parts, with a_t reduced by hand."""
    model, _, rollout, _ = step_setup
    mask = rollout.completion_mask.bool()
    a = _audio_mass_by_hand(model, rollout, algo.attn.layers, algo.attn.head_reduce, algo.attn.layer_reduce)
    delta_h = (prepared.ablated - prepared.old_entropy) * mask  # H(ref | no audio) − H(policy | audio)
    gate = prepared.content_gate
    nu = mapo.targeting_weights(delta_h, gate, mask=mask, tau_base=algo.attn.tau_base, cap=algo.attn.cap)  # τ from T_i
    w = mapo.temporal_weights(mask, schedule=algo.attn.schedule, kappa=algo.attn.kappa)
    g = mapo.sequence_gate(prepared.accuracy <= 0, prepared.advantages, floor=algo.attn.fail_floor,
                           adv_eps=algo.attn.adv_eps, cap=algo.attn.gate_cap)
    return float(mapo.attention_loss(a, mask, nu, w, gate, g, num_seqs=mask.shape[0]))


ATTENTION_OPTIONS = [
    {},
    {"attn.head_reduce": "mean"},
    {"attn.layer_reduce": "max"},
    {"attn.head_reduce": "mean", "attn.layer_reduce": "max"},
    {"attn.schedule": "power", "attn.kappa": 2.0},
    {"attn.schedule": "exp", "attn.kappa": 3.0},
    {"attn.schedule": "step"},
    {"attn.schedule": "constant"},
]


@pytest.mark.parametrize("options", ATTENTION_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
def test_attention_options_change_the_loss_by_the_expected_amount(step_setup, options):
    algo = _algo(**options)
    prepared = _prepare(step_setup, algo)
    _, m = _metrics(step_setup, algo, prepared)
    expected = _expected_attention_loss(step_setup, algo, prepared)
    assert m["loss/attn"] == pytest.approx(expected, rel=1e-4, abs=1e-7)
    if options:  # the option moves the loss away from the default's by a visible amount
        default = _expected_attention_loss(step_setup, _algo(), prepared)
        assert abs(expected - default) > 1e-3 * abs(default), (expected, default)


def test_audio_mass_metrics_follow_the_head_and_layer_reduction(step_setup):
    """The audio_mass/q* metrics are the bucket means of a_t under the configured reduction."""
    model, _, rollout, _ = step_setup
    mask = rollout.completion_mask.bool()
    lengths = mask.sum(-1, keepdim=True)
    bucket = ((torch.cumsum(mask.long(), -1) - 1).float() / lengths * 4).long().clamp(max=3)
    seen = []
    for head, layer in (("max", "mean"), ("mean", "mean"), ("max", "max"), ("mean", "max")):
        algo = _algo(**{"attn.head_reduce": head, "attn.layer_reduce": layer})
        _, m = _metrics(step_setup, algo, _prepare(step_setup, algo))
        a = _audio_mass_by_hand(model, rollout, algo.attn.layers, head, layer)
        q1 = float(a[mask & (bucket == 0)].mean())
        assert m["audio_mass/q1"] == pytest.approx(q1, rel=1e-4)
        seen.append(q1)
    assert len({round(v, 6) for v in seen}) == 4  # the four reductions really differ here


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_kind_changes_the_kl_term_by_the_expected_amount(step_setup, kind):
    algo = _algo(kl_kind=kind)
    prepared = _prepare(step_setup, algo)
    _, m = _metrics(step_setup, algo, prepared)
    mask = step_setup[2].completion_mask.double()
    p, q = prepared.old_logprobs.double(), prepared.ref_logprobs.double()  # policy (unchanged) and reference
    per_token = {"k1": p - q, "k2": 0.5 * (p - q) ** 2, "k3": torch.exp(q - p) - (q - p) - 1}[kind]
    expected = float(((per_token * mask).sum(-1) / mask.sum(-1)).mean())  # per-sequence token mean
    assert m["loss/kl"] == pytest.approx(expected, rel=1e-4, abs=1e-8)
    # The total moves with the estimator: total − β·KL is the same for every kind.
    rest = m["loss/total"] - algo.beta * m["loss/kl"]
    k3 = _algo(kl_kind="k3")
    _, m3 = _metrics(step_setup, k3, _prepare(step_setup, k3))
    assert rest == pytest.approx(m3["loss/total"] - k3.beta * m3["loss/kl"], abs=1e-6)
    if kind != "k3":
        assert abs(m["loss/kl"] - m3["loss/kl"]) > 1e-4


# ------------------------------------------------------------------------------------------ clip statistics


def test_clip_counts_use_eps_high_above_and_eps_low_below():
    # Ratios r = exp(logp − old): 1.15, 1.25, 1.35 (Â > 0) and 0.85, 0.65 (Â < 0); eps_low 0.1, eps_high 0.3.
    ratios = torch.tensor([[1.15, 1.25, 1.35], [0.85, 0.65, 1.0]])
    logprobs = torch.zeros(2, 3)
    old = -ratios.log()
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 3, dtype=torch.bool)
    counts = losses.clip_token_counts(logprobs, old, adv, mask, eps_low=0.1, eps_high=0.3)
    # high: Â > 0 and r > 1.3 → only 1.35. low: Â < 0 and r < 0.9 → 0.85 and 0.65.
    assert (float(counts["clipped_high"]), float(counts["clipped_low"]), float(counts["tokens"])) == (1.0, 2.0, 6.0)
    swapped = losses.clip_token_counts(logprobs, old, adv, mask, eps_low=0.3, eps_high=0.1)
    # high with 0.1: 1.15, 1.25, 1.35; low with 0.3: only 0.65 (0.7 bound).
    assert (float(swapped["clipped_high"]), float(swapped["clipped_low"])) == (3.0, 1.0)


def test_mapo_step_clip_metrics_use_the_asymmetric_range(step_setup):
    """mapo_step with π_old shifted by known amounts per token: the clip metrics count with eps_high above
    and eps_low below (the fractions are of all valid tokens)."""
    _, _, rollout, _ = step_setup
    algo = _algo(eps_low=0.1, eps_high=0.3, **{"attn.eta": 0.0})
    algo.mask.enabled = False
    prepared = _prepare(step_setup, algo)
    mask = rollout.completion_mask.bool()
    n, t = mask.shape
    # Per-token ratio r = π/π_old cycling over 1.2, 1.4, 0.85, 0.6; advantages alternate in sign by row.
    cycle = torch.tensor([1.2, 1.4, 0.85, 0.6])
    ratio = cycle[torch.arange(n * t) % 4].reshape(n, t)
    adv = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)
    shifted = dataclasses.replace(prepared, old_logprobs=prepared.old_logprobs - ratio.log(), advantages=adv)
    _, m = _metrics(step_setup, algo, shifted)
    pos, neg = (adv > 0)[:, None] & mask, (adv < 0)[:, None] & mask
    high = float((pos & (ratio > 1.3)).sum()) / float(mask.sum())  # 1.4 only (1.2 < 1 + 0.3)
    low = float((neg & (ratio < 0.9)).sum()) / float(mask.sum())  # 0.85 and 0.6
    assert m["clip/high"] == pytest.approx(high, abs=1e-6) and m["clip/low"] == pytest.approx(low, abs=1e-6)
    # Non-vacuous: counting high clips with eps_low (1.1) would also count the 1.2s.
    assert float((pos & (ratio > 1.1)).sum()) / float(mask.sum()) > high + 0.05
