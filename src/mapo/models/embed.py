"""Input embeddings with the audio scattered in: one helper shared by rollout, scoring and training.

An audio LM's own forward encodes `input_features` with the audio tower, projects them, and writes
the result into the token embeddings wherever `input_ids == audio_token_id`. Doing those two steps
ourselves (the encoding through the family's adapter) lets every pass reuse one encoding of a prompt's audio (DESIGN §9) and lets the ablations
of DESIGN §3 swap the audio for nothing, silence or noise. `encode_audio` + `build_inputs_embeds`
reproduce the model's forward exactly (see tests/test_scoring.py).

Audio embeddings travel as one tensor per *sequence row* (`[n_audio_tokens_of_row, H]`, or None for a
row without audio). The model's forward fills the audio positions of the whole batch in row-major
order with the clips concatenated in order, so concatenating the clips and splitting by each row's
count of audio tokens (`split_audio_by_row`) gives each row exactly the embeddings the model would
have written there, also for rows with several clips or none.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mapo.models.adapter import get_adapter


def audio_token_id(model: nn.Module) -> int:
    """Id of the audio placeholder token of `model` (from its family's adapter)."""
    return get_adapter(model).audio_token_id(model)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Rotary positions that skip padding: `cumsum(mask) - 1`, 0 at padded slots (as HF generate does).

    attention_mask: [B, S] (1 = real token) -> position_ids: [B, S] long.
    With left padding the first real token of every row gets position 0, whatever the padding.
    """
    mask = attention_mask.long()
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def audio_span_mask(
    input_ids: torch.Tensor, audio_token_id: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Where the audio embeddings sit: input_ids [B, S] → bool [B, S], True at `<|AUDIO|>` positions
    (and, when attention_mask [B, S] is given, never on padding)."""
    span = input_ids == audio_token_id
    return span if attention_mask is None else span & attention_mask.bool()


def encode_audio(
    model: nn.Module, input_features: torch.Tensor, feature_attention_mask: torch.Tensor
) -> list[torch.Tensor]:
    """The model's audio encoder (tower + projector, as its own forward runs them), via its adapter.

    input_features: [C, n_mels, F] log-mel features of C clips;
    feature_attention_mask: [C, F] (1 = valid mel frame).
    Returns C tensors, clip c: [n_c, H] with n_c = its number of audio tokens and H the text hidden size.
    Runs under the caller's grad mode (no grad for rollout/scoring; grad when the tower is trained).
    """
    if input_features.dim() != 3:
        raise ValueError(f"input_features must be [clips, n_mels, frames], got shape {tuple(input_features.shape)}")
    expected = (input_features.shape[0], input_features.shape[-1])
    if feature_attention_mask is None or tuple(feature_attention_mask.shape) != expected:
        got = None if feature_attention_mask is None else tuple(feature_attention_mask.shape)
        raise ValueError(f"feature_attention_mask must be [clips, frames] = {expected}, got {got}")
    return get_adapter(model).encode_audio(model, input_features, feature_attention_mask)


def split_audio_by_row(
    clip_embeds: Sequence[torch.Tensor], input_ids: torch.Tensor, audio_token: int
) -> list[torch.Tensor | None]:
    """Regroup per-clip embeddings into per-row embeddings (see the module docstring).

    clip_embeds: C tensors [n_c, H] in the order of the clips in the batch; input_ids: [B, S].
    Returns B entries: [n_audio_tokens_of_row, H], or None for a row without audio tokens.
    """
    counts = (input_ids == audio_token).sum(-1).tolist()
    total_tokens = sum(counts)
    total_embeds = sum(int(e.shape[0]) for e in clip_embeds)
    if total_tokens != total_embeds:
        raise ValueError(
            f"audio tokens in input_ids ({total_tokens}, per row {counts}) do not match the audio embeddings "
            f"of the {len(clip_embeds)} clips ({total_embeds}): prompts and input_features disagree"
        )
    if total_tokens == 0:
        return [None] * len(counts)
    pieces = torch.cat(list(clip_embeds), dim=0).split(counts, dim=0)
    return [piece if n > 0 else None for piece, n in zip(pieces, counts)]


def build_inputs_embeds(
    model: nn.Module, input_ids: torch.Tensor, row_audio_embeds: Sequence[torch.Tensor | None] | None
) -> torch.Tensor:
    """Token embeddings with each row's audio embeddings written at its `<|AUDIO|>` positions.

    input_ids: [B, S]; row_audio_embeds: B entries [n_i, H] (n_i = audio tokens of row i) or None.
    A None entry, or `row_audio_embeds=None` for all rows, leaves the placeholders with the bare
    `<|AUDIO|>` token embedding: the "drop features" ablation of DESIGN §3.
    Returns inputs_embeds: [B, S, H], differentiable w.r.t. the token table and the audio embeddings.
    """
    embed_tokens = get_adapter(model).embed_tokens(model)
    input_ids = input_ids.to(embed_tokens.weight.device)
    inputs_embeds = embed_tokens(input_ids)
    if row_audio_embeds is None:
        return inputs_embeds
    if len(row_audio_embeds) != input_ids.shape[0]:
        raise ValueError(f"row_audio_embeds has {len(row_audio_embeds)} entries for {input_ids.shape[0]} rows")
    audio_positions = input_ids == audio_token_id(model)  # [B, S]
    counts = audio_positions.sum(-1).tolist()
    filled_rows, sources = [], []
    for row, (embeds, n) in enumerate(zip(row_audio_embeds, counts)):
        if embeds is None:
            continue
        if embeds.shape[0] != n:
            raise ValueError(f"row {row}: {n} audio tokens but audio embeddings of shape {tuple(embeds.shape)}")
        filled_rows.append(row)
        sources.append(embeds)
    if not filled_rows:
        return inputs_embeds
    row_selected = torch.zeros_like(audio_positions)
    row_selected[filled_rows] = True
    scatter_mask = (audio_positions & row_selected).unsqueeze(-1)  # [B, S, 1]
    source = torch.cat(sources, dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
    # masked_scatter fills in row-major order, which is the order of `sources` (rows ascending).
    return inputs_embeds.masked_scatter(scatter_mask, source)
