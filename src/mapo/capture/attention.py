"""Context manager that records the differentiable audio attention mass during a policy forward.

Usage (DESIGN §3 "Audio attention mass", §4):

    keys = audio_key_mask_from_ids(input_ids, audio_token_id, attention_mask)      # [B, S] bool
    with capture_audio_attention(model, keys, layers=(-3, -2, -1)) as cap:
        out = model(**batch)
    a = cap.mass                       # [B, S] float32, differentiable in the captured q/k projections
    a_t = completion_mass(a, P, T)     # [B, T]: the mass at the query position that predicts y_t

`cap.mass[b, i]` = reduce_layers reduce_heads Σ_{k : audio_key_mask[b, k]} α_{i,k}: the attention that
query position i puts on the audio keys, with α the layer's softmax attention weights under the model's
own padding + causal mask (padding keys get α = 0, so they never count; a left-padding query row, whose
keys are all blocked, gets mass 0).

How it is installed, and why this way:

- The capture is an `mapo.models.attention_override.AttentionOverride` of the chosen layers' attention
  modules (that module says how it redirects them without touching the model config or its mask). With
  methods "sdpa" and "eager" the wrapper first calls the model's original function (`sdpa` or `eager`,
  whatever the model was loaded with) with the unchanged arguments — so outputs and gradients of the model
  are exactly as without the capture — then computes the mass from the same query/key tensors (after
  rotary embedding) and the same attention mask.
- method "fused" (what the default `algo.attn.method` "auto" takes on CPU, and on CUDA for heads narrower
  than 121; see `mapo.capture.kernels.fused_capture_pays`) changes the first point: the wrapper calls the original
  function once, on query/key/value widened by `mapo.capture.kernels.fused_inputs`, and splits the result
  into the layer's output and the mass. Same function, same mask, one attention instead of two per captured
  layer; the model's outputs then equal the uncaptured ones up to floating-point rounding.
- On exit (normal or exception) the original config objects are put back and the private name is
  removed from the registry; nothing stays installed. The recorded masses stay readable after exit.

Limits: the model must run its text decoder with `attn_implementation` "sdpa" or "eager" (flash and
flex kernels take a different mask format). With gradient checkpointing on the captured layers, call
`backward()` inside the `with` block: the recomputation re-runs the captured attention and must find the
capture installed (torch raises a CheckpointError otherwise). One capture per model at a time. If the
model runs several forwards inside one context, `mass` refers to the latest one; assign
`cap.audio_key_mask` before a forward on a new batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import torch
from torch import nn

from mapo.capture.kernels import (
    audio_mass_eager,
    audio_mass_sdpa,
    fused_capture_pays,
    fused_inputs,
    split_fused_output,
)
from mapo.models.adapter import get_adapter, has_adapter
from mapo.models.attention_override import AttentionOverride
from mapo.models.embed import audio_span_mask

#: Methods that compute the mass in a second call after the layer's own attention (see `mapo.capture.kernels`).
MASS_METHODS: dict[str, Callable[..., torch.Tensor]] = {"sdpa": audio_mass_sdpa, "eager": audio_mass_eager}
#: Every `method` of a capture: "fused" rides in the layer's own attention call, the others run after it;
#: "auto" takes "fused" where `fused_capture_pays` and "sdpa" elsewhere, call by call.
CAPTURE_METHODS = ("auto", "fused", *MASS_METHODS)
HEAD_REDUCTIONS = ("max", "mean")
LAYER_REDUCTIONS = ("mean", "max")

# Attribute paths to a text decoder's layer list for models without a mapo adapter (a plain causal LM
# such as Qwen2ForCausalLM, or a bare decoder); models of a supported family ask their adapter.
_DECODER_LAYER_PATHS = ("model.layers", "layers")


def text_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The text decoder's layers of `model` (its adapter's, else a plain LM's); raises naming the paths tried."""
    if has_adapter(model):
        return get_adapter(model).decoder_layers(model)
    for path in _DECODER_LAYER_PATHS:
        node: Any = model
        for name in path.split("."):
            node = getattr(node, name, None)
            if node is None:
                break
        if isinstance(node, nn.ModuleList):
            return node
    raise ValueError(
        f"cannot find the text decoder layers of {type(model).__name__}; tried {list(_DECODER_LAYER_PATHS)}"
    )


def audio_key_mask_from_ids(
    input_ids: torch.Tensor, audio_token_id: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Which key positions are audio: input_ids [B, S] long, attention_mask [B, S] (1 = real token) or None.

    Returns [B, S] bool, True where input_ids == audio_token_id and the position is not padding
    (the audio-span mask of `mapo.models.embed`, named for its use here).
    """
    return audio_span_mask(input_ids, audio_token_id, attention_mask)


class AudioAttentionCapture:
    """Installed on enter, removed on exit; see the module docstring. Build it with `capture_audio_attention`.

    Attributes after a forward inside the context:
        mass:       [B, Q] float32, differentiable — audio attention mass per query position, reduced.
        head_mass:  [B, L, Hq, Q] float32 — the unreduced per-layer, per-head masses (L = len(layers)).
        layer_indices: the captured decoder layer indices, non-negative, in the order given.
    Q equals S (the key length) for a forward without a KV cache.
    """

    def __init__(
        self,
        model: nn.Module,
        audio_key_mask: torch.Tensor,
        layers: Sequence[int] = (-3, -2, -1),
        head_reduce: str = "max",
        layer_reduce: str = "mean",
        method: str = "auto",
        key_length: int | None = None,
    ) -> None:
        if method not in CAPTURE_METHODS:
            raise ValueError(f"method must be one of {list(CAPTURE_METHODS)}; got {method!r}")
        if head_reduce not in HEAD_REDUCTIONS:
            raise ValueError(f"head_reduce must be one of {list(HEAD_REDUCTIONS)}; got {head_reduce!r}")
        if layer_reduce not in LAYER_REDUCTIONS:
            raise ValueError(f"layer_reduce must be one of {list(LAYER_REDUCTIONS)}; got {layer_reduce!r}")
        decoder_layers = text_decoder_layers(model)
        self.layer_indices = _normalise_layer_indices(layers, len(decoder_layers))
        self._attention_modules = [_self_attention(decoder_layers[i], i) for i in self.layer_indices]
        self.audio_key_mask = audio_key_mask
        self.head_reduce = head_reduce
        self.layer_reduce = layer_reduce
        self.method = method
        self._mass_fn = MASS_METHODS.get(method)  # None for "fused" and "auto"
        self.key_length = key_length
        self._slot_of = {attn: slot for slot, attn in enumerate(self._attention_modules)}
        self._override = AttentionOverride(self._attention_modules, self._attention, "audio capture",
                                           labels=[f"decoder layer {i}" for i in self.layer_indices])
        self._head_mass: list[torch.Tensor | None] = [None] * len(self.layer_indices)

    # ----------------------------------------------------------------------------- inputs
    @property
    def audio_key_mask(self) -> torch.Tensor:
        """[B, S] bool, True on audio keys. Assigning a new one clears the recorded masses."""
        return self._audio_key_mask

    @audio_key_mask.setter
    def audio_key_mask(self, mask: torch.Tensor) -> None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
            got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise TypeError(f"audio_key_mask must be a [B, S] bool tensor; got {got}")
        self._audio_key_mask = mask
        self._head_mass = [None] * len(self.layer_indices)

    # ----------------------------------------------------------------------------- install / remove
    def __enter__(self) -> AudioAttentionCapture:
        self._override.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._override.__exit__(exc_type, exc, tb)

    # ----------------------------------------------------------------------------- the wrapper
    def _attention(
        self,
        module: nn.Module,
        original: Callable,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The override's wrapper (`AttentionOverride`): `original` is the module's own attention function, the
        rest its arguments as transformers passes them: query [B, Hq, Q, d], key/value [B, Hkv, S, d]."""
        slot = self._slot_of[module]
        if self.key_length is not None and key.shape[2] != self.key_length:
            # a call over other keys (the prompt-only call of a shared-prefix pass): not recorded
            return original(module, query, key, value, attention_mask, *args, **kwargs)
        scaling = kwargs.get("scaling")
        if scaling is None:
            scaling = query.shape[-1] ** -0.5  # SDPA's default, used by the original function too
        audio_keys = self._audio_key_mask.to(key.device)
        mass_fn = self._mass_fn
        if self.method == "auto" and not fused_capture_pays(query.device.type, query.shape[-1], value.shape[-1]):
            mass_fn = MASS_METHODS["sdpa"]
        if mass_fn is None:
            # fused: one call of the original on widened inputs; the scaling must stay the unwidened one
            wide_q, wide_k, wide_v = fused_inputs(query, key, value, audio_keys)
            wide_out, weights = original(module, wide_q, wide_k, wide_v, attention_mask, *args,
                                         **{**kwargs, "scaling": scaling})
            out, self._head_mass[slot] = split_fused_output(wide_out, value.shape[-1], attention_mask)
            return out, weights
        output = original(module, query, key, value, attention_mask, *args, **kwargs)
        is_causal = kwargs.get("is_causal")
        if is_causal is None:
            is_causal = getattr(module, "is_causal", True)
        self._head_mass[slot] = mass_fn(query, key, audio_keys, attention_mask, scaling, is_causal)
        return output

    # ----------------------------------------------------------------------------- results
    @property
    def head_mass(self) -> torch.Tensor:
        """[B, L, Hq, Q] float32: per captured layer (in `layer_indices` order) and per query head."""
        missing = [i for i, m in zip(self.layer_indices, self._head_mass) if m is None]
        if missing:
            raise RuntimeError(
                f"no forward through captured decoder layers {missing} happened inside the capture context "
                "(or audio_key_mask was reassigned since)"
            )
        return torch.stack(self._head_mass, dim=1)  # type: ignore[arg-type]

    @property
    def mass(self) -> torch.Tensor:
        """[B, Q] float32: `layer_reduce` over layers of `head_reduce` over heads of the audio mass."""
        per_head = self.head_mass  # [B, L, Hq, Q]
        per_layer = per_head.amax(dim=2) if self.head_reduce == "max" else per_head.mean(dim=2)
        return per_layer.amax(dim=1) if self.layer_reduce == "max" else per_layer.mean(dim=1)


def capture_audio_attention(
    model: nn.Module,
    audio_key_mask: torch.Tensor,
    layers: Sequence[int] = (-3, -2, -1),
    head_reduce: str = "max",
    layer_reduce: str = "mean",
    method: str = "auto",
    key_length: int | None = None,
) -> AudioAttentionCapture:
    """Context manager recording the audio attention mass of `model`'s text decoder.

    model: a model of a supported family (or a plain causal LM) run with attn_implementation
        "sdpa" or "eager" in its text decoder.
    audio_key_mask: [B, S] bool, True on the audio token positions of the batch about to be run
        (see `audio_key_mask_from_ids`); S is the full sequence length (prompt + completion).
    layers: indices into the text decoder layers; negative counts from the end (default: last 3).
    head_reduce: "max" | "mean" over query heads; layer_reduce: "mean" | "max" over the chosen layers.
    method: "auto" (the default: "fused" where `mapo.capture.kernels.fused_capture_pays`, i.e. on CPU, and on
        CUDA for heads narrower than 121; "sdpa" otherwise) | "fused" (the indicator rides in the layer's own
        attention call) | "sdpa" (a second, indicator-value SDPA call; no Q×S tensor; the model's outputs
        bit-identical) | "eager" (full softmax weights; reference).
    key_length: record only attention calls over exactly this many keys (None: every call). A shared-prefix
        pass (mapo.shared_prefix) calls each layer twice, for the prompt alone and for the completion
        queries over prompt + completion keys; only the second is wanted, its mass is then [B, T].
    Returns the capture; after the forward, `.mass` is [B, S] float32 and differentiable.
    """
    return AudioAttentionCapture(model, audio_key_mask, layers, head_reduce, layer_reduce, method, key_length)


def _normalise_layer_indices(layers: Sequence[int], num_layers: int) -> tuple[int, ...]:
    """Map possibly negative indices into 0..num_layers-1; reject empty, out-of-range and repeated ones."""
    if len(layers) == 0:
        raise ValueError("layers must name at least one decoder layer")
    normalised = []
    for index in layers:
        if not -num_layers <= index < num_layers:
            raise ValueError(f"layer index {index} is out of range for a text decoder with {num_layers} layers")
        normalised.append(index % num_layers)
    if len(set(normalised)) != len(normalised):
        raise ValueError(f"layers {tuple(layers)} name the same decoder layer twice ({num_layers} layers)")
    return tuple(normalised)


def _self_attention(layer: nn.Module, index: int) -> nn.Module:
    """The `self_attn` module of a decoder layer, with the attributes the capture relies on."""
    attn = getattr(layer, "self_attn", None)
    if attn is None or not hasattr(attn, "config"):
        raise ValueError(f"decoder layer {index} ({type(layer).__name__}) has no self_attn module with a config")
    return attn
