"""The MAPO step on the tiny model: it lowers its own loss, micro-batching is exact, GRPO is the special case."""

from __future__ import annotations

import copy

import pytest
import torch

from mapo.algos.mapo import build_content_vocab_mask
from mapo.config import AlgoConfig
from mapo.data.collate import Collator
from mapo.data.validate import read_manifest
from mapo.models.loader import generation_suppressed_token_ids, load_model_and_processor
from mapo.rollout import generate_rollout
from mapo.step import Normalisers, mapo_step, plain_call, prepare_batch

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


def norms_for(rollout) -> Normalisers:
    return Normalisers(num_tokens=rollout.completion_mask.sum().float(), num_seqs=rollout.completion_ids.shape[0], max_len=10)


def total_loss(model, rollout, prepared, algo, micro=None):
    rows = torch.arange(rollout.completion_ids.shape[0])
    chunks = [rows] if micro is None else list(rows.split(micro))
    total, metrics = 0.0, []
    for chunk in chunks:
        loss, m = mapo_step(model, rollout, chunk, prepared, algo, norms_for(rollout), temperature=1.0)
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


def test_mask_weights_follow_delta_h(setup):
    """ω̃ is not uniform once the ablated reference differs from the policy (soft mask, cap 5)."""
    model, _, rollout, content = setup
    algo = mapo_algo()
    prepared = prepared_for(model, rollout, algo, content)
    _, metrics = total_loss(model, rollout, prepared, algo)
    m = metrics[0]
    assert float(m["mapo/abs_delta_h"][0]) > 0
    assert 1.0 < float(m["mapo/omega_max"][0]) <= 5.0


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
