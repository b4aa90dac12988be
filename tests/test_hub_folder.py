"""The Hub's Qwen2-Audio-7B-Instruct folder as it is (tests/hub_folder.py, reduced width and depth):
our loader, the processor's audio template, rollout that decides its own sampling, the padded LM-head
rows, the 30 s window."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch
from hub_folder import GENERATION_CONFIG, SPECIAL, build_model, write_hub_folder

from mapo.data.collate import Collator
from mapo.data.schema import Record
from mapo.models.loader import generation_suppressed_token_ids, load_model_and_processor
from mapo.rollout import generate_rollout

TOKENIZER_LEN, VOCAB_ROWS = 154_931, 156_032


@pytest.fixture(scope="session")
def hub(tmp_path_factory):
    folder = write_hub_folder(tmp_path_factory.mktemp("hub") / "Qwen2-Audio-7B-Instruct")
    model, processor = load_model_and_processor(folder)
    return {"folder": folder, "model": model, "processor": processor, "root": folder.parent}


def clip(root, seconds: float, name: str) -> str:
    path = root / f"{name}.wav"
    t = np.arange(int(16_000 * seconds)) / 16_000
    sf.write(path, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16_000)
    return str(path)


def record(audio: str, rid: str = "q1") -> Record:
    return Record(id=rid, audio=audio, question="What is heard?", choices=["a tone", "speech"], answer="a tone", task="sound", split="test")


def test_the_folder_is_laid_out_like_the_hub(hub):
    names = {p.name for p in hub["folder"].iterdir()}
    assert {"config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json", "vocab.json",
            "merges.txt", "tokenizer_config.json", "model.safetensors.index.json"} <= names
    assert not names & {"chat_template.json", "chat_template.jinja", "special_tokens_map.json", "processor_config.json"}
    index = json.loads((hub["folder"] / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 5
    keys = set(index["weight_map"])
    assert "language_model.lm_head.weight" in keys and "language_model.model.embed_tokens.weight" in keys
    assert any(k.startswith("audio_tower.layers.") for k in keys) and any(k.startswith("multi_modal_projector.") for k in keys)
    assert not any(k.startswith("model.") for k in keys)  # the legacy names, as the Hub checkpoint has them
    config = json.loads((hub["folder"] / "config.json").read_text())
    assert (config["vocab_size"], config["audio_token_index"], config["audio_config"]["max_source_positions"]) == (156032, 151646, 1500)


def test_our_loader_loads_it_with_every_weight(hub):
    model, processor = hub["model"], hub["processor"]
    tokenizer = processor.tokenizer
    assert type(processor).__name__ == "Qwen2AudioProcessor"
    assert len(tokenizer) == TOKENIZER_LEN and model.lm_head.out_features == VOCAB_ROWS
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL} == SPECIAL
    assert tokenizer.pad_token_id == 151643 and tokenizer.convert_tokens_to_ids("<|im_end|>") == 151645
    want = build_model(0).state_dict()
    got = model.state_dict()
    assert want.keys() == got.keys()
    for name, value in want.items():  # stored in bf16 under the legacy names, loaded under the 5.x ones
        assert torch.equal(got[name].to(torch.bfloat16), value.to(torch.bfloat16)), name


def test_the_processors_audio_template_applies(hub):
    processor = hub["processor"]
    audio = clip(hub["root"], 1.0, "one_second")
    text = Collator(processor).prompt_text(record(audio))
    assert text.count("<|audio_bos|><|AUDIO|><|audio_eos|>") == 1 and text.endswith("<|im_start|>assistant\n")
    # the folder's own (tokenizer) template is text-only: it cannot place the audio
    messages = [{"role": "user", "content": [{"type": "audio", "audio_url": audio}, {"type": "text", "text": "What is heard?"}]}]
    try:
        tokenizer_text = processor.tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # noqa: BLE001 — string + list inside the template: it fails, which is the point
        tokenizer_text = ""
    assert "<|AUDIO|>" not in tokenizer_text
    assert processor.chat_template != processor.tokenizer.chat_template


def test_clips_over_the_window_are_cut_to_750_audio_tokens_with_a_warning(hub):
    long_clip = clip(hub["root"], 35.0, "thirty_five_seconds")
    collator = Collator(hub["processor"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = collator.prompts([record(long_clip)])
    assert int((batch["input_ids"] == SPECIAL["<|AUDIO|>"]).sum()) == 750
    assert batch["input_features"].shape[-1] == 3000 and int(batch["feature_attention_mask"].sum()) == 3000
    assert any("longer than the 30 s audio window" in str(w.message) for w in caught)
    # the run-level count of cut clips: tests/test_faults_data.py::test_the_collator_counts_every_cut_clip_and_warns_once


def _prompt_batch(hub):
    audio = clip(hub["root"], 2.0, "two_seconds")
    return Collator(hub["processor"]).prompts([record(audio, "a"), record(audio, "b")])


def test_rollout_samples_as_our_config_says_not_as_generation_config(hub):
    """generation_config.json says top_k 20, top_p 0.5, temperature 0.7; our rollout (top_p 1, temperature 1)
    draws from the whole vocabulary: with random weights its tokens fall far outside the top 20."""
    model, processor = hub["model"], hub["processor"]
    assert model.generation_config.top_k == GENERATION_CONFIG["top_k"]  # loaded, and ignored by our rollout
    batch = _prompt_batch(hub)
    kwargs = dict(eos_token_id=151645, pad_token_id=151643, suppress_token_ids=generation_suppressed_token_ids(processor, VOCAB_ROWS))
    rollout = generate_rollout(model, batch, group_size=8, max_new_tokens=1, temperature=1.0, top_p=1.0, seeds=[1, 2], **kwargs)
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items()}).logits[:, -1].float()  # [2, V] prefill logits
    ranks = [int((logits[b] > logits[b, t]).sum()) for b, t in zip(rollout.group_index.tolist(), rollout.completion_ids[:, 0].tolist())]
    assert max(ranks) > 20  # top_k = 20 would keep every rank below 20
    from mapo.config import MapoConfig, RolloutConfig
    from mapo.train import sampling_summary

    cfg = MapoConfig(rollout=RolloutConfig(temperature=1.0, top_p=1.0, top_k=7, repetition_penalty=1.3, max_new_tokens=4))
    line = sampling_summary(cfg, hub["folder"])
    assert "temperature=1.0, top_p=1.0, top_k=7, repetition_penalty=1.3, max_new_tokens=4 (from the run config)" in line
    assert "generation_config.json of the model folder (do_sample=True, temperature=0.7, top_p=0.5, top_k=20, repetition_penalty=1.1) is not used" in line


def test_lm_head_rows_past_the_tokenizer_are_never_sampled(hub, monkeypatch):
    model, processor = hub["model"], hub["processor"]
    head = model.lm_head

    class Boosted(torch.nn.Linear):  # the padding rows get the highest logits
        def forward(self, x):
            out = super().forward(x)
            out[..., TOKENIZER_LEN:] += 100.0
            return out

    boosted = Boosted(head.in_features, head.out_features, bias=False)
    boosted.weight = head.weight
    monkeypatch.setattr(model, "lm_head", boosted)
    batch = _prompt_batch(hub)
    common = dict(group_size=4, max_new_tokens=3, eos_token_id=151645, pad_token_id=151643, seeds=[3, 4])
    unsuppressed = generate_rollout(model, batch, suppress_token_ids=generation_suppressed_token_ids(processor), **common)
    assert (unsuppressed.completion_ids >= TOKENIZER_LEN).all()  # the fixture works: they would be drawn
    ids = generation_suppressed_token_ids(processor, VOCAB_ROWS)
    assert set(range(TOKENIZER_LEN, VOCAB_ROWS)) <= set(ids)
    rollout = generate_rollout(model, batch, suppress_token_ids=ids, **common)
    assert (rollout.completion_ids < TOKENIZER_LEN).all()


def test_the_preflight_reads_the_folders_config(hub):
    from mapo.preflight import ConfigError, check_config

    from test_preflight import cfg_of

    config = json.loads((hub["folder"] / "config.json").read_text())
    preprocessor = json.loads((hub["folder"] / "preprocessor_config.json").read_text())
    cfg = cfg_of("experiment=qwen2audio_mapo", f"model.path={hub['folder']}", "data.dir=/data")
    with pytest.raises(ConfigError, match=r"algo.attn.layers=\[-3, -2, -1\]: \[-3\] do not exist: the text decoder has 2 layers"):
        check_config(cfg, config, 1, preprocessor)
    check_config(cfg_of("experiment=qwen2audio_mapo", "algo.attn.layers=[-2,-1]", "data.dir=/data"), config, 1, preprocessor)
