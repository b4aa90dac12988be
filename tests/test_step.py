"""The MAPO step on the tiny model: it lowers its own loss, micro-batching is exact, GRPO is the special case."""

from __future__ import annotations

import copy
import dataclasses
import os
import sys

import pytest
import torch

from mapo.algos.losses import clip_token_counts
from mapo.algos.mapo import build_content_vocab_mask, relevance_weights
from mapo.config import AlgoConfig
from mapo.data.collate import Collator
from mapo.data.validate import read_manifest
from mapo.models.loader import generation_suppressed_token_ids, load_model_and_processor
from mapo.rollout import completion_mask_from_ids, generate_rollout
from mapo.scoring import reference_pass, score_tokens
from mapo.step import (
    MetricSums,
    Normalisers,
    local_counts,
    mapo_step,
    mini_batch_rows,
    normalisers_from_counts,
    plain_call,
    prepare_batch,
    truncated_rows,
    update_on_rollout,
)

G = 4


@pytest.fixture(scope="module")
def setup(tiny_env):
    torch.manual_seed(0)
    model, processor = load_model_and_processor(tiny_env["model"])
    collator = Collator(processor)
    records = read_manifest(tiny_env["data"] / "train.jsonl").records[::20][:3]
    batch = collator.prompts(records)
    tok = processor.tokenizer
    rollout = generate_rollout(
        model, batch, group_size=G, max_new_tokens=10, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.pad_token_id, suppress_token_ids=generation_suppressed_token_ids(processor),
        seeds=[1, 2, 3],
    )
    content = build_content_vocab_mask(tok, model.lm_head.out_features)
    return model, collator, rollout, content


def mapo_algo(**attn) -> AlgoConfig:
    algo = AlgoConfig()
    algo.attn.layers = [-2, -1]
    for k, v in attn.items():
        setattr(algo.attn, k, v)
    return algo


def prepared_for(model, rollout, algo, content, old_pass=True, advantages=None):
    n = rollout.completion_ids.shape[0]
    gen = torch.Generator().manual_seed(0)
    adv = torch.randn(n, generator=gen) if advantages is None else advantages
    acc = (torch.arange(n) % 3 == 0).float()
    reference = copy.deepcopy(model).requires_grad_(False)
    return prepare_batch(
        plain_call(model), rollout, adv, acc, algo, frozen_reference=plain_call(reference),
        feature_extractor=None, content_vocab_mask=content, temperature=1.0, old_pass=old_pass,
    )


def norms_for(prepared, rollout, rows=None) -> Normalisers:
    """The normalisers of one optimizer step on `rows` (default all), as the loop computes them."""
    rows = torch.arange(rollout.completion_ids.shape[0]) if rows is None else rows
    return normalisers_from_counts(local_counts(prepared, rollout, rows), max_len=10)


def independent_delta_h(reference, model, rollout):
    """Δh computed outside the step: H(reference, audio dropped) − H(policy, audio), 0 off the mask."""
    entropy_gap = reference_pass(reference, rollout, "drop_features").entropy - score_tokens(model, rollout).entropy
    return entropy_gap * rollout.completion_mask.bool()


def total_loss(model, rollout, prepared, algo, micro=None):
    rows = torch.arange(rollout.completion_ids.shape[0])
    chunks = [rows] if micro is None else list(rows.split(micro))
    total, metrics = 0.0, []
    norms = norms_for(prepared, rollout)
    for chunk in chunks:
        loss, m = mapo_step(model, rollout, chunk, prepared, algo, norms, temperature=1.0)
        total = total + loss
        metrics.append(m)
    return total, metrics


def test_one_mapo_step_lowers_its_own_loss(setup):
    model, _, rollout, content = setup
    model = copy.deepcopy(model).train()
    algo = mapo_algo()
    prepared = prepared_for(model, rollout, algo, content)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    before, metrics = total_loss(model, rollout, prepared, algo)
    assert "loss/attn" in metrics[0] and metrics[0]["loss/attn"][0] > 0
    before.backward()
    opt.step()
    with torch.no_grad():
        after, _ = total_loss(model, rollout, prepared, algo)
    assert after < before - 1e-4, (float(before), float(after))


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("agg", ["seq_mean_token_mean", "token_mean", "seq_mean_token_sum", "dr_grpo"])
def test_micro_batches_give_the_whole_batch_gradient(setup, agg):
    model, _, rollout, content = setup
    algo = mapo_algo()
    algo.loss_agg = agg
    prepared = prepared_for(model, rollout, algo, content)
    whole_model, micro_model = copy.deepcopy(model), copy.deepcopy(model)
    loss_whole, _ = total_loss(whole_model, rollout, prepared, algo)
    loss_whole.backward()
    loss_micro, _ = total_loss(micro_model, rollout, prepared, algo, micro=5)
    loss_micro.backward()
    assert float(loss_micro.detach()) == pytest.approx(float(loss_whole.detach()), abs=1e-6)
    gw, gm = grads(whole_model), grads(micro_model)
    assert gw.keys() == gm.keys() and gw
    for name in gw:
        torch.testing.assert_close(gm[name], gw[name], atol=1e-6, rtol=1e-4, msg=name)


def test_grpo_is_the_step_with_unit_weights_and_no_attention(setup):
    model, _, rollout, content = setup
    algo = AlgoConfig(name="grpo")
    algo.mask.enabled = False
    algo.attn.eta = 0.0
    prepared = prepared_for(model, rollout, algo, content)
    assert prepared.ablated is None  # no ablated reference pass is run for GRPO
    _, metrics = total_loss(model, rollout, prepared, algo)
    m = metrics[0]
    assert "loss/attn" not in m
    assert float(m["mapo/omega_mean"][0] / m["mapo/omega_mean"][1]) == pytest.approx(1.0)
    assert float(m["mapo/omega_max"][0]) == pytest.approx(1.0)


def test_attention_loss_alone_trains_the_captured_query_and_key(setup):
    model, _, rollout, content = setup
    model = copy.deepcopy(model)
    algo = mapo_algo(eta=1.0)
    algo.beta = 0.0
    n = rollout.completion_ids.shape[0]
    prepared = prepared_for(model, rollout, algo, content, advantages=torch.zeros(n))  # L_PG ≡ 0
    loss, metrics = total_loss(model, rollout, prepared, algo)
    assert float(metrics[0]["loss/pg"][0]) == 0.0 and float(metrics[0]["loss/attn"][0]) > 0
    loss.backward()
    for i in (0, 1):
        attn = model.model.language_model.layers[i].self_attn
        assert attn.q_proj.weight.grad.abs().sum() > 0, f"layer {i} q_proj"
        assert attn.k_proj.weight.grad.abs().sum() > 0, f"layer {i} k_proj"


@pytest.mark.parametrize("old_pass", [True, False], ids=["delta_h_from_pi_old", "delta_h_per_micro_batch"])
def test_mask_weights_follow_delta_h(setup, old_pass):
    """ω̃ is not uniform once the ablated reference differs from the policy (soft mask, cap 5); the logged
    mean |Δh| (and mean Δh) is pooled over the valid tokens of every micro-batch, and equals Δh computed
    outside the step."""
    model, collator, rollout, content = setup
    eos = collator.tokenizer.convert_tokens_to_ids("<|im_end|>")
    # completions of 1 to 10 tokens: the micro-batches of 5, 5 and 2 rows hold 47, 15 and 3 valid tokens
    rollout = with_eos_at(rollout, eos, int(content.nonzero()[200]), [None, 8, None, 7, None, 3, 2, 1, 4, 0, 0, 1])
    algo = mapo_algo()
    reference = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():  # |Δh| well above float noise (the tiny model barely hears its audio)
        noise = torch.randn(reference.lm_head.weight.shape, generator=torch.Generator().manual_seed(2))
        reference.lm_head.weight.add_(0.05 * noise)
    n = rollout.completion_ids.shape[0]
    prepared = prepare_batch(
        plain_call(model), rollout, torch.randn(n, generator=torch.Generator().manual_seed(0)),
        (torch.arange(n) % 3 == 0).float(), algo, frozen_reference=plain_call(reference), feature_extractor=None,
        content_vocab_mask=content, temperature=1.0, old_pass=old_pass,
    )
    assert (prepared.delta_h is not None) == old_pass  # without the π_old pass each micro-batch computes Δh
    _, metrics = total_loss(model, rollout, prepared, algo, micro=5)
    sums = MetricSums()
    for m in metrics:
        sums.add(m)
    logged = MetricSums.finalize({k: float(v) for k, v in sums.flat().items()})
    mask = rollout.completion_mask.bool()
    delta_h = independent_delta_h(reference, model, rollout)
    pooled = float(delta_h.abs()[mask].mean())
    # a mean of the micro-batches' means is not the pooled mean
    chunks = torch.arange(n).split(5)
    assert [int(mask[r].sum()) for r in chunks] == [47, 15, 3]
    mean_of_means = sum(float(delta_h[r].abs()[mask[r]].mean()) for r in chunks) / len(chunks)
    assert pooled > 0 and abs(mean_of_means - pooled) > 1e-3, (pooled, mean_of_means)
    assert logged["mapo/abs_delta_h"] == pytest.approx(pooled, abs=1e-5)
    assert logged["mapo/delta_h"] == pytest.approx(float(delta_h[mask].mean()), abs=1e-5)
    assert 1.0 < logged["mapo/omega_max"] <= 5.0


@pytest.mark.parametrize(
    "options",
    [
        {"mask.kind": "threshold"}, {"mask.kind": "topk"}, {"mask.kind": "quantile"},
        {"mask.score": "kl_token"}, {"mask.score": "kl_full"},
        {"reference.ablation": "mask_audio_keys"}, {"reference.ablation": "silence"}, {"reference.ablation": "noise"},
        {"reference.model": "policy"}, {"attn.method": "eager"}, {"attn.schedule": "exp", "attn.kappa": 2.0},
        {"attn.schedule": "step"}, {"attn.schedule": "constant"}, {"attn.token_gate": "all"},
        {"attn.head_reduce": "mean", "attn.layer_reduce": "max"}, {"kl_kind": "k1"}, {"kl_kind": "k2"},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_every_option_gives_a_finite_loss_and_gradient(setup, options):
    model, collator, rollout, content = setup
    model = copy.deepcopy(model)
    algo = mapo_algo()
    for key, value in options.items():
        node = algo
        *path, leaf = key.split(".")
        for part in path:
            node = getattr(node, part)
        setattr(node, leaf, value)
    n = rollout.completion_ids.shape[0]
    reference = copy.deepcopy(model).requires_grad_(False)
    prepared = prepare_batch(
        plain_call(model), rollout, torch.randn(n, generator=torch.Generator().manual_seed(0)),
        (torch.arange(n) % 2).float(), algo, frozen_reference=plain_call(reference),
        feature_extractor=collator.feature_extractor, content_vocab_mask=content, temperature=1.0, old_pass=True,
    )
    loss, metrics = total_loss(model, rollout, prepared, algo)
    assert torch.isfinite(loss) and float(metrics[0]["loss/attn"][0]) > 0
    loss.backward()
    grad_norm = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters() if p.grad is not None))
    assert torch.isfinite(grad_norm) and grad_norm > 0


# ----------------------------------------------------------------------------- a prompt with several clips
def two_clip_rollout():
    """Toy model, 2 prompts: prompt 0 holds clips 0 and 1 (25 + 15 audio tokens), prompt 1 clip 2 (15)."""
    from toy_model import AUDIO, EOS, PAD, make_batch, tiny_model

    clips = make_batch((0, 2))  # clip 0: 100 valid frames (25 audio tokens), clip 1: 60 (15)
    features, frames = clips["input_features"], clips["feature_attention_mask"]
    prompts = [
        [10, 2] + [AUDIO] * 25 + [3, 11, 2] + [AUDIO] * 15 + [3, 12, 13],
        [10, 20, 2] + [AUDIO] * 15 + [3, 15],
    ]
    width = max(map(len, prompts))
    input_ids = torch.full((2, width), PAD)
    attention_mask = torch.zeros(2, width, dtype=torch.long)
    for row, p in enumerate(prompts):
        input_ids[row, width - len(p):] = torch.tensor(p)
        attention_mask[row, width - len(p):] = 1
    batch = {
        "input_ids": input_ids, "attention_mask": attention_mask,
        "input_features": torch.cat([features, features[1:] * -0.7]), "feature_attention_mask": torch.cat([frames, frames[1:]]),
    }
    model = tiny_model(0, projector_gain=50.0)  # an audible audio path (random init is nearly silent)
    rollout = generate_rollout(model, batch, group_size=2, max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD, seeds=[0, 1])
    return model, rollout


def test_a_prompt_with_two_clips_keeps_its_audio_in_every_pass():
    from transformers import WhisperFeatureExtractor

    from mapo.scoring import score_tokens
    from mapo.step import prompt_clips, select_rows

    model, rollout = two_clip_rollout()
    extractor = WhisperFeatureExtractor(feature_size=128, chunk_length=1)
    assert prompt_clips(rollout) == [[0, 1], [2]]
    rows = torch.tensor([3, 0, 1])  # prompt 1, then prompt 0 twice (out of order on purpose)
    sub = select_rows(rollout, rows)
    assert sub.input_features.shape[0] == 1 + 2 + 2  # every row brings all of its prompt's clips
    cached = score_tokens(model, sub, audio="cached")
    for audio in ("recompute", "silence", "noise"):
        whole = score_tokens(model, rollout, audio=audio, feature_extractor=extractor)
        part = score_tokens(model, sub, audio=audio, feature_extractor=extractor)
        torch.testing.assert_close(part.logprobs, whole.logprobs[rows], atol=1e-5, rtol=0, msg=audio)
        torch.testing.assert_close(part.entropy, whole.entropy[rows], atol=1e-5, rtol=0, msg=audio)
    # re-encoding the clips gives the rollout's cached audio; bare placeholders would be far from it
    recomputed = score_tokens(model, sub, audio="recompute")
    torch.testing.assert_close(recomputed.logprobs, cached.logprobs, atol=1e-5, rtol=0)
    bare = score_tokens(model, sub, audio="drop_features")
    assert (bare.logprobs - cached.logprobs).abs().max() > 0.1
    # a micro-batched MAPO step that re-encodes the audio (trained tower, silence reference) equals the whole batch
    algo = mapo_algo(token_gate="all")
    algo.reference.ablation = "silence"
    n = rollout.completion_ids.shape[0]
    prepared = prepare_batch(
        plain_call(model), rollout, torch.tensor([1.0, -1.0, 0.5, -0.5]), (torch.arange(n) % 2).float(), algo,
        frozen_reference=plain_call(copy.deepcopy(model)), feature_extractor=extractor, content_vocab_mask=None,
        temperature=1.0, audio_input="recompute", old_pass=True,
    )
    norms = Normalisers(num_tokens=rollout.completion_mask.sum().float(), num_seqs=n, max_len=6)
    losses = {}
    for micro, clips_of in ((n, None), (1, prompt_clips(rollout))):  # the loop computes the clips once per rollout
        losses[micro] = sum(
            mapo_step(model, rollout, chunk, prepared, algo, norms, temperature=1.0, audio_input="recompute", clips_of=clips_of)[0]
            for chunk in torch.arange(n).split(micro)
        )
    assert float(losses[n].detach()) != 0.0
    assert float(losses[1].detach()) == pytest.approx(float(losses[n].detach()), abs=1e-6)


def test_unsupported_clip_layouts_fail_clearly():
    import dataclasses

    from mapo.scoring import score_tokens
    from mapo.step import select_rows

    model, rollout = two_clip_rollout()
    short = dataclasses.replace(rollout, input_features=rollout.input_features[:2], feature_attention_mask=rollout.feature_attention_mask[:2])
    with pytest.raises(ValueError, match=r"2 audio clips but its prompts have 3 runs of audio placeholders \(per prompt: \[2, 1\]\)"):
        select_rows(short, torch.tensor([0]))
    featureless = dataclasses.replace(rollout, input_features=None, feature_attention_mask=None)
    with pytest.raises(ValueError, match="'recompute' re-encodes the clips"):
        score_tokens(model, featureless, audio="recompute")


# ----------------------------------------------------------------------------- token_mean normaliser Σ ω̃
def test_token_mean_normalises_by_the_global_sum_of_omega(setup):
    model, _, rollout, content = setup
    mask = rollout.completion_mask.bool()
    reference = copy.deepcopy(model).requires_grad_(False)
    delta_h = independent_delta_h(reference, model, rollout)
    algo = mapo_algo()
    algo.loss_agg, algo.beta, algo.attn.eta = "token_mean", 0.0, 0.0
    # threshold ω̃ (1 above the median |Δh|, 0.1 below): Σ ω̃ is far from the token count
    algo.mask.kind, algo.mask.threshold, algo.mask.floor = "threshold", float(delta_h[mask].abs().median()), 0.1
    n = rollout.completion_ids.shape[0]
    adv = torch.randn(n, generator=torch.Generator().manual_seed(0))
    prepared = prepare_batch(
        plain_call(model), rollout, adv, torch.zeros(n), algo, frozen_reference=plain_call(reference),
        feature_extractor=None, content_vocab_mask=content, temperature=1.0,
    )
    assert prepared.old_logprobs is not None  # token_mean with the mask runs the π_old pass by itself
    omega = relevance_weights(delta_h, mask, "threshold", threshold=algo.mask.threshold, floor=0.1)
    torch.testing.assert_close(prepared.omega, omega, atol=1e-6, rtol=0)
    counts = local_counts(prepared, rollout, torch.arange(n))
    assert float(counts[0]) == float((prepared.omega.double() * mask).sum())  # the normaliser is Σ ω̃, exactly
    assert float(counts[0]) < float(mask.sum()) - 5  # ... and not the token count
    # at ratio 1 every token's loss is −Â_i, so L_PG = Σ_i Σ_t ω̃_it·(−Â_i) / Σ ω̃
    expected = float((omega * -adv[:, None]).sum() / omega.sum())
    whole, metrics = total_loss(model, rollout, prepared, algo)
    assert float(metrics[0]["loss/pg"][0]) == pytest.approx(expected, abs=1e-5)
    micro, _ = total_loss(model, rollout, prepared, algo, micro=5)
    assert float(micro.detach()) == pytest.approx(float(whole.detach()), abs=1e-6)
    with pytest.raises(ValueError, match="needs the π_old pass"):
        prepare_batch(
            plain_call(model), rollout, adv, torch.zeros(n), algo, frozen_reference=plain_call(reference),
            feature_extractor=None, content_vocab_mask=content, temperature=1.0, old_pass=False,
        )


# ----------------------------------------------------------------------------- overlong filter
def with_eos_at(rollout, eos: int, token: int, positions: list[int | None], width: int = 10):
    """The rollout with completions rewritten: row i is `token` repeated, with EOS at positions[i] (None: cut)."""
    ids = torch.full((len(positions), width), token)
    for row, pos in enumerate(positions):
        if pos is not None:
            ids[row, pos] = eos
    mask = completion_mask_from_ids(ids, [eos])
    prompt_mask = rollout.attention_mask[:, : rollout.prompt_len]
    return dataclasses.replace(
        rollout, completion_ids=ids, completion_mask=mask, attention_mask=torch.cat([prompt_mask, mask], 1),
        audio_mask=torch.cat([rollout.audio_mask[:, : rollout.prompt_len], torch.zeros_like(mask, dtype=torch.bool)], 1),
    )


def test_overlong_filter_hand_values(setup):
    model, collator, rollout, content = setup
    eos = collator.tokenizer.convert_tokens_to_ids("<|im_end|>")
    token = int(content.nonzero()[10])
    # rows 0, 1 never end (cut at 10 tokens); row 2 ends at token 3, row 3 at token 5, rows 4..11 at token 1
    cut = with_eos_at(rollout, eos, token, [None, None, 2, 4] + [0] * 8)
    truncated = truncated_rows(cut.completion_ids, eos)
    assert truncated.tolist() == [True, True] + [False] * 10
    assert truncated_rows(cut.completion_ids, [eos, token]).sum() == 0  # any listed EOS ends a row
    adv = torch.tensor([1.0, -2.0, 0.5, 1.5] + [0.0] * 8)
    algo = AlgoConfig(name="grpo", beta=0.0)
    algo.mask.enabled, algo.attn.eta = False, 0.0
    expected = {
        # filter on: rows 2 and 3 carry the signal; 10 rows and 3 + 5 + 8·1 = 16 tokens stay
        (True, "seq_mean_token_mean"): -(0.5 + 1.5) / 10,  # −0.2
        (True, "token_mean"): -(3 * 0.5 + 5 * 1.5) / 16,  # −0.5625
        # filter off: 12 rows, 10 + 10 + 16 = 36 tokens
        (False, "seq_mean_token_mean"): -(1 - 2 + 0.5 + 1.5) / 12,  # −0.0833
        (False, "token_mean"): -(10 * 1 - 10 * 2 + 3 * 0.5 + 5 * 1.5) / 36,  # +0.0278
    }
    for (on, agg), value in expected.items():
        algo.overlong_filter, algo.loss_agg = on, agg
        prepared = prepare_batch(
            plain_call(model), cut, adv, torch.zeros(12), algo, frozen_reference=None, feature_extractor=None,
            content_vocab_mask=content, temperature=1.0, old_pass=False, truncated=truncated,
        )
        counts = local_counts(prepared, cut, torch.arange(12))
        assert counts.tolist() == ([16.0, 10.0, 12.0] if on else [36.0, 12.0, 12.0])
        norms = normalisers_from_counts(counts, max_len=10)
        loss, _ = mapo_step(model, cut, torch.arange(12), prepared, algo, norms, temperature=1.0)  # ratio ≡ 1
        assert float(loss.detach()) == pytest.approx(value, abs=1e-6), (on, agg)


def test_overlong_filter_drops_attention_rows_and_keeps_kl(setup):
    model, collator, rollout, content = setup
    eos = collator.tokenizer.convert_tokens_to_ids("<|im_end|>")
    cut = with_eos_at(rollout, eos, int(content.nonzero()[10]), [None, 3, None, 5, 2, 7, 1, 4, None, 6, 3, 2])
    truncated = truncated_rows(cut.completion_ids, eos)
    kept = (~truncated).nonzero().flatten()
    reference = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        reference.lm_head.weight.add_(0.05 * torch.randn_like(reference.lm_head.weight))  # KL ≠ 0
    adv = torch.randn(12, generator=torch.Generator().manual_seed(1))
    acc = (torch.arange(12) % 3 == 0).float()

    def step(filter_on, rows):
        algo = mapo_algo(eta=1.0)
        algo.beta, algo.overlong_filter = 0.5, filter_on
        prepared = prepare_batch(
            plain_call(model), cut, adv, acc, algo, frozen_reference=plain_call(reference), feature_extractor=None,
            content_vocab_mask=content, temperature=1.0, old_pass=False, truncated=truncated,
        )
        norms = normalisers_from_counts(local_counts(prepared, cut, rows), max_len=10)
        return {k: float(v[0]) for k, v in mapo_step(model, cut, rows, prepared, algo, norms, temperature=1.0)[1].items()}

    filtered, unfiltered, kept_only = step(True, torch.arange(12)), step(False, torch.arange(12)), step(False, kept)
    assert truncated.sum() == 3 and filtered["loss/kl"] > 0 and filtered["loss/attn"] > 0
    # L_PG and L_attn: the filter is the step on the kept rows alone; the KL is the unfiltered one
    assert filtered["loss/pg"] == pytest.approx(kept_only["loss/pg"], abs=1e-6)
    assert filtered["loss/attn"] == pytest.approx(kept_only["loss/attn"], abs=1e-6)
    assert filtered["loss/kl"] == pytest.approx(unfiltered["loss/kl"], abs=1e-7)
    assert abs(filtered["loss/attn"] - unfiltered["loss/attn"]) > 1e-4  # the filter took effect


# ----------------------------------------------------------------------------- PPO mini-batches
def test_mini_batch_rows_partition_and_seed():
    assert [r.tolist() for r in mini_batch_rows(6, 1, seed=3)] == [[0, 1, 2, 3, 4, 5]]
    parts = mini_batch_rows(12, 3, seed=3)
    assert [len(p) for p in parts] == [4, 4, 4] and sorted(torch.cat(parts).tolist()) == list(range(12))
    assert torch.equal(torch.cat(parts), torch.cat(mini_batch_rows(12, 3, seed=3)))  # reproducible
    assert not torch.equal(torch.cat(parts), torch.cat(mini_batch_rows(12, 3, seed=4)))  # the seed matters
    assert not torch.equal(torch.cat(parts), torch.arange(12))  # shuffled
    with pytest.raises(ValueError, match="algo.mini_batches=5 must divide the 12 rows"):
        mini_batch_rows(12, 5, seed=0)


def _prepared_with_old_pass(model, rollout, content, algo):
    """(advantages [N], the prepared batch) of the mini-batch tests: random advantages, every third row right."""
    n = rollout.completion_ids.shape[0]
    adv = torch.randn(n, generator=torch.Generator().manual_seed(0))
    prepared = prepare_batch(
        plain_call(model), rollout, adv, (torch.arange(n) % 3 == 0).float(), algo,
        frozen_reference=plain_call(copy.deepcopy(model).requires_grad_(False)), feature_extractor=None,
        content_vocab_mask=content, temperature=1.0,
    )
    return adv, prepared


def test_update_loop_reads_no_rows_back_per_micro_batch(setup, monkeypatch):
    """The loop keeps each pass's row order on the host: the number of `tolist` calls made in mapo.step (a
    read-back, which on a GPU waits for the previous micro-batch's backward) does not grow with the number
    of micro-batches."""
    model, _, rollout, content = setup
    model = copy.deepcopy(model).train()
    algo = mapo_algo()
    algo.mini_batches = 2
    n = rollout.completion_ids.shape[0]
    _, prepared = _prepared_with_old_pass(model, rollout, content, algo)
    assert rollout.input_features is not None  # the micro-batches select clips too
    calls = []
    tolist = torch.Tensor.tolist

    def counted(self):  # the read-backs of the update loop itself (mapo.step)
        calls.append(sys._getframe(1).f_code.co_filename.endswith(os.path.join("mapo", "step.py")))
        return tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counted)

    def count(micro_batch_size):
        calls.clear()
        sums, _ = update_on_rollout(
            model, rollout, prepared, algo, micro_batch_size=micro_batch_size, seed=3, temperature=1.0, max_len=10,
            optimizer_step=lambda: model.zero_grad(set_to_none=True) or torch.zeros(()),
        )
        return sum(calls), sums

    (many, sums), (few, _) = count(1), count(n)
    assert many == few
    assert "mapo/gate_mean" in sums.values


def test_mini_batches_ratio_is_one_on_the_first_step_only(setup, monkeypatch):
    import mapo.step

    model, _, rollout, content = setup
    model = copy.deepcopy(model).train()
    algo = mapo_algo()
    algo.mini_batches, algo.updates_per_rollout = 2, 2
    algo.eps_low, algo.eps_high = 0.02, 0.05  # asymmetric and small, so the later steps clip
    n = rollout.completion_ids.shape[0]
    adv, prepared = _prepared_with_old_pass(model, rollout, content, algo)
    assert prepared.old_logprobs is not None
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=2.0)
    policy_first = score_tokens(model, rollout).logprobs  # log-probs of the policy step 1 sees
    policy_after = []  # log-probs of the policy each later step sees
    rows_of_step = [*mini_batch_rows(n, 2, 11), *mini_batch_rows(n, 2, 12)]
    assert rollout.input_features is not None  # the micro-batches select clips (prompt_clips)
    clips_of = mapo.step.prompt_clips(rollout)
    clip_calls = []
    monkeypatch.setattr(mapo.step, "prompt_clips", lambda r: clip_calls.append(r is rollout) or clips_of)
    step_alone = []  # each step's losses with its rows as one micro-batch, from the policy that step sees

    def optimizer_step():
        rows = rows_of_step[len(step_alone)]
        _, m = mapo_step(model, rollout, rows, prepared, algo, norms_for(prepared, rollout, rows), temperature=1.0, clips_of=clips_of)
        step_alone.append({k: float(v[0]) for k, v in m.items() if k.startswith("loss/")})
        norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        policy_after.append(score_tokens(model, rollout).logprobs)
        return norm

    step_losses = []
    sums, norms = update_on_rollout(
        model, rollout, prepared, algo, micro_batch_size=4, optimizer_step=optimizer_step, seed=11,
        temperature=1.0, max_len=10, on_step_loss=lambda loss: step_losses.append(float(loss)),
    )
    assert len(norms) == 4 and all(float(x) > 0 for x in norms)
    assert clip_calls == [True]  # the clips of the prompts: once per rollout, not once per micro-batch
    v = sums.values
    assert float(v["ratio/dev_u1_max"][0]) <= 1e-6  # first step: exp(logp − old) = 1 to 1e-6
    assert float(v["clip/high_u1"][0]) == float(v["clip/low_u1"][0]) == 0
    mask = rollout.completion_mask.bool()
    for j in (2, 3, 4):
        rows = rows_of_step[j - 1]
        logp = policy_after[j - 2][rows]  # the policy after step j − 1
        ratio_dev = ((logp - prepared.old_logprobs[rows]).exp() - 1).abs()[mask[rows]].max()
        assert float(v[f"ratio/dev_u{j}_max"][0]) == pytest.approx(float(ratio_dev), abs=1e-5) and ratio_dev > 1e-3
        expected = clip_token_counts(logp, prepared.old_logprobs[rows], adv[rows], mask[rows], 0.02, 0.05)
        assert float(v[f"clip/high_u{j}"][0]) == float(expected["clipped_high"])
        assert float(v[f"clip/low_u{j}"][0]) == float(expected["clipped_low"])
        assert float(v[f"clip/high_u{j}"][1]) == float(mask[rows].sum())
    clipped = sum(float(v[f"clip/{side}_u{j}"][0]) for side in ("high", "low") for j in (2, 3, 4))
    assert clipped > 0
    # loss/* are the mean over the 4 optimizer steps of each step's loss. L_PG and the KL of each step by
    # hand (ω̃ fixed from π_old, seq_mean_token_mean over the step's 6 rows); L_attn from the step's rows
    # as one micro-batch (the loop ran micro-batches of 4 and 2)
    logged = MetricSums.finalize({k: float(x) for k, x in sums.flat().items()})
    assert "clip/high_u4" in logged
    omega = prepared.omega * mask
    by_hand = {"loss/pg": [], "loss/kl": [], "loss/attn": [], "loss/total": []}
    for rows, logp, alone in zip(rows_of_step, [policy_first, *policy_after[:3]], step_alone):
        w, m, a = omega[rows], mask[rows], adv[rows, None]
        ratio = (logp[rows] - prepared.old_logprobs[rows]).exp()
        per_token = -torch.minimum(ratio * a, ratio.clamp(1 - 0.02, 1 + 0.05) * a)
        pg = float(((w * per_token).sum(-1) / w.sum(-1)).mean())
        d = prepared.ref_logprobs[rows] - logp[rows]
        kl = float((((d.exp() - d - 1) * m).sum(-1) / m.sum(-1)).mean())
        assert alone["loss/pg"] == pytest.approx(pg, abs=1e-5) and alone["loss/kl"] == pytest.approx(kl, rel=1e-5, abs=1e-6)
        for key, value in (("loss/pg", pg), ("loss/kl", kl), ("loss/attn", alone["loss/attn"]),
                           ("loss/total", pg + algo.beta * kl + algo.attn.eta * alone["loss/attn"])):
            by_hand[key].append(value)
    assert step_losses == pytest.approx(by_hand["loss/total"], abs=1e-5)  # what the non-finite guard sees
    # the steps' losses differ, and their mean is far from their sum: neither one step's loss nor the sum passes
    assert max(by_hand["loss/pg"]) - min(by_hand["loss/pg"]) > 1e-3 and abs(sum(by_hand["loss/pg"])) > 1e-2
    assert by_hand["loss/kl"][0] == pytest.approx(0.0, abs=1e-6) and by_hand["loss/kl"][3] > 1e-4  # the policy moved
    for key, values in by_hand.items():
        assert logged[key] == pytest.approx(sum(values) / 4, abs=1e-5), key


def test_schedule_counts_optimizer_steps():
    from mapo import config as C
    from mapo.optim import lr_multiplier
    from mapo.phase import Phase

    layer = torch.nn.Linear(2, 2)
    cfg = C.MapoConfig(
        model=C.ModelConfig(), data=C.DataConfig(), rollout=C.RolloutConfig(), algo=C.AlgoConfig(),
        reward=C.RewardConfig(), trainer=C.TrainerConfig(), logger=C.LoggerConfig(),
    )
    phase = Phase("rl", None, layer, 1.0, 4, 1, "linear", cfg, [0, 1], optimizer_steps_per_step=3)
    seen = []
    for _ in range(12):  # 4 RL steps × 3 optimizer steps
        seen.append(phase.scheduler.get_last_lr()[0])
        layer(torch.ones(1, 2)).sum().backward()
        phase.clip_and_step(0.0)
    # warm-up 1 RL step = 3 optimizer steps, then linear decay to 0 over the other 9
    assert seen == pytest.approx([lr_multiplier(s, 3, 12, "linear") for s in range(12)])
    assert seen[:4] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0]) and seen[-1] == pytest.approx(1 - 8 / 9)
