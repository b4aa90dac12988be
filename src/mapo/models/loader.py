"""The one loader for Qwen2-Audio checkpoints: the tiny model and a real one (e.g. Qwen2-Audio-7B-Instruct).

Both are local folders written by `save_pretrained`; both go through the same calls, so whatever works
on the tiny model on a laptop runs unchanged on the real one. The network is never touched
(`local_files_only=True`): a missing file is an error that says what the folder must hold. Weights load
from safetensors only (`use_safetensors=True`); remote code is never trusted (`trust_remote_code` is
left at its default, off).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor

EXPECTED = (
    "expected a local folder with config.json of a Qwen2AudioForConditionalGeneration (model_type "
    "'qwen2_audio'), its weights, tokenizer and preprocessor files (e.g. a downloaded "
    "Qwen2-Audio-7B-Instruct, or the tiny model from `make tiny`)"
)
#: Tokenizer files: either the fast tokenizer's single file or the BPE pair.
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))
#: Feature-extractor settings: the classic file, or the combined processor file of newer transformers.
PREPROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

#: Tokens that must never be sampled: the audio markers and placeholder (an extra <|AUDIO|> breaks the
#: next forward with "audio features and audio tokens do not match"), padding, and the start of a new
#: turn. Stopping is left to eos (<|im_end|>).
SUPPRESSED_TOKENS = ("<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<|im_start|>")


def check_model_folder(path: str | Path) -> Path:
    """Raise a clear error unless `path` looks like a local Qwen2-Audio checkpoint; returns it as a Path."""
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: model folder not found; {EXPECTED}")
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder}: not a folder; {EXPECTED}")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder}: no config.json; {EXPECTED}")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file}: not valid JSON ({err}); {EXPECTED}") from None
    if model_type != "qwen2_audio":
        raise ValueError(f"{config_file}: model_type is {model_type!r}, not 'qwen2_audio'; {EXPECTED}")
    if not any(all((folder / name).is_file() for name in group) for group in TOKENIZER_FILES):
        raise FileNotFoundError(f"{folder}: no tokenizer files (tokenizer.json, or vocab.json + merges.txt); {EXPECTED}")
    if not any((folder / name).is_file() for name in PREPROCESSOR_FILES):
        raise FileNotFoundError(f"{folder}: no {' or '.join(PREPROCESSOR_FILES)}; {EXPECTED}")
    if not any(folder.glob("*.safetensors")):
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = f" (found {', '.join(pickled)}: pickle files are never loaded; convert them to safetensors)" if pickled else ""
        raise FileNotFoundError(f"{folder}: no *.safetensors weights{hint}; {EXPECTED}")
    return folder


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model_and_processor(
    path: str | Path,
    *,
    dtype: str | torch.dtype = "float32",
    attn_implementation: str | dict = "sdpa",
    device: str | torch.device = "cpu",
) -> tuple[Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor]:
    """Load a Qwen2-Audio checkpoint and its processor from a local folder, in eval mode on `device`.

    attn_implementation: "sdpa", "eager", a registered name, or a dict per sub-config
        (e.g. {"text_config": "eager", "audio_config": "sdpa"}).
    The tokenizer is switched to left padding (batched generation appends on the right) whatever the
    checkpoint says, so tiny and real models batch the same way.
    """
    folder = check_model_folder(path)
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    if not isinstance(processor, Qwen2AudioProcessor):
        raise ValueError(f"{folder}: processor is {type(processor).__name__}, not Qwen2AudioProcessor; {EXPECTED}")
    processor.tokenizer.padding_side = "left"
    model = Qwen2AudioForConditionalGeneration.from_pretrained(
        folder,
        dtype=resolve_dtype(dtype),
        attn_implementation=attn_implementation,
        local_files_only=True,
        use_safetensors=True,  # weights never come from a pickle (.bin): loading one can run code
    )
    # The encoder defines its position table as frozen (requires_grad=False), but from_pretrained
    # (transformers 5.24) hands it back trainable; restore the architecture's intent.
    model.model.audio_tower.embed_positions.requires_grad_(False)
    return model.to(device).eval(), processor


def audio_token_id(source: Qwen2AudioProcessor | Qwen2AudioForConditionalGeneration) -> int:
    """Id of the <|AUDIO|> placeholder, from a processor or a model (they agree for a sound checkpoint)."""
    if isinstance(source, Qwen2AudioProcessor):
        return int(source.audio_token_id)
    config = getattr(source, "config", None)
    if config is not None and getattr(config, "audio_token_id", None) is not None:
        return int(config.audio_token_id)
    raise TypeError(f"cannot find the audio token id on {type(source).__name__}; pass a Qwen2-Audio processor or model")


def generation_suppressed_token_ids(processor: Qwen2AudioProcessor) -> list[int]:
    """Ids to forbid during sampling: <|AUDIO|>, <|audio_bos|>, <|audio_eos|>, <|im_start|> and the pad token.

    Pass them as `generate(..., suppress_tokens=ids)` (or `bad_words_ids=[[i] for i in ids]`).
    Note: in the real Qwen2-Audio-Instruct the pad token <|endoftext|> is also listed as an eos id;
    suppressing it leaves <|im_end|>, which is how the assistant turn ends.
    """
    tokenizer = processor.tokenizer
    tokens = list(SUPPRESSED_TOKENS) + [tokenizer.pad_token]
    vocab = tokenizer.get_vocab()
    missing = [token for token in tokens if token is None or token not in vocab]
    if missing:
        raise ValueError(f"tokenizer lacks the special tokens {missing}; is this a Qwen2-Audio tokenizer?")
    return sorted({vocab[token] for token in tokens})


def enable_activation_checkpointing(model: Qwen2AudioForConditionalGeneration) -> None:
    """Recompute decoder activations in backward (non-reentrant), across transformers 5.x.

    transformers 5.2x names it `activation_checkpointing_enable` and keeps `gradient_checkpointing_enable`
    as a deprecated alias; earlier 5.x releases have only the latter.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
