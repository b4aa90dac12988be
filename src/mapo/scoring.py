"""Scoring passes over a rollout: log-probs and entropies of the completion tokens, with or without audio.

One pass = build the inputs (`sequence_inputs`: how the audio enters), run the base model to hidden
states (`hidden_states`: the forward an attention-capture context manager can wrap), then turn hidden
states into per-token values chunk by chunk (`logprobs_from_hidden`), so the fp32 `[N, T, V]` logits
of the whole batch never exist at once. Alignment (DESIGN §3): completion token t (0-based) is
predicted by the hidden state at position P + t − 1.

Temperature divides the logits before the softmax, so log-probs and entropies are those of the
distribution the rollout sampled from (top-p truncation is not applied: it would give the unsampled
tail log-prob −inf and make ratios and KL undefined).

How the audio enters (`AudioInput`):
  "cached"           the rollout's embeddings (encoded once, DESIGN §9). Exact while the audio tower and
                     projector are the ones that ran at rollout time (frozen, or not yet updated).
  "recompute"        re-encode the rollout's features with *this* model's tower, under the caller's
                     grad mode: a trainable tower/projector, or a reference model whose audio weights
                     differ from the policy's.
  "drop_features"    placeholders keep the bare `<|AUDIO|>` embedding (paper default ablation).
  "mask_audio_keys"  attention mask 0 on the audio positions; positions of the other tokens keep the
                     values computed from the original mask, so nothing shifts.
  "silence"/"noise"  an all-zero / fixed-seed white-noise waveform of each clip's length goes through the
                     feature extractor and this model's tower (same number of audio tokens).
The last four are the ablations of DESIGN §3 (`ABLATION_MODES`); the reference model is the caller's
choice (`pick_reference_model`): the frozen reference or the current policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mapo.models.adapter import get_adapter
from mapo.models.embed import (
    audio_token_id,
    build_inputs_embeds,
    encode_audio,
    position_ids_from_mask,
    split_audio_by_row,
)
from mapo.rollout import Rollout
from mapo.shared_prefix import can_share_prefix, completion_hidden

AblationMode = Literal["drop_features", "mask_audio_keys", "silence", "noise"]
AudioInput = Literal["cached", "recompute", "drop_features", "mask_audio_keys", "silence", "noise"]
ABLATION_MODES: tuple[str, ...] = get_args(AblationMode)
AUDIO_INPUTS: tuple[str, ...] = get_args(AudioInput)
ReferenceChoice = Literal["frozen", "policy"]

#: Token positions per lm_head chunk. 512 × a 152k vocabulary in fp32 is ~0.3 GB per temporary.
DEFAULT_CHUNK_SIZE = 512
#: On CPU a chunk is also capped at this many bytes of fp32 logits: buffers that stay below the allocator's
#: mmap threshold are reused instead of being faulted in afresh for every chunk (measured 1.2-1.4x faster).
CPU_CHUNK_BYTES = 16 * 2**20


def lm_head_chunk_rows(chunk_size: int, vocab: int, device_type: str) -> int:
    """Positions per LM-head chunk as `completion_logprobs` takes them (on CPU also under CPU_CHUNK_BYTES)."""
    if device_type == "cpu":
        return min(chunk_size, max(1, CPU_CHUNK_BYTES // (4 * vocab)))
    return chunk_size


def keeps_logits(device_type: str, compute_bytes: int) -> bool:
    """Whether a scored forward with gradient keeps its [M, V] logits for the backward (`keep_logits=None`):
    on CUDA with a 16-bit compute dtype, where they cost 2 bytes per element against the ~18 that full logits
    peak at, and save the backward's recomputing matmul. Measured on an H200 (2026-11-28, 8×512 positions,
    V = 156,032, bf16, `experiments/gpu/followup_20261128.py`): speed 0.82× → 0.92× of full logits, memory
    0.10 → 0.21 of theirs; the 7B-width update pass went from 36–40 % to 40–41 % MFU. On CPU, in fp32 the kept
    logits would be 4 bytes per element and the chunks there are capped small (CPU_CHUNK_BYTES): kept bf16
    logits took the memory to 0.27 of full logits (8×128 positions, V = 32,000), so CPU recomputes."""
    return device_type == "cuda" and compute_bytes == 2


def lm_head_workspace_bytes(positions: int, vocab: int, chunk_size: int, device_type: str, compute_bytes: int = 4,
                            with_grad: bool = False) -> int:
    """Peak temporary bytes of the log-prob/entropy chunks over `positions` scored positions (for the memory
    plan): two fp32 [chunk, V] buffers (logits then log-probs/gradient, and probabilities), plus the logits in
    the compute dtype before their fp32 copy when that dtype is narrower; with_grad: plus the [positions, V]
    logits kept for the backward where `keeps_logits`."""
    rows = min(positions, lm_head_chunk_rows(chunk_size, vocab, device_type))
    kept = positions * vocab * compute_bytes if with_grad and keeps_logits(device_type, compute_bytes) else 0
    return rows * vocab * (8 + (compute_bytes if compute_bytes < 4 else 0)) + kept


@dataclass
class TokenScores:
    """Per completion token values of one pass; 0 where completion_mask is 0.

    logprobs: [N, T] fp32, log π(y_t | ·) at the sampling temperature.
    entropy:  [N, T] fp32, full-vocabulary entropy of π(· | ·) at that position.
    hidden:   [N, P+T, H] final hidden states, only when asked for (full-vocabulary KL).
    """

    logprobs: torch.Tensor
    entropy: torch.Tensor
    hidden: torch.Tensor | None = None


def pick_reference_model(choice: ReferenceChoice, policy: nn.Module, frozen_reference: nn.Module | None) -> nn.Module:
    """The model of the audio-ablated reference pass: the frozen reference (paper default) or the policy."""
    if choice == "policy":
        return policy
    if choice == "frozen":
        if frozen_reference is None:
            raise ValueError("reference choice 'frozen' needs a frozen reference model, got None")
        return frozen_reference
    raise ValueError(f"unknown reference choice {choice!r}; valid: 'frozen', 'policy'")


def ablation_features(
    feature_extractor,
    feature_attention_mask: torch.Tensor,
    kind: Literal["silence", "noise"],
    *,
    noise_seed: int = 0,
    noise_std: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of a silent / white-noise waveform with the same number of valid frames as each clip.

    feature_attention_mask: [C, F] of the real clips. Every clip gets `L_c · hop_length` samples, which the
    extractor turns into exactly L_c valid frames, hence the same number of audio tokens.
    Noise is N(0, noise_std²) from `np.random.default_rng(noise_seed)`, the same for every clip and call.
    Returns input_features [C, n_mels, F] and feature_attention_mask [C, F].
    """
    if feature_extractor is None:
        raise ValueError(f"the {kind!r} ablation needs a feature_extractor (the processor's), got None")
    hop = int(feature_extractor.hop_length)
    frame_counts = feature_attention_mask.sum(-1).tolist()
    waves = []
    for frames in frame_counts:
        n = int(frames) * hop
        if kind == "silence":
            waves.append(np.zeros(n, dtype=np.float32))
        else:
            waves.append((np.random.default_rng(noise_seed).standard_normal(n) * noise_std).astype(np.float32))
    # Padded to the rollout's own width F (the window for families that pad every clip to it, the longest
    # clip of the batch for Qwen3-Omni), so the ablated features line up with the real ones.
    out = feature_extractor(
        waves, sampling_rate=feature_extractor.sampling_rate, return_attention_mask=True, return_tensors="pt",
        padding="max_length", max_length=int(feature_attention_mask.shape[-1]) * hop,
    )
    features, mask = out["input_features"], out["attention_mask"]
    if features.shape[-1] != feature_attention_mask.shape[-1] or mask.sum(-1).tolist() != frame_counts:
        raise ValueError(
            f"feature_extractor made {features.shape[-1]} frames with valid counts {mask.sum(-1).tolist()}; "
            f"the rollout's clips have {feature_attention_mask.shape[-1]} frames with {frame_counts}: "
            "use the processor's own feature extractor"
        )
    return features, mask


def _encoded_rows(model: nn.Module, rollout: Rollout, features: torch.Tensor, mask: torch.Tensor):
    """Encode C clips with `model`'s tower and hand each of the N rows its prompt's embeddings."""
    clips = encode_audio(model, features, mask)
    per_prompt = split_audio_by_row(clips, rollout.unique_prompt_ids(), audio_token_id(model))
    return [per_prompt[b] for b in rollout.row_prompts()]


def audio_inputs(
    model: nn.Module,
    rollout: Rollout,
    audio: AudioInput = "cached",
    *,
    feature_extractor=None,
    noise_seed: int = 0,
    noise_std: float = 0.1,
) -> tuple[list[torch.Tensor | None] | None, torch.Tensor]:
    """How the audio enters a pass: (per-row audio embeddings (N entries) or None for bare placeholders,
    the attention mask [N, P+T] of the pass: the rollout's, with the audio keys blocked for "mask_audio_keys")."""
    if audio not in AUDIO_INPUTS:
        raise ValueError(f"unknown audio input {audio!r}; valid: {', '.join(AUDIO_INPUTS)}")
    attention_mask = rollout.attention_mask
    has_clips = rollout.input_features is not None
    if audio == "cached":
        rows = rollout.row_audio_embeds()
    elif audio in ("recompute", "silence", "noise") and has_clips:
        features, mask = rollout.input_features, rollout.feature_attention_mask
        if audio != "recompute":
            features, mask = ablation_features(
                feature_extractor, mask, audio, noise_seed=noise_seed, noise_std=noise_std
            )
        rows = _encoded_rows(model, rollout, features, mask)
    else:
        if audio in ("recompute", "silence", "noise") and bool(rollout.has_audio.any()):
            raise ValueError(
                f"audio input {audio!r} re-encodes the clips, but this rollout has audio placeholders and no "
                "input_features (bare placeholders would silently stand in for the audio)"
            )
        # drop_features / mask_audio_keys (or a text-only rollout): placeholders keep bare embeddings.
        rows = None
    if audio == "mask_audio_keys":
        attention_mask = attention_mask.masked_fill(rollout.audio_mask.to(attention_mask.device), 0)
    return rows, attention_mask


def sequence_inputs(model: nn.Module, rollout: Rollout, audio: AudioInput = "cached", **options) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs of a full-sequence pass: inputs_embeds [N, P+T, H], attention_mask [N, P+T], position_ids [N, P+T].

    options: those of `audio_inputs` (feature_extractor, noise_seed, noise_std). Positions always come from
    the rollout's own mask, so they equal the ones used while sampling.
    """
    rows, attention_mask = audio_inputs(model, rollout, audio, **options)
    position_ids = position_ids_from_mask(rollout.attention_mask)
    inputs_embeds = build_inputs_embeds(model, rollout.full_ids, rows)
    return inputs_embeds, attention_mask.to(inputs_embeds.device), position_ids.to(inputs_embeds.device)


def hidden_states(
    model: nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
) -> torch.Tensor:
    """Final (normed) hidden states of the base model, no LM head: [N, S, H].

    This is the forward to wrap in an attention-capture context manager for the policy update.
    """
    return get_adapter(model).run_text_model(model, inputs_embeds, attention_mask, position_ids)


def _chunk_logprob_entropy(
    lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden: [c, H], targets: [c] -> (log-prob of the target [c], entropy [c]), fp32. Plain autograd
    (the path for an LM head that is not a plain `nn.Linear`, e.g. one wrapped by an adapter)."""
    logits = lm_head(hidden).float()
    if temperature != 1.0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)
    token_logp = logp.gather(-1, targets[:, None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return token_logp, entropy


def _chunk_stats(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, temperature: float,
    logits_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk, no autograd: z = (h Wᵀ + b) / T in fp32 -> (log p(target), entropy, logsumexp z), each [c].

    log_softmax once; the probabilities overwrite z (no third [c, V] buffer); entropy = −Σ p·log p as a
    batched dot product; logsumexp z = z_target − log p_target. logits_out: [c, V] in the compute dtype, to
    receive h Wᵀ + b (before the temperature) for a backward that reuses them.
    """
    raw = nn.functional.linear(hidden, weight, bias)
    if logits_out is not None:
        logits_out.copy_(raw)
    z = raw.float()
    if temperature != 1.0:
        z.div_(temperature)  # raw is this call's own temporary (logits_out holds a copy)
    logp = torch.log_softmax(z, dim=-1)
    token_logp = logp.gather(1, targets[:, None]).squeeze(1)
    lse = z.gather(1, targets[:, None]).squeeze(1) - token_logp
    probs = torch.exp(logp, out=z)
    entropy = -torch.bmm(probs[:, None, :], logp[:, :, None]).view(-1)
    return token_logp, entropy, lse


def vocab_slice_width(chunk: int, positions: int, vocab: int) -> int:
    """Vocabulary columns per slice of `_FusedTokenStats`' backward: a [positions, width] slice holds no more
    elements than a forward chunk's [chunk, vocab] logits (so the same memory bound, and on CPU the same
    byte cap, hold for both directions)."""
    return max(1, min(vocab, (chunk * vocab) // max(positions, 1)))


class _FusedTokenStats(torch.autograd.Function):
    """Log-prob of the target and entropy of softmax((h Wᵀ + b) / T), without ever holding the [M, V] logits.

    Forward: `chunk` positions at a time; keeps, besides its inputs, two numbers per position (logsumexp and
    entropy). Backward: a slice of the vocabulary at a time, over all M positions (`vocab_slice_width`):
    recompute the slice's logits (one matmul), turn them in place into the logit gradient
        dL/dz = g_lp·(onehot − p) − g_H·p·(log p + H)          (p, log p from the saved logsumexp),
    then dW[slice] = dzᵀ·h and db[slice] = Σ dz are each written once, by one matmul over every position,
    and dh += dz·W[slice] accumulates in an fp32 [M, H] buffer; all divided by T.

    Why the backward slices the vocabulary rather than the positions: sliced by positions, every chunk adds a
    whole [V, H] weight gradient into an fp32 accumulator. At V = 156k, H = 4096 that is a 2.5 GB buffer (the
    scoring memory went to 0.27 of full logits on an H200) and ~7.7 GB of memory traffic per chunk, more than
    the chunk's matmuls (the speed was 0.58× of full logits there). Sliced by the vocabulary, the weight
    gradient is produced like autograd produces it (one matmul per row block, fp32 accumulation inside,
    rounded once to the compute dtype: the weight's own, or under autocast the autocast dtype, then widened
    to an fp32 weight's dtype) and what accumulates is dh: [M, H], 32× smaller at those widths.
    Peak extra memory is two fp32 [chunk, V]-sized buffers. Under autocast the matmuls run in the dtype the
    forward's linear produced (recorded at forward).
    keep_logits: the forward also writes h Wᵀ + b, in that compute dtype, into one [M, V] buffer, and the
    backward reads its slices instead of recomputing them: one matmul of four saved for 2 bytes per element
    in bf16 (`keeps_logits` says where that is the default, with the measurements). Values are the same either
    way; gradients up to rounding (a matmul over a slice of columns may round unlike one over a chunk of rows).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature: float, chunk: int, keep_logits: bool = False):
        device_type = hidden.device.type
        autocast = torch.is_autocast_enabled(device_type)
        compute_dtype = torch.get_autocast_dtype(device_type) if autocast else weight.dtype
        logits = (torch.empty(hidden.shape[0], weight.shape[0], dtype=compute_dtype, device=hidden.device)
                  if keep_logits else None)  # [M, V]: the backward then reads them instead of recomputing
        parts = [_chunk_stats(hidden[s : s + chunk], weight, bias, targets[s : s + chunk], temperature,
                              None if logits is None else logits[s : s + chunk])
                 for s in range(0, hidden.shape[0], chunk)]
        logp, entropy, lse = (torch.cat(values) for values in zip(*parts))
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy, logits)
        ctx.compute_dtype = compute_dtype
        ctx.temperature, ctx.chunk = temperature, chunk
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, lse, entropy, logits = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dtype, temperature = ctx.compute_dtype, ctx.temperature
        positions, vocab = hidden.shape[0], weight.shape[0]
        width = vocab_slice_width(ctx.chunk, positions, vocab)
        h = hidden.to(dtype)
        g_lp = (torch.zeros_like(lse) if grad_logp is None else grad_logp.float())[:, None]  # [M, 1]
        g_h = (torch.zeros_like(lse) if grad_entropy is None else grad_entropy.float())[:, None]
        c = torch.addcmul(g_lp, g_h, entropy[:, None])  # [M, 1]: dz = −p·(g_H·log p + c) + g_lp·onehot
        neg_g_h, lse = g_h.neg(), lse[:, None]
        d_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        d_weight = torch.empty_like(weight) if need_w else None
        d_bias = torch.empty_like(bias) if need_b else None
        for start in range(0, vocab, width):
            stop = min(start + width, vocab)
            w = weight[start:stop].to(dtype)
            if logits is None:
                z = nn.functional.linear(h, w, None if bias is None else bias[start:stop].to(dtype)).float()
            else:
                z = logits[:, start:stop].to(torch.float32, copy=True)  # (never write into the saved logits)
            if temperature != 1.0:
                z.div_(temperature)
            logp = z.sub_(lse)  # log p, in place
            probs = logp.exp()
            dz = logp.mul_(neg_g_h).sub_(c).mul_(probs)
            del probs
            column = targets - start
            inside = (column >= 0) & (column < stop - start)  # rows whose target lies in this slice
            dz.scatter_add_(1, column.clamp(0, stop - start - 1)[:, None], g_lp * inside[:, None])
            if temperature != 1.0:
                dz.div_(temperature)
            dz_c = dz.to(dtype)
            if need_h:
                d_hidden.add_(dz_c @ w)
            if need_w:
                d_weight[start:stop] = dz_c.t() @ h
            if need_b:
                d_bias[start:stop] = dz.sum(0)
        if d_hidden is not None:
            d_hidden = d_hidden.to(hidden.dtype)
        return d_hidden, d_weight, d_bias, None, None, None, None


def _fusable(lm_head: nn.Module) -> bool:
    """A plain linear head: its weight and bias are all there is to it (a wrapped head takes the autograd path)."""
    return type(lm_head) is nn.Linear


def logprobs_from_hidden(
    lm_head: nn.Module,
    hidden: torch.Tensor,
    completion_ids: torch.Tensor,
    prompt_len: int,
    *,
    completion_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    keep_logits: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the completion tokens and full-vocabulary entropies, `chunk_size` positions at a time.

    hidden: [N, P+T, H]; completion_ids: [N, T]; completion_mask: [N, T] or None.
    Returns (logprobs [N, T], entropy [N, T]) in fp32, 0 where completion_mask is 0.
    Only the positions a mask keeps go through the LM head; on CPU a chunk also stays under CPU_CHUNK_BYTES.
    With grad enabled, a plain linear head uses `_FusedTokenStats` (one custom backward over vocabulary slices;
    the logits recomputed there, or with keep_logits kept from the forward in the compute dtype; None: where
    `keeps_logits`, i.e. on CUDA in bf16/fp16); another head is checkpointed chunk by chunk. Peak memory stays
    at about one chunk of fp32 logits, plus the kept logits.
    """
    num_rows, num_tokens = completion_ids.shape
    if hidden.shape[1] != prompt_len + num_tokens:
        raise ValueError(
            f"hidden has {hidden.shape[1]} positions, expected prompt_len + T = {prompt_len} + {num_tokens}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
    queries = hidden[:, prompt_len - 1 : prompt_len - 1 + num_tokens]
    return completion_logprobs(lm_head, queries, completion_ids, completion_mask=completion_mask,
                               temperature=temperature, chunk_size=chunk_size, keep_logits=keep_logits)


def completion_logprobs(
    lm_head: nn.Module,
    queries: torch.Tensor,
    completion_ids: torch.Tensor,
    *,
    completion_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    keep_logits: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`logprobs_from_hidden` on the T query states themselves: queries [N, T, H] (query t predicts
    completion token t). Returns (logprobs [N, T], entropy [N, T]) fp32, 0 where completion_mask is 0."""
    num_rows, num_tokens = completion_ids.shape
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
    vocab = lm_head.weight.shape[0] if hasattr(lm_head, "weight") else 1
    chunk_size = lm_head_chunk_rows(chunk_size, vocab, queries.device.type)
    needs_grad = torch.is_grad_enabled() and (
        queries.requires_grad or any(p.requires_grad for p in lm_head.parameters())
    )
    device = queries.device
    queries = queries.reshape(num_rows * num_tokens, -1)
    targets = completion_ids.to(device).reshape(-1)
    total = num_rows * num_tokens
    kept = None  # [K] flat positions scored (one nonzero: the only host sync here), or None for all
    if completion_mask is not None:
        kept = completion_mask.to(device).reshape(-1).nonzero().squeeze(1)
        if kept.numel() == total:
            kept = None
        elif kept.numel() > 0:  # (nothing kept: score everything, values zeroed below)
            queries, targets = queries.index_select(0, kept), targets.index_select(0, kept)
    if _fusable(lm_head):
        if needs_grad:
            if keep_logits is None:
                autocast = torch.is_autocast_enabled(device.type)
                compute = torch.get_autocast_dtype(device.type) if autocast else lm_head.weight.dtype
                keep_logits = keeps_logits(device.type, compute.itemsize)
            logprobs, entropy = _FusedTokenStats.apply(
                queries, lm_head.weight, lm_head.bias, targets, float(temperature), chunk_size, keep_logits
            )
        else:
            with torch.no_grad():
                parts = [
                    _chunk_stats(queries[s : s + chunk_size], lm_head.weight, lm_head.bias,
                                 targets[s : s + chunk_size], temperature)[:2]
                    for s in range(0, queries.shape[0], chunk_size)
                ]
            logprobs, entropy = (torch.cat(values) for values in zip(*parts))
    else:
        logprob_chunks, entropy_chunks = [], []
        for start in range(0, queries.shape[0], chunk_size):
            args = (lm_head, queries[start : start + chunk_size], targets[start : start + chunk_size], temperature)
            if needs_grad:
                token_logp, token_entropy = checkpoint(_chunk_logprob_entropy, *args, use_reentrant=False)
            else:
                token_logp, token_entropy = _chunk_logprob_entropy(*args)
            logprob_chunks.append(token_logp)
            entropy_chunks.append(token_entropy)
        logprobs, entropy = torch.cat(logprob_chunks), torch.cat(entropy_chunks)
    if kept is not None and logprobs.shape[0] < total:
        logprobs = logprobs.new_zeros(total).index_copy(0, kept, logprobs)
        entropy = entropy.new_zeros(total).index_copy(0, kept, entropy)
    elif kept is not None:  # nothing kept: every value is zeroed
        logprobs, entropy = logprobs * 0, entropy * 0
    return logprobs.view(num_rows, num_tokens), entropy.view(num_rows, num_tokens)


def score_tokens(
    model: nn.Module,
    rollout: Rollout,
    *,
    audio: AudioInput = "cached",
    feature_extractor=None,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    with_grad: bool = False,
    keep_hidden: bool = False,
    noise_seed: int = 0,
    noise_std: float = 0.1,
    share_prefix: bool | None = None,
) -> TokenScores:
    """One pass of `model` over the rollout. with_grad=False runs under no_grad.
    share_prefix: the caller's `can_share_prefix` decision when it already made one (the capture must
    agree with the pass it records); None decides here.

    When the rollout's rows come in groups that share a prompt (and `can_share_prefix` allows it), each prompt
    is run once and the completions attend to it (`mapo.shared_prefix`); otherwise one full-sequence pass.
    Both give the same values (tested). Returns TokenScores: logprobs [N, T], entropy [N, T] (and hidden
    [N, P+T, H] if keep_hidden, which always takes the full pass).
    """
    lm_head = get_adapter(model).lm_head(model)
    with torch.set_grad_enabled(with_grad):
        if share_prefix is None:
            share_prefix = not keep_hidden and can_share_prefix(model, rollout, with_grad=with_grad)
        if share_prefix:
            rows, attention_mask = audio_inputs(
                model, rollout, audio, feature_extractor=feature_extractor, noise_seed=noise_seed, noise_std=noise_std
            )
            queries = completion_hidden(model, rollout, rows, attention_mask)
            logprobs, entropy = completion_logprobs(
                lm_head, queries, rollout.completion_ids, completion_mask=rollout.completion_mask,
                temperature=temperature, chunk_size=chunk_size,
            )
            return TokenScores(logprobs=logprobs, entropy=entropy)
        inputs = sequence_inputs(
            model, rollout, audio, feature_extractor=feature_extractor, noise_seed=noise_seed, noise_std=noise_std
        )
        hidden = hidden_states(model, *inputs)
        logprobs, entropy = logprobs_from_hidden(
            lm_head,
            hidden,
            rollout.completion_ids,
            rollout.prompt_len,
            completion_mask=rollout.completion_mask,
            temperature=temperature,
            chunk_size=chunk_size,
        )
    return TokenScores(logprobs=logprobs, entropy=entropy, hidden=hidden if keep_hidden else None)


def token_logprobs_and_entropy(model: nn.Module, rollout: Rollout, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprobs [N, T], entropy [N, T]) of the completion tokens.

    options: the keyword arguments of `score_tokens` (audio, feature_extractor, temperature, chunk_size,
    with_grad, ...), passed through unchanged so the two cannot drift apart.
    """
    scores = score_tokens(model, rollout, **options)
    return scores.logprobs, scores.entropy


def reference_pass(
    ref_model: nn.Module,
    rollout: Rollout,
    mode: AblationMode = "drop_features",
    *,
    feature_extractor=None,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    keep_hidden: bool = False,
    noise_seed: int = 0,
    noise_std: float = 0.1,
) -> TokenScores:
    """The audio-ablated reference pass of DESIGN §3 (no grad). ref_model: see `pick_reference_model`.

    Returns TokenScores: logprobs [N, T], entropy [N, T] of π_ref(· | ablated audio, text, y_<t).
    """
    if mode not in ABLATION_MODES:
        raise ValueError(f"unknown ablation mode {mode!r}; valid: {', '.join(ABLATION_MODES)}")
    return score_tokens(
        ref_model,
        rollout,
        audio=mode,
        feature_extractor=feature_extractor,
        temperature=temperature,
        chunk_size=chunk_size,
        keep_hidden=keep_hidden,
        noise_seed=noise_seed,
        noise_std=noise_std,
    )


def delta_entropy(
    entropy_ref_ablated: torch.Tensor, entropy_policy: torch.Tensor, completion_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Δh_t = H(π_ref | audio ablated) − H(π_θ | audio). All [N, T]; 0 where completion_mask is 0."""
    delta = entropy_ref_ablated - entropy_policy
    return delta if completion_mask is None else delta * completion_mask.to(delta.dtype)


def kl_score(
    logprobs_policy: torch.Tensor, logprobs_ablated: torch.Tensor, completion_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Sampled-token estimate of KL(π_θ ‖ π_ablated): log π_θ(y_t) − log π_ablated(y_t). All [N, T]."""
    score = logprobs_policy - logprobs_ablated
    return score if completion_mask is None else score * completion_mask.to(score.dtype)


@torch.no_grad()
def kl_full_vocabulary(
    policy_lm_head: nn.Module,
    policy_hidden: torch.Tensor,
    ablated_lm_head: nn.Module,
    ablated_hidden: torch.Tensor,
    prompt_len: int,
    *,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Exact KL(π_θ ‖ π_ablated) = Σ_v p_θ(v)·(log p_θ(v) − log p_abl(v)) at each completion position, chunked.

    policy_hidden, ablated_hidden: [N, P+T, H] (e.g. `score_tokens(..., keep_hidden=True).hidden`);
    completion_mask: [N, T]. Returns [N, T] fp32, 0 where the mask is 0.
    """
    num_rows, num_tokens = completion_mask.shape
    span = slice(prompt_len - 1, prompt_len - 1 + num_tokens)
    policy_q = policy_hidden[:, span].reshape(num_rows * num_tokens, -1)
    ablated_q = ablated_hidden[:, span].reshape(num_rows * num_tokens, -1)
    chunks = []
    for start in range(0, policy_q.shape[0], chunk_size):
        stop = start + chunk_size
        logp = torch.log_softmax(policy_lm_head(policy_q[start:stop]).float() / temperature, dim=-1)
        logq = torch.log_softmax(ablated_lm_head(ablated_q[start:stop]).float() / temperature, dim=-1)
        chunks.append((logp.exp() * (logp - logq)).sum(-1))
    kl = torch.cat(chunks).view(num_rows, num_tokens)
    return kl * completion_mask.to(kl.device, kl.dtype)
