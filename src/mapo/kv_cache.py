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

import torch

MASK_KINDS = ("bool", "additive")


class _ColumnCache:
    """The decode half both caches share: per layer, `keys` / `values` buffers [rows, h_kv, columns, d], one
    column written per step at `write_position`, the first `visible` columns returned."""

    keys: dict[int, torch.Tensor]
    values: dict[int, torch.Tensor]
    write_position: torch.Tensor
    visible: int
    decoding: bool

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
    """Keys/values [rows, h_kv, max_len, d] per layer, allocated on the first prefill `update` of each layer.

    rows = num_prompts · group_size; row r belongs to prompt r // group_size.
    write_position: [1] long tensor on the model's device, the column the next decode step writes (the
    caller advances it in place after each step).
    """

    def __init__(self, num_prompts: int, group_size: int, max_len: int, write_position: torch.Tensor):
        self.num_prompts, self.group_size, self.max_len = num_prompts, group_size, max_len
        self.rows = num_prompts * group_size
        self.write_position = write_position
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.decoding = False
        self.visible = max_len  # columns a decode step's attention reads (set by the caller per step)

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

    write_position: [1] long on the model's device, the *completion* column the next decode step writes
    (0 at the first step; the caller advances it in place). prompt_allowed: [B, 1, 1, P] bool, the prompt's
    non-padding keys. `visible`: completion columns a step reads (set by the caller per step).
    """

    def __init__(self, num_prompts: int, group_size: int, max_new_tokens: int, write_position: torch.Tensor,
                 prompt_allowed: torch.Tensor):
        if prompt_allowed.dim() != 4 or prompt_allowed.shape[0] != num_prompts or prompt_allowed.dtype != torch.bool:
            raise ValueError(f"prompt_allowed must be [{num_prompts}, 1, 1, P] bool, got {prompt_allowed.dtype} "
                             f"{tuple(prompt_allowed.shape)}")
        self.num_prompts, self.group_size, self.max_new_tokens = num_prompts, group_size, max_new_tokens
        self.rows = num_prompts * group_size
        self.write_position, self.prompt_allowed = write_position, prompt_allowed
        self.prompt_keys: dict[int, torch.Tensor] = {}
        self.prompt_values: dict[int, torch.Tensor] = {}
        self.keys: dict[int, torch.Tensor] = {}  # completion part
        self.values: dict[int, torch.Tensor] = {}
        self.decoding = False
        self.visible = max_new_tokens

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Prefill (B rows, P positions): keep them as the prompt part, return them unchanged. Decode (N rows,
        1 position): write at `write_position` of the completion part, return its first `visible` columns."""
        if not self.decoding:
            batch, heads, length, dim = key_states.shape
            if batch != self.num_prompts or length != self.prompt_allowed.shape[-1]:
                raise ValueError(f"SharedPromptKVCache prefill got {tuple(key_states.shape)}; expected {self.num_prompts} "
                                 f"rows and {self.prompt_allowed.shape[-1]} positions")
            self.prompt_keys[layer_idx], self.prompt_values[layer_idx] = key_states, value_states
            self.keys[layer_idx] = key_states.new_zeros(self.rows, heads, self.max_new_tokens, dim)
            self.values[layer_idx] = value_states.new_zeros(self.rows, heads, self.max_new_tokens, value_states.shape[-1])
            return key_states, value_states
        return self._write_column(key_states, value_states, layer_idx)


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
        prompt_keys, prompt_values = cache.prompt_keys[module.layer_idx], cache.prompt_values[module.layer_idx]
        batch, kv_heads, prompt_len, dim = prompt_keys.shape
        rows, heads = query.shape[0], query.shape[1]
        group, rep = rows // batch, heads // kv_heads
        scale = dim**-0.5 if scaling is None else scaling
        # prompt part, a group's G rows together against their one prompt: [B, h_kv, G·rep, P]
        grouped = query.reshape(batch, group, kv_heads, rep, dim).transpose(1, 2).reshape(batch, kv_heads, group * rep, dim)
        prompt_scores = torch.matmul(grouped, prompt_keys.transpose(-1, -2)).float().mul_(scale)
        prompt_scores.masked_fill_(~cache.prompt_allowed, float("-inf"))
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
