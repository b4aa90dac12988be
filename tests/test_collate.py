"""Batching: prompts for generation, supervised batches, mixed audio / text-only batches, the feature cache."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

from mapo.data import prompt
from mapo.data.audio import load_audio
from mapo.data.collate import (
    IGNORE_INDEX,
    ClipFeatures,
    Collator,
    FeatureCache,
    audio_span_mask,
    num_audio_tokens,
    position_ids_from_mask,
)
from mapo.data.schema import Record
from mapo.models import tiny
from mapo.models.loader import load_model_and_processor

torch.set_num_threads(1)
SR = 16_000
PITCH_Q = "Is the second tone higher or lower than the first?"


def write_tones(folder: Path, name: str, freqs: list[float], seconds_each: float) -> str:
    """Back-to-back tones, `seconds_each` seconds per tone, written as a 16 kHz WAV; returns its path."""
    t = np.arange(int(seconds_each * SR)) / SR
    samples = np.concatenate([0.5 * np.sin(2 * np.pi * f * t) for f in freqs]).astype(np.float32)
    path = folder / f"{name}.wav"
    sf.write(path, samples, SR)
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("collate")
    records = [
        Record("p1", write_tones(root, "p1", [300, 1200], 0.5), PITCH_Q, ["higher", "lower"], "higher",
               trace="first tone: low. second tone: high. the second is higher."),  # 1 s
        Record("t1", None, "Which is usually louder, a whisper or a shout?", ["a whisper", "a shout"], "a shout",
               trace="a shout is louder."),
        Record("p2", write_tones(root, "p2", [1200, 300], 1.5), PITCH_Q, ["higher", "lower"], "lower",
               trace="first tone: high. second tone: low. the second is lower."),  # 3 s
        Record("c1", write_tones(root, "c1", [800, 0, 800], 0.5), "How many beeps do you hear?",
               ["one", "two", "three"], "two"),  # 1.5 s, no trace: completion is the answer tag alone
    ]
    cfg = tiny.TinyModelConfig(out_dir=str(root / "model"))
    folder = tiny.write_tiny(cfg, tiny.chat_texts(records))
    model, processor = load_model_and_processor(folder)
    return dict(root=root, records=records, model=model, processor=processor)


def test_num_audio_tokens_hand_values():
    # ((n - 1) // 2 + 1 - 2) // 2 + 1
    assert num_audio_tokens(100) == 25  # 1 s: 50 → 25
    assert num_audio_tokens(150) == 37  # 1.5 s: 149 // 2 + 1 = 75 → 73 // 2 + 1 = 36 + 1 = 37
    assert num_audio_tokens(300) == 75  # 3 s: 150 → 75
    assert num_audio_tokens(3) == 1 and num_audio_tokens(2) == 0


def test_audio_span_and_position_ids_hand_examples():
    ids = torch.tensor([[0, 0, 7, 4, 4, 9], [7, 4, 4, 4, 9, 9]])
    assert audio_span_mask(ids, 4).tolist() == [[False, False, False, True, True, False],
                                                 [False, True, True, True, False, False]]
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_prompts_equal_the_processor_on_an_all_audio_batch(setup):
    processor = setup["processor"]
    records = [r for r in setup["records"] if r.audio is not None]
    collator = Collator(processor)
    mine = collator.prompts(records)
    reference = processor(
        text=[collator.prompt_text(r) for r in records],
        audio=[load_audio(r.audio) for r in records],
        sampling_rate=SR,
        return_tensors="pt",
        padding=True,
    )
    assert set(mine.keys()) == {"input_ids", "attention_mask", "input_features", "feature_attention_mask"}
    for key in mine:
        assert torch.equal(mine[key], reference[key]), key
    # 1 s, 3 s and 1.5 s clips → 25, 75 and 37 audio positions (see test_num_audio_tokens_hand_values)
    assert audio_span_mask(mine["input_ids"], processor.audio_token_id).sum(-1).tolist() == [25, 75, 37]


def test_mixed_batch_features_cover_audio_items_in_order(setup):
    processor, records = setup["processor"], setup["records"]  # audio, text-only, audio, audio
    batch = Collator(processor).prompts(records)
    assert batch["input_features"].shape == (3, 128, 300)
    assert batch["feature_attention_mask"].sum(-1).tolist() == [100, 300, 150]  # 1 s, 3 s, 1.5 s
    per_clip = [processor.feature_extractor(load_audio(r.audio), sampling_rate=SR, return_tensors="pt")
                ["input_features"][0] for r in records if r.audio is not None]
    assert torch.equal(batch["input_features"], torch.stack(per_clip))
    assert audio_span_mask(batch["input_ids"], processor.audio_token_id).sum(-1).tolist() == [25, 0, 75, 37]
    only_text = Collator(processor).prompts([records[1]])
    assert set(only_text.keys()) == {"input_ids", "attention_mask"}


def test_mixed_batch_forward_matches_each_item_alone(setup):
    """An item's logits do not depend on the rest of the batch (padding masked, features per clip)."""
    model, collator, records = setup["model"], Collator(setup["processor"]), setup["records"]
    batch = collator.prompts(records)
    with torch.no_grad():
        logits = model(**batch, position_ids=position_ids_from_mask(batch["attention_mask"])).logits
        for row, record in enumerate(records):
            alone = collator.prompts([record])
            n = alone["input_ids"].shape[1]
            assert torch.equal(batch["input_ids"][row, -n:], alone["input_ids"][0])
            alone_logits = model(**alone).logits[0]
            torch.testing.assert_close(logits[row, -n:], alone_logits, rtol=0, atol=1e-4)


def test_supervised_labels_mask_exactly_the_prompt(setup):
    processor, records = setup["processor"], setup["records"]
    collator = Collator(processor)
    tokenizer = processor.tokenizer
    batch = collator.supervised(records)
    prompts = collator.prompts(records)
    width = batch["input_ids"].shape[1]
    for row, record in enumerate(records):
        prompt_ids = prompts["input_ids"][row][prompts["attention_mask"][row].bool()].tolist()
        completion = tokenizer(prompt.reference_completion(record) + "<|im_end|>", add_special_tokens=False)["input_ids"]
        n_pad = width - len(prompt_ids) - len(completion)
        # layout of the row: [pad × n_pad][prompt][completion]
        assert batch["attention_mask"][row].tolist() == [0] * n_pad + [1] * (len(prompt_ids) + len(completion))
        assert batch["input_ids"][row, n_pad:].tolist() == prompt_ids + completion
        assert batch["labels"][row].tolist() == [IGNORE_INDEX] * (n_pad + len(prompt_ids)) + completion
        assert tokenizer.decode(completion) == prompt.reference_completion(record) + "<|im_end|>"
    assert tokenizer.decode(batch["labels"][3][batch["labels"][3] != IGNORE_INDEX]) == "<answer>two</answer><|im_end|>"
    assert torch.equal(batch["position_ids"], position_ids_from_mask(batch["attention_mask"]))
    assert torch.equal(batch["input_features"], prompts["input_features"])


def test_supervised_loss_is_mean_cross_entropy_on_the_completion(setup):
    model = setup["model"]
    batch = Collator(setup["processor"]).supervised(setup["records"])
    with torch.no_grad():
        out = model(**batch)
    # Reference: logits at position s predict the token at s + 1; average over the kept labels only.
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    expected = F.cross_entropy(logits[keep], labels[keep])
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    # Untrained: close to ln(vocab) (uniform guess); finite and positive.
    assert 0.5 * np.log(logits.shape[-1]) < float(out.loss) < 2 * np.log(logits.shape[-1])
    # Training reaches the audio path: the loss has a gradient on the encoder's first convolution.
    model.zero_grad()
    model(**batch).loss.backward()
    conv_grad = model.model.audio_tower.conv1.weight.grad
    assert conv_grad is not None and torch.isfinite(conv_grad).all() and float(conv_grad.abs().sum()) > 0
    model.zero_grad()


def test_feature_cache_is_lossless_and_skips_reloading(setup):
    processor, records = setup["processor"], setup["records"]
    calls: list[str] = []

    def counting_loader(path: str) -> np.ndarray:
        calls.append(path)
        return load_audio(path)

    cache = FeatureCache()
    collator = Collator(processor, audio_loader=counting_loader, feature_cache=cache)
    first = collator.prompts(records)
    assert len(calls) == 3 and len(cache) == 3
    second = collator.prompts(list(reversed(records)))
    assert len(calls) == 3  # all from the cache
    assert torch.equal(second["input_features"], first["input_features"].flip(0))
    uncached = Collator(processor).prompts(records)
    for key in first:
        assert torch.equal(first[key], uncached[key]), key
    # The 1 s clip's silent tail (frames ~102..299 of 300) is stored as one column: well under half the window.
    assert cache.get(records[0].audio).head.shape[1] < 150
    assert cache.nbytes() < 3 * 128 * 300 * 4


def test_clip_features_round_trip_hand_example():
    features = torch.tensor([[1.0, 2.0, 5.0, 5.0], [3.0, 4.0, 6.0, 6.0]])  # last two columns equal
    clip = ClipFeatures.compress(features, n_valid=2)
    assert clip.head.shape == (2, 2) and clip.tail.tolist() == [5.0, 6.0]
    assert torch.equal(clip.features(), features)
    constant = torch.ones(2, 3)
    assert ClipFeatures.compress(constant, n_valid=3).head.shape == (2, 0)
    assert torch.equal(ClipFeatures.compress(constant, n_valid=3).features(), constant)


def test_bad_records_give_clear_errors(setup, tmp_path):
    collator = Collator(setup["processor"])
    sneaky = Record("x1", None, "What does <|AUDIO|> mean?", ["a", "b"], "a")
    with pytest.raises(ValueError, match=r"record 'x1': its prompt holds 1 <\|AUDIO\|> placeholder\(s\), expected 0"):
        collator.prompts([sneaky])
    short = tmp_path / "short.wav"
    sf.write(short, np.zeros(200, np.float32), SR)  # 200 samples = 1 frame → 0 audio positions
    with pytest.raises(ValueError, match="short.wav: clip too short"):
        collator.prompts([Record("x2", str(short), "q?", ["a", "b"], "a")])
    with pytest.raises(ValueError, match="empty batch"):
        collator.prompts([])


def test_long_clip_warns_once_and_is_cut_to_the_window(setup, tmp_path):
    long_clip = write_tones(tmp_path, "long", [440, 660], 2.0)  # 4 s > 3 s window
    collator = Collator(setup["processor"])
    record = Record("long", long_clip, PITCH_Q, ["higher", "lower"], "higher")
    with pytest.warns(UserWarning, match=r"long.wav: 4.00 s is longer than the 3 s audio window"):
        batch = collator.prompts([record])
    assert int(batch["feature_attention_mask"].sum()) == 300
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        collator.prompts([record])  # second time: no warning


def test_audio_token_id_falls_back_to_the_tokenizer_when_the_processor_lacks_it(setup):
    """Qwen3OmniMoeProcessor (transformers 5.17) names its placeholder but carries no `audio_token_id`:
    `mapo.models.loader.audio_token_id` asks the tokenizer, and the collator uses it."""
    import copy

    from mapo.models.loader import audio_token_id

    processor = copy.copy(setup["processor"])
    del processor.audio_token_id
    assert not hasattr(processor, "audio_token_id")
    expected = processor.tokenizer.convert_tokens_to_ids(processor.audio_token)
    assert audio_token_id(processor) == expected == setup["processor"].audio_token_id == 4
    collator = Collator(processor)
    assert collator.audio_token_id == 4
    records = [r for r in setup["records"] if r.audio is not None]
    assert audio_span_mask(collator.prompts(records)["input_ids"], 4).sum(-1).tolist() == [25, 75, 37]
    processor.audio_token = "<|no such token|>"
    with pytest.raises(ValueError, match="no id for its audio placeholder"):
        audio_token_id(processor)
