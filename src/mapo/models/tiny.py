"""Build a tiny model of a supported family offline: tokenizer, processor and a randomly initialised model.

`python -m mapo.models.tiny key=value ...` writes a folder that the common loader
(`mapo.models.loader.load_model_and_processor`) reads exactly like a real checkpoint of the family:
config.json + model.safetensors + generation_config.json, the tokenizer files (a `Qwen2Tokenizer`, as in
the real checkpoints), the feature extractor's config and the chat template. `family=` picks the
architecture: `qwen2_audio` (default, this module), `qwen2_5_omni` or `qwen3_omni_moe` (the thinkers,
`mapo.models.tiny_omni`); the tokenizer builder and the audio-path init are shared.

- Tokenizer: byte-level BPE trained locally with the Qwen2 pre-tokenizer on the benchmark's chat text
  (system line, question, options, instruction, trace, answer tag), plus the ChatML and audio special
  tokens. Byte-level, so any text encodes and decodes back unchanged.
- Processor: `Qwen2AudioProcessor` with a Whisper feature extractor whose window is `window_seconds`
  (not 30 s) so CPU steps take milliseconds; the encoder's `max_source_positions` is half the window's
  mel frames, as the encoder requires.
- Model: `Qwen2AudioForConditionalGeneration` with small sizes (config fields), built under `seed`, with
  the audio path re-initialised by `mapo.models.init.init_audio_path` (the stock random init makes the
  audio almost unusable for learning; see that module).
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import jinja2
import torch
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers import (
    GenerationConfig,
    Qwen2AudioConfig,
    Qwen2AudioEncoderConfig,
    Qwen2AudioForConditionalGeneration,
    Qwen2AudioProcessor,
    Qwen2Config,
    Qwen2Tokenizer,
    WhisperFeatureExtractor,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from mapo import paths
from mapo.cli_args import parse_overrides
from mapo.data import prompt
from mapo.data.schema import Record
from mapo.models.init import init_audio_path

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
AUDIO_BOS, AUDIO, AUDIO_EOS = "<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"
#: Special tokens, in id order (ids 0..5 in the tiny tokenizer).
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, AUDIO_BOS, AUDIO, AUDIO_EOS)

SAMPLING_RATE = 16_000
HOP_LENGTH = 160  # samples per mel frame: 100 frames per second
N_MELS = 128  # Qwen2-Audio's encoder reads 128 mel bins

#: Qwen2-Audio-Instruct's ChatML layout: a default system turn, each clip as
#: "Audio k: <|audio_bos|><|AUDIO|><|audio_eos|>\n" (the processor expands <|AUDIO|> to one token per
#: audio position), and "<|im_start|>assistant\n" as the generation prompt.
CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif 'text' in content %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


#: Families the builder knows (the Omni ones live in mapo.models.tiny_omni).
FAMILIES = ("qwen2_audio", "qwen2_5_omni", "qwen3_omni_moe")


@dataclass
class TinyModelConfig:
    family: str = "qwen2_audio"  # qwen2_audio | qwen2_5_omni | qwen3_omni_moe (the thinkers)
    seed: int = 0  # seeds the model's random init and the audio-path init
    out_dir: str = str(paths.TINY_MODEL_DIR)  # folder written with save_pretrained
    corpus: str = str(paths.SYNTHETIC_DATA_DIR / "train.jsonl")  # JSONL of Records whose text trains the tokenizer
    window_seconds: int = 3  # audio window (feature extractor chunk_length); longer clips are cut
    vocab_size: int = 512  # BPE target size (256 bytes + 6 specials + merges); may end smaller on a small corpus
    audio_d_model: int = 64  # audio encoder width
    audio_layers: int = 2  # audio encoder layers
    audio_heads: int = 4  # audio encoder attention heads
    audio_ffn: int = 128  # audio encoder feed-forward width
    text_hidden: int = 64  # text decoder width
    text_layers: int = 2  # text decoder layers
    text_heads: int = 4  # text decoder query heads
    text_kv_heads: int = 2  # text decoder key/value heads (fewer than query heads: exercises GQA)
    text_intermediate: int = 128  # text decoder MLP width
    max_position: int = 1024  # longest sequence (prompt + audio positions + completion)
    text_experts: int = 4  # qwen3_omni_moe only: experts per decoder layer
    text_experts_per_token: int = 2  # qwen3_omni_moe only: experts routed per token
    text_moe_intermediate: int = 64  # qwen3_omni_moe only: each expert's MLP width


# ----------------------------------------------------------------------------------------------- text


def read_corpus(path: str | Path) -> list[Record]:
    """Records from a JSONL manifest (one `Record.to_json()` object per line); errors name file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: tokenizer corpus not found (build the benchmark first: `make data`, or pass corpus=...)"
        )
    records = []
    with path.open(encoding="utf-8") as lines:
        for line_no, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                records.append(Record(**json.loads(line)))
            except (json.JSONDecodeError, TypeError) as err:
                raise ValueError(f"{path}:{line_no}: not a Record ({err})") from None
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def chat_texts(records: list[Record], chat_template: str = CHAT_TEMPLATE) -> list[str]:
    """Each record's whole conversation as the model sees it: system turn, user turn, assistant completion.

    Rendered with the family's chat template, so the tokenizer is trained on exactly the strings it will encode.
    """
    template = jinja2.Environment().from_string(chat_template)
    texts = []
    for record in records:
        conversation = prompt.messages(record) + [
            {"role": "assistant", "content": prompt.reference_completion(record)}
        ]
        texts.append(template.render(messages=conversation, add_generation_prompt=False))
    return texts


def build_tokenizer(
    texts: list[str],
    vocab_size: int,
    seed: int = 0,
    *,
    special_tokens: tuple[str, ...] = SPECIAL_TOKENS,
    named_tokens: dict[str, str] | None = None,
    chat_template: str = CHAT_TEMPLATE,
) -> Qwen2Tokenizer:
    """Train a byte-level BPE on `texts` and wrap it as a `Qwen2Tokenizer` (left padding).

    special_tokens: added whole with ids 0..n-1 in this order (cut out of `texts` before training); they
        must include <|endoftext|>, <|im_start|> and <|im_end|>. Default: Qwen2-Audio's six.
    named_tokens: model-specific token attributes the family's processor reads (e.g. {"audio_token":
        "<|audio_pad|>"} gives `tokenizer.audio_token` / `tokenizer.audio_token_id`); None for Qwen2-Audio,
        whose processor knows its tokens itself.
    eos = <|im_end|> (ends the assistant turn), pad = <|endoftext|>, no bos, no unk (byte-level).
    `seed` is accepted for symmetry with the other builders; BPE training is deterministic (ties are
    broken by the pair itself), so the same texts always give the same tokenizer.
    """
    del seed  # nothing random to seed
    min_size = 256 + len(special_tokens)
    if vocab_size <= min_size:
        raise ValueError(f"vocab_size must exceed {min_size} (256 byte tokens + {len(special_tokens)} specials), got {vocab_size}")
    specials_pattern = re.compile("|".join(re.escape(token) for token in special_tokens))
    pieces = [piece for text in texts for piece in specials_pattern.split(text) if piece]
    if not pieces:
        raise ValueError("no text to train the tokenizer on")

    # The Qwen2 pipeline (same normaliser, pre-tokeniser and decoder as Qwen2Tokenizer builds), so the
    # wrapped tokenizer splits text exactly as the one that learned the merges.
    bpe = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        show_progress=False,
    )
    bpe.train_from_iterator(pieces, trainer=trainer)
    model_json = json.loads(bpe.to_str())["model"]

    extra = [token for token in special_tokens if token not in (ENDOFTEXT, IM_END)]
    tokenizer = Qwen2Tokenizer(
        vocab=model_json["vocab"],
        merges=[tuple(pair) for pair in model_json["merges"]],
        unk_token=None,
        bos_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        extra_special_tokens=extra,
        padding_side="left",  # batched generation appends on the right
        clean_up_tokenization_spaces=False,  # decode(encode(text)) == text
        **(named_tokens or {}),
    )
    tokenizer.chat_template = chat_template
    ids = tokenizer.convert_tokens_to_ids(list(special_tokens))
    if ids != list(range(len(special_tokens))):
        raise RuntimeError(f"special tokens got ids {ids}, expected 0..{len(special_tokens) - 1}")
    return tokenizer


# ---------------------------------------------------------------------------------------------- audio


def build_processor(tokenizer: Qwen2Tokenizer, window_seconds: int) -> Qwen2AudioProcessor:
    """`Qwen2AudioProcessor` over `tokenizer` with a `window_seconds` Whisper feature extractor.

    input_features: [B, 128, 100 · window_seconds]; a clip of s seconds expands <|AUDIO|> into
    ~25 · s audio tokens (exactly ((L - 1) // 2 + 1 - 2) // 2 + 1 for L = 100 · s valid frames).
    """
    return Qwen2AudioProcessor(feature_extractor=whisper_features(window_seconds), tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def whisper_features(window_seconds: int) -> WhisperFeatureExtractor:
    """The Whisper feature extractor of every family (128 mel bins, 16 kHz, 100 frames/s), `window_seconds` long."""
    if window_seconds < 1:
        raise ValueError(f"window_seconds must be >= 1, got {window_seconds}")
    return WhisperFeatureExtractor(
        feature_size=N_MELS,
        sampling_rate=SAMPLING_RATE,
        hop_length=HOP_LENGTH,
        chunk_length=window_seconds,
        n_fft=400,
        padding_value=0.0,
        return_attention_mask=True,
    )


# ---------------------------------------------------------------------------------------------- model


def build_tiny_model(cfg: TinyModelConfig, tokenizer: Qwen2Tokenizer) -> Qwen2AudioForConditionalGeneration:
    """A randomly initialised small Qwen2-Audio for `tokenizer`, identical for the same `cfg.seed`.

    The global torch RNG is seeded inside a fork, so callers' random state is left as it was.
    """
    frames = cfg.window_seconds * SAMPLING_RATE // HOP_LENGTH  # mel frames per window
    audio_config = Qwen2AudioEncoderConfig(
        num_mel_bins=N_MELS,
        d_model=cfg.audio_d_model,
        encoder_layers=cfg.audio_layers,
        encoder_attention_heads=cfg.audio_heads,
        encoder_ffn_dim=cfg.audio_ffn,
        max_source_positions=frames // 2,  # the encoder checks input_features.shape[-1] == 2 · this
    )
    pad_id, eos_id = tokenizer.convert_tokens_to_ids([ENDOFTEXT, IM_END])
    text_config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_hidden,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_kv_heads,
        intermediate_size=cfg.text_intermediate,
        max_position_embeddings=cfg.max_position,
        tie_word_embeddings=False,  # as in Qwen2-Audio-7B
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    config = Qwen2AudioConfig(
        audio_config=audio_config,
        text_config=text_config,
        audio_token_index=tokenizer.convert_tokens_to_ids(AUDIO),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = Qwen2AudioForConditionalGeneration(config)
    init_audio_path(model, seed=cfg.seed)
    model.generation_config = GenerationConfig(eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=None)
    return model.eval()


def family_builder(family: str):
    """(chat template, tokenizer, processor and model builders) of a family: the functions above for
    Qwen2-Audio, `mapo.models.tiny_omni`'s for the Omni thinkers."""
    if family == "qwen2_audio":
        return CHAT_TEMPLATE, build_tokenizer, build_processor, build_tiny_model
    if family in FAMILIES:
        from mapo.models import tiny_omni

        return tiny_omni.builder(family)
    raise ValueError(f"unknown tiny model family {family!r}; valid: {', '.join(FAMILIES)}")


def write_tiny(cfg: TinyModelConfig, texts: list[str] | None = None) -> Path:
    """Build tokenizer, processor and model of `cfg.family` and save them to `cfg.out_dir` (safetensors).

    texts: tokenizer training text; None reads the records of `cfg.corpus` and renders them with the
    family's chat template (`chat_texts`). Returns the folder.
    """
    template, make_tokenizer, make_processor, make_model = family_builder(cfg.family)
    if texts is None:
        texts = chat_texts(read_corpus(cfg.corpus), template)
    tokenizer = make_tokenizer(texts, cfg.vocab_size, cfg.seed)
    processor = make_processor(tokenizer, cfg.window_seconds)
    model = make_model(cfg, tokenizer)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)  # safetensors is the default
    processor.save_pretrained(out_dir)
    # Provenance: the exact builder settings next to the weights.
    (out_dir / "tiny_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    return out_dir


def folder_size_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> None:
    cfg = parse_overrides(TinyModelConfig, argv)
    start = time.perf_counter()
    try:
        texts = chat_texts(read_corpus(cfg.corpus), family_builder(cfg.family)[0])
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    out_dir = write_tiny(cfg, texts)
    elapsed = time.perf_counter() - start
    from mapo.models.loader import (
        load_model_and_processor,  # check it loads the way training will load it
    )

    model, processor = load_model_and_processor(out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"[tiny] wrote {out_dir} ({cfg.family}): {n_params / 1e6:.3f} M parameters, vocab {len(processor.tokenizer)}, "
        f"window {cfg.window_seconds} s, {folder_size_bytes(out_dir) / 1e6:.2f} MB on disk, {elapsed:.1f} s"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
