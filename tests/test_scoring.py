"""Scoring: embeddings equal the model's own forward, chunked log-probs/entropies, ablations, Δh and KL."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from toy_model import AUDIO, CLIP_OF_PROMPT, EOS, PAD, make_batch, tiny_model
from transformers import WhisperFeatureExtractor

from mapo.models.embed import build_inputs_embeds, encode_audio, position_ids_from_mask, split_audio_by_row
from mapo.rollout import generate_rollout
from mapo.scoring import (
    ABLATION_MODES,
    ablation_features,
    delta_entropy,
    hidden_states,
    kl_full_vocabulary,
    keeps_logits,
    kl_score,
    lm_head_workspace_bytes,
    logprobs_from_hidden,
    pick_reference_model,
    reference_pass,
    score_tokens,
    sequence_inputs,
    token_logprobs_and_entropy,
    vocab_slice_width,
)

torch.set_num_threads(1)


def audible_model(seed: int = 0):
    """The toy model with its projector scaled ×50: random init makes the audio path nearly silent
    (FIELD-NOTES), so the larger projector makes "with audio they change" a strong check."""
    return tiny_model(seed, projector_gain=50.0)


def make_rollout(model, group_size: int = 2, max_new_tokens: int = 8):
    return generate_rollout(
        model, make_batch(), group_size=group_size, max_new_tokens=max_new_tokens, eos_token_id=EOS,
        pad_token_id=PAD, seeds=[0, 1, 2],
    )


def with_other_waveform(model, rollout):
    """The same rollout with different audio (same clip lengths): features and cached embeddings swapped."""
    other = make_batch(feature_seed=123)
    clips = encode_audio(model, other["input_features"], other["feature_attention_mask"])
    return dataclasses.replace(
        rollout,
        input_features=other["input_features"],
        feature_attention_mask=other["feature_attention_mask"],
        prompt_audio_embeds=split_audio_by_row(clips, rollout.unique_prompt_ids(), AUDIO),
    )


def full_logits_reference(model, rollout, temperature: float):
    """Unchunked: the model's own forward (input_features path) -> fp32 [N, P+T, V] -> gather + entropy."""
    n = rollout.prompt_ids.shape[0]
    features = rollout.input_features
    # Model forward wants one clip per audio-bearing row: rows of prompt 0 use clip 0, of prompt 2 clip 1.
    rows_clips = [CLIP_OF_PROMPT[g] for g in rollout.group_index.tolist() if g in CLIP_OF_PROMPT]
    logits = model(
        input_ids=rollout.full_ids,
        attention_mask=rollout.attention_mask,
        position_ids=position_ids_from_mask(rollout.attention_mask),
        input_features=features[rows_clips],
        feature_attention_mask=rollout.feature_attention_mask[rows_clips],
    ).logits.float()
    p, t = rollout.prompt_len, rollout.completion_ids.shape[1]
    logp = torch.log_softmax(logits[:, p - 1 : p - 1 + t] / temperature, dim=-1)
    token_logp = logp.gather(-1, rollout.completion_ids[..., None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    assert token_logp.shape == (n, t)
    mask = rollout.completion_mask.float()
    return token_logp * mask, entropy * mask


def test_build_inputs_embeds_reproduces_model_forward():
    model = audible_model()
    batch = make_batch()
    clips = encode_audio(model, batch["input_features"], batch["feature_attention_mask"])
    assert [c.shape for c in clips] == [(25, 64), (15, 64)]
    rows = split_audio_by_row(clips, batch["input_ids"], AUDIO)
    assert rows[1] is None
    embeds = build_inputs_embeds(model, batch["input_ids"], rows)
    ours = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
    theirs = model(**batch).logits
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=0)
    # Dropping the features does change the logits (the check above can fail).
    bare_embeds = build_inputs_embeds(model, batch["input_ids"], None)
    bare = model(inputs_embeds=bare_embeds, attention_mask=batch["attention_mask"]).logits
    assert (bare - theirs).abs().max() > 1e-2
    with pytest.raises(ValueError, match="row 0: 25 audio tokens"):
        build_inputs_embeds(model, batch["input_ids"], [clips[1], None, clips[1]])
    with pytest.raises(ValueError, match="do not match"):
        split_audio_by_row(clips[:1], batch["input_ids"], AUDIO)


@pytest.mark.parametrize("chunk_size", [1, 7, 10_000])
def test_chunked_logprobs_and_entropy_equal_full_logits(chunk_size):
    model = audible_model()
    rollout = make_rollout(model)
    expected_logp, expected_entropy = full_logits_reference(model, rollout, temperature=0.7)
    logp, entropy = token_logprobs_and_entropy(model, rollout, temperature=0.7, chunk_size=chunk_size)
    assert torch.allclose(logp, expected_logp, atol=1e-5, rtol=0)
    assert torch.allclose(entropy, expected_entropy, atol=1e-5, rtol=0)
    # "recompute" (this model's tower again) equals "cached" (the rollout's embeddings).
    recomputed, _ = token_logprobs_and_entropy(
        model, rollout, audio="recompute", temperature=0.7, chunk_size=chunk_size
    )
    assert torch.allclose(recomputed, logp, atol=1e-6, rtol=0)
    # Entropy of 100 tokens lies in (0, log 100 = 4.605].
    assert (entropy[rollout.completion_mask == 1] > 0).all()
    assert (entropy <= torch.log(torch.tensor(100.0)) + 1e-5).all()


def test_logprobs_align_with_prefix_forwards_and_mask():
    """Loop reference: log p(y_t) from a forward over the unpadded prefix prompt + y_<t, one t at a time."""
    model = audible_model()
    rollout = generate_rollout(
        model, make_batch(), group_size=2, max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD, seeds=[5, 6, 7]
    )
    scores = score_tokens(model, rollout)
    batch = make_batch()
    for row in (0, 3, 5):  # a row of each prompt (with audio, text only, with audio)
        prompt = rollout.prompt_ids[row][rollout.attention_mask[row, : rollout.prompt_len].bool()]
        clip = {0: [0], 1: [], 2: [1]}[row // 2]
        extra = {}
        if clip:
            extra = dict(
                input_features=batch["input_features"][clip],
                feature_attention_mask=batch["feature_attention_mask"][clip],
            )
        for t in range(int(rollout.completion_mask[row].sum())):
            ids = torch.cat([prompt, rollout.completion_ids[row, :t]])[None]
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits[0, -1].float()
            expected = torch.log_softmax(logits, -1)[rollout.completion_ids[row, t]]
            assert abs(scores.logprobs[row, t].item() - expected.item()) < 1e-5
    # Positions after the end are zeroed.
    assert (scores.logprobs[rollout.completion_mask == 0] == 0).all()
    assert (scores.entropy[rollout.completion_mask == 0] == 0).all()


def test_ablated_reference_ignores_the_waveform_and_audio_does_not():
    model = audible_model()
    extractor = WhisperFeatureExtractor(feature_size=128, chunk_length=1)
    rollout = make_rollout(model)
    swapped = with_other_waveform(model, rollout)
    audio_rows = rollout.has_audio
    with_audio = score_tokens(model, rollout)
    with_audio_swapped = score_tokens(model, swapped)
    # With audio, the outputs of audio rows move with the waveform; text-only rows do not.
    assert (with_audio.entropy[audio_rows] - with_audio_swapped.entropy[audio_rows]).abs().max() > 1e-3
    assert torch.allclose(with_audio.entropy[~audio_rows], with_audio_swapped.entropy[~audio_rows], atol=1e-6)
    ablated = {}
    for mode in ABLATION_MODES:
        ref = reference_pass(model, rollout, mode, feature_extractor=extractor)
        ref_swapped = reference_pass(model, swapped, mode, feature_extractor=extractor)
        assert torch.equal(ref.entropy, ref_swapped.entropy), mode
        assert torch.equal(ref.logprobs, ref_swapped.logprobs), mode
        # The ablation removes the audio of audio rows and leaves text-only rows as they were.
        assert (ref.entropy[audio_rows] - with_audio.entropy[audio_rows]).abs().max() > 1e-3, mode
        assert torch.allclose(ref.entropy[~audio_rows], with_audio.entropy[~audio_rows], atol=1e-6), mode
        ablated[mode] = ref.entropy
    # The four ablations are different interventions.
    modes = list(ABLATION_MODES)
    for i, a in enumerate(modes):
        for b in modes[i + 1:]:
            assert (ablated[a] - ablated[b]).abs().max() > 1e-4, (a, b)


def test_mask_audio_keys_equals_cutting_the_audio_out():
    model = audible_model()
    rollout = make_rollout(model)
    masked = reference_pass(model, rollout, "mask_audio_keys")
    for row in (0, 5):  # prompt 0 (25 audio tokens) and prompt 2 (15)
        keep = rollout.attention_mask[row].bool() & ~rollout.audio_mask[row]
        ids = rollout.full_ids[row][keep][None]
        # The original positions, with the gap where the audio was: rotary offsets stay the same.
        positions = position_ids_from_mask(rollout.attention_mask[row : row + 1])[:, keep]
        hidden = hidden_states(model, build_inputs_embeds(model, ids, None), torch.ones_like(ids), positions)
        cut_prompt_len = ids.shape[1] - rollout.completion_ids.shape[1]
        logp, entropy = logprobs_from_hidden(
            model.lm_head, hidden, rollout.completion_ids[row : row + 1], cut_prompt_len
        )
        assert torch.allclose(masked.logprobs[row], logp[0], atol=1e-5, rtol=0)
        assert torch.allclose(masked.entropy[row], entropy[0], atol=1e-5, rtol=0)
    # Masking the keys makes the content of the placeholder positions irrelevant: real audio there gives
    # the same completion scores as bare placeholders.
    embeds, mask, positions = sequence_inputs(model, rollout, "mask_audio_keys")
    with_audio_embeds = build_inputs_embeds(model, rollout.full_ids, rollout.row_audio_embeds())
    ids, prompt_len = rollout.completion_ids, rollout.prompt_len
    bare, _ = logprobs_from_hidden(model.lm_head, hidden_states(model, embeds, mask, positions), ids, prompt_len)
    filled, _ = logprobs_from_hidden(
        model.lm_head, hidden_states(model, with_audio_embeds, mask, positions), ids, prompt_len
    )
    assert torch.allclose(bare, filled, atol=1e-5, rtol=0)


def test_silence_features_hand_worked():
    # Whisper log-mel of zeros: log10(max(0, 1e-10)) = -10 everywhere; clamp at max - 8 = -18 leaves -10;
    # (x + 4) / 4 = -1.5.
    extractor = WhisperFeatureExtractor(feature_size=128, chunk_length=1)
    features, mask = ablation_features(extractor, torch.tensor([[1] * 60 + [0] * 40]), "silence")
    assert mask.sum().item() == 60 and features.shape == (1, 128, 100)
    assert torch.allclose(features, torch.full_like(features, -1.5))
    noise_a, _ = ablation_features(extractor, torch.tensor([[1] * 60 + [0] * 40]), "noise", noise_seed=3)
    noise_b, _ = ablation_features(extractor, torch.tensor([[1] * 60 + [0] * 40]), "noise", noise_seed=3)
    assert torch.equal(noise_a, noise_b) and (noise_a != -1.5).any()
    with pytest.raises(ValueError, match="feature_extractor"):
        ablation_features(None, mask, "noise")


def test_with_grad_matches_unchunked_gradients():
    model = audible_model()
    rollout = make_rollout(model)
    mask = rollout.completion_mask.float()
    logp, entropy = token_logprobs_and_entropy(model, rollout, with_grad=True, chunk_size=5)
    assert logp.requires_grad
    ((logp * mask).sum() + 0.1 * (entropy * mask).sum()).backward()
    chunked = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ref_logp, ref_entropy = full_logits_reference(model, rollout, temperature=1.0)
    ((ref_logp * mask).sum() + 0.1 * (ref_entropy * mask).sum()).backward()
    lm_head_grad = model.lm_head.weight.grad
    assert lm_head_grad.abs().max() > 0
    for name in ("lm_head.weight", "model.language_model.layers.0.self_attn.q_proj.weight"):
        ref_grad = dict(model.named_parameters())[name].grad
        assert torch.allclose(chunked[name], ref_grad, atol=1e-5, rtol=1e-4), name
    # The cached audio embeddings carry no graph: the audio tower gets no gradient on the cached path.
    assert "model.audio_tower.conv1.weight" not in chunked


def test_delta_entropy_and_kl_scores():
    # Hand-worked: Δh = [2.0 - 0.5, 1.0 - 1.5, masked] = [1.5, -0.5, 0].
    h_ref = torch.tensor([[2.0, 1.0, 0.5]])
    h_pol = torch.tensor([[0.5, 1.5, 0.5]])
    mask = torch.tensor([[1, 1, 0]])
    assert torch.equal(delta_entropy(h_ref, h_pol, mask), torch.tensor([[1.5, -0.5, 0.0]]))
    # log π_θ − log π_abl = [-0.2 - (-1.2), -2.0 - (-0.5), masked] = [1.0, -1.5, 0].
    score = kl_score(torch.tensor([[-0.2, -2.0, -3.0]]), torch.tensor([[-1.2, -0.5, -0.1]]), mask)
    assert torch.allclose(score, torch.tensor([[1.0, -1.5, 0.0]]))

    model = audible_model()
    rollout = make_rollout(model)
    policy = score_tokens(model, rollout, keep_hidden=True)
    ablated = reference_pass(model, rollout, "drop_features", keep_hidden=True)
    kl = kl_full_vocabulary(
        model.lm_head, policy.hidden, model.lm_head, ablated.hidden, rollout.prompt_len,
        completion_mask=rollout.completion_mask, temperature=0.8, chunk_size=3,
    )
    # Vectorised reference over the full logits.
    p, t = rollout.prompt_len, rollout.completion_ids.shape[1]
    logp = torch.log_softmax(model.lm_head(policy.hidden[:, p - 1 : p - 1 + t]) / 0.8, -1)
    logq = torch.log_softmax(model.lm_head(ablated.hidden[:, p - 1 : p - 1 + t]) / 0.8, -1)
    expected = torch.nn.functional.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)
    assert torch.allclose(kl, expected, atol=1e-6)
    assert (kl[rollout.has_audio] > 1e-4).all() and torch.allclose(kl[~rollout.has_audio], torch.zeros(()), atol=1e-6)
    self_kl = kl_full_vocabulary(
        model.lm_head, policy.hidden, model.lm_head, policy.hidden, p, completion_mask=rollout.completion_mask
    )
    assert self_kl.abs().max() < 1e-6


def test_pick_reference_model():
    policy, frozen = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    assert pick_reference_model("policy", policy, frozen) is policy
    assert pick_reference_model("frozen", policy, frozen) is frozen
    with pytest.raises(ValueError, match="needs a frozen reference"):
        pick_reference_model("frozen", policy, None)
    with pytest.raises(ValueError, match="unknown reference choice"):
        pick_reference_model("ema", policy, frozen)


class _WrappedHead(torch.nn.Module):
    """An LM head that is not a plain nn.Linear (as an adapter-wrapped head would be): the autograd path."""

    def __init__(self, head: torch.nn.Linear):
        super().__init__()
        self.inner = head

    def forward(self, x):
        return self.inner(x)


@pytest.mark.parametrize("wrapped", [False, True])
def test_fused_chunks_equal_full_logits_in_value_and_gradient(wrapped):
    """Fused custom backward (or the checkpointed fallback) against plain autograd over the full fp32 logits."""
    gen = torch.Generator().manual_seed(0)
    rows, prompt_len, tokens, width, vocab = 3, 4, 6, 16, 50
    head = torch.nn.Linear(width, vocab, bias=True)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, width, generator=gen) * 0.5)
        head.bias.copy_(torch.randn(vocab, generator=gen))
    hidden = torch.randn(rows, prompt_len + tokens, width, generator=gen, requires_grad=True)
    ids = torch.randint(vocab, (rows, tokens), generator=gen)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 1 + [0] * 5])
    upstream_lp = torch.randn(rows, tokens, generator=gen)
    upstream_h = torch.randn(rows, tokens, generator=gen)

    def grads(fn):
        hidden.grad = head.weight.grad = head.bias.grad = None
        lp, ent = fn()
        ((lp * upstream_lp).sum() + (ent * upstream_h).sum()).backward()
        return lp.detach(), ent.detach(), hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()

    def reference():
        logits = head(hidden[:, prompt_len - 1 : prompt_len - 1 + tokens]).float() / 0.7
        logp = torch.log_softmax(logits, -1)
        lp = logp.gather(-1, ids[..., None]).squeeze(-1) * mask
        ent = -(logp.exp() * logp).sum(-1) * mask
        return lp, ent

    module = _WrappedHead(head) if wrapped else head
    expected = grads(reference)
    for chunk in (1, 4, 100):
        for keep in (False, True):  # the backward recomputes the logits, or reads the ones the forward kept
            got = grads(lambda: logprobs_from_hidden(module, hidden, ids, prompt_len, completion_mask=mask,
                                                     temperature=0.7, chunk_size=chunk, keep_logits=keep))
            for name, a, b in zip(("logp", "entropy", "d_hidden", "d_weight", "d_bias"), got, expected):
                assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), (name, chunk, keep, (a - b).abs().max().item())
    assert expected[3].abs().max() > 1e-3 and expected[2][:, : prompt_len - 1].abs().max() == 0
    # No grad: the same values.
    with torch.no_grad():
        lp, ent = logprobs_from_hidden(module, hidden, ids, prompt_len, completion_mask=mask, temperature=0.7)
    assert torch.allclose(lp, expected[0], atol=1e-6) and torch.allclose(ent, expected[1], atol=1e-6)


def test_vocab_slices_of_the_backward():
    # [positions, width] holds at most chunk × vocab elements; at least one column, at most the vocabulary.
    assert vocab_slice_width(512, 4096, 156_032) == 19_504 and 4096 * 19_504 <= 512 * 156_032
    assert vocab_slice_width(1, 11, 50) == 4
    assert vocab_slice_width(100, 11, 50) == 50 and vocab_slice_width(1, 10_000, 50) == 1


@pytest.mark.parametrize("used", ["both", "logp_only", "entropy_only"])
def test_fused_backward_with_a_frozen_head_and_one_output(used):
    """The head frozen (LoRA: no dW, no db) and only one of the two outputs in the loss (the other gets no
    gradient): dh still equals autograd's. Targets sit on both sides of every slice boundary (slices of 3)."""
    gen = torch.Generator().manual_seed(1)
    positions, width, vocab = 7, 8, 20
    head = torch.nn.Linear(width, vocab, bias=True).requires_grad_(False)
    hidden = torch.randn(1, positions + 1, width, generator=gen, requires_grad=True)
    ids = torch.tensor([[7, 8, 15, 16, 0, 19, 3]])  # slice width = 3·20 // 7 = 8: columns 0-7, 8-15, 16-19

    def loss(lp, ent):
        return {"both": lp.sum() - 0.3 * ent.sum(), "logp_only": lp.sum(), "entropy_only": ent.sum()}[used]

    fused = []
    for keep in (False, True):
        hidden.grad = None
        lp, ent = logprobs_from_hidden(head, hidden, ids, 1, temperature=1.3, chunk_size=3, keep_logits=keep)
        loss(lp, ent).backward()
        fused.append(hidden.grad.clone())
    assert torch.allclose(fused[0], fused[1], atol=1e-7, rtol=1e-6)  # kept = recomputed logits, up to rounding
    fused = fused[0]
    hidden.grad = None
    logp = torch.log_softmax(head(hidden[:, :-1]) / 1.3, -1)
    loss(logp.gather(-1, ids[..., None]).squeeze(-1), -(logp.exp() * logp).sum(-1)).backward()
    assert vocab_slice_width(3, positions, vocab) == 8
    assert hidden.grad.abs().max() > 1e-3
    assert torch.allclose(fused, hidden.grad, atol=1e-6, rtol=1e-5), (fused - hidden.grad).abs().max()


def _saved_shapes(fn) -> list[tuple[int, ...]]:
    """Shapes of the tensors autograd saves while fn() runs."""
    shapes: list[tuple[int, ...]] = []

    def pack(tensor):
        shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return shapes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_kept_for_the_backward_only_where_it_pays(dtype, monkeypatch):
    """keep_logits=None keeps the [M, V] logits on CUDA in 16 bits only (`keeps_logits`); on this CPU it
    recomputes them. Forcing it saves exactly one [M, V] tensor in the compute dtype, counted by the plan's
    workspace (`lm_head_workspace_bytes(with_grad=True)`)."""
    import mapo.scoring as scoring

    assert keeps_logits("cuda", 2) and not keeps_logits("cuda", 4) and not keeps_logits("cpu", 2)
    gen = torch.Generator().manual_seed(2)
    head = torch.nn.Linear(8, 30, bias=False).to(dtype)
    hidden = torch.randn(2, 6, 8, generator=gen).to(dtype).requires_grad_()
    ids = torch.randint(30, (2, 5), generator=gen)

    def run(**kw):
        return logprobs_from_hidden(head, hidden, ids, 1, chunk_size=4, **kw)

    assert (10, 30) not in _saved_shapes(run)
    kept = [s for s in _saved_shapes(lambda: run(keep_logits=True)) if s == (10, 30)]
    assert len(kept) == 1
    # where the rule says keep (CUDA, 16-bit), the default keeps: the rule decides for the device it sees
    monkeypatch.setattr(scoring, "keeps_logits", lambda device_type, compute_bytes: compute_bytes == dtype.itemsize)
    assert (10, 30) in _saved_shapes(run)
    monkeypatch.undo()
    base = lm_head_workspace_bytes(4096, 156_032, 512, "cuda", 2)
    assert lm_head_workspace_bytes(4096, 156_032, 512, "cuda", 2, with_grad=True) == base + 4096 * 156_032 * 2
    assert lm_head_workspace_bytes(4096, 156_032, 512, "cuda", 4, with_grad=True) == lm_head_workspace_bytes(
        4096, 156_032, 512, "cuda", 4)
    assert lm_head_workspace_bytes(64, 500, 512, "cpu", 2, with_grad=True) == lm_head_workspace_bytes(64, 500, 512, "cpu", 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_keeps_the_logits_and_matches_recomputing():
    """On CUDA in bf16 the default keeps the [M, V] logits for the backward; values equal the recomputing
    path's and gradients agree to bf16 rounding."""
    gen = torch.Generator().manual_seed(3)
    head = torch.nn.Linear(64, 3000, bias=False).cuda().bfloat16()
    hidden = torch.randn(4, 33, 64, generator=gen).cuda().bfloat16().requires_grad_()
    ids = torch.randint(3000, (4, 32), generator=gen).cuda()
    assert (128, 3000) in _saved_shapes(lambda: logprobs_from_hidden(head, hidden, ids, 1, chunk_size=16))
    results = []
    for keep in (None, False):
        hidden.grad = head.weight.grad = None
        lp, ent = logprobs_from_hidden(head, hidden, ids, 1, chunk_size=16, temperature=0.8, keep_logits=keep)
        (lp.sum() - 0.5 * ent.sum()).backward()
        results.append((lp.detach(), ent.detach(), hidden.grad.float(), head.weight.grad.float()))
    (lp0, ent0, dh0, dw0), (lp1, ent1, dh1, dw1) = results
    assert torch.equal(lp0, lp1) and torch.equal(ent0, ent1)
    for got, want in ((dh0, dh1), (dw0, dw1)):
        assert ((got - want).norm() / want.norm()).item() < 1e-2
