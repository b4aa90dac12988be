"""The Qwen Omni thinkers behind the model adapter (issue 8.5): Qwen2.5-Omni and Qwen3-Omni-MoE.

Each family's tiny model (real architecture, random weights) goes through what mapo does with a model:
load (also from a full Omni Hub-style folder with talker weights, and from a thinker-only folder),
prompts equal to the processor's own output, our forward (audio encoded once, 2-D positions) equal to the
model's own forward and rotary positions, greedy rollout equal to `generate`, the attention capture equal
to the eager reference in value and gradient, the four ablations, and a MAPO step that lowers its loss.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import transformers
from safetensors.torch import load_file, save_file

from mapo.algos.mapo import build_content_vocab_mask
from mapo.capture import audio_key_mask_from_ids, capture_audio_attention
from mapo.config import AlgoConfig
from mapo.data import prompt
from mapo.data.audio import load_audio
from mapo.data.collate import Collator
from mapo.data.schema import Record
from mapo.models.adapter import adapter_for_folder, adapter_for_processor, get_adapter
from mapo.models.embed import build_inputs_embeds, encode_audio, position_ids_from_mask, split_audio_by_row
from mapo.models.loader import generation_suppressed_token_ids, load_model_and_processor
from mapo.models.omni import qwen3_omni_audio_tokens, qwen25_omni_audio_tokens
from mapo.models.omni_processor import NoVideoProcessor
from mapo.models.tiny import TinyModelConfig, chat_texts, write_tiny
from mapo.models.tiny_omni import builder
from mapo.rollout import generate_rollout
from mapo.scoring import ABLATION_MODES, hidden_states, sequence_inputs
from mapo.step import Normalisers, mapo_step, plain_call, prepare_batch

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:.*longer than the 3 s audio window")  # the 3.7 s clip, on purpose

FAMILIES = ("qwen2_5_omni", "qwen3_omni_moe")
#: The full model of each family (what a Hub folder holds) and its vocoder's weight prefix.
FULL_MODEL = {
    "qwen2_5_omni": ("Qwen2_5OmniConfig", "Qwen2_5OmniForConditionalGeneration", "token2wav"),
    "qwen3_omni_moe": ("Qwen3OmniMoeConfig", "Qwen3OmniMoeForConditionalGeneration", "code2wav"),
}
#: EOS bias of the greedy test's LM head: some greedy completions end early, some run to the cap (seed 3).
EOS_BIAS = {"qwen2_5_omni": 0.37, "qwen3_omni_moe": 0.35}
SECONDS = (1.0, 2.5, 3.7)  # the tiny window is 3 s: the last clip is cut for Qwen2.5-Omni, kept whole for Qwen3-Omni


def tones(seconds: float, freq: float) -> np.ndarray:
    t = np.arange(int(seconds * 16_000)) / 16_000
    return (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[Record]:
    """Three audio prompts with clips of 1, 2.5 and 3.7 s, and one text-only prompt."""
    folder = tmp_path_factory.mktemp("omni_audio")
    out = []
    for i, s in enumerate(SECONDS):
        path = folder / f"clip{i}.wav"
        sf.write(path, tones(s, 300.0 + 200 * i), 16_000)
        out.append(Record(id=f"a{i}", audio=str(path), question=f"How many tones are there {'?' * (i + 1)}",
                          choices=["one", "two"], answer="one", task="count", split="train", trace="I hear one tone."))
    out.append(Record(id="t", audio=None, question="Which is higher?", choices=["first", "second"], answer="first",
                      task="pitch", split="train", trace="The first."))
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def omni(request, records, tmp_path_factory):
    """{'family', 'folder', 'model', 'processor', 'collator'} of one family's tiny thinker."""
    family = request.param
    texts = chat_texts(records, builder(family)[0]) * 4
    folder = write_tiny(TinyModelConfig(family=family, out_dir=str(tmp_path_factory.mktemp(family)), seed=3), texts)
    model, processor = load_model_and_processor(folder)
    return {"family": family, "folder": folder, "model": model, "processor": processor, "collator": Collator(processor)}


def test_placeholder_counts_hand_worked():
    # Qwen2.5-Omni: conv stride 2 then pool 2, as Qwen2-Audio: 100 frames → 50 → 25; 250 → 125 → 62.
    assert [qwen25_omni_audio_tokens(n) for n in (100, 250, 300)] == [25, 62, 75]
    # Qwen3-Omni: 13 per 100-frame chunk, the rest halved three times rounding up: 50 → 25 → 13 → 7.
    assert [qwen3_omni_audio_tokens(n) for n in (50, 100, 250, 300, 370)] == [7, 13, 33, 39, 48]


def test_parts_registry_and_fixed_vision_tower(omni):
    model, processor = omni["model"], omni["processor"]
    adapter = get_adapter(model)
    assert adapter.family == omni["family"] and adapter_for_processor(processor) is adapter
    assert adapter_for_folder(omni["folder"]) is adapter  # model_type "<family>_thinker"
    assert type(processor.video_processor) is NoVideoProcessor
    inner = model.model
    assert adapter.text_model(model) is inner.language_model and adapter.lm_head(model) is model.lm_head
    assert adapter.audio_tower(model) is inner.audio_tower and adapter.audio_projector(model) is None
    assert adapter.fsdp_units(model) == [*inner.language_model.layers, *inner.audio_tower.layers, inner.visual]
    fixed = {id(p) for p in adapter.fixed_parameters(model)}
    assert fixed == {id(p) for p in inner.visual.parameters()} and fixed
    assert adapter.audio_token_id(model) == processor.audio_token_id == processor.tokenizer.convert_tokens_to_ids(processor.audio_token)
    # everything a processor can mark (audio, image, video, their start/end) is suppressed in sampling
    markers = [processor.audio_token, processor.audio_bos_token, processor.image_token, processor.vision_eos_token]
    assert set(processor.tokenizer.convert_tokens_to_ids(markers)) <= set(generation_suppressed_token_ids(processor))


def test_collator_equals_the_processors_own_call(omni, records):
    processor, collator = omni["processor"], omni["collator"]
    expected_tokens = {  # window 3 s: Qwen2.5-Omni cuts the 3.7 s clip to 300 frames, Qwen3-Omni keeps 370
        "qwen2_5_omni": [25, 62, 75], "qwen3_omni_moe": [13, 33, 48],
    }[omni["family"]]
    for record, n_tokens in zip(records, expected_tokens):
        text = collator.prompt_text(record)
        theirs = processor(text=[text], audio=[load_audio(record.audio)], return_tensors="pt")
        ours = collator.prompts([record])
        for key in ("input_ids", "attention_mask", "input_features", "feature_attention_mask"):
            assert torch.equal(ours[key], theirs[key]), (record.id, key)
        assert int((ours["input_ids"] == processor.audio_token_id).sum()) == n_tokens
    # In a batch the clips are zero-padded to the longest (masked); each prompt row is unchanged.
    batch = collator.prompts(records)
    for row, record in enumerate(records):
        alone = collator.prompts([record])["input_ids"][0]
        assert torch.equal(batch["input_ids"][row, -len(alone):], alone)
    alone_features = collator.prompts(records[:1])["input_features"][0]
    assert torch.equal(batch["input_features"][0, :, : alone_features.shape[-1]], alone_features)


@pytest.mark.parametrize("adapter_class", ["Qwen25OmniThinkerAdapter", "Qwen3OmniMoeThinkerAdapter"])
def test_adapter_finds_the_towers_in_both_transformers_layouts(adapter_class):
    """transformers 5.2x: thinker.model holds the towers and `.language_model`; earlier 5.x (5.17, the GPU
    machine's): the towers sit on the thinker and thinker.model is the text model itself."""
    from torch import nn

    from mapo.models import omni as omni_module

    adapter = getattr(omni_module, adapter_class)()
    tower, visual, text = nn.Linear(1, 1), nn.Linear(1, 1), nn.Linear(1, 1)
    new = nn.Module()
    new.model = nn.Module()
    new.model.audio_tower, new.model.visual, new.model.language_model = tower, visual, text
    old = nn.Module()
    old.audio_tower, old.visual, old.model = tower, visual, text
    for thinker in (new, old):
        assert adapter.audio_tower(thinker) is tower
        assert adapter.vision_tower(thinker) is visual
        assert adapter.text_model(thinker) is text


def test_collator_finds_the_placeholder_id_when_the_processor_lacks_it(omni, records):
    """transformers 5.17's Qwen3OmniMoeProcessor names `audio_token` but sets no `audio_token_id`."""
    processor = copy.copy(omni["processor"])
    expected = processor.audio_token_id
    del processor.audio_token_id
    collator = Collator(processor)
    assert collator.audio_token_id == expected
    assert torch.equal(collator.prompts(records)["input_ids"], omni["collator"].prompts(records)["input_ids"])
    processor.audio_token = "<no such token>"
    with pytest.raises(ValueError, match="no id for its audio placeholder"):
        Collator(processor)


def test_our_forward_and_positions_equal_the_models_own(omni, records):
    model, collator = omni["model"], omni["collator"]
    adapter = get_adapter(model)
    batch = collator.prompts(records)  # clips of 3 lengths + a text-only row, left padded
    mask = batch["attention_mask"]
    valid = mask.bool()
    positions = position_ids_from_mask(mask)
    # The model's own 3-D rotary positions for audio + text are the plain sequential ones on every axis.
    rope, _ = model.model.get_rope_index(
        batch["input_ids"], None, None, mask, audio_seqlens=batch["feature_attention_mask"].sum(-1)
    )
    assert rope.shape == (3, *mask.shape)
    for axis in range(3):
        assert torch.equal(rope[axis][valid].long(), positions[valid])
    with torch.no_grad():
        theirs = model(**batch).logits
        clips = encode_audio(model, batch["input_features"], batch["feature_attention_mask"])
        assert [c.shape[0] for c in clips] == [int((batch["input_ids"][r] == adapter.audio_token_id(model)).sum()) for r in range(3)]
        rows = split_audio_by_row(clips, batch["input_ids"], adapter.audio_token_id(model))
        hidden = adapter.run_text_model(model, build_inputs_embeds(model, batch["input_ids"], rows), mask, positions)
        ours = adapter.lm_head(model)(hidden)
    torch.testing.assert_close(ours[valid], theirs[valid], rtol=0, atol=1e-5)
    # Non-vacuous: the audio changes the outputs.
    with torch.no_grad():
        no_audio = adapter.lm_head(model)(adapter.run_text_model(model, build_inputs_embeds(model, batch["input_ids"], None), mask, positions))
    assert (no_audio[valid] - ours[valid]).abs().max() > 1e-2


def _eos_leaning(model, eos: int, bias: float):
    """A copy whose LM head has a bias on EOS, so greedy completions end at varied lengths."""
    model = copy.deepcopy(model)
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[eos] = bias
    model.lm_head = head
    return model


def test_rollout_greedy_equals_generate(omni, records):
    processor = omni["processor"]
    tok = processor.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    model = _eos_leaning(omni["model"], eos, EOS_BIAS[omni["family"]])
    batch = omni["collator"].prompts(records)
    suppress = generation_suppressed_token_ids(processor)
    kwargs = dict(eos_token_id=eos, pad_token_id=tok.pad_token_id)
    tower_calls: list[int] = []  # clips per audio-tower call
    hook = get_adapter(model).audio_tower(model).register_forward_hook(
        lambda mod, args, kwargs, out: tower_calls.append(len(kwargs["feature_lens"])), with_kwargs=True
    )
    rollout = generate_rollout(model, batch, group_size=2, max_new_tokens=12, do_sample=False, suppress_token_ids=suppress, **kwargs)
    hook.remove()
    assert tower_calls == [3]  # the 3 clips encoded once, not once per sample or per decode step
    reference = model.generate(**batch, max_new_tokens=12, do_sample=False, suppress_tokens=suppress, **kwargs)
    expected = reference[:, batch["input_ids"].shape[1]:].repeat_interleave(2, dim=0)
    assert torch.equal(rollout.completion_ids[:, : expected.shape[1]], expected)
    assert (rollout.completion_ids[:, expected.shape[1]:] == tok.pad_token_id).all()
    lengths = rollout.completion_mask.sum(-1)
    assert lengths.min() < 12 and lengths.max() == 12, lengths  # some rows stop early, some do not
    # each prompt's keys/values once for its rows (rollout.shared_prompt_cache): the same greedy tokens, and
    # the same sampled ones
    shared = generate_rollout(model, batch, group_size=2, max_new_tokens=12, do_sample=False, suppress_token_ids=suppress,
                              shared_prompt_cache=True, **kwargs)
    assert torch.equal(shared.completion_ids, rollout.completion_ids)
    sampled = dict(group_size=3, max_new_tokens=12, temperature=1.3, seeds=[5, 6, 7, 8], suppress_token_ids=suppress, **kwargs)
    assert torch.equal(generate_rollout(model, batch, shared_prompt_cache=True, **sampled).completion_ids,
                       generate_rollout(model, batch, **sampled).completion_ids)


@pytest.mark.parametrize("method", ["fused", "sdpa"])
def test_capture_equals_eager_reference_in_value_and_gradient(omni, records, method):
    folder = omni["folder"]
    reference_model, _ = load_model_and_processor(folder, attn_implementation="eager")
    model, _ = load_model_and_processor(folder, attn_implementation="sdpa")
    adapter = get_adapter(model)
    batch = omni["collator"].prompts(records)
    valid = batch["attention_mask"].bool()
    keys = audio_key_mask_from_ids(batch["input_ids"], adapter.audio_token_id(model), batch["attention_mask"])
    weights = torch.randn(keys.shape, generator=torch.Generator().manual_seed(0)) * valid

    out = reference_model(**batch, output_attentions=True)
    per_layer = [torch.einsum("bhqk,bk->bhq", out.attentions[i].float(), keys.float()) for i in (0, 1)]
    reference = torch.stack(per_layer, dim=1).amax(2).mean(1)  # max over heads, mean over layers
    (reference * weights).sum().backward()

    def qk_grads(m):
        return [p.grad for layer in get_adapter(m).decoder_layers(m) for p in (layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight)]

    with capture_audio_attention(model, keys, layers=(-2, -1), method=method) as cap:
        model(**batch)
    torch.testing.assert_close(cap.mass[valid], reference[valid], atol=1e-5, rtol=0)
    (cap.mass * weights).sum().backward()
    want = qk_grads(reference_model)
    assert max(float(g.abs().max()) for g in want) > 1e-3  # the comparison is not between zeros
    for got, expected in zip(qk_grads(model), want):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_ablations_take_effect_and_a_mapo_step_lowers_its_loss(omni, records):
    model, processor = copy.deepcopy(omni["model"]), omni["processor"]
    tok = processor.tokenizer
    batch = omni["collator"].prompts(records)
    rollout = generate_rollout(
        model, batch, group_size=4, max_new_tokens=8, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.pad_token_id, suppress_token_ids=generation_suppressed_token_ids(processor), seeds=[1, 2, 3, 4],
    )
    audio_rows = rollout.has_audio
    with torch.no_grad():
        cached = hidden_states(model, *sequence_inputs(model, rollout, "cached"))
        recomputed = hidden_states(model, *sequence_inputs(model, rollout, "recompute"))
        torch.testing.assert_close(recomputed, cached, atol=1e-5, rtol=0)
        for mode in ABLATION_MODES:
            ablated = hidden_states(model, *sequence_inputs(model, rollout, mode, feature_extractor=processor.feature_extractor))
            assert torch.isfinite(ablated).all(), mode
            assert (ablated[audio_rows] - cached[audio_rows]).abs().amax() > 1e-2, mode  # the ablation took effect
            torch.testing.assert_close(ablated[~audio_rows], cached[~audio_rows], atol=1e-5, rtol=0)  # text-only rows

    algo = AlgoConfig()
    algo.attn.layers = [-2, -1]
    n = rollout.completion_ids.shape[0]
    advantages = torch.randn(n, generator=torch.Generator().manual_seed(0))
    accuracy = (torch.arange(n) % 3 == 0).float()
    reference = copy.deepcopy(model).requires_grad_(False)
    content = build_content_vocab_mask(tok, get_adapter(model).vocab_size(model))
    prepared = prepare_batch(
        plain_call(model), rollout, advantages, accuracy, algo, frozen_reference=plain_call(reference),
        feature_extractor=processor.feature_extractor, content_vocab_mask=content, temperature=1.0, old_pass=True,
    )
    norms = Normalisers(num_tokens=rollout.completion_mask.sum().float(), num_seqs=n, max_len=8)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss, metrics = mapo_step(model, rollout, torch.arange(n), prepared, algo, norms, temperature=1.0)
        assert torch.isfinite(loss) and metrics["loss/attn"][0] > 0
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[2] < losses[1] < losses[0], losses


def _hub_style_folder(omni, out: Path) -> Path:
    """What a Hub folder of the family holds: the *full* Omni model's config (thinker_config, talker…) and
    weights keyed thinker.* (transformers' save of the full model writes the released key names, per-expert
    weights for Qwen3-Omni), plus talker and vocoder tensors that mapo must skip."""
    config_cls, model_cls, vocoder = FULL_MODEL[omni["family"]]
    thinker = omni["model"]
    config = getattr(transformers, config_cls)(thinker_config=thinker.config.to_dict(), enable_audio_output=False)
    full = getattr(transformers, model_cls)(config)
    full.thinker.load_state_dict(thinker.state_dict())
    full.save_pretrained(out)
    omni["processor"].save_pretrained(out)
    weights = load_file(out / "model.safetensors")
    assert any(k.startswith("thinker.model.layers.0.") for k in weights)
    if omni["family"] == "qwen3_omni_moe":
        assert "thinker.model.layers.0.mlp.experts.1.gate_proj.weight" in weights  # per-expert on disk
    weights["talker.model.layers.0.mlp.up_proj.weight"] = torch.randn(8, 8)
    weights[f"{vocoder}.decoder.0.weight"] = torch.randn(4)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    raw = json.loads((out / "config.json").read_text())
    raw["enable_audio_output"] = True
    (out / "config.json").write_text(json.dumps(raw))
    return out


def test_loads_the_thinker_of_a_full_folder_and_a_thinker_only_folder(omni, tmp_path):
    thinker = omni["model"]
    full = _hub_style_folder(omni, tmp_path / "hub")
    assert json.loads((full / "config.json").read_text())["model_type"] == omni["family"]
    assert adapter_for_folder(full) is get_adapter(thinker)
    loaded, processor = load_model_and_processor(full)
    assert type(loaded) is type(thinker) and not hasattr(loaded, "talker")
    want = thinker.state_dict()
    got = loaded.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert processor.audio_token_id == omni["processor"].audio_token_id
    assert processor.chat_template == omni["processor"].chat_template
    only = tmp_path / "thinker"
    shutil.copytree(omni["folder"], only)
    reloaded, _ = load_model_and_processor(only)
    assert all(torch.equal(reloaded.state_dict()[k], want[k]) for k in want)


def test_chat_templates_follow_the_released_layouts(omni, records):
    text = omni["collator"].prompt_text(records[0])
    user = f"<|im_start|>user\n{{}}{prompt.user_text(records[0])}<|im_end|>\n<|im_start|>assistant\n"
    if omni["family"] == "qwen2_5_omni":
        assert text == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" + user.format("<|audio_bos|><|AUDIO|><|audio_eos|>")
    else:
        assert text == user.format("<|audio_start|><|audio_pad|><|audio_end|>")


# ----------------------------------------------------------------------------- the training program
@pytest.fixture(scope="module")
def omni_env(tiny_env, tmp_path_factory):
    """The session's small benchmark with a tiny thinker of each family built on its text."""
    root = tmp_path_factory.mktemp("omni_env")
    models = {
        family: write_tiny(TinyModelConfig(family=family, out_dir=str(root / family), corpus=str(tiny_env["data"] / "train.jsonl")))
        for family in FAMILIES
    }
    return {"root": root, "data": tiny_env["data"], "models": models}


@pytest.mark.slow
def test_qwen25_omni_experiment_runs_end_to_end(omni_env, tmp_path):
    from test_train import metrics_lines, run_ok, train_cmd

    env = {**omni_env, "model": omni_env["models"]["qwen2_5_omni"]}
    run_dir = tmp_path / "run"
    run_ok(train_cmd(env, run_dir, "tiny_qwen25omni_mapo", "trainer.eval_on_start=false"))
    rows = [r for r in metrics_lines(run_dir) if "reward/mean" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["loss/attn"] > 0 and "mapo/abs_delta_h" in r for r in rows)
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["step"] == 2 and 0.0 <= final["test/audio/accuracy"] <= 1.0
    exported, processor = load_model_and_processor(run_dir / "final_model")  # the export loads as the family
    assert get_adapter(exported).family == "qwen2_5_omni" and type(processor.video_processor) is NoVideoProcessor


@pytest.mark.slow
def test_qwen3_omni_moe_under_fsdp2_two_processes_match_one(omni_env, tmp_path):
    # FSDP2 units: each MoE decoder layer (attention, router and all experts), each audio encoder layer,
    # the vision tower, then the root. No warm start: every completion fails, so the advantages are 0, but
    # MAPO's attention loss (gate floor ε_A) and, at step 2, the KL give non-zero gradients.
    from test_train import metrics_lines, run_ok, train_cmd

    env = {**omni_env, "model": omni_env["models"]["qwen3_omni_moe"]}
    base = ("trainer.warm_start.enabled=false", "trainer.eval_on_start=false", "data.eval_max_items=2",
            "trainer.export_final=false")
    single = tmp_path / "single"
    run_ok(train_cmd(env, single, "tiny_qwen3omni_mapo", *base))
    double = tmp_path / "double"
    cmd = train_cmd(env, double, "tiny_qwen3omni_mapo", *base)
    run_ok([cmd[0], "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *cmd[1:]])
    one = [r for r in metrics_lines(single) if "reward/mean" in r]
    two = [r for r in metrics_lines(double) if "reward/mean" in r]
    assert len(one) == len(two) == 2
    assert all(r["grad_norm"] > 0 and r["loss/attn"] > 0 for r in one) and one[1]["loss/kl"] > 0
    for a, b in zip(one, two):
        assert b["reward/mean"] == pytest.approx(a["reward/mean"], abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        for key in ("loss/total", "loss/attn", "loss/kl"):
            assert b[key] == pytest.approx(a[key], abs=1e-4), key


def test_the_tiny_towers_carry_the_clip(omni, records):
    # Random init nearly hides the audio (FIELD-NOTES); the builders' init makes two different clips give
    # clearly different tower outputs. Qwen3-Omni with the stock conv_out init: 0.13 here.
    model, collator = omni["model"], omni["collator"]
    batch = collator.prompts(records[1:3])  # 2.5 s and 3 s(+) clips: compare their first 2.5 s
    with torch.no_grad():
        first, second = encode_audio(model, batch["input_features"], batch["feature_attention_mask"])
    n = first.shape[0]
    assert float((first - second[:n]).norm() / second[:n].norm()) > 0.3


def test_lora_reaches_the_text_linears_and_switches_off_exactly(omni, records):
    # transformers 5 fuses Qwen3-Omni's experts into 3-D parameters (no nn.Linear) and its router is a bare
    # parameter, so all-linear LoRA there adapts the attention projections only.
    from types import SimpleNamespace

    from mapo.models.lora import adapter_parameters, adapters_disabled, add_lora, target_module_names

    model = copy.deepcopy(omni["model"])
    expected = {"qwen2_5_omni": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
                "qwen3_omni_moe": ["k_proj", "o_proj", "q_proj", "v_proj"]}[omni["family"]]
    assert sorted({n.rsplit(".", 1)[-1] for n in target_module_names(model, "all-linear")}) == expected
    add_lora(model, SimpleNamespace(rank=4, alpha=8.0, dropout=0.0, targets="all-linear"))
    batch = omni["collator"].prompts(records)
    with torch.no_grad():
        for p in adapter_parameters(model):
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        base = omni["model"](**batch).logits
        adapted = model(**batch).logits
        with adapters_disabled(model):
            off = model(**batch).logits
    assert torch.equal(off, base) and (adapted - base).abs().max() > 1e-2


def test_memory_plan_dims_count_the_thinker(omni, tmp_path):
    import dataclasses

    from types import SimpleNamespace

    from mapo.config import RolloutConfig
    from mapo.preflight import CheckContext, check_audio_window

    model = omni["model"]
    adapter = get_adapter(model)
    dims = adapter.dims(json.loads((omni["folder"] / "config.json").read_text()))
    inner = model.model
    assert dims.total_params == sum(p.numel() for p in model.parameters())
    assert dims.other_params == sum(p.numel() for p in inner.visual.parameters())  # loaded, never run
    assert dims.projector_params == 0 and dims.audio_params == sum(p.numel() for p in inner.audio_tower.parameters())
    assert dims.num_layers == 2 and dims.layer_params == sum(p.numel() for p in inner.language_model.layers[0].parameters())
    moe = omni["family"] == "qwen3_omni_moe"
    assert (dims.num_experts, dims.experts_per_token) == ((4, 2) if moe else (0, 0))
    assert dims.mlp_width == (2 * 64 if moe else 128)  # routed experts' widths | intermediate_size
    assert dims.audio_tokens_per_window == (390 if moe else 750)  # the released 30 s window
    assert dims.audio_window_fixed is False and adapter.audio_window_fixed is False  # any clip length
    # A full Omni folder's config gives the thinker's dims (the talker is never loaded, never counted).
    full = _hub_style_folder(omni, tmp_path / "hub")
    assert adapter.dims(json.loads((full / "config.json").read_text())) == dims
    # The preflight window check applies only to encoders that take a fixed number of frames.
    cfg = SimpleNamespace(rollout=RolloutConfig())  # the check reads rollout.max_new_tokens only
    other_window = {"nb_max_frames": 30000}
    assert check_audio_window(cfg, CheckContext(world_size=1, dims=dims, preprocessor_config=other_window)) == []
    fixed = dataclasses.replace(dims, audio_window_fixed=True)
    found = check_audio_window(cfg, CheckContext(world_size=1, dims=fixed, preprocessor_config=other_window))
    assert len(found) == 1 and found[0].startswith(
        f"preprocessor_config.json nb_max_frames=30000: the audio encoder takes exactly {dims.audio_frames} mel frames")


@pytest.mark.parametrize("model_type, window", [("qwen2_audio", 30.0), ("qwen2_5_omni", None),
                                                ("qwen3_omni_moe", None), ("qwen3_omni_moe_thinker", None)])
def test_audio_window_is_read_without_building_a_model(model_type, window, tmp_path, monkeypatch):
    """`audio_window_seconds` runs at the start of every run: whether the family's encoder has a fixed window
    is a class attribute of its adapter, so no meta model is built for it (preflight and the plan build one)."""
    from mapo.assets import audio_window_seconds
    from mapo.models import adapter as adapter_module

    def no_model(*args, **kwargs):
        raise AssertionError("audio_window_seconds built a model")

    for cls in {type(a) for a in adapter_module._ADAPTERS.values()}:
        monkeypatch.setattr(cls, "meta_model", no_model)
        monkeypatch.setattr(cls, "dims", no_model)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"chunk_length": 30, "feature_size": 128}))
    assert audio_window_seconds(tmp_path) == window
    assert adapter_for_folder(tmp_path).audio_window_fixed is (window is not None)
