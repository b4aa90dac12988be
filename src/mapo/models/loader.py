"""The one loader for every supported model family: the tiny model and a real one (e.g. Qwen2-Audio-7B-Instruct).

Both are local folders written by `save_pretrained`; both go through the same calls, so whatever works
on the tiny model on a laptop runs unchanged on the real one. The folder's config.json names the family
(`model_type`), whose adapter (`mapo.models.adapter`) does the loading. The network is never touched
(`local_files_only=True`): a missing file is an error that says what the folder must hold. Weights load
from safetensors only (a folder with only pickled .bin weights is refused); remote code is never
trusted (`trust_remote_code` stays at its default, off).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mapo.models.adapter import adapter_for_folder, get_adapter, registered_model_types

EXPECTED = (
    "expected a local folder with config.json of a supported audio LM (model_type one of {types}), its "
    "weights, tokenizer and preprocessor files (e.g. a downloaded Qwen2-Audio-7B-Instruct, Qwen2.5-Omni-7B or "
    "Qwen3-Omni-30B-A3B-Instruct/Thinking, or the tiny "
    "model from `make tiny`)"
)
#: Tokenizer files: either the fast tokenizer's single file or the BPE pair.
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))
#: Feature-extractor settings: the classic file, or the combined processor file of newer transformers.
PREPROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")

def read_feature_extractor_settings(folder: str | Path) -> dict | None:
    """The feature extractor's settings of a model folder (`preprocessor_config.json`, or the block nested
    in a combined `processor_config.json`), read without loading anything; None when neither file is there."""
    for name in PREPROCESSOR_FILES:
        file = Path(folder) / name
        if file.is_file():
            settings = json.loads(file.read_text())
            return settings.get("feature_extractor", settings)
    return None


DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}



def _expected() -> str:
    return EXPECTED.format(types=", ".join(repr(t) for t in registered_model_types()))


def check_model_folder(path: str | Path) -> Path:
    """Raise a clear error unless `path` looks like a local checkpoint of a supported family; returns it as a Path."""
    EXPECTED = _expected()  # noqa: N806  (the message names the families registered now)
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
    if model_type not in registered_model_types():
        raise ValueError(f"{config_file}: model_type is {model_type!r}, not a supported family; {EXPECTED}")
    if not any(all((folder / name).is_file() for name in group) for group in TOKENIZER_FILES):
        raise FileNotFoundError(f"{folder}: no tokenizer files (tokenizer.json, or vocab.json + merges.txt); {EXPECTED}")
    if not any((folder / name).is_file() for name in PREPROCESSOR_FILES):
        raise FileNotFoundError(f"{folder}: no {' or '.join(PREPROCESSOR_FILES)}; {EXPECTED}")
    return folder


def require_safetensors(folder: Path) -> None:
    """Weights load from safetensors only: a folder holding only pickled weights (.bin, .pt) is refused
    with a message that says so (unpickling a downloaded file can run code)."""
    if not any(folder.glob("*.safetensors")):
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = f" (found {', '.join(pickled)}: pickle files are never loaded; convert them to safetensors)" if pickled else ""
        raise FileNotFoundError(f"{folder}: no *.safetensors weights{hint}; {_expected()}")


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
):
    """Load a checkpoint of any supported family and its processor from a local folder, in eval mode on `device`.

    attn_implementation: "sdpa", "eager", a registered name, or a dict per sub-config
        (e.g. {"text_config": "eager", "audio_config": "sdpa"}).
    The tokenizer is switched to left padding (batched generation appends on the right) whatever the
    checkpoint says, so tiny and real models batch the same way.
    """
    folder = check_model_folder(path)
    require_safetensors(folder)
    adapter = adapter_for_folder(folder)
    model, processor = adapter.load(
        folder, dtype=resolve_dtype(dtype), attn_implementation=attn_implementation, device=device
    )
    processor.tokenizer.padding_side = "left"
    return model, processor


def audio_token_id(source) -> int:
    """Id of the audio placeholder, from a processor or a model (its adapter).

    A processor gives its `audio_token_id`; some processor releases (Qwen3OmniMoeProcessor in transformers
    5.17) name the placeholder (`audio_token`) but do not carry its id: its tokenizer knows it then. Raises
    ValueError when the tokenizer has no id for the placeholder, TypeError for anything else.
    """
    if isinstance(source, torch.nn.Module):
        return get_adapter(source).audio_token_id(source)
    if getattr(source, "audio_token_id", None) is not None:
        return int(source.audio_token_id)
    token, tokenizer = getattr(source, "audio_token", None), getattr(source, "tokenizer", None)
    if token is not None and tokenizer is not None:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer of {type(source).__name__} has no id for its audio placeholder {token!r}")
        return int(token_id)
    raise TypeError(f"cannot find the audio token id on {type(source).__name__}; pass a processor or a model")


#: Processor attributes naming multimodal marker tokens (those a processor has are suppressed).
MARKER_ATTRIBUTES = (
    "audio_token", "audio_bos_token", "audio_eos_token",
    "image_token", "video_token", "vision_bos_token", "vision_eos_token",
)
#: The start of a new chat turn (every supported family uses the ChatML markers).
TURN_START = "<|im_start|>"


def generation_suppressed_token_ids(processor, vocab_size: int | None = None) -> list[int]:
    """Ids to forbid during sampling: the processor's multimodal markers and placeholders (an extra
    audio placeholder breaks every later pass with "audio features and audio tokens do not match"), the
    start of a new turn, the pad token, and, given the model's `vocab_size`, every LM-head row past the
    tokenizer (the real Qwen2-Audio has 156,032 rows for 154,931 tokens: a sampled padding row decodes to
    nothing). Stopping is left to EOS (<|im_end|>).

    Pass them as `generate(..., suppress_tokens=ids)` (or `bad_words_ids=[[i] for i in ids]`).
    Note: in the real Qwen2-Audio-Instruct the pad token <|endoftext|> is also listed as an eos id;
    suppressing it leaves <|im_end|>, which is how the assistant turn ends.
    """
    tokenizer = processor.tokenizer
    markers = [getattr(processor, name, None) for name in MARKER_ATTRIBUTES]
    tokens = [t for t in markers if t is not None] + [TURN_START, tokenizer.pad_token]
    vocab = tokenizer.get_vocab()
    missing = [token for token in tokens if token is None or token not in vocab]
    if missing:
        raise ValueError(f"tokenizer lacks the special tokens {missing}; does it belong to this model family?")
    padding_rows = range(len(tokenizer), vocab_size) if vocab_size is not None else range(0)
    return sorted({vocab[token] for token in tokens} | set(padding_rows))


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute decoder activations in backward (non-reentrant), across transformers 5.x.

    transformers 5.2x names it `activation_checkpointing_enable` and keeps `gradient_checkpointing_enable`
    as a deprecated alias; earlier 5.x releases have only the latter.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
