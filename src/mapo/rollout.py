"""Rollout: G sampled completions per prompt, with our own KV-cached decode loop.

Why not `model.generate`: we want (1) each prompt's audio encoded once and its embeddings kept for the
later passes, (2) the shared prompt prefilled once per group and the cache expanded ×G afterwards
(generate expands the inputs first and prefills every copy), (3) per-prompt random generators, so a
prompt gets the same samples whatever batch or rank it lands in, and (4) a hook that keeps ranks
stepping together under FSDP until every rank is done. The loop stays greedy-equal to
`generate(do_sample=False)` (tested).

Sampling: logits of suppressed tokens -> -inf (the `<|AUDIO|>` token is always suppressed: an audio
placeholder inside a completion would break every later pass), divide by temperature, keep the
smallest set of most likely tokens whose mass reaches top_p, draw by inverse CDF with one uniform
number per row. Rows that have emitted EOS keep receiving `pad_token_id`; the completion mask is 1 up
to and including the first EOS.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from mapo.models.adapter import get_adapter
from mapo.models.embed import (
    audio_token_id,
    build_inputs_embeds,
    encode_audio,
    position_ids_from_mask,
    split_audio_by_row,
)


@dataclass
class Rollout:
    """The sampled batch: N = B·G rows, row i belongs to prompt i // G (rows of a group are contiguous).

    prompt_ids:        [N, P] long, left-padded prompts (row i = prompt i // G).
    completion_ids:    [N, T] long, sampled tokens left-aligned; `pad_token_id` after the first EOS.
    completion_mask:   [N, T] long, 1 up to and including the first EOS, 0 after.
    attention_mask:    [N, P+T] long, prompt padding mask followed by completion_mask.
    audio_mask:        [N, P+T] bool, True at the `<|AUDIO|>` positions of the prompt.
    group_index:       [N] long, the prompt each row came from.
    has_audio:         [N] bool, the row's prompt has at least one audio token.
    prompt_audio_embeds: B entries, [n_b, H] audio embeddings of prompt b (all its clips in order) or
                       None for a text-only prompt; computed once at rollout, reusable by later passes
                       while the audio tower and projector are unchanged.
    input_features:    [C, n_mels, F] the clips' features as given (None without audio); kept for passes
                       that re-encode (another model's tower, silence/noise ablations).
    feature_attention_mask: [C, F] or None, alongside input_features.
    group_size:        G.
    """

    prompt_ids: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    attention_mask: torch.Tensor
    audio_mask: torch.Tensor
    group_index: torch.Tensor
    has_audio: torch.Tensor
    prompt_audio_embeds: list[torch.Tensor | None]
    input_features: torch.Tensor | None
    feature_attention_mask: torch.Tensor | None
    group_size: int

    @property
    def full_ids(self) -> torch.Tensor:
        """[N, P+T] prompt then completion."""
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def prompt_len(self) -> int:
        """P: completion token t (0-based) sits at P + t and is predicted by the query at P + t − 1."""
        return self.prompt_ids.shape[1]

    @property
    def num_prompts(self) -> int:
        return len(self.prompt_audio_embeds)

    def unique_prompt_ids(self) -> torch.Tensor:
        """[B, P] one copy of each prompt (row b·G)."""
        return self.prompt_ids[:: self.group_size]

    def row_audio_embeds(self) -> list[torch.Tensor | None]:
        """N entries: the cached audio embeddings of each row's prompt (shared, not copied)."""
        return [self.prompt_audio_embeds[b] for b in self.group_index.tolist()]


def _check_left_padded(attention_mask: torch.Tensor) -> None:
    """A left-padded mask never goes from 1 back to 0 along a row."""
    if (attention_mask[:, 1:] < attention_mask[:, :-1]).any():
        rows = torch.nonzero((attention_mask[:, 1:] < attention_mask[:, :-1]).any(-1)).flatten().tolist()
        raise ValueError(f"prompt_batch.attention_mask must be left-padded; rows {rows} have padding after tokens")
    if (attention_mask[:, -1] == 0).any():
        raise ValueError("prompt_batch.attention_mask: a prompt is empty or right-padded (last column is 0)")


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter. logits: [R, V] -> [R, V] with -inf outside the smallest most-likely set of mass ≥ top_p.

    A token is dropped when the tokens ranked strictly above it already hold ≥ top_p of the mass, so the
    most likely token is always kept.
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    sorted_probs = sorted_logits.softmax(dim=-1)
    mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop_sorted = mass_above >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_from_probs(
    probs: torch.Tensor, generators: Sequence[torch.Generator] | None, group_size: int
) -> torch.Tensor:
    """Inverse-CDF draw, one uniform number per row. probs: [R, V] -> tokens [R] long.

    With generators, rows [b·G, (b+1)·G) draw from generators[b], so a prompt's draws do not depend on
    the other prompts of the batch. A token of zero probability is never drawn.
    """
    if generators is None:
        uniforms = torch.rand(probs.shape[0], 1, device=probs.device, dtype=probs.dtype)
    else:
        uniforms = torch.cat(
            [torch.rand(group_size, 1, generator=g, device=probs.device, dtype=probs.dtype) for g in generators]
        )
    cdf = probs.cumsum(dim=-1)
    # Scale by the row total rather than assume it is exactly 1 in floating point.
    targets = uniforms * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, targets, right=True).squeeze(-1)
    return tokens.clamp_(max=probs.shape[-1] - 1)


def _next_tokens(
    logits: torch.Tensor,
    *,
    suppress: torch.Tensor | None,
    do_sample: bool,
    temperature: float,
    top_p: float,
    generators: Sequence[torch.Generator] | None,
    group_size: int,
) -> torch.Tensor:
    """logits: [N, V] fp32 -> next tokens [N]."""
    if suppress is not None:
        logits = logits.masked_fill(suppress, float("-inf"))
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = top_p_filter(logits / temperature, top_p)
    return sample_from_probs(logits.softmax(dim=-1), generators, group_size)


def _as_eos_list(eos_token_id: int | Sequence[int]) -> list[int]:
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not ids:
        raise ValueError("eos_token_id must name at least one token")
    return ids


def completion_mask_from_ids(completion_ids: torch.Tensor, eos_ids: Sequence[int]) -> torch.Tensor:
    """[N, T] -> [N, T] long: 1 up to and including the first EOS of the row, 0 after."""
    is_eos = torch.isin(completion_ids, torch.tensor(list(eos_ids), device=completion_ids.device)).long()
    eos_before = is_eos.cumsum(dim=-1) - is_eos
    return (eos_before == 0).long()


@torch.no_grad()
def generate_rollout(
    model: nn.Module,
    prompt_batch: Mapping[str, torch.Tensor],
    *,
    group_size: int,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int],
    pad_token_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    do_sample: bool = True,
    suppress_token_ids: Sequence[int] = (),
    seeds: Sequence[int] | None = None,
    sync_finished: Callable[[bool], bool] | None = None,
    drop_audio: bool = False,
) -> Rollout:
    """Sample `group_size` completions for each prompt of a processor batch.

    prompt_batch: `input_ids` [B, P] and `attention_mask` [B, P] (left-padded), optional
    `input_features` [C, n_mels, F] and `feature_attention_mask` [C, F] for the C clips of the batch.
    seeds: one per prompt; the G rows of prompt b then draw from `torch.Generator().manual_seed(seeds[b])`
    (reproducible per prompt); None uses the global RNG.
    sync_finished: called every step with "all rows of this process are done"; returns "all rows of all
    processes are done" (e.g. an all-reduce). Every process then runs the same number of forwards,
    which FSDP needs. The rollout itself never touches torch.distributed.
    drop_audio: sample with the audio features dropped (placeholders keep their bare embedding, the
    "drop_features" ablation): the language-prior floor used by evaluation. The tower never runs.
    Returns a Rollout with N = B·G rows and T ≤ max_new_tokens completion columns.
    """
    input_ids = prompt_batch["input_ids"]
    prompt_mask = prompt_batch["attention_mask"]
    input_features = prompt_batch.get("input_features")
    feature_attention_mask = prompt_batch.get("feature_attention_mask")
    if input_ids.dim() != 2 or prompt_mask.shape != input_ids.shape:
        raise ValueError(
            f"prompt_batch: input_ids {tuple(input_ids.shape)} and attention_mask {tuple(prompt_mask.shape)} "
            "must be the same [B, P]"
        )
    if group_size < 1 or max_new_tokens < 1:
        raise ValueError(f"group_size ({group_size}) and max_new_tokens ({max_new_tokens}) must be ≥ 1")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    num_prompts = input_ids.shape[0]
    if seeds is not None and len(seeds) != num_prompts:
        raise ValueError(f"seeds has {len(seeds)} entries for {num_prompts} prompts")
    _check_left_padded(prompt_mask)
    eos_ids = _as_eos_list(eos_token_id)

    adapter = get_adapter(model)
    embed_tokens, lm_head = adapter.embed_tokens(model), adapter.lm_head(model)
    device = embed_tokens.weight.device
    input_ids, prompt_mask = input_ids.to(device), prompt_mask.to(device)
    audio_token = audio_token_id(model)
    vocab_size = adapter.vocab_size(model)
    suppress = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    suppress[[audio_token, *suppress_token_ids]] = True
    if suppress[eos_ids].any():
        raise ValueError("suppress_token_ids must not contain an EOS token")
    generators = None
    if seeds is not None:
        generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

    was_training = model.training
    model.eval()
    try:
        # 1. Encode each prompt's audio once; the embeddings are kept for later passes.
        if input_features is not None and not drop_audio:
            clip_embeds = encode_audio(model, input_features, feature_attention_mask)
            prompt_audio_embeds = split_audio_by_row(clip_embeds, input_ids, audio_token)
        else:
            if (input_ids == audio_token).any() and not drop_audio:
                raise ValueError("prompt_batch has <|AUDIO|> tokens but no input_features")
            prompt_audio_embeds = [None] * num_prompts

        # 2. Prefill the B distinct prompts once, then copy cache and last logits G times.
        kv_cache = adapter.new_cache(model)
        positions = position_ids_from_mask(prompt_mask)
        prefill = adapter.run_text_model(
            model, build_inputs_embeds(model, input_ids, prompt_audio_embeds), prompt_mask, positions, cache=kv_cache
        )
        logits = lm_head(prefill[:, -1]).float()  # [B, V]
        kv_cache.batch_repeat_interleave(group_size)
        logits = logits.repeat_interleave(group_size, dim=0)  # [N, V]
        step_mask = prompt_mask.repeat_interleave(group_size, dim=0)  # [N, P + t]
        # Left padding: the last prompt column is real for every row, so the next position follows it.
        next_position = positions[:, -1:].repeat_interleave(group_size, dim=0) + 1  # [N, 1]

        # 3. Token-by-token decode, feeding only the new token.
        num_rows = num_prompts * group_size
        finished = torch.zeros(num_rows, dtype=torch.bool, device=device)
        eos_tensor = torch.tensor(eos_ids, device=device)
        new_tokens: list[torch.Tensor] = []
        for step in range(max_new_tokens):
            tokens = _next_tokens(
                logits,
                suppress=suppress,
                do_sample=do_sample,
                temperature=temperature,
                top_p=top_p,
                generators=generators,
                group_size=group_size,
            )
            tokens = tokens.masked_fill(finished, pad_token_id)
            new_tokens.append(tokens)
            finished |= torch.isin(tokens, eos_tensor)
            all_done = bool(finished.all())
            if sync_finished is not None:
                all_done = bool(sync_finished(all_done))
            if all_done or step == max_new_tokens - 1:
                break
            step_mask = torch.cat([step_mask, step_mask.new_ones(num_rows, 1)], dim=1)
            hidden = adapter.run_text_model(model, embed_tokens(tokens[:, None]), step_mask, next_position, cache=kv_cache)
            logits = lm_head(hidden[:, -1]).float()
            next_position = next_position + 1
    finally:
        model.train(was_training)

    completion_ids = torch.stack(new_tokens, dim=1)  # [N, T]
    completion_mask = completion_mask_from_ids(completion_ids, eos_ids)
    prompt_ids = input_ids.repeat_interleave(group_size, dim=0)
    prompt_mask_rows = prompt_mask.repeat_interleave(group_size, dim=0).long()
    prompt_audio = (prompt_ids == audio_token) & (prompt_mask_rows == 1)
    return Rollout(
        prompt_ids=prompt_ids,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        attention_mask=torch.cat([prompt_mask_rows, completion_mask], dim=1),
        audio_mask=torch.cat([prompt_audio, torch.zeros_like(completion_mask, dtype=torch.bool)], dim=1),
        group_index=torch.arange(num_prompts, device=device).repeat_interleave(group_size),
        has_audio=prompt_audio.any(dim=1),
        prompt_audio_embeds=prompt_audio_embeds,
        input_features=input_features,
        feature_attention_mask=feature_attention_mask,
        group_size=group_size,
    )
