"""Rollout: greedy equality with HF generate (penalty, top-k, eager masks), EOS masking, audio encoded once,
per-prompt seeds, layout, sampling limits that reduce to greedy, static = dynamic cache, CUDA graph option."""

from __future__ import annotations

import pytest
import torch
from toy_model import AUDIO, EOS, PAD, VOCAB, make_batch, tiny_model

from mapo.models.embed import encode_audio
from mapo.rollout import (
    completion_mask_from_ids,
    generate_rollout,
    graph_stats,
    resolve_cuda_graph,
)

torch.set_num_threads(1)


def test_greedy_equals_hf_generate():
    model = tiny_model(seed=0, eos_bias=0.25)  # greedy lengths 3, 12, 11
    batch = make_batch()
    rollout = generate_rollout(
        model, batch, group_size=2, max_new_tokens=12, eos_token_id=EOS, pad_token_id=PAD, do_sample=False
    )
    reference = model.generate(
        **batch, max_new_tokens=12, do_sample=False, eos_token_id=EOS, pad_token_id=PAD, suppress_tokens=[AUDIO]
    )
    expected = reference[:, batch["input_ids"].shape[1]:].repeat_interleave(2, dim=0)
    assert torch.equal(rollout.completion_ids, expected)
    # Non-vacuous: with this seed at least one prompt stops early and one does not.
    lengths = rollout.completion_mask.sum(-1)
    assert lengths.min() < 12 and lengths.max() == 12, lengths


def test_completion_mask_masks_after_first_eos():
    # Hand-worked: eos = 1. Row 0 ends at t=1 (the 2nd 1 is after the end); row 1 at t=0; row 2 never.
    ids = torch.tensor([[5, 1, 7, 1], [1, 0, 0, 0], [4, 4, 4, 4]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    assert torch.equal(completion_mask_from_ids(ids, [EOS]), expected)

    model = tiny_model(seed=1, eos_bias=3.0)
    rollout = generate_rollout(
        model, make_batch(), group_size=4, max_new_tokens=16, eos_token_id=EOS, pad_token_id=PAD, seeds=[1, 2, 3]
    )
    ended_early = 0
    for ids_row, mask_row in zip(rollout.completion_ids.tolist(), rollout.completion_mask.tolist()):
        first_eos = ids_row.index(EOS) if EOS in ids_row else len(ids_row) - 1
        assert mask_row == [1] * (first_eos + 1) + [0] * (len(ids_row) - first_eos - 1)
        assert all(tok == PAD for tok in ids_row[first_eos + 1:])  # pad after the end
        ended_early += first_eos < len(ids_row) - 1
    assert ended_early >= 3
    assert AUDIO not in rollout.completion_ids.tolist()  # always suppressed


def test_forced_eos_and_sync_finished_keeps_stepping():
    model = tiny_model(seed=0)
    everything_but_eos = [t for t in range(VOCAB) if t != EOS]
    kwargs = dict(
        group_size=2, max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD, suppress_token_ids=everything_but_eos
    )
    alone = generate_rollout(model, make_batch(), **kwargs)
    assert alone.completion_ids.shape == (6, 1) and (alone.completion_ids == EOS).all()

    # Another "rank" is still going for the first 4 checks: this one keeps stepping, emitting pad.
    calls = []
    def other_rank_done_at_fifth_check(locally_done: bool) -> bool:
        calls.append(locally_done)
        return len(calls) >= 5

    synced = generate_rollout(model, make_batch(), sync_finished=other_rank_done_at_fifth_check, **kwargs)
    assert calls == [True] * 5
    assert synced.completion_ids.shape == (6, 5)
    assert torch.equal(synced.completion_ids[:, 0], torch.full((6,), EOS))
    assert (synced.completion_ids[:, 1:] == PAD).all()
    assert torch.equal(synced.completion_mask, torch.tensor([[1, 0, 0, 0, 0]] * 6))


def test_audio_tower_runs_once_per_prompt():
    model = tiny_model(seed=0)
    encoded_batches: list[int] = []
    model.model.audio_tower.register_forward_hook(lambda mod, args, out: encoded_batches.append(args[0].shape[0]))
    model.train()  # the rollout switches to eval and must restore the mode
    rollout = generate_rollout(
        model, make_batch(), group_size=4, max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD
    )
    assert model.training
    # One tower call over the 2 clips of the 2 audio prompts, not 2 × G = 8 clips, none while decoding.
    assert encoded_batches == [2]
    assert rollout.completion_ids.shape[0] == 12


def test_per_prompt_seed_gives_same_samples_alone_or_batched():
    model = tiny_model(seed=2, eos_bias=1.5)
    kwargs = dict(group_size=3, max_new_tokens=10, eos_token_id=EOS, pad_token_id=PAD, temperature=1.3, top_p=0.95)
    batched = generate_rollout(model, make_batch((0, 1, 2)), seeds=[11, 22, 33], **kwargs)
    alone = generate_rollout(model, make_batch((2,)), seeds=[33], **kwargs)
    in_batch = batched.completion_ids[6:9]
    width = alone.completion_ids.shape[1]
    assert torch.equal(in_batch[:, :width], alone.completion_ids)
    assert (in_batch[:, width:] == PAD).all()  # the lone run stopped only because its rows had ended
    # Different seeds do give different samples (the test can fail).
    other = generate_rollout(model, make_batch((2,)), seeds=[34], **kwargs)
    assert not torch.equal(other.completion_ids[:, :2], alone.completion_ids[:, :2])


def test_layout_group_index_audio_mask_and_cached_embeds():
    model = tiny_model(seed=0)
    batch = make_batch()
    rollout = generate_rollout(
        model, batch, group_size=4, max_new_tokens=5, eos_token_id=EOS, pad_token_id=PAD, seeds=[0, 1, 2]
    )
    n, width = 12, batch["input_ids"].shape[1]
    assert rollout.prompt_len == width and rollout.full_ids.shape == (n, width + rollout.completion_ids.shape[1])
    assert rollout.group_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    for row in range(n):
        prompt = batch["input_ids"][row // 4]
        assert torch.equal(rollout.prompt_ids[row], prompt)
        expected_audio = torch.cat([prompt == AUDIO, torch.zeros(rollout.completion_ids.shape[1], dtype=torch.bool)])
        assert torch.equal(rollout.audio_mask[row], expected_audio)
        expected_mask = torch.cat([batch["attention_mask"][row // 4], rollout.completion_mask[row]])
        assert torch.equal(rollout.attention_mask[row], expected_mask)
    assert rollout.audio_mask.sum(-1).tolist() == [25] * 4 + [0] * 4 + [15] * 4
    assert rollout.has_audio.tolist() == [True] * 4 + [False] * 4 + [True] * 4
    clips = encode_audio(model, batch["input_features"], batch["feature_attention_mask"])
    assert rollout.prompt_audio_embeds[1] is None
    assert torch.allclose(rollout.prompt_audio_embeds[0], clips[0], atol=1e-6)
    assert torch.allclose(rollout.prompt_audio_embeds[2], clips[1], atol=1e-6)
    assert rollout.row_audio_embeds()[5] is None and rollout.row_audio_embeds()[9] is rollout.prompt_audio_embeds[2]


def greedy_reference(model, batch, max_new_tokens, **settings):
    """transformers' greedy `generate` with the same processors, completions repeated per row of a group."""
    out = model.generate(
        **batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=EOS, pad_token_id=PAD,
        suppress_tokens=[AUDIO], **settings,
    )
    return out[:, batch["input_ids"].shape[1]:]


def test_greedy_with_repetition_penalty_and_top_k_equals_hf_generate():
    model = tiny_model(seed=3, eos_bias=0.25)
    batch = make_batch()
    kwargs = dict(group_size=1, max_new_tokens=14, eos_token_id=EOS, pad_token_id=PAD, do_sample=False)
    plain = generate_rollout(model, batch, **kwargs)
    penalised = generate_rollout(model, batch, repetition_penalty=1.5, top_k=5, **kwargs)
    expected = greedy_reference(model, batch, 14, repetition_penalty=1.5, top_k=5)
    assert torch.equal(penalised.completion_ids, expected[:, : penalised.completion_ids.shape[1]])
    assert (expected[:, penalised.completion_ids.shape[1]:] == PAD).all()
    # The penalty took effect: greedy without it repeats tokens and differs.
    assert not torch.equal(plain.completion_ids, penalised.completion_ids)


def test_eager_attention_decodes_with_additive_masks_and_equals_generate():
    model = tiny_model(seed=0, eos_bias=0.25)
    model.set_attn_implementation("eager")
    batch = make_batch()
    rollout = generate_rollout(
        model, batch, group_size=2, max_new_tokens=12, eos_token_id=EOS, pad_token_id=PAD, do_sample=False
    )
    assert torch.equal(rollout.completion_ids, greedy_reference(model, batch, 12).repeat_interleave(2, dim=0))


def test_cold_temperature_tiny_top_p_and_top_k_1_sample_the_greedy_path():
    model = tiny_model(seed=2, eos_bias=1.5)
    batch = make_batch()
    kwargs = dict(group_size=3, max_new_tokens=10, eos_token_id=EOS, pad_token_id=PAD, seeds=[4, 5, 6])
    greedy = generate_rollout(model, batch, do_sample=False, **kwargs).completion_ids
    for sampler in (dict(temperature=1e-4), dict(top_p=1e-6), dict(top_k=1, temperature=1.7)):
        sampled = generate_rollout(model, batch, **sampler, **kwargs).completion_ids
        assert torch.equal(sampled, greedy), sampler
    # Ordinary sampling does differ from greedy here (the checks above can fail).
    assert not torch.equal(generate_rollout(model, batch, temperature=1.5, **kwargs).completion_ids, greedy)


def test_static_and_dynamic_caches_and_check_intervals_agree():
    model = tiny_model(seed=2, eos_bias=1.5)
    batch = make_batch()
    kwargs = dict(group_size=4, max_new_tokens=16, eos_token_id=EOS, pad_token_id=PAD, seeds=[1, 2, 3],
                  temperature=1.2, top_k=40, top_p=0.95, repetition_penalty=1.2)
    static = generate_rollout(model, batch, cache="static", **kwargs)
    dynamic = generate_rollout(model, batch, cache="dynamic", **kwargs)
    sparse_checks = generate_rollout(model, batch, finish_check_every=5, **kwargs)
    assert torch.equal(static.completion_ids, dynamic.completion_ids)
    assert torch.equal(static.completion_ids, sparse_checks.completion_ids)
    assert torch.equal(static.completion_mask, sparse_checks.completion_mask)
    lengths = static.completion_mask.sum(-1)
    assert lengths.min() < 16 and lengths.max() == static.completion_ids.shape[1]  # trimmed to the longest


def test_bucketed_cache_reads_equal_exact_reads(monkeypatch):
    """Reading the cache up to a rounded-up length (what CUDA graphs do) masks the unwritten columns exactly."""
    import mapo.rollout as rollout_module

    model = tiny_model(seed=2, eos_bias=-2.0)
    kwargs = dict(group_size=2, max_new_tokens=20, eos_token_id=EOS, pad_token_id=PAD, seeds=[1, 2, 3], temperature=1.1)
    exact = generate_rollout(model, make_batch(), **kwargs)
    monkeypatch.setattr(rollout_module, "EAGER_BUCKET", 16)
    bucketed = generate_rollout(model, make_batch(), **kwargs)
    assert torch.equal(exact.completion_ids, bucketed.completion_ids) and exact.completion_ids.shape[1] == 20


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prompt_cache_decodes_what_the_per_row_cache_does(attn):
    """Each prompt's keys/values held once for its G rows (rollout.shared_prompt_cache): the same logits at
    every step to 1e-5 and the same sampled tokens (padded prompts, audio, GQA, penalty, bucketed reads),
    with B·P + N·T cached columns instead of N·(P + T); the attention override is gone afterwards."""
    import mapo.rollout as rollout_module
    from mapo.kv_cache import SharedPromptKVCache

    model = tiny_model(seed=2, eos_bias=1.5, projector_gain=50.0)
    model.set_attn_implementation({"text_config": attn, "audio_config": "sdpa"})
    batch = make_batch()
    configs = [layer.self_attn.config for layer in model.model.language_model.layers]
    kwargs = dict(group_size=4, max_new_tokens=16, eos_token_id=EOS, pad_token_id=PAD, seeds=[1, 2, 3],
                  temperature=1.2, top_k=40, repetition_penalty=1.2, cache="static")
    logits: dict[bool, list[torch.Tensor]] = {False: [], True: []}
    caches = {}
    step = rollout_module._StaticDecoder.step

    def spy(self, tokens):
        out = step(self, tokens)
        shared_cache = isinstance(self.cache, SharedPromptKVCache)
        logits[shared_cache].append(out.clone())
        caches[shared_cache] = self.cache
        return out

    rollout_module._StaticDecoder.step = spy
    try:
        per_row = generate_rollout(model, batch, **kwargs)
        shared = generate_rollout(model, batch, shared_prompt_cache=True, **kwargs)
    finally:
        rollout_module._StaticDecoder.step = step
    assert torch.equal(per_row.completion_ids, shared.completion_ids)
    assert len(logits[True]) == len(logits[False]) >= 10
    for a, b in zip(logits[False], logits[True]):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    lengths = shared.completion_mask.sum(-1)
    assert lengths.min() < lengths.max()  # rows end at different steps
    cache = caches[True]
    assert isinstance(cache, SharedPromptKVCache)
    prompt_len, rows = batch["input_ids"].shape[1], 12
    assert cache.prompt_keys[0].shape == (3, 2, prompt_len, 16) and cache.keys[0].shape == (rows, 2, 16, 16)
    assert caches[False].keys[0].shape == (rows, 2, prompt_len + 16, 16)
    assert [layer.self_attn.config for layer in model.model.language_model.layers] == configs  # override removed
    # bucketed reads (what CUDA graphs do) mask the unwritten completion columns exactly
    rollout_module.EAGER_BUCKET = 8
    try:
        assert torch.equal(generate_rollout(model, batch, shared_prompt_cache=True, **kwargs).completion_ids,
                           shared.completion_ids)
    finally:
        rollout_module.EAGER_BUCKET = 1
    # the growing cache cannot share: said, not silently ignored
    with pytest.warns(UserWarning, match="shared_prompt_cache has no effect"):
        dynamic = generate_rollout(model, batch, shared_prompt_cache=True, **{**kwargs, "cache": "dynamic"})
    assert torch.equal(dynamic.completion_ids, per_row.completion_ids)
    # greedy with one row per prompt: nothing to share, the per-row path runs and still equals generate
    greedy = generate_rollout(model, batch, group_size=1, max_new_tokens=12, eos_token_id=EOS, pad_token_id=PAD,
                              do_sample=False, shared_prompt_cache=True)
    assert torch.equal(greedy.completion_ids, greedy_reference(model, batch, 12)[:, : greedy.completion_ids.shape[1]])


@pytest.mark.parametrize("shared", [False, True])
def test_compiled_decoder_decodes_what_the_eager_one_does(shared):
    """rollout.compile: the decode steps through torch.compile of the text decoder (the cache writes eager)
    sample the same tokens as the eager steps, with the per-row and the shared-prompt cache; the prefill stays
    eager; afterwards the module's forward and the caches' writes are the class's own again. The "eager"
    backend runs what dynamo traced (graph breaks at the cache writes, guards, dynamic shapes) without
    Inductor's minutes of C++ compiling on this CPU; the GPU runs time Inductor's code."""
    from mapo.decode_compile import EAGER_CACHE_WRITES

    torch._dynamo.reset()
    model = tiny_model(seed=2, eos_bias=1.5, projector_gain=50.0)
    text = model.model.language_model
    writes = {cls: cls.__dict__["update"] for cls in EAGER_CACHE_WRITES}
    kwargs = dict(group_size=4, max_new_tokens=16, eos_token_id=EOS, pad_token_id=PAD, seeds=[1, 2, 3],
                  temperature=1.2, top_k=40, repetition_penalty=1.2, cache="static", shared_prompt_cache=shared)
    calls = {"compiled": 0}
    compile_fn = torch.compile

    def counting_compile(fn, **options):
        calls["compiled"] += 1
        assert options == {"dynamic": True, "backend": "eager"}
        return compile_fn(fn, **options)

    eager = generate_rollout(model, make_batch(), **kwargs)
    torch.compile, original = counting_compile, torch.compile
    try:
        compiled = generate_rollout(model, make_batch(), compile_decoder="eager", **kwargs)
        again = generate_rollout(model, make_batch(), compile_decoder="eager", **kwargs)
    finally:
        torch.compile = original
    assert calls["compiled"] == 2  # one compiled forward per rollout (torch reuses the compiled code)
    assert torch.equal(eager.completion_ids, compiled.completion_ids)
    assert torch.equal(compiled.completion_ids, again.completion_ids)
    lengths = compiled.completion_mask.sum(-1)
    assert lengths.min() < lengths.max() and compiled.completion_ids.shape[1] >= 10
    assert "forward" not in text.__dict__  # the class's forward again
    assert all(cls.__dict__["update"] is update for cls, update in writes.items())
    # the growing cache has nothing to compile this way: said, and decoded eagerly
    with pytest.warns(UserWarning, match="compile_decoder has no effect"):
        dynamic = generate_rollout(model, make_batch(), compile_decoder="eager", **{**kwargs, "cache": "dynamic"})
    assert torch.equal(dynamic.completion_ids, eager.completion_ids)


def test_shared_prompt_attention_hand_worked():
    """One prompt of 2 keys, G = 2 rows with 1 own key each, d = 1, scaling 1: row r's query q_r sees
    scores (q·k0, q·k1, q·c_r); the output is the softmax-weighted values; a padded prompt key is skipped."""
    import math

    from mapo.kv_cache import SharedPromptKVCache, shared_prompt_attention

    cache = SharedPromptKVCache(torch.tensor([[0, 1, 1]]), group_size=2, max_new_tokens=1)
    keys = torch.tensor([9.0, 0.0, math.log(3.0)]).view(1, 1, 3, 1)  # key 0 is padding
    values = torch.tensor([100.0, 1.0, 2.0]).view(1, 1, 3, 1)
    cache.update(keys, values, 0)
    cache.start_decoding()
    module = type("Attn", (), {"layer_idx": 0})()
    own_keys = torch.tensor([0.0, math.log(2.0)]).view(2, 1, 1, 1)  # row 0: score 0, row 1: score ln 2
    own_values = torch.tensor([3.0, 4.0]).view(2, 1, 1, 1)
    query = torch.ones(2, 1, 1, 1)
    out, weights = shared_prompt_attention(cache)(module, None, query, own_keys, own_values,
                                                  torch.ones(2, 1, 1, 1, dtype=torch.bool), scaling=1.0)
    # row 0: weights ∝ (1, 3, 1) over values (1, 2, 3) -> 10/5 = 2; row 1: ∝ (1, 3, 2) over (1, 2, 4) -> 15/6
    assert weights is None and out.shape == (2, 1, 1, 1)
    torch.testing.assert_close(out.flatten(), torch.tensor([2.0, 2.5]))


def test_decode_masks_and_columns_of_the_two_caches():
    """Before any decode step: the per-row cache opens each row's prompt keys (not its padding) among P + T
    columns and writes from column P; the shared-prompt cache's mask covers the T completion columns only,
    all closed, bool whatever the kernel, and writes from column 0."""
    from mapo.kv_cache import SharedPromptKVCache, StaticKVCache

    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    per_row = StaticKVCache(prompt_mask, group_size=2, max_new_tokens=2)
    mask, opened = per_row.decode_mask("additive", torch.float32)
    closed = torch.finfo(torch.float32).min
    assert (per_row.first_column, per_row.columns, per_row.write_position.tolist(), opened) == (3, 5, [3], 0.0)
    assert mask[:, 0, 0].tolist() == [[closed, 0, 0, closed, closed]] * 2 + [[0, 0, 0, closed, closed]] * 2
    assert per_row.decode_mask("bool", torch.float32)[0][:, 0, 0].tolist() == [[False, True, True, False, False]] * 2 + [[True, True, True, False, False]] * 2
    shared = SharedPromptKVCache(prompt_mask, group_size=2, max_new_tokens=2)
    mask, opened = shared.decode_mask("additive", torch.float32)
    assert (shared.first_column, shared.columns, shared.write_position.tolist(), opened) == (0, 2, [0], True)
    assert mask.dtype == torch.bool and mask.shape == (4, 1, 1, 2) and not mask.any()
    assert shared.prompt_padding[:, 0, 0].tolist() == [[True, False, False], [False, False, False]]


def test_cuda_graph_option():
    cpu = torch.device("cpu")
    assert resolve_cuda_graph("auto", cpu, multi_process=False) is False
    assert resolve_cuda_graph("auto", torch.device("cuda"), multi_process=False) is True
    assert resolve_cuda_graph(None, torch.device("cuda"), multi_process=False) is True  # None = auto
    assert resolve_cuda_graph(None, torch.device("cuda"), multi_process=True) is False
    assert resolve_cuda_graph("auto", torch.device("cuda"), multi_process=True) is False
    assert resolve_cuda_graph("on", torch.device("cuda"), multi_process=True) is True
    assert resolve_cuda_graph(False, torch.device("cuda"), multi_process=False) is False
    with pytest.raises(ValueError, match="cuda_graph"):
        resolve_cuda_graph("sometimes", cpu, multi_process=False)
    with pytest.raises(ValueError, match="cuda_graph"):  # refused by the rollout itself, CPU or not
        generate_rollout(tiny_model(0), make_batch(), group_size=1, max_new_tokens=2, eos_token_id=EOS,
                         pad_token_id=PAD, cuda_graph="sometimes", cache="dynamic")
    with pytest.raises(ValueError, match="cache"):
        generate_rollout(tiny_model(0), make_batch(), group_size=1, max_new_tokens=2, eos_token_id=EOS,
                         pad_token_id=PAD, cache="paged")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decode_equals_eager_on_gpu():
    model = tiny_model(seed=2, eos_bias=-3.0).cuda()  # long completions: several cache buckets, several graphs
    batch = {k: v.cuda() for k, v in make_batch().items()}
    kwargs = dict(group_size=4, max_new_tokens=200, eos_token_id=EOS, pad_token_id=PAD, seeds=[1, 2, 3],
                  temperature=1.1, top_k=30, repetition_penalty=1.1)
    before = graph_stats()
    graphed = generate_rollout(model, batch, cuda_graph="on", **kwargs)
    stats = {k: v - before[k] for k, v in graph_stats().items()}
    # the graphs really ran: a failed capture falls back to eager and would make this compare eager with eager
    assert stats["captured"] >= 2 and stats["replayed"] > 0 and stats["failed"] == 0, stats
    eager = generate_rollout(model, batch, cuda_graph="off", **kwargs)
    assert torch.equal(graphed.completion_ids, eager.completion_ids)
    greedy = generate_rollout(model, batch, group_size=1, max_new_tokens=200, eos_token_id=EOS, pad_token_id=PAD,
                              do_sample=False, cuda_graph="on")
    expected = greedy_reference(model, batch, 200)
    assert torch.equal(greedy.completion_ids, expected[:, : greedy.completion_ids.shape[1]])
    # the shared-prompt cache under graphs: the same tokens as the per-row cache, eager
    before = graph_stats()
    shared = generate_rollout(model, batch, cuda_graph="on", shared_prompt_cache=True, **kwargs)
    stats = {k: v - before[k] for k, v in graph_stats().items()}
    assert stats["captured"] >= 2 and stats["failed"] == 0, stats
    assert torch.equal(shared.completion_ids, eager.completion_ids)
