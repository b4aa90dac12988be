"""Shared-prefix passes (each prompt computed once per group) equal full-sequence passes: log-probs,
entropies, parameter gradients, every audio input, and the audio-attention capture; micro-batches of whole
groups stay groups."""

from __future__ import annotations

import pytest
import torch
from toy_model import EOS, PAD, make_batch, tiny_model
from transformers import WhisperFeatureExtractor

from mapo.capture import capture_audio_attention, completion_mass
from mapo.rollout import generate_rollout
from mapo.scoring import AUDIO_INPUTS, score_tokens
from mapo.shared_prefix import can_share_prefix
from mapo.step import select_rows

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model_and_rollout():
    model = tiny_model(0, eos_bias=1.0, projector_gain=50.0)
    rollout = generate_rollout(model, make_batch(), group_size=3, max_new_tokens=8, eos_token_id=EOS,
                               pad_token_id=PAD, seeds=[0, 1, 2], temperature=1.2)
    assert rollout.completion_mask.sum(-1).min() < rollout.completion_ids.shape[1]  # some rows end early
    return model, rollout


def passes(model, rollout, audio, with_grad, extractor):
    """(shared-prefix scores, full-pass scores); keep_hidden=True forces the full pass."""
    options = dict(audio=audio, temperature=0.9, with_grad=with_grad, feature_extractor=extractor, chunk_size=5)
    return score_tokens(model, rollout, **options), score_tokens(model, rollout, keep_hidden=True, **options)


@pytest.mark.parametrize("audio", AUDIO_INPUTS)
def test_values_equal_the_full_pass(model_and_rollout, audio):
    model, rollout = model_and_rollout
    assert can_share_prefix(model, rollout, with_grad=False)
    shared, full = passes(model, rollout, audio, False, WhisperFeatureExtractor(feature_size=128, chunk_length=1))
    assert torch.allclose(shared.logprobs, full.logprobs, atol=1e-5, rtol=0)
    assert torch.allclose(shared.entropy, full.entropy, atol=1e-5, rtol=0)
    assert (shared.logprobs[rollout.completion_mask == 0] == 0).all()


@pytest.mark.parametrize("audio", ["cached", "recompute"])
def test_gradients_equal_the_full_pass(model_and_rollout, audio):
    model, rollout = model_and_rollout
    model.train()
    assert can_share_prefix(model, rollout, with_grad=True)  # else both passes would be the full one
    grads = []
    for scores in passes(model, rollout, audio, True, None):
        model.zero_grad()
        mask = rollout.completion_mask.float()
        ((scores.logprobs * mask).sum() + 0.3 * (scores.entropy * mask).sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.eval()
    assert grads[0].keys() == grads[1].keys() and ("model.audio_tower.conv1.weight" in grads[0]) == (audio == "recompute")
    for name in grads[1]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4), name


def test_capture_mass_equals_the_full_pass(model_and_rollout):
    model, rollout = model_and_rollout
    prompt_len, tokens = rollout.prompt_len, rollout.completion_ids.shape[1]
    keys = prompt_len - 1 + tokens
    with capture_audio_attention(model, rollout.audio_mask[:, :keys], layers=(0, 1), key_length=keys) as cap:
        score_tokens(model, rollout, with_grad=True)
        shared = cap.mass
    with capture_audio_attention(model, rollout.audio_mask, layers=(0, 1)) as cap:
        score_tokens(model, rollout, with_grad=True, keep_hidden=True)
        full = completion_mass(cap.mass, prompt_len, tokens)
    assert shared.shape == full.shape == (rollout.completion_ids.shape[0], tokens)
    assert torch.allclose(shared, full, atol=1e-5, rtol=0)
    assert shared[rollout.has_audio].min() > 1e-3  # audio rows do attend to their audio
    q_proj = model.model.language_model.layers[1].self_attn.q_proj.weight
    g_shared, = torch.autograd.grad(shared.sum(), q_proj)
    g_full, = torch.autograd.grad(full.sum(), q_proj)
    assert torch.allclose(g_shared, g_full, atol=1e-5, rtol=1e-4)


def test_when_the_full_pass_is_used(model_and_rollout):
    model, rollout = model_and_rollout
    assert not can_share_prefix(model, rollout, with_grad=False, keep_hidden=True)
    assert not can_share_prefix(model, select_rows(rollout, torch.tensor([1, 2])), with_grad=False)  # groups of one
    grouped = select_rows(rollout, torch.arange(3, 9))  # prompts 1 and 2, whole groups
    assert grouped.group_size == 3 and grouped.group_index.tolist() == [0, 0, 0, 1, 1, 1]
    assert grouped.prompt_audio_embeds[1] is rollout.prompt_audio_embeds[2]
    assert torch.equal(grouped.input_features, rollout.input_features[1:2])  # prompt 2's clip only
    assert can_share_prefix(model, grouped, with_grad=False)
    shifted = select_rows(rollout, torch.arange(1, 7))  # not aligned to groups
    assert shifted.group_size == 1 and shifted.group_index.tolist() == list(range(6))
    model.train()
    model.model.language_model.layers[0].gradient_checkpointing = True
    try:  # transformers drops the cache argument of checkpointed layers: gradient passes go full length
        assert not can_share_prefix(model, rollout, with_grad=True)
        assert can_share_prefix(model, rollout, with_grad=False)
    finally:
        model.model.language_model.layers[0].gradient_checkpointing = False
        model.eval()
