"""The model adapter: what mapo needs to know about one model family, in one small object (DESIGN §10).

Rollout, scoring, the attention capture, FSDP wrapping and the training loop ask the adapter for the
parts they use (the text decoder, its layers, the LM head, the token table, the audio tower) and for the
few operations whose details differ between families (encoding audio, placing it, the decoder call with
a KV cache). They never test a model's type. An adapter is stateless: every method takes the model.

`get_adapter(model)` finds the adapter by the model config's `model_type`; `adapter_for_folder(path)`
by the `model_type` in a folder's config.json (the loader uses it before any weights are read);
`adapter_for_processor(processor)` by the processor's class (the collator has no model).

`adapter.dims(config_dict)` turns a folder's config.json into `ModelDims`, the few numbers the memory
plan (`mapo.plan`) needs: parameter counts by part (counted on a weightless meta-device model, so they are
exact for any family the adapter can build) and the shapes that size the KV cache and activations.

Adding a family = one subclass registered with `register_adapter`, plus a tiny builder for the tests.
The Qwen Omni thinkers live in `mapo.models.omni` (imported at the end of this module, so importing
the adapter registry always knows every family).
"""

from __future__ import annotations

import functools
import inspect
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "LinearGroup", "ModelAdapter", "ModelDims", "Qwen2AudioAdapter", "adapter_for_config", "adapter_for_folder", "dims_for_config",
    "adapter_for_processor", "get_adapter", "has_adapter", "register_adapter", "registered_model_types",
]

@dataclass(frozen=True)
class LinearGroup:
    """`count` linear layers called `name` (the module's own attribute name, e.g. "q_proj") in one part
    of the model ("text", "audio", "projector" or "lm_head"), each `in_features` → `out_features`.
    LoRA's parameter count is Σ count · rank · (in + out) over the targeted groups."""

    part: str
    name: str
    in_features: int
    out_features: int
    count: int


@dataclass(frozen=True)
class ModelDims:
    """What the memory plan needs to know about a model, read from config.json alone (no weights).

    Parameter counts (an MoE layer counts all its experts: they are all stored):
      embed_params      token table of the text model.
      layer_params      one text decoder layer (the FSDP unit gathered at a time); num_layers of them.
      text_other_params the rest of the text stack (final norm, …).
      lm_head_params    output projection (0 when tied to the token table).
      audio_params      the whole audio tower; audio_layer_params one encoder layer, audio_layers of them.
      projector_params  audio → text projection (0 when it sits inside the tower).
      other_params      anything else the checkpoint holds (e.g. a vision tower mapo never runs).
    Shapes that size memory per token:
      hidden_size, num_heads, num_kv_heads, head_dim   text attention (KV cache: 2·layers·kv_heads·head_dim).
      mlp_width         MLP activation width per token: intermediate_size (dense), or the active
                        experts' widths + shared experts' (MoE: experts_per_token · moe_intermediate + shared).
      vocab_size        rows of the LM head (may exceed the tokenizer's length).
      max_position      longest text sequence the position scheme allows.
      audio_hidden, audio_heads, audio_ffn             audio encoder width (its transient activations).
      num_mel_bins      feature channels of one audio frame.
      audio_frames      mel frames of one full window (the encoder's input length; 3000 for 30 s).
      audio_tokens_per_window  audio positions one full-window clip gives the text model (750 for 30 s).
    linears: the model's linear layers by part and name (LoRA sizing).
    num_experts, experts_per_token: 0 for a dense model (reported only).
    audio_window_fixed: the encoder takes exactly `audio_frames` frames (Qwen2-Audio); False when it takes
                      any length (the Omni towers: `audio_frames` is then the released processor's window).
    """

    family: str
    embed_params: int
    layer_params: int
    num_layers: int
    text_other_params: int
    lm_head_params: int
    audio_params: int
    audio_layer_params: int
    audio_layers: int
    projector_params: int
    other_params: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_width: int
    vocab_size: int
    max_position: int
    audio_hidden: int
    num_mel_bins: int
    audio_heads: int
    audio_ffn: int
    audio_frames: int
    audio_tokens_per_window: int
    linears: tuple[LinearGroup, ...] = ()
    num_experts: int = 0
    experts_per_token: int = 0
    audio_window_fixed: bool = True

    @property
    def text_params(self) -> int:
        """The text model without the LM head: token table, layers, final norm."""
        return self.embed_params + self.num_layers * self.layer_params + self.text_other_params

    @property
    def total_params(self) -> int:
        return self.text_params + self.lm_head_params + self.audio_params + self.projector_params + self.other_params

    @property
    def largest_param(self) -> int:
        """Elements of the biggest single weight tensor (the token table or the LM head, in practice)."""
        return max(self.embed_params, self.lm_head_params)


def count_parameters(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def linear_groups(parts: dict[str, nn.Module | None]) -> tuple[LinearGroup, ...]:
    """The nn.Linear layers of each named part, grouped by (part, attribute name, in, out)."""
    counts: Counter = Counter()
    for part, module in parts.items():
        if module is None:
            continue
        if isinstance(module, nn.Linear):
            counts[(part, part, module.in_features, module.out_features)] += 1
            continue
        for name, sub in module.named_modules():
            if isinstance(sub, nn.Linear):
                counts[(part, name.rsplit(".", 1)[-1], sub.in_features, sub.out_features)] += 1
    return tuple(LinearGroup(part, name, i, o, n) for (part, name, i, o), n in sorted(counts.items()))


class ModelAdapter:
    """Interface of a model family. Subclasses set `family`, `model_types` and override what differs.

    Shapes: B rows, S positions, H text hidden size, C clips, F mel frames.
    """

    #: Short name used in messages and configs (e.g. "qwen2_audio").
    family: str = ""
    #: `model_type` values of config.json this adapter loads (and of the built model's config).
    model_types: tuple[str, ...] = ()
    #: Class names of the processors of this family (how the collator finds the adapter).
    processor_types: tuple[str, ...] = ()
    #: The encoder takes exactly one fixed window of mel frames (Qwen2-Audio: clips are cut to it); False
    #: when it takes clips of any length (the Omni towers). A property of the family, readable without a
    #: model (`mapo.assets.audio_window_seconds`); `dims_of` copies it into `ModelDims.audio_window_fixed`.
    audio_window_fixed: bool = True

    # ------------------------------------------------------------------ loading
    def load(self, folder: Path, *, dtype: torch.dtype, attn_implementation: str | dict, device) -> tuple[nn.Module, Any]:
        """(model in eval mode on `device`, processor) from a local folder; never touches the network."""
        raise NotImplementedError

    def config_from_dict(self, config_dict: dict):
        """The family's transformers config object from a config.json dict (defaults filled in)."""
        raise NotImplementedError

    def meta_model(self, config_dict: dict) -> nn.Module:
        """The model built on the meta device: every parameter's shape, no memory, no weights read."""
        raise NotImplementedError

    def dims(self, config_dict: dict) -> ModelDims:
        """`ModelDims` of a checkpoint from its config.json dict (parameter counts from `meta_model`)."""
        raise NotImplementedError

    def dims_of(self, model: nn.Module, *, mlp_width: int, audio_frames: int, audio_tokens_per_window: int, **extra) -> ModelDims:
        """`ModelDims` counted on a (meta-device) model through this adapter's parts; the family gives what
        the parts cannot tell (MLP activation width, the audio window) and any further field in `extra`."""
        text, audio = model.config.text_config, model.config.audio_config
        text_model, layers, tower = self.text_model(model), self.decoder_layers(model), self.audio_tower(model)
        projector, lm_head, embed = self.audio_projector(model), self.lm_head(model), self.embed_tokens(model)
        lm_head_params = 0 if lm_head.weight is embed.weight else lm_head.weight.numel()
        counted = count_parameters(text_model) + lm_head_params + count_parameters(tower) + count_parameters(projector)
        return ModelDims(
            family=self.family,
            embed_params=embed.weight.numel(),
            layer_params=max(count_parameters(layer) for layer in layers),  # the largest FSDP unit
            num_layers=len(layers),
            text_other_params=count_parameters(text_model) - embed.weight.numel() - sum(map(count_parameters, layers)),
            lm_head_params=lm_head_params,
            audio_params=count_parameters(tower),
            audio_layer_params=count_parameters(tower.layers[0]),
            audio_layers=len(tower.layers),
            projector_params=count_parameters(projector),
            other_params=count_parameters(model) - counted,
            hidden_size=text.hidden_size,
            num_heads=text.num_attention_heads,
            num_kv_heads=text.num_key_value_heads or text.num_attention_heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
            mlp_width=mlp_width,
            vocab_size=lm_head.out_features,
            max_position=text.max_position_embeddings,
            audio_hidden=audio.d_model,
            num_mel_bins=audio.num_mel_bins,
            audio_heads=audio.encoder_attention_heads,
            audio_ffn=audio.encoder_ffn_dim,
            audio_frames=audio_frames,
            audio_tokens_per_window=audio_tokens_per_window,
            linears=linear_groups({"text": text_model, "lm_head": lm_head, "audio": tower, "projector": projector}),
            audio_window_fixed=self.audio_window_fixed,
            **extra,
        )

    # ------------------------------------------------------------------ parts
    def text_model(self, model: nn.Module) -> nn.Module:
        """The text decoder stack (embeddings → layers → final norm), without the LM head."""
        raise NotImplementedError

    def lm_head(self, model: nn.Module) -> nn.Linear:
        return model.lm_head

    def embed_tokens(self, model: nn.Module) -> nn.Embedding:
        return model.get_input_embeddings()

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The text decoder's layers (what the attention capture and FSDP wrap)."""
        return self.text_model(model).layers

    def audio_tower(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def audio_projector(self, model: nn.Module) -> nn.Module | None:
        """The audio → text projection when it is a separate module (None when inside the tower)."""
        return None

    def audio_encoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return self.audio_tower(model).layers

    def fixed_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """Parameters that never train, whatever the config says (e.g. a fixed sinusoid table)."""
        return []

    def fsdp_units(self, model: nn.Module) -> list[nn.Module]:
        """Modules sharded as their own FSDP2 units, innermost first (the root is wrapped by the caller)."""
        return [*self.decoder_layers(model), *self.audio_encoder_layers(model)]

    def vocab_size(self, model: nn.Module) -> int:
        """Rows of the LM head (may exceed the tokenizer's length: padded vocabularies)."""
        return self.lm_head(model).out_features

    # ------------------------------------------------------------------ tokens
    def audio_token_id(self, model: nn.Module) -> int:
        """Id of the audio placeholder token whose positions receive the audio embeddings."""
        config = model.config
        for name in ("audio_token_id", "audio_token_index"):
            value = getattr(config, name, None)
            if value is not None:
                return int(value)
        raise ValueError(f"{self.family}: the model config has no audio_token_id / audio_token_index")

    # ------------------------------------------------------------------ prompts (processor side, no model)
    def num_audio_tokens(self, processor, n_frames: int) -> int:
        """Audio placeholder positions the family's encoder yields for one clip of `n_frames` valid mel frames
        (the count the processor expands the placeholder to)."""
        raise NotImplementedError

    def clip_feature_kwargs(self, processor) -> dict[str, Any]:
        """Keyword arguments of the feature extractor for one clip alone, as the family's processor calls it
        (padding and truncation; `sampling_rate` and `return_attention_mask` are added by the caller)."""
        return {"padding": "max_length"}

    # ------------------------------------------------------------------ operations
    def encode_audio(self, model: nn.Module, input_features: torch.Tensor, feature_attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """C clips' features [C, n_mels, F] and mask [C, F] → C tensors [n_c, H] in the text hidden size."""
        raise NotImplementedError

    def new_cache(self, model: nn.Module):
        """An empty KV cache for `run_text_model(..., cache=...)`."""
        from transformers import DynamicCache

        return DynamicCache(config=model.config)

    def run_text_model(
        self,
        model: nn.Module,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *,
        cache=None,
    ) -> torch.Tensor:
        """Final (normed) hidden states [B, S, H] of the text decoder; `cache` is filled in place when given."""
        text = self.text_model(model)
        kwargs: dict[str, Any] = {"use_cache": cache is not None}
        if cache is not None:
            kwargs[_cache_keyword(text)] = cache
        out = text(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        return out.last_hidden_state

    def prepared_mask_kind(self, model: nn.Module) -> str | None:
        """Whether the text decoder can run on a caller-prepared 4-D attention mask with a cache object that
        only implements `update(key, value, layer_idx)` (mapo.kv_cache.StaticKVCache), and in which format:
        "bool" (SDPA), "additive" (eager); None when it must build its own masks (other attention kernels,
        sliding-window layers). The rollout uses it to decode with a preallocated KV cache."""
        config = self.text_model(model).config
        if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
            return None
        return {"sdpa": "bool", "eager": "additive"}.get(getattr(config, "_attn_implementation", None))


def _cache_keyword(module: nn.Module) -> str:
    """The KV-cache argument of a decoder's forward: `cache` in recent transformers 5.x, before that
    `past_key_values` (the cache object is updated in place, so its name on the output is never needed)."""
    return _cache_keyword_of(type(module))


@functools.lru_cache(maxsize=None)
def _cache_keyword_of(module_type: type) -> str:
    # Looked up once per class: inspect.signature costs about as much as a small decode step.
    return "cache" if "cache" in inspect.signature(module_type.forward).parameters else "past_key_values"


# ---------------------------------------------------------------------------------------- Qwen2-Audio
class Qwen2AudioAdapter(ModelAdapter):
    """`Qwen2AudioForConditionalGeneration` (transformers 5.x layout: `model.model.audio_tower`,
    `model.model.multi_modal_projector`, `model.model.language_model`, `model.lm_head`)."""

    family = "qwen2_audio"
    model_types = ("qwen2_audio",)
    processor_types = ("Qwen2AudioProcessor",)

    def load(self, folder, *, dtype, attn_implementation, device):
        from transformers import (
            AutoProcessor,
            Qwen2AudioForConditionalGeneration,
            Qwen2AudioProcessor,
        )

        processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
        if not isinstance(processor, Qwen2AudioProcessor):
            raise ValueError(f"{folder}: processor is {type(processor).__name__}, not Qwen2AudioProcessor")
        model = Qwen2AudioForConditionalGeneration.from_pretrained(
            folder, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True,
            use_safetensors=True,  # weights never come from a pickle (.bin): loading one can run code
        )
        # The encoder defines its position table as frozen (requires_grad=False), but from_pretrained
        # (transformers 5.24) hands it back trainable; restore the architecture's intent.
        for p in self.fixed_parameters(model):
            p.requires_grad_(False)
        return model.to(device).eval(), processor

    def config_from_dict(self, config_dict):
        from transformers import Qwen2AudioConfig

        return Qwen2AudioConfig(**{k: v for k, v in config_dict.items() if k != "model_type"})

    def meta_model(self, config_dict):
        from transformers import Qwen2AudioForConditionalGeneration

        config = self.config_from_dict(config_dict)
        with torch.device("meta"):
            return Qwen2AudioForConditionalGeneration(config)

    def dims(self, config_dict):
        """Qwen2-Audio: a dense Qwen2 text model and a Whisper-style encoder. The Hub config.json's
        `text_config` omits hidden size, layer and head counts, so Qwen2Config's defaults (4096 / 32 / 32)
        apply; building the config object fills them exactly as loading would."""
        model = self.meta_model(config_dict)
        text, audio = model.config.text_config, model.config.audio_config
        frames = 2 * audio.max_source_positions  # the encoder's required input length (mel frames)
        return self.dims_of(
            model, mlp_width=text.intermediate_size, audio_frames=frames, audio_tokens_per_window=self.num_audio_tokens(None, frames),
        )

    def text_model(self, model):
        return model.model.language_model

    def audio_tower(self, model):
        return model.model.audio_tower

    def audio_projector(self, model):
        return model.model.multi_modal_projector

    def fixed_parameters(self, model):
        return list(self.audio_tower(model).embed_positions.parameters())

    def num_audio_tokens(self, processor, n_frames):
        """Conv stride 2 then pool 2 over the padded window: ((n - 1) // 2 + 1 - 2) // 2 + 1 (25 per second)."""
        return ((n_frames - 1) // 2 + 1 - 2) // 2 + 1

    def encode_audio(self, model, input_features, feature_attention_mask):
        """Audio tower + projector exactly as `Qwen2AudioModel.forward` runs them (the features are padded
        to the encoder's full window; padding frames after the first convolution are masked out of the
        encoder's bidirectional attention)."""
        from transformers.masking_utils import create_bidirectional_mask

        tower = self.audio_tower(model)
        device = tower.conv1.weight.device
        input_features = input_features.to(device, tower.conv1.weight.dtype)
        feature_attention_mask = feature_attention_mask.to(device)
        conv_lengths, output_lengths = tower._get_feat_extract_output_lengths(feature_attention_mask.sum(-1))
        num_clips, _, num_frames = input_features.shape
        conv_len = (num_frames - 2) // 2 + 1
        valid = torch.arange(conv_len, device=device)[None, :] < conv_lengths[:, None]
        text_dtype = self.embed_tokens(model).weight.dtype
        encoder_mask = create_bidirectional_mask(
            config=tower.config,
            inputs_embeds=torch.zeros(num_clips, conv_len, 1, dtype=text_dtype, device=device),
            attention_mask=valid.long(),
        )
        encoded = tower(input_features, attention_mask=encoder_mask).last_hidden_state  # [C, F/4, d_audio]
        projected = self.audio_projector(model)(encoded)  # [C, F/4, H]
        return [projected[c, :n] for c, n in enumerate(output_lengths.tolist())]


# ---------------------------------------------------------------------------------------- registry
_ADAPTERS: dict[str, ModelAdapter] = {}


def register_adapter(adapter: ModelAdapter) -> ModelAdapter:
    """Make `adapter` the one for each of its `model_types`."""
    for model_type in adapter.model_types:
        _ADAPTERS[model_type] = adapter
    return adapter


register_adapter(Qwen2AudioAdapter())


def registered_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def _lookup(model_type: str | None, where: str) -> ModelAdapter:
    adapter = _ADAPTERS.get(model_type or "")
    if adapter is None:
        raise ValueError(f"{where}: model_type {model_type!r} has no mapo adapter; supported: {', '.join(registered_model_types())}")
    return adapter


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter of a built model (by `model.config.model_type`)."""
    config = getattr(model, "config", None)
    return _lookup(getattr(config, "model_type", None), type(model).__name__)


def adapter_for_processor(processor) -> ModelAdapter:
    """The adapter of the family a processor belongs to (by its class name)."""
    name = type(processor).__name__
    for adapter in dict.fromkeys(_ADAPTERS.values()):
        if name in adapter.processor_types:
            return adapter
    known = sorted({t for a in _ADAPTERS.values() for t in a.processor_types})
    raise ValueError(f"processor {name} belongs to no mapo model family; supported: {', '.join(known)}")


def has_adapter(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) in _ADAPTERS


def adapter_for_config(config_dict: dict, where: str = "config.json") -> ModelAdapter:
    """The adapter for a config.json dict (by its `model_type`); `where` names it in the error."""
    return _lookup(config_dict.get("model_type"), where)


def dims_for_config(config_dict: dict, where: str = "config.json") -> ModelDims:
    """ModelDims of a config.json dict, cached by content: the preflight checks and the memory plan at
    the start of a run both need them, and each build makes a meta model of the whole network."""
    return _cached_dims(json.dumps(config_dict, sort_keys=True), where)


@functools.lru_cache(maxsize=8)
def _cached_dims(config_json: str, where: str) -> ModelDims:
    config = json.loads(config_json)
    return adapter_for_config(config, where).dims(config)


def adapter_for_folder(folder: str | Path) -> ModelAdapter:
    """The adapter for a local model folder, from the `model_type` of its config.json."""
    config_file = Path(folder) / "config.json"
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file}: not valid JSON ({err})") from None
    return _lookup(model_type, str(config_file))


# The Qwen Omni thinkers register themselves (after the registry above exists).
from mapo.models import omni as _omni  # noqa: E402,F401
