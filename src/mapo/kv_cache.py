"""Preallocated KV caches for the rollout's decode loop, and the attention masks that go with them.

`StaticKVCache` holds, per decoder layer, keys and values of shape [N, h_kv, L, d] allocated once (L = prompt
length + max new tokens). The prompt is prefilled for the B distinct prompts and written into all G rows of
its group without a repeated copy in between; each decode step then writes one column at a position held in
a device tensor, so a step has static shapes and no host synchronisation (what a CUDA graph needs), and
nothing grows by concatenation. `SharedPromptKVCache` (`rollout.shared_prompt_cache`) keeps each prompt once
for its G rows instead, with the completion per row, and needs its own decode attention
(`shared_prompt_attention`), since transformers' functions expect one key sequence per row.

The text decoder only ever calls `cache.update(key_states, value_states, layer_idx, ...)` on it (the
adapter's `run_text_model` passes it as the decoder's cache argument), and the caller passes a prepared 4-D
attention mask, which transformers' mask creation returns unchanged, so no other part of transformers' Cache
interface is used. `ModelAdapter.prepared_mask_kind(model)` says whether a family's decoder works this way
and which mask format its attention kernel takes; when it does not (another kernel, sliding-window layers)
the rollout falls back to the family's own cache (`adapter.new_cache`).

Mask formats (what transformers builds for the kernel): "bool" (SDPA: True = attend) and "additive" (eager:
0 = attend, the dtype's minimum = masked), shape [rows, 1, queries, L].
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from mapo.models.attention_override import AttentionOverride

MASK_KINDS = ("bool", "additive")


class _ColumnCache:
    """What both caches share: built from the prompts' padding mask [B, P], the group size G and the number of
    new tokens T; per layer, `keys` / `values` buffers [N, h_kv, columns, d] written one column per decode
    step at `write_position` ([1] long on the mask's device, first `first_column`, advanced in place by the
    caller), of which a step's attention reads the first `visible` (set by the caller per step).

    A subclass sets `first_column` and `columns` and says how a decode step's mask starts (`decode_allowed`)
    and whether the step needs its own attention (`decode_attention`)."""

    first_column: int
    columns: int

    def __init__(self, prompt_mask: torch.Tensor, group_size: int, max_new_tokens: int):
        self.prompt_mask, self.group_size, self.max_new_tokens = prompt_mask, group_size, max_new_tokens
        self.num_prompts, self.prompt_len = prompt_mask.shape
        self.rows = self.num_prompts * group_size
        self.write_position = torch.tensor([self.first_column], dtype=torch.long, device=prompt_mask.device)
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.decoding = False
        self.visible = self.columns

    def decode_allowed(self) -> torch.Tensor:
        """[N, 1, 1, columns] bool: the keys a decode step may attend before anything is written (the caller
        opens each column as it writes it)."""
        return torch.zeros(self.rows, 1, 1, self.columns, dtype=torch.bool, device=self.prompt_mask.device)

    def decode_mask(self, mask_kind: str, dtype: torch.dtype) -> tuple[torch.Tensor, bool | float]:
        """(the decode steps' mask in the kernel's format, the value that opens a column in it)."""
        return as_mask(self.decode_allowed(), mask_kind, dtype), True if mask_kind == "bool" else 0.0

    def decode_attention(self, decoder_layers):
        """The context the decode steps run in (nothing to install by default)."""
        return nullcontext()

    def _write_column(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys.index_copy_(2, self.write_position, key_states.to(keys.dtype))
        values.index_copy_(2, self.write_position, value_states.to(values.dtype))
        return keys[:, :, : self.visible], values[:, :, : self.visible]

    def start_decoding(self) -> None:
        if not self.keys:
            raise RuntimeError(f"{type(self).__name__}: decode before any prefill")
        self.decoding = True


class StaticKVCache(_ColumnCache):
    """Keys/values [N, h_kv, P + T, d] per layer, allocated on the first prefill `update` of each layer; row r
    belongs to prompt r // G, and decode steps write from column P on."""

    def __init__(self, prompt_mask: torch.Tensor, group_size: int, max_new_tokens: int):
        self.max_len = prompt_mask.shape[1] + max_new_tokens
        self.first_column, self.columns = prompt_mask.shape[1], self.max_len
        super().__init__(prompt_mask, group_size, max_new_tokens)

    def decode_allowed(self) -> torch.Tensor:
        allowed = super().decode_allowed()
        allowed[:, 0, 0, : self.prompt_len] = self.prompt_mask.bool().repeat_interleave(self.group_size, dim=0)
        return allowed

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Prefill (B rows, P positions): store into every row of the group, return the inputs unchanged.
        Decode (rows rows, 1 position): write at `write_position`, return the first `visible` columns."""
        if not self.decoding:
            batch, heads, length, _ = key_states.shape
            if batch != self.num_prompts or length > self.max_len:
                raise ValueError(f"StaticKVCache prefill got {tuple(key_states.shape)}; expected {self.num_prompts} rows and ≤ {self.max_len} positions")
            for store, states in ((self.keys, key_states), (self.values, value_states)):
                buffer = states.new_zeros(self.rows, heads, self.max_len, states.shape[-1])
                grouped = buffer.view(batch, self.group_size, heads, self.max_len, states.shape[-1])
                grouped[:, :, :, :length].copy_(states[:, None])
                store[layer_idx] = buffer
            return key_states, value_states
        return self._write_column(key_states, value_states, layer_idx)


class SharedPromptKVCache(_ColumnCache):
    """The prompt's keys/values once per prompt, [B, h_kv, P, d] per layer, and each row's completion keys/values
    [N, h_kv, T, d] (T = max new tokens): the G rows of a group share their prompt instead of holding G copies.

    A decode step's attention must then read the two parts itself: `shared_prompt_attention(cache)` is the
    wrapper that does (installed with `mapo.models.attention_override.AttentionOverride` on every decoder
    layer); it reads each prompt once for its G rows, where attention over the per-row copies of
    `StaticKVCache` reads it G times. Memory: B·P + N·T columns instead of N·(P + T).

    `keys` / `values` (and `write_position`, `visible`) are the completion part, whose column 0 the first
    decode step writes; prompt_padding: [B, 1, 1, P] bool, True on the prompt's padding keys (made once, read
    by every layer of every step).
    """

    first_column = 0

    def __init__(self, prompt_mask: torch.Tensor, group_size: int, max_new_tokens: int):
        self.columns = max_new_tokens
        super().__init__(prompt_mask, group_size, max_new_tokens)
        self.prompt_padding = ~prompt_mask.bool()[:, None, None, :]
        self.prompt_keys: dict[int, torch.Tensor] = {}
        self.prompt_values: dict[int, torch.Tensor] = {}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Prefill (B rows, P positions): keep them as the prompt part, return them unchanged. Decode (N rows,
        1 position): write at `write_position` of the completion part, return its first `visible` columns."""
        if not self.decoding:
            batch, heads, length, dim = key_states.shape
            if batch != self.num_prompts or length != self.prompt_len:
                raise ValueError(f"SharedPromptKVCache prefill got {tuple(key_states.shape)}; expected {self.num_prompts} "
                                 f"rows and {self.prompt_len} positions")
            self.prompt_keys[layer_idx], self.prompt_values[layer_idx] = key_states, value_states
            self.keys[layer_idx] = key_states.new_zeros(self.rows, heads, self.max_new_tokens, dim)
            self.values[layer_idx] = value_states.new_zeros(self.rows, heads, self.max_new_tokens, value_states.shape[-1])
            return key_states, value_states
        return self._write_column(key_states, value_states, layer_idx)

    def decode_mask(self, mask_kind: str, dtype: torch.dtype) -> tuple[torch.Tensor, bool | float]:
        # shared_prompt_attention reads the completion mask as bool, whatever the model's own kernel takes
        return self.decode_allowed(), True

    def decode_attention(self, decoder_layers):
        """Every decoder layer's attention through `shared_prompt_attention` (prefill calls pass through)."""
        return AttentionOverride([layer.self_attn for layer in decoder_layers], shared_prompt_attention(self),
                                 "shared-prompt decode", labels=[f"decoder layer {i}" for i in range(len(decoder_layers))])


def shared_prompt_attention(cache: SharedPromptKVCache):
    """The `AttentionOverride` wrapper that decodes over a `SharedPromptKVCache`: prefill calls go to the
    module's own function; a decode call (one query per row) attends to its group's prompt keys and its own
    completion keys with one softmax over both.

    query [N, Hq, 1, d]; key/value [N, h_kv, t, d]: the completion part `cache.update` returned; attention_mask
    [N, 1, 1, t] bool (True = a written column). Query head h uses kv head h // (Hq / h_kv), as in
    transformers. Scores and softmax in fp32, both products in the cache's dtype. Returns ([N, 1, Hq, d], None).
    """

    def attention(module, original, query, key, value, attention_mask, *args, scaling=None, **kwargs):
        if not cache.decoding:
            return original(module, query, key, value, attention_mask, *args, scaling=scaling, **kwargs)
        return decode(module.layer_idx, query, key, value, attention_mask, scaling)

    # Left out of a compiled decoder (`mapo.decode_compile`): indexing the per-layer lists makes dynamo
    # specialise on the layer, one recompile per layer until its limit; the few large kernels here gain
    # nothing from fusion, and a CUDA graph replays them either way.
    @torch.compiler.disable
    def decode(layer: int, query, key, value, attention_mask, scaling):
        prompt_keys, prompt_values = cache.prompt_keys[layer], cache.prompt_values[layer]
        batch, kv_heads, prompt_len, dim = prompt_keys.shape
        rows, heads = query.shape[0], query.shape[1]
        group, rep = rows // batch, heads // kv_heads
        scale = dim**-0.5 if scaling is None else scaling
        # prompt part, a group's G rows together against their one prompt: [B, h_kv, G·rep, P]
        grouped = query.reshape(batch, group, kv_heads, rep, dim).transpose(1, 2).reshape(batch, kv_heads, group * rep, dim)
        prompt_scores = torch.matmul(grouped, prompt_keys.transpose(-1, -2)).float().mul_(scale)
        prompt_scores.masked_fill_(cache.prompt_padding, float("-inf"))
        prompt_scores = prompt_scores.view(batch, kv_heads, group, rep, prompt_len).transpose(1, 2)
        # completion part, per row: [N, h_kv, rep, t]
        own_scores = torch.matmul(query.reshape(rows, kv_heads, rep, dim), key.transpose(-1, -2)).float().mul_(scale)
        own_scores.masked_fill_(~attention_mask, float("-inf"))
        probs = torch.cat([prompt_scores.reshape(rows, kv_heads, rep, prompt_len), own_scores], dim=-1).softmax(dim=-1)
        prompt_probs = probs[..., :prompt_len].reshape(batch, group, kv_heads, rep, prompt_len).transpose(1, 2)
        out = torch.matmul(prompt_probs.reshape(batch, kv_heads, group * rep, prompt_len).to(prompt_values.dtype),
                           prompt_values)  # [B, h_kv, G·rep, d]
        out = out.view(batch, kv_heads, group, rep, -1).transpose(1, 2).reshape(rows, kv_heads, rep, -1)
        out = out + torch.matmul(probs[..., prompt_len:].to(value.dtype), value)
        return out.reshape(rows, 1, heads, -1), None

    return attention


def as_mask(allowed: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """allowed [R, 1, Q, L] bool (True = attend) -> the mask format `kind` ("bool" or "additive" in `dtype`)."""
    if kind == "bool":
        return allowed
    if kind == "additive":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)
    raise ValueError(f"unknown mask kind {kind!r}; valid: {', '.join(MASK_KINDS)}")


def prefill_allowed(prompt_mask: torch.Tensor) -> torch.Tensor:
    """prompt_mask [B, P] (1 = token, left padded) -> [B, 1, P, P] bool: causal and not padding."""
    length = prompt_mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=prompt_mask.device).tril_()
    return causal[None, None] & prompt_mask.bool()[:, None, None, :]
