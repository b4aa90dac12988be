"""A folder laid out like the Hub's `Qwen/Qwen2-Audio-7B-Instruct`, at reduced width and depth.

What it mimics (FIELD-NOTES "The real Qwen2-Audio-7B-Instruct folder"):
- config.json: the real values (top-level vocab_size 156,032, audio_token_index 151,646, the real audio
  window: 128 mel bins, max_source_positions 1500 = 30 s = 750 audio tokens, max_position 8192,
  rope_theta under its legacy key) except the width and depth, which the real file leaves to Qwen2Config's
  defaults and this one sets small;
- a byte-level BPE tokenizer of 151,643 entries (most of them unreachable fillers) plus 3,288 added tokens
  with the real special ids (<|endoftext|> 151643 = pad, <|im_start|> 151644, <|im_end|> 151645 = eos,
  <|AUDIO|> 151646, <|audio_bos|> 151647, <|audio_eos|> 151648): len(tokenizer) = 154,931 < 156,032 rows;
  tokenizer.json, vocab.json + merges.txt and tokenizer_config.json whose chat template is text-only;
  no chat_template.json / .jinja, no special_tokens_map.json, no processor_config.json;
- preprocessor_config.json of the real Whisper feature extractor (30 s window);
- bf16 weights in several safetensors shards with model.safetensors.index.json and the legacy key names
  (audio_tower.*, multi_modal_projector.*, language_model.model.*, language_model.lm_head.weight);
- generation_config.json with the real sampling defaults (do_sample, top_k 20, top_p 0.5, temperature 0.7,
  repetition_penalty 1.1, eos [151643, 151645]).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

REAL_CONFIG = Path(__file__).resolve().parents[1] / "src" / "mapo" / "models" / "configs" / "Qwen2-Audio-7B-Instruct.json"
BPE_ENTRIES = 151_643
ADDED_TOKENS = 3_288
SPECIAL = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
           "<|AUDIO|>": 151646, "<|audio_bos|>": 151647, "<|audio_eos|>": 151648}
TEXT_ONLY_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
GENERATION_CONFIG = {
    "bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True, "eos_token_id": [151643, 151645],
    "repetition_penalty": 1.1, "temperature": 0.7, "top_k": 20, "top_p": 0.5, "transformers_version": "4.45.0.dev0",
}
PREPROCESSOR_CONFIG = {
    "chunk_length": 30, "feature_extractor_type": "WhisperFeatureExtractor", "feature_size": 128, "hop_length": 160,
    "n_fft": 400, "n_samples": 480000, "nb_max_frames": 3000, "padding_side": "right", "padding_value": 0.0,
    "processor_class": "Qwen2AudioProcessor", "return_attention_mask": True, "sampling_rate": 16000,
}
#: Reduced sizes (the real ones: text 4096 / 32 layers / 32 heads / 11008; audio 1280 / 32 / 20 / 5120).
SMALL_TEXT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 64}
SMALL_AUDIO = {"d_model": 32, "encoder_layers": 2, "encoder_attention_heads": 2, "encoder_ffn_dim": 64}


def real_config() -> dict:
    return json.loads(REAL_CONFIG.read_text())


def small_config() -> dict:
    config = real_config()
    config["text_config"].update(SMALL_TEXT)
    config["audio_config"].update(SMALL_AUDIO)
    return config


def _tokenizer_files(out: Path) -> None:
    """tokenizer.json, vocab.json, merges.txt, tokenizer_config.json (ids as in the real folder)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    def pipeline(tok: Tokenizer) -> Tokenizer:
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        return tok

    corpus = ["You are a helpful assistant.", "What sound is heard in the audio?", "Think step by step, then give "
              "the answer in <answer></answer>.", "(A) a dog (B) a car (C) rain (D) music", "system user assistant"]
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    learned = pipeline(Tokenizer(BPE()))
    learned.train_from_iterator(corpus, trainer=trainer)
    model = json.loads(learned.to_str())["model"]
    vocab = dict(model["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    for k in range(len(vocab), BPE_ENTRIES):  # unreachable fillers (no merge produces them)
        vocab[f"<filler_{k}>"] = k
    tok = pipeline(Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False)))
    names = list(SPECIAL) + [f"<|extra_{k}|>" for k in range(ADDED_TOKENS - len(SPECIAL))]
    tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
    assert tok.token_to_id("<|audio_eos|>") == 151648 and tok.get_vocab_size() == BPE_ENTRIES + ADDED_TOKENS
    tok.save(str(out / "tokenizer.json"))
    (out / "vocab.json").write_text(json.dumps({k: v for k, v in vocab.items()}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    added = {str(SPECIAL.get(n, BPE_ENTRIES + i)): {"content": n, "special": True, "lstrip": False, "rstrip": False,
                                                    "normalized": False, "single_word": False}
             for i, n in enumerate(names)}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": added, "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"],
        "bos_token": None, "chat_template": TEXT_ONLY_TEMPLATE, "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 32768, "pad_token": "<|endoftext|>",
        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }))


def legacy_name(name: str) -> str:
    """transformers 5.x module path → the checkpoint's original key."""
    for new, old in (("model.audio_tower.", "audio_tower."), ("model.multi_modal_projector.", "multi_modal_projector."),
                     ("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head.")):
        if name.startswith(new):
            return old + name[len(new):]
    raise ValueError(f"unexpected parameter {name}")


def write_hub_folder(out: str | Path, seed: int = 0, shards: int = 5) -> Path:
    """Write the folder; returns its path. The weights are those of `build_model(seed)`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(small_config(), indent=2))
    (out / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2))
    _tokenizer_files(out)
    state = {legacy_name(k): v.to(torch.bfloat16).contiguous() for k, v in build_model(seed).state_dict().items()}
    names = sorted(state)
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for s in range(shards):
        part = {n: state[n] for n in names[s * per : (s + 1) * per]}
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(out / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
        total += sum(t.numel() * t.element_size() for t in part.values())
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return out


def build_model(seed: int = 0):
    """The randomly initialised reduced model whose weights the folder holds (5.x module names)."""
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    config = copy.deepcopy(small_config())
    config.pop("model_type", None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen2AudioForConditionalGeneration(Qwen2AudioConfig(**config))
