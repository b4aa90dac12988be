"""The tiny Qwen2-Audio: tokenizer, processor, model, the audio-path init and the common loader."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from transformers import Qwen2AudioForConditionalGeneration

from mapo.data import prompt
from mapo.data.collate import Collator
from mapo.data.schema import Record
from mapo.models import tiny
from mapo.models.init import init_audio_path, sinusoidal_positions
from mapo.models.loader import (
    audio_token_id,
    check_model_folder,
    generation_suppressed_token_ids,
    load_model_and_processor,
)

torch.set_num_threads(1)
SR = 16_000


def tone_sequence(freqs: list[float], tone_s: float = 0.5, gap_s: float = 0.5, amp: float = 0.5) -> np.ndarray:
    """Tones of `tone_s` seconds at `freqs` Hz, each followed by `gap_s` of silence: float32 [n]."""
    parts = []
    for freq in freqs:
        t = np.arange(int(tone_s * SR)) / SR
        parts += [amp * np.sin(2 * np.pi * freq * t), np.zeros(int(gap_s * SR))]
    return np.concatenate(parts).astype(np.float32)


def write_wav(folder: Path, name: str, samples: np.ndarray) -> str:
    path = folder / f"{name}.wav"
    sf.write(path, samples, SR)
    return str(path)


def make_records(folder: Path) -> list[Record]:
    """Benchmark-style records: pitch comparison (1 s and 2 s clips), tone count (3 s), one without audio."""
    pitch_q = "Is the second tone higher or lower than the first?"
    return [
        Record("pitch-1", write_wav(folder, "low_high", tone_sequence([300, 1200], tone_s=0.25, gap_s=0.25)),
               pitch_q, ["higher", "lower"], "higher", task="pitch_compare",
               trace="first tone: low. second tone: high. the second is higher."),
        Record("pitch-2", write_wav(folder, "high_low", tone_sequence([1200, 300])),
               pitch_q, ["higher", "lower"], "lower", task="pitch_compare",
               trace="first tone: high. second tone: low. the second is lower."),
        Record("count-1", write_wav(folder, "three", tone_sequence([800, 800, 800])),
               "How many beeps do you hear?", ["two", "three", "four", "five"], "three", task="tone_count",
               trace="beep one. beep two. beep three. there are three beeps."),
        Record("text-1", None, "Which is usually louder, a whisper or a shout?", ["a whisper", "a shout"],
               "a shout", task="text_only", trace="a shout is louder."),
    ]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Records, the in-memory tokenizer/processor/model, and the same model written to disk and reloaded."""
    root = tmp_path_factory.mktemp("tiny")
    records = make_records(root)
    texts = tiny.chat_texts(records)
    cfg = tiny.TinyModelConfig(out_dir=str(root / "model"), seed=0)
    tokenizer = tiny.build_tokenizer(texts, cfg.vocab_size, cfg.seed)
    processor = tiny.build_processor(tokenizer, cfg.window_seconds)
    model = tiny.build_tiny_model(cfg, tokenizer)
    folder = tiny.write_tiny(cfg, texts)
    loaded_model, loaded_processor = load_model_and_processor(folder)
    return dict(records=records, texts=texts, cfg=cfg, tokenizer=tokenizer, processor=processor, model=model,
                folder=folder, loaded_model=loaded_model, loaded_processor=loaded_processor, root=root)


# ------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_round_trips_benchmark_text(built):
    tokenizer = built["loaded_processor"].tokenizer
    strings = list(built["texts"])  # whole conversations, special tokens included
    for record in built["records"]:
        strings += [prompt.user_text(record), prompt.reference_completion(record)]
    strings.append("Unseen text: 17 beeps, ümlaut & emoji 🎵 — still byte-level.")  # not in the corpus
    for text in strings:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
    # BPE learned merges: the benchmark text takes far fewer tokens than its bytes.
    trace = built["records"][0].trace
    assert len(tokenizer(trace)["input_ids"]) < len(trace.encode()) / 2


def test_tokenizer_knows_the_special_tokens(built):
    tokenizer = built["loaded_processor"].tokenizer
    for expected_id, token in enumerate(tiny.SPECIAL_TOKENS):
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [expected_id]
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert tokenizer.padding_side == "left"
    # Inside text, a special is still one token: "Audio 1: " + bos + AUDIO + eos.
    ids = tokenizer("x<|audio_bos|><|AUDIO|><|audio_eos|>y", add_special_tokens=False)["input_ids"]
    assert ids[1:4] == [3, 4, 5]
    assert built["tokenizer"].get_vocab() == tokenizer.get_vocab()  # the saved tokenizer is the built one


def test_chat_template_renders_qwen2_audio_layout(built):
    processor = built["loaded_processor"]
    record = built["records"][0]
    text = processor.apply_chat_template(prompt.messages(record), add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nAudio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
        f"{prompt.user_text(record)}<|im_end|>\n<|im_start|>assistant\n"
    )


# ------------------------------------------------------------------------------------------ processor


@pytest.mark.parametrize(
    ("seconds", "expected_tokens"),
    [
        # 1 s = 100 mel frames → conv stride 2: (100 - 1) // 2 + 1 = 50 → pool 2: (50 - 2) // 2 + 1 = 25
        (1.0, 25),
        # 3 s = 300 frames → 150 → (150 - 2) // 2 + 1 = 75: the full window
        (3.0, 75),
        # 4 s is cut to the 3 s window
        (4.0, 75),
    ],
)
def test_processor_expands_audio_to_model_positions(built, seconds, expected_tokens):
    processor, model = built["loaded_processor"], built["loaded_model"]
    clip = tone_sequence([440], tone_s=seconds, gap_s=0.0)
    batch = processor(text=["Audio: <|AUDIO|> ok"], audio=[clip], sampling_rate=SR, return_tensors="pt")
    assert int((batch["input_ids"] == audio_token_id(processor)).sum()) == expected_tokens
    assert tuple(batch["input_features"].shape) == (1, 128, 300)  # 3 s window = 300 frames
    tower = model.model.audio_tower
    assert tower.config.max_source_positions == 150  # 300 frames // 2
    _, output_lengths = tower._get_feat_extract_output_lengths(batch["feature_attention_mask"].sum(-1))
    assert int(output_lengths) == expected_tokens
    with torch.no_grad():
        out = tower(batch["input_features"]).last_hidden_state
    assert tuple(out.shape) == (1, 75, 64)  # the tower always yields the full window's 75 positions


# ------------------------------------------------------------------------------------------ model


def test_save_reload_gives_identical_forward(built):
    collator = Collator(built["loaded_processor"])
    batch = collator.prompts(built["records"])
    with torch.no_grad():
        in_memory = built["model"](**batch).logits
        reloaded = built["loaded_model"](**batch).logits
    assert in_memory.shape == (4, batch["input_ids"].shape[1], len(built["tokenizer"]))
    assert torch.isfinite(reloaded).all()
    torch.testing.assert_close(reloaded, in_memory, rtol=0, atol=1e-6)
    assert (built["folder"] / "model.safetensors").is_file()


def test_same_seed_same_weights_other_seed_differs(built):
    cfg, tokenizer = built["cfg"], built["tokenizer"]
    first = tiny.build_tiny_model(cfg, tokenizer).state_dict()
    again = tiny.build_tiny_model(cfg, tokenizer).state_dict()
    other = tiny.build_tiny_model(replace(cfg, seed=1), tokenizer).state_dict()
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["model.audio_tower.conv1.weight"], other["model.audio_tower.conv1.weight"])
    assert not torch.equal(first["lm_head.weight"], other["lm_head.weight"])
    # The sinusoidal table does not depend on the seed.
    key = "model.audio_tower.embed_positions.weight"
    assert torch.equal(first[key], other[key])


def test_sizes_follow_the_config(built):
    model = built["loaded_model"]
    text, audio = model.config.text_config, model.config.audio_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (64, 2, 4, 2)
    assert (text.intermediate_size, text.max_position_embeddings) == (128, 1024)
    assert (audio.d_model, audio.encoder_layers, audio.encoder_attention_heads, audio.encoder_ffn_dim) == (64, 2, 4, 128)
    assert model.config.audio_token_id == 4
    assert (model.generation_config.eos_token_id, model.generation_config.pad_token_id) == (2, 0)
    wide = tiny.build_tiny_model(replace(built["cfg"], text_hidden=32, window_seconds=2), built["tokenizer"])
    assert wide.config.text_config.hidden_size == 32
    assert wide.config.audio_config.max_source_positions == 100  # 2 s = 200 frames // 2


def test_batched_generate_is_deterministic_under_a_seed(built):
    model, processor = built["loaded_model"], built["loaded_processor"]
    batch = Collator(processor).prompts(built["records"])
    # Left padding: every row ends with the generation prompt, so the last column is real for all.
    assert bool(batch["attention_mask"][:, -1].all()) and not bool(batch["attention_mask"][:, 0].all())
    suppressed = generation_suppressed_token_ids(processor)

    def sample(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=16, min_new_tokens=16, do_sample=True,
                                 suppress_tokens=suppressed)
        return out

    first, again, other = sample(123), sample(123), sample(124)
    prompt_len = batch["input_ids"].shape[1]
    assert first.shape == (4, prompt_len + 16)
    assert torch.equal(first[:, :prompt_len], batch["input_ids"])
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    new_tokens = first[:, prompt_len:]
    assert not torch.isin(new_tokens, torch.tensor(suppressed)).any()


# ------------------------------------------------------------------------------------------ audio path


def tower_outputs(model: Qwen2AudioForConditionalGeneration, processor, clips: list[np.ndarray]) -> torch.Tensor:
    feats = processor.feature_extractor(clips, sampling_rate=SR, return_tensors="pt")["input_features"]
    with torch.no_grad():
        return model.model.audio_tower(feats).last_hidden_state  # [N, 75, 64]


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


def test_audio_tower_outputs_differ_between_clips(built):
    clips = [tone_sequence([300, 1200]), tone_sequence([1200, 300]), tone_sequence([300]), tone_sequence([1200])]
    out = tower_outputs(built["loaded_model"], built["loaded_processor"], clips)
    assert relative_difference(out[0], out[1]) > 0.1  # same tones, other order (measured ~0.29)
    assert relative_difference(out[2], out[3]) > 0.1  # one tone, other pitch (measured ~0.22)
    same = tower_outputs(built["loaded_model"], built["loaded_processor"], [clips[0], clips[0]])
    assert relative_difference(same[0], same[1]) == 0.0


def encoder_stream_stats(model: Qwen2AudioForConditionalGeneration, feats: torch.Tensor) -> tuple[float, list[float]]:
    """rms of the conv output, and ||layer(h) - h|| / ||h|| for each encoder layer (h: [N, 150, d])."""
    tower = model.model.audio_tower
    with torch.no_grad():
        conv = F.gelu(tower.conv2(F.gelu(tower.conv1(feats)))).permute(0, 2, 1)
        hidden = conv + tower.embed_positions.weight
        changes = []
        for layer in tower.layers:
            updated = layer(hidden, None)
            changes.append(float((updated - hidden).norm() / hidden.norm()))
            hidden = updated
    return float(conv.pow(2).mean().sqrt()), changes


def test_audio_init_contrast_with_stock_init(built):
    """The stock init's stream is ~0.02 rms and each random layer rewrites most of it; ours passes it through.

    (The stock tower's *outputs* also differ between clips, since its final LayerNorm rescales; the
    difference is what training can do with them: see mapo.models.init for the measured learning runs.)
    """
    model, processor = built["loaded_model"], built["loaded_processor"]
    clips = [tone_sequence([300, 1200]), tone_sequence([800, 800, 800])]
    feats = processor.feature_extractor(clips, sampling_rate=SR, return_tensors="pt")["input_features"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        stock = Qwen2AudioForConditionalGeneration(model.config).eval()
    ours_rms, ours_changes = encoder_stream_stats(model, feats)
    stock_rms, stock_changes = encoder_stream_stats(stock, feats)
    assert ours_rms > 0.2 and stock_rms < 0.05  # measured 0.44 vs 0.016
    assert max(ours_changes) < 0.2 and min(stock_changes) > 0.4  # measured ~0.03 vs 0.68-0.81


def test_position_table_is_sinusoidal(built):
    table = built["loaded_model"].model.audio_tower.embed_positions.weight.detach()  # [150, 64]
    assert tuple(table.shape) == (150, 64)
    # position 0: sin(0) = 0 on channels 0..31, cos(0) = 1 on 32..63
    assert torch.equal(table[0, :32], torch.zeros(32)) and torch.equal(table[0, 32:], torch.ones(32))
    # position 1, channel 0 has timescale 1: sin(1) = 0.84147, cos(1) = 0.54030
    assert math.isclose(float(table[1, 0]), 0.84147, abs_tol=1e-5)
    assert math.isclose(float(table[1, 32]), 0.54030, abs_tol=1e-5)
    # last channel pair has timescale 10 000: position 100 → sin(0.01) = 0.0099998
    assert math.isclose(float(table[100, 31]), math.sin(100 / 10_000), abs_tol=1e-6)
    torch.testing.assert_close(table, sinusoidal_positions(150, 64), rtol=0, atol=0)


def test_init_audio_path_is_deterministic_and_leaves_global_rng(built):
    cfg = built["cfg"]
    model_a = tiny.build_tiny_model(cfg, built["tokenizer"])
    model_b = tiny.build_tiny_model(cfg, built["tokenizer"])
    torch.manual_seed(7)
    expected_next = torch.rand(3)
    torch.manual_seed(7)
    init_audio_path(model_a, seed=5)
    init_audio_path(model_b, seed=5)
    assert torch.equal(torch.rand(3), expected_next)  # the global RNG did not move
    conv_a, conv_b = model_a.model.audio_tower.conv1.weight, model_b.model.audio_tower.conv1.weight
    assert torch.equal(conv_a, conv_b)
    # Kaiming: std = sqrt(2 / fan_in), fan_in = 128 mel bins · kernel 3 = 384 → 0.0722
    assert math.isclose(float(conv_a.detach().std()), math.sqrt(2 / 384), rel_tol=0.05)


# ------------------------------------------------------------------------------------------ loader


def test_loader_errors_say_what_is_expected(tmp_path, built):
    with pytest.raises(FileNotFoundError, match="model folder not found.*config.json of a supported audio LM \\(model_type one of .*'qwen2_audio'"):
        load_model_and_processor(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json.*tokenizer and preprocessor files"):
        load_model_and_processor(empty)
    whisper = tmp_path / "whisper"
    whisper.mkdir()
    (whisper / "config.json").write_text(json.dumps({"model_type": "whisper"}))
    with pytest.raises(ValueError, match="model_type is 'whisper', not a supported family"):
        load_model_and_processor(whisper)
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text((built["folder"] / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        check_model_folder(no_tokenizer)
    with pytest.raises(ValueError, match="unknown dtype 'float8'; valid: float32"):
        load_model_and_processor(built["folder"], dtype="float8")


def test_loader_dtype_and_attention(built):
    model, processor = load_model_and_processor(built["folder"], dtype="bfloat16", attn_implementation="eager")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config.text_config._attn_implementation == "eager"
    assert not model.training
    # from_pretrained would leave the encoder's frozen position table trainable; the loader re-freezes it.
    assert not model.model.audio_tower.embed_positions.weight.requires_grad
    assert processor.tokenizer.padding_side == "left"


def test_suppressed_and_audio_token_ids(built):
    processor, model = built["loaded_processor"], built["loaded_model"]
    # ids: <|endoftext|> 0 (pad), <|im_start|> 1, <|audio_bos|> 3, <|AUDIO|> 4, <|audio_eos|> 5; not <|im_end|> 2 (eos)
    assert generation_suppressed_token_ids(processor) == [0, 1, 3, 4, 5]
    assert audio_token_id(processor) == audio_token_id(model) == 4


# ------------------------------------------------------------------------------------------ CLI


def test_cli_reads_the_corpus_and_reports(built, tmp_path, capsys):
    corpus = tmp_path / "train.jsonl"
    corpus.write_text("".join(json.dumps(r.to_json()) + "\n" for r in built["records"]))
    out_dir = tmp_path / "cli_model"
    tiny.main([f"out_dir={out_dir}", f"corpus={corpus}", "seed=0"])
    printed = capsys.readouterr().out
    assert "M parameters" in printed and "MB on disk" in printed
    # Same seed and same corpus text as the fixture → the same weights and vocabulary.
    reloaded, processor = load_model_and_processor(out_dir)
    assert processor.tokenizer.get_vocab() == built["tokenizer"].get_vocab()
    expected = built["model"].state_dict()
    assert all(torch.equal(t, expected[k]) for k, t in reloaded.state_dict().items())
    assert json.loads((out_dir / "tiny_config.json").read_text())["seed"] == 0


def test_cli_bad_corpus_line_names_file_and_line(tmp_path):
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text('{"id": "a"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not a Record"):
        tiny.read_corpus(corpus)
    with pytest.raises(FileNotFoundError, match="make data"):
        tiny.read_corpus(tmp_path / "missing.jsonl")
