"""Scoring passes with each prompt computed once per group (DESIGN §9: "prefill the shared prompt once per
group", applied to the scoring and update passes too).

The G completions of a prompt share it, so a full-sequence pass over N = B·G rows computes the prompt's
P positions G times. Here a pass is split in two calls of the text decoder:

1. prefix: the B distinct prompts without their last token, positions 0 … P−2 (B·(P−1) positions);
2. suffix: the N rows, positions P−1 … P+T−2 (the last prompt token, then completion tokens 0 … T−2),
   attending to their prompt's prefix keys/values and causally to their own.

The suffix outputs are exactly the T hidden states that predict the completion tokens, so nothing else is
needed for log-probs, entropies and the audio-attention capture (whose queries are those same positions).
Keys/values of the prefix flow to the suffix through the cache object (`update(key, value, layer_idx)`,
gradients included), with a prepared 4-D mask: the same padding, causal and (for "mask_audio_keys") audio-key
pattern as the full pass, so values equal the full pass up to floating-point rounding (tested, with
gradients). Work: B·(P−1) + N·T positions instead of N·(P+T).

Not used (the full pass runs instead) when: the rows are not in groups of ≥ 2 sharing a prompt, the
family's decoder cannot take a prepared mask (`ModelAdapter.prepared_mask_kind` is None), the prompt has one
column, its last column is an audio position, the full hidden states are wanted (full-vocabulary KL), or a
gradient pass meets transformers' activation checkpointing (which drops the cache argument of checkpointed
layers) or FSDP2-sharded decoder layers (FSDP2 reshards a layer after the backward of its last call, before
the prefix call's backward needs it). Those last two restrict gradient passes only.
"""

from __future__ import annotations

import torch
from torch import nn

from mapo.distributed import fsdp_units
from mapo.kv_cache import as_mask, prefill_allowed
from mapo.models.adapter import get_adapter
from mapo.models.embed import build_inputs_embeds, position_ids_from_mask


class _PrefixCache:
    """Prefix call: remember each layer's keys/values and return them. Suffix call: return the row's prompt
    prefix (rows picked by `prefix_of_row`) followed by the suffix's own keys/values."""

    def __init__(self, prefix_of_row: torch.Tensor):
        self.prefix_of_row = prefix_of_row
        self.prefix: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.in_suffix = False

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if not self.in_suffix:
            self.prefix[layer_idx] = (key_states, value_states)
            return key_states, value_states
        prefix_keys, prefix_values = self.prefix[layer_idx]
        keys = torch.cat([prefix_keys.index_select(0, self.prefix_of_row), key_states], dim=2)
        values = torch.cat([prefix_values.index_select(0, self.prefix_of_row), value_states], dim=2)
        return keys, values


def _checkpointed(model: nn.Module) -> bool:
    return any(getattr(layer, "gradient_checkpointing", False) for layer in get_adapter(model).decoder_layers(model))


def can_share_prefix(model: nn.Module, rollout, *, with_grad: bool, keep_hidden: bool = False) -> bool:
    """Whether a pass of `model` over `rollout` may use the prefix/suffix split (see the module docstring)."""
    if keep_hidden or rollout.group_size < 2 or rollout.prompt_len < 2:
        return False
    if get_adapter(model).prepared_mask_kind(model) is None:
        return False
    # FSDP2's post-backward reshards a layer after the backward of its last call, while the prefix call's
    # backward through the same layer still needs the weights
    if with_grad and (fsdp_units(get_adapter(model).decoder_layers(model)) or (model.training and _checkpointed(model))):
        return False
    return not bool(rollout.audio_mask[:, rollout.prompt_len - 1].any())


def pass_positions(prompts: int, group: int, prompt_len: int, new_tokens: int, shared: bool) -> int:
    """Positions a scoring or update pass runs through the decoder (for the memory plan): the full pass
    prompts·G·(P + T), or with the shared prefix prompts·(P − 1) + prompts·G·T."""
    if shared and group >= 2 and prompt_len >= 2:
        return prompts * (prompt_len - 1) + prompts * group * new_tokens
    return prompts * group * (prompt_len + new_tokens)


def expanded_kv_bytes(rows: int, seq: int, kv_heads: int, head_dim: int, act_bytes: int) -> int:
    """Bytes of one layer's suffix keys and values (the rows' copy of their prompt's prefix and the
    concatenation with their own), which a gradient pass keeps for backward (for the memory plan)."""
    return 2 * 2 * rows * seq * kv_heads * head_dim * act_bytes


def completion_hidden(
    model: nn.Module, rollout, row_audio: list[torch.Tensor | None] | None, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Hidden states [N, T, H] at positions P−1 … P+T−2 (query t predicts completion token t).

    row_audio: N entries of audio embeddings (rows of a group share their prompt's) or None (bare
    placeholders); attention_mask: [N, P+T] the pass's mask (the rollout's, audio keys blocked for
    "mask_audio_keys"). Positions come from the rollout's own mask, as in the full pass.
    """
    adapter = get_adapter(model)
    kind = adapter.prepared_mask_kind(model)
    num_rows, num_tokens = rollout.completion_ids.shape
    prompt_len, group = rollout.prompt_len, rollout.group_size
    embed_tokens = adapter.embed_tokens(model)
    device = embed_tokens.weight.device
    prefix_len = prompt_len - 1
    positions = position_ids_from_mask(rollout.attention_mask).to(device)
    keys_ok = attention_mask.to(device).bool()  # [N, P+T]
    first = torch.arange(0, num_rows, group, device=device)  # one row per prompt

    # 1. prefix: B prompts, positions 0 … P−2
    prefix_audio = None if row_audio is None else [row_audio[i] for i in range(0, num_rows, group)]
    prefix_embeds = build_inputs_embeds(model, rollout.prompt_ids[first, :prefix_len].to(device), prefix_audio)
    prefix_allowed = prefill_allowed(keys_ok[first, :prefix_len])
    cache = _PrefixCache(rollout.group_index.to(device))
    adapter.run_text_model(model, prefix_embeds, as_mask(prefix_allowed, kind, prefix_embeds.dtype),
                           positions[first, :prefix_len], cache=cache)

    # 2. suffix: N rows, the last prompt token and completion tokens 0 … T−2
    suffix_ids = torch.cat([rollout.prompt_ids[:, prefix_len:], rollout.completion_ids[:, : num_tokens - 1]], dim=1)
    suffix_embeds = embed_tokens(suffix_ids.to(device))
    allowed = torch.cat([
        keys_ok[:, None, None, :prefix_len].expand(num_rows, 1, num_tokens, prefix_len),
        prefill_allowed(keys_ok[:, prefix_len : prefix_len + num_tokens]),
    ], dim=-1)  # [N, 1, T, P−1+T]
    cache.in_suffix = True
    return adapter.run_text_model(model, suffix_embeds, as_mask(allowed, kind, suffix_embeds.dtype),
                                  positions[:, prefix_len : prefix_len + num_tokens], cache=cache)
