"""A preallocated KV cache for the rollout's decode loop, and the attention masks that go with it.

`StaticKVCache` holds, per decoder layer, keys and values of shape [N, h_kv, L, d] allocated once (L = prompt
length + max new tokens). The prompt is prefilled for the B distinct prompts and written into all G rows of
its group without a repeated copy in between; each decode step then writes one column at a position held in
a device tensor, so a step has static shapes and no host synchronisation (what a CUDA graph needs), and
nothing grows by concatenation.

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


class StaticKVCache:
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
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys.index_copy_(2, self.write_position, key_states.to(keys.dtype))
        values.index_copy_(2, self.write_position, value_states.to(values.dtype))
        return keys[:, :, : self.visible], values[:, :, : self.visible]

    def start_decoding(self) -> None:
        if not self.keys:
            raise RuntimeError("StaticKVCache: decode before any prefill")
        self.decoding = True


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
