"""One GRPO/MAPO update on (part of) a rollout: L = L_PG(ω̃) + β·L_KL + η·L_attn (DESIGN §3).

The loop (rl.py) prepares everything that needs no gradient once per rollout (`prepare_batch`:
advantages, the reference log-probs for the KL, the audio-ablated reference entropies, the sequence gate
inputs, and, when needed, π_old, Δh and ω̃) and then runs `update_on_rollout`: `updates_per_rollout`
passes over the rows, each pass split into `mini_batches` optimizer steps, each step accumulated over
micro-batches of `mapo_step`. `grpo` is the same function with the mask off (ω̃ ≡ 1) and η = 0: the
config decides, there is no separate code path.

Where this departs from a literal reading of DESIGN §3, and why:
- π_old pass. When a rollout feeds exactly one optimizer step (one pass, one mini-batch), π_old is the
  policy itself, so the old log-probs and the policy entropy used for Δh are taken (detached) from the
  training forward instead of a separate no-grad pass: the same numbers, one forward fewer. A separate
  no-grad pass (`prepare_batch`, before the first update) runs when that is not exact: several passes
  or mini-batches (the ratio must use the sampling policy), `loss_agg=token_mean` with the mask (its
  normaliser is the global Σ ω̃, needed before the first micro-batch), and the `quantile` mask (ranked
  over the whole local batch, not one micro-batch). Δh and ω̃ are then computed once, from π_old, and
  stay fixed over every update of the rollout (the paper's release also computes Δh once per generation).
- The policy entropy in Δh is the entropy at the sampling temperature, like the reference's.
- Token-level aggregation modes weight by ω̃ and normalise by the global Σ ω̃ (DESIGN: "token-level modes
  weight the global sums the same way"); per-sequence modes normalise each row by its own Σ ω̃ inside
  `aggregate` (DESIGN's L_PG formula).
- Overlong filter (`algo.overlong_filter`): a completion cut at max_new_tokens (no EOS) has an unknown
  outcome, so its reward-driven terms are dropped: it leaves L_PG (weight 0, and it is not counted in
  L_PG's normalisers) and L_attn (whose sequence gate g_i is built from the same outcome: f_i = 1 only
  because the answer was cut off, and |Â_i|). The KL penalty keeps it: the KL is a regulariser toward the
  reference that does not depend on the outcome, and the filtered text is still the policy's own sample.
  Advantages are computed before the filter, over every completion of the group (as in the release).
- PPO mini-batches: the rows of a pass are shuffled with a seed from (trainer.seed, step, pass) and split
  into k equal parts, so a group's completions may land in different mini-batches; each mini-batch's
  losses are normalised by its own global counts (it is one optimizer step).
- The `kl_full` score runs the ablated reference's hidden states through the *policy's* LM head (the
  two models cannot be gathered at once under FSDP): exact while the LM head is frozen (LoRA) or at the
  first step, an approximation when a trained LM head drifts from the reference's.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from mapo.algos import losses, mapo
from mapo.capture import capture_audio_attention, completion_mass
from mapo.config import AlgoConfig
from mapo.eval.positions import relative_bins
from mapo.models.adapter import get_adapter
from mapo.models.embed import build_inputs_embeds, encode_audio, split_audio_by_row
from mapo.rollout import Rollout, as_eos_list
from mapo.scoring import (
    DEFAULT_CHUNK_SIZE,
    delta_entropy,
    kl_full_vocabulary,
    kl_score,
    pick_reference_model,
    reference_pass,
    score_tokens,
)
from mapo.shared_prefix import can_share_prefix

#: Relative-position buckets of the audio-mass metric (the collapse curve, DESIGN §6).
MASS_BUCKETS = 4


@dataclass
class PreparedBatch:
    """No-grad inputs of the update for the N local rows of a rollout (all [N] or [N, T]).

    advantages:      [N] group-relative advantages Â.
    accuracy:        [N] the accuracy reward (the sequence gate's f_i = 1[accuracy ≤ 0]).
    ref_logprobs:    [N, T] frozen reference with audio (KL term), or None when β = 0.
    ablated:         [N, T] the audio-ablated reference's entropy (score "entropy") or log-probs
                     (scores "kl_token"), or None when neither the mask nor the attention loss is on.
    ablated_hidden:  [N, P+T, H] the ablated reference's hidden states (score "kl_full" only, and only
                     while Δh is computed in the update; None once `delta_h` holds it).
    old_logprobs:    [N, T] π_old log-probs, or None (then π_old = the policy of the training forward).
    old_entropy:     [N, T] π_old entropy for Δh, alongside old_logprobs.
    content_gate:    [N, T] bool, p_t of the attention loss (content tokens, or all valid tokens).
    pg_rows:         [N] bool, rows that enter L_PG and L_attn (False: removed by the overlong filter).
    delta_h:         [N, T] Δh (or its KL score) from π_old, when the π_old pass ran; else None
                     (then each update computes it from its training forward).
    omega:           [N, T] ω̃ over the whole local batch, when delta_h is set and the mask is on.
    """

    advantages: torch.Tensor
    accuracy: torch.Tensor
    ref_logprobs: torch.Tensor | None
    ablated: torch.Tensor | None
    ablated_hidden: torch.Tensor | None
    old_logprobs: torch.Tensor | None
    old_entropy: torch.Tensor | None
    content_gate: torch.Tensor
    pg_rows: torch.Tensor
    delta_h: torch.Tensor | None = None
    omega: torch.Tensor | None = None


@dataclass
class Normalisers:
    """Global (all ranks, all micro-batches of one optimizer step) counts that make micro-batched losses exact.

    num_tokens: Σ of the L_PG aggregation weights (mask·ω̃ on the rows that enter L_PG), token-level modes.
    num_seqs:   number of sequences in L_PG and L_attn (the overlong filter removes some).
    max_len:    the generation budget (dr_grpo mode).
    kl_seqs:    number of sequences in the KL term (every row); None = num_seqs.
    """

    num_tokens: torch.Tensor | float
    num_seqs: int | torch.Tensor
    max_len: int
    kl_seqs: int | torch.Tensor | None = None


def uses_ablated_reference(algo: AlgoConfig) -> bool:
    return algo.name != "sft" and (algo.mask.enabled or algo.attn.eta > 0)


def uses_kl_reference(algo: AlgoConfig) -> bool:
    return algo.name != "sft" and algo.beta > 0


def needs_frozen_reference(algo: AlgoConfig) -> bool:
    """Whether a training run holds a frozen reference (a frozen copy, or with LoRA the model with its
    adapters off): for the KL term, or for the audio-ablated pass when `reference.model` is "frozen"."""
    return uses_kl_reference(algo) or (uses_ablated_reference(algo) and algo.reference.model == "frozen")


def optimizer_steps_per_rollout(algo: AlgoConfig) -> int:
    """Optimizer steps one rollout feeds: `updates_per_rollout` passes × `mini_batches` steps each."""
    if algo.updates_per_rollout < 1 or algo.mini_batches < 1:
        raise ValueError(
            f"algo.updates_per_rollout ({algo.updates_per_rollout}) and algo.mini_batches ({algo.mini_batches}) must be ≥ 1"
        )
    return algo.updates_per_rollout * algo.mini_batches


def needs_old_pass(algo: AlgoConfig) -> bool:
    """Whether π_old (and Δh, ω̃) must come from a no-grad pass before the first update (module docstring)."""
    if optimizer_steps_per_rollout(algo) > 1:
        return True
    return algo.mask.enabled and (algo.loss_agg == "token_mean" or algo.mask.kind == "quantile")


def truncated_rows(completion_ids: torch.Tensor, eos_token_id: int | list[int] | tuple[int, ...]) -> torch.Tensor:
    """[N, T] completion ids → [N] bool: the row never emitted an EOS (it was cut at max_new_tokens)."""
    eos = torch.tensor(as_eos_list(eos_token_id), device=completion_ids.device)
    return ~torch.isin(completion_ids, eos).any(dim=-1)


Call = Callable[..., object]  # call(fn, *args, **kwargs) = fn(model, *args, **kwargs), see ModelRunner


def plain_call(model: nn.Module) -> Call:
    """`call` for a model used without FSDP."""
    return lambda fn, *args, **kwargs: fn(model, *args, **kwargs)


@torch.no_grad()
def prepare_batch(
    policy: Call,
    rollout: Rollout,
    advantages: torch.Tensor,
    accuracy: torch.Tensor,
    algo: AlgoConfig,
    *,
    frozen_reference: Call | None,
    feature_extractor,
    content_vocab_mask: torch.Tensor | None,
    temperature: float,
    audio_input: str = "cached",
    old_pass: bool | None = None,
    truncated: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> PreparedBatch:
    """Everything the update needs that has no gradient, computed once per rollout.

    policy, frozen_reference: calls into the policy / the initial policy (`plain_call(model)` or a
    ModelRunner); frozen_reference is None when neither β nor the frozen ablated reference needs it.
    advantages, accuracy: [N].
    audio_input: how the policy sees the audio ("cached" while its tower is frozen, else "recompute").
    old_pass: run the π_old pass (and fix Δh, ω̃ from it); None = `needs_old_pass(algo)`. False where
              the config needs it is an error (the losses would not be what the config says).
    truncated: [N] bool rows cut at max_new_tokens (`truncated_rows`); with `algo.overlong_filter` they
               leave L_PG and L_attn. None = no row is truncated.
    """
    device = rollout.completion_ids.device
    mask = rollout.completion_mask.bool()
    if old_pass is None:
        old_pass = needs_old_pass(algo)
    elif not old_pass and needs_old_pass(algo):
        raise ValueError(
            "prepare_batch(old_pass=False) but this config needs the π_old pass (several optimizer steps per "
            "rollout, loss_agg=token_mean with the mask, or the quantile mask)"
        )
    ref_logprobs = None
    if uses_kl_reference(algo):
        if frozen_reference is None:
            raise ValueError("algo.beta > 0 needs a frozen reference model")
        ref_audio = "cached" if audio_input == "cached" else "recompute"
        ref_logprobs = frozen_reference(
            score_tokens, rollout, audio=ref_audio, temperature=temperature, chunk_size=chunk_size
        ).logprobs
    ablated = ablated_hidden = None
    if uses_ablated_reference(algo):
        ref_call = pick_reference_model(algo.reference.model, policy, frozen_reference)
        scores = ref_call(
            reference_pass,
            rollout,
            algo.reference.ablation,
            feature_extractor=feature_extractor,
            temperature=temperature,
            chunk_size=chunk_size,
            keep_hidden=algo.mask.score == "kl_full",
        )
        ablated = scores.logprobs if algo.mask.score == "kl_token" else scores.entropy
        ablated_hidden = scores.hidden
    old_logprobs = old_entropy = delta_h = omega = None
    if old_pass:
        old = policy(
            score_tokens, rollout, audio=audio_input, temperature=temperature, chunk_size=chunk_size,
            keep_hidden=ablated_hidden is not None,
        )
        old_logprobs, old_entropy = old.logprobs, old.entropy
        if ablated is not None:
            if algo.mask.score == "kl_full":
                delta_h = policy(_kl_full, old.hidden, ablated_hidden, rollout, temperature, chunk_size)
                ablated_hidden = None  # Δh holds what was needed; free the [N, P+T, H] states
            else:
                delta_h = relevance_score(algo, old_logprobs, old_entropy, ablated) * mask
            if algo.mask.enabled:
                omega = _relevance(algo, delta_h, mask)
    if algo.attn.token_gate == "content":
        if content_vocab_mask is None:
            raise ValueError("algo.attn.token_gate=content needs a content vocabulary mask")
        gate = mapo.content_token_gate(rollout.completion_ids, content_vocab_mask.to(device)) & mask
    elif algo.attn.token_gate == "all":
        gate = mask
    else:
        raise ValueError(f"algo.attn.token_gate must be content or all, got {algo.attn.token_gate!r}")
    gate = gate & rollout.has_audio.to(device)[:, None]  # no audio span, no attention to pull toward it
    pg_rows = torch.ones(mask.shape[0], dtype=torch.bool, device=device)
    if algo.overlong_filter and truncated is not None:
        if truncated.shape != pg_rows.shape:
            raise ValueError(f"truncated must be [N] = {tuple(pg_rows.shape)}, got {tuple(truncated.shape)}")
        pg_rows = ~truncated.to(device).bool()
    return PreparedBatch(
        advantages=advantages.to(device),
        accuracy=accuracy.to(device),
        ref_logprobs=ref_logprobs,
        ablated=ablated,
        ablated_hidden=ablated_hidden,
        old_logprobs=old_logprobs,
        old_entropy=old_entropy,
        content_gate=gate,
        pg_rows=pg_rows,
        delta_h=delta_h,
        omega=omega,
    )


def prompt_clips(rollout: Rollout) -> list[list[int]]:
    """For each of the rollout's prompts, the indices of its clips in `rollout.input_features`, in order.

    The clips of a batch come prompt by prompt in the order their placeholders appear, and each clip is
    one contiguous run of audio positions (the chat templates wrap every clip in its own begin/end
    tokens), so counting runs per prompt assigns the clips. A layout where that does not hold (two
    clips' placeholders touching, or placeholders split around other tokens) is refused: its clips
    could not be matched to the prompts, and a pass that re-encodes the audio would silently go wrong.
    returns: B lists (empty for a text-only prompt); all empty when the rollout keeps no features.
    """
    prompt_audio = rollout.audio_mask[:: rollout.group_size, : rollout.prompt_len].bool()  # [B, P]
    if rollout.input_features is None:
        return [[] for _ in range(prompt_audio.shape[0])]
    run_starts = prompt_audio.clone()
    run_starts[:, 1:] &= ~prompt_audio[:, :-1]
    runs = run_starts.sum(-1).tolist()
    num_clips = rollout.input_features.shape[0]
    if sum(runs) != num_clips:
        raise ValueError(
            f"the rollout holds {num_clips} audio clips but its prompts have {sum(runs)} runs of audio "
            f"placeholders (per prompt: {runs}); mapo needs each clip to be one contiguous run, in prompt order"
        )
    clips, first = [], 0
    for count in runs:
        clips.append(list(range(first, first + count)))
        first += count
    return clips


def _selected_prompts(rollout: Rollout, idx: list[int]) -> tuple[int, list[int]]:
    """(group size of the sub-rollout of rows `idx`, the prompt of each of its groups): whole aligned groups
    stay groups (their rows share a prompt, which later passes then compute once), any other selection
    becomes groups of one. Read on the host: a rollout's `group_index` is arange(B).repeat_interleave(G)."""
    G = rollout.group_size
    whole_groups = G > 1 and len(idx) % G == 0 and idx[0] % G == 0 and idx == list(range(idx[0], idx[0] + len(idx)))
    group = G if whole_groups else 1
    return group, [i // G for i in idx][::group]


def _selected_clips(rollout: Rollout, idx: list[int], clips_of: list[list[int]]) -> list[int]:
    """Indices into `rollout.input_features` of the clips of the prompts of rows `idx`, in sub-rollout order."""
    return [c for b in _selected_prompts(rollout, idx)[1] for c in clips_of[b]]


def select_rows(
    rollout: Rollout,
    rows: torch.Tensor,
    clips_of: list[list[int]] | None = None,
    *,
    host_rows: list[int] | None = None,
    clip_index: torch.Tensor | None = None,
) -> Rollout:
    """The sub-rollout of `rows` ([n] long): whole aligned groups of the rollout stay groups of G, any other
    selection becomes n groups of one (cached audio embeddings shared, not copied).

    The clip features of each selected row's prompt (all of its clips, `prompt_clips`) come along, so
    passes that re-encode the audio (recompute, silence, noise) see the same audio as on the whole rollout.
    clips_of: `prompt_clips(rollout)` when the caller selects several parts of one rollout (it is the same
    for every part, and computing it reads the audio mask back to the host); None computes it here.
    host_rows: `rows` as a host list, and clip_index: the clips' indices (`_selected_clips`) on the features'
    device, when the caller has them (the update loop): reading device rows back or copying an index to the
    device would wait for the queued GPU work, once per micro-batch.
    """
    idx = rows.tolist() if host_rows is None else host_rows
    group, prompts = _selected_prompts(rollout, idx)
    features = feature_mask = None
    if rollout.input_features is not None:
        if clip_index is None:
            clips = _selected_clips(rollout, idx, prompt_clips(rollout) if clips_of is None else clips_of)
            clip_index = torch.tensor(clips, dtype=torch.long, device=rollout.input_features.device)
        if clip_index.numel():
            features = rollout.input_features[clip_index]
            feature_mask = rollout.feature_attention_mask[clip_index.to(rollout.feature_attention_mask.device)]
    return Rollout(
        prompt_ids=rollout.prompt_ids[rows],
        completion_ids=rollout.completion_ids[rows],
        completion_mask=rollout.completion_mask[rows],
        attention_mask=rollout.attention_mask[rows],
        audio_mask=rollout.audio_mask[rows],
        group_index=torch.arange(len(prompts), device=rows.device).repeat_interleave(group),
        has_audio=rollout.has_audio[rows],
        prompt_audio_embeds=[rollout.prompt_audio_embeds[b] for b in prompts],
        input_features=features,
        feature_attention_mask=feature_mask,
        group_size=group,
    )


def relevance_score(algo: AlgoConfig, policy_logprobs: torch.Tensor, policy_entropy: torch.Tensor, ablated: torch.Tensor) -> torch.Tensor:
    """Δh_t (or the KL score that replaces it), [N, T], no grad."""
    if algo.mask.score == "entropy":
        return delta_entropy(ablated, policy_entropy)  # H(π_ref | no audio) − H(π_θ | audio)
    if algo.mask.score == "kl_token":
        return kl_score(policy_logprobs, ablated)  # log π_θ(y_t) − log π_ablated(y_t)
    raise ValueError(f"algo.mask.score must be entropy, kl_token or kl_full, got {algo.mask.score!r}")


def _relevance(algo: AlgoConfig, delta_h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ω̃ [n, T] of the configured mask kind."""
    m = algo.mask
    return mapo.relevance_weights(
        delta_h, mask, kind=m.kind, tau_base=m.tau_base, cap=m.cap, threshold=m.threshold, floor=m.floor, rho=m.rho
    )


def local_counts(prepared: PreparedBatch, rollout: Rollout, rows: torch.Tensor) -> torch.Tensor:
    """This rank's share of the normalisers of an optimizer step on `rows`: [3] float64 =
    (Σ L_PG weights mask·ω̃ over rows in L_PG, rows in L_PG, rows). Sum it over ranks → `Normalisers`.

    Without a precomputed ω̃ the L_PG weights are the mask: exact for every mode that reads num_tokens,
    because token_mean with the mask always precomputes ω̃ (`needs_old_pass`).
    """
    mask = rollout.completion_mask[rows].to(prepared.advantages.device).double()
    weights = mask if prepared.omega is None else prepared.omega[rows].double() * mask
    keep = prepared.pg_rows[rows].double()
    # torch.full, not torch.tensor: a host-to-device copy would wait for the queued GPU work
    count = torch.full((), float(rows.shape[0]), dtype=torch.float64, device=keep.device)
    return torch.stack([(weights * keep[:, None]).sum(), keep.sum(), count])


def normalisers_from_counts(counts: torch.Tensor, max_len: int) -> Normalisers:
    """Normalisers from the global sum of `local_counts` ([3])."""
    return Normalisers(num_tokens=counts[0], num_seqs=counts[1], max_len=max_len, kl_seqs=counts[2])


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m = mask.to(x.dtype)
    return (x * m).sum(), m.sum()


def mapo_step(
    model: nn.Module,
    rollout: Rollout,
    rows: torch.Tensor,
    prepared: PreparedBatch,
    algo: AlgoConfig,
    norms: Normalisers,
    *,
    temperature: float,
    audio_input: str = "cached",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    backward_scale: float | None = None,
    call: Call | None = None,
    clips_of: list[list[int]] | None = None,
    host_rows: list[int] | None = None,
    clip_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of the micro-batch `rows` ([n] long indices into the rollout) and its metrics.

    Returns (loss, metrics). loss is this micro-batch's share of the loss of its optimizer step (the
    global normalisers in `norms` make the sum over micro-batches equal the whole-batch loss). When
    `backward_scale` is given, `(loss · backward_scale).backward()` runs inside the attention capture
    (needed with gradient checkpointing) and the returned loss is detached.
    metrics: name → tensor [2] = (sum, count) for means, or name ending in "_max" → [2] = (max, 1);
    the loop accumulates them over micro-batches and ranks (`MetricSums`).
    call: runs `fn(model, *args)`; under FSDP the loop passes its `ModelRunner` so the forward goes
    through the root module (default: a plain call).
    clips_of: `prompt_clips(rollout)`, computed once per rollout by the loop (`select_rows`).
    host_rows, clip_index: `rows` as a host list and the clips' device index, prepared once per pass by the
    loop so that a micro-batch does not wait for the previous one's GPU work (`select_rows`).
    """
    call = call or plain_call(model)
    sub = select_rows(rollout, rows, clips_of, host_rows=host_rows, clip_index=clip_index)
    mask = sub.completion_mask.bool()
    adv = prepared.advantages[rows]
    keep = prepared.pg_rows[rows]  # [n] rows in L_PG and L_attn
    if algo.loss_agg == "token_mean" and algo.mask.enabled and prepared.omega is None and prepared.ablated is not None:
        raise ValueError("loss_agg=token_mean with the mask needs ω̃ before the micro-batches: prepare_batch(old_pass=True)")
    eta = algo.attn.eta
    # the full-vocabulary KL needs the policy's hidden states of this forward (unless Δh came from π_old)
    keep_hidden = prepared.delta_h is None and prepared.ablated_hidden is not None and algo.mask.score == "kl_full"
    # A shared-prefix forward (mapo.shared_prefix) yields the completion queries only: the capture then
    # records the call over prompt + completion keys, and its mass is already per completion token.
    shared = can_share_prefix(model, sub, with_grad=True, keep_hidden=keep_hidden)
    num_keys = sub.prompt_len - 1 + sub.completion_ids.shape[1]
    capture = (
        capture_audio_attention(
            model,
            sub.audio_mask[:, :num_keys] if shared else sub.audio_mask,
            layers=tuple(algo.attn.layers),
            head_reduce=algo.attn.head_reduce,
            layer_reduce=algo.attn.layer_reduce,
            method=algo.attn.method,
            key_length=num_keys if shared else None,
        )
        if eta > 0
        else nullcontext()
    )
    metrics: dict[str, torch.Tensor] = {}
    with capture as cap:
        hidden, logprobs, entropy = call(_policy_forward, sub, audio_input, temperature, chunk_size, keep_hidden, shared)
        old_logprobs = prepared.old_logprobs[rows] if prepared.old_logprobs is not None else logprobs.detach()
        policy_entropy = prepared.old_entropy[rows] if prepared.old_entropy is not None else entropy.detach()

        # Δh and the relevance mask ω̃ (no grad): fixed from π_old when prepared, else from this forward.
        delta_h = None
        if prepared.delta_h is not None:
            delta_h = prepared.delta_h[rows]
        elif prepared.ablated is not None:
            with torch.no_grad():
                if algo.mask.score == "kl_full":
                    delta_h = call(_kl_full, hidden.detach(), prepared.ablated_hidden[rows], sub, temperature, chunk_size)
                else:
                    delta_h = relevance_score(algo, old_logprobs, policy_entropy, prepared.ablated[rows]) * mask
        if prepared.omega is not None:
            omega = prepared.omega[rows]
        elif algo.mask.enabled and delta_h is not None:
            omega = _relevance(algo, delta_h, mask)
        else:
            omega = mask.to(logprobs.dtype)

        # Policy-gradient term (rows removed by the overlong filter weigh 0 and are not in norms.num_seqs).
        pg_weights = torch.where(keep[:, None], omega, torch.zeros_like(omega))
        per_token = losses.policy_loss(logprobs, old_logprobs, adv, eps_low=algo.eps_low, eps_high=algo.eps_high)
        pg = losses.aggregate(
            per_token, pg_weights, algo.loss_agg,
            num_tokens=norms.num_tokens, max_len=norms.max_len, num_seqs=norms.num_seqs,
        )
        total = pg
        metrics["loss/pg"] = torch.stack([pg.detach(), torch.ones((), device=pg.device)])

        # KL to the frozen reference (plain mask weights over every row: the penalty follows neither ω̃
        # nor the overlong filter).
        if prepared.ref_logprobs is not None and algo.beta > 0:
            kl_seqs = norms.num_seqs if norms.kl_seqs is None else norms.kl_seqs
            kl_tok = losses.kl_penalty(logprobs, prepared.ref_logprobs[rows], kind=algo.kl_kind)
            kl = losses.aggregate(kl_tok, mask.to(kl_tok.dtype), "seq_mean_token_mean", num_seqs=kl_seqs)
            total = total + algo.beta * kl
            metrics["loss/kl"] = torch.stack([kl.detach(), torch.ones((), device=kl.device)])
            metrics["kl/mean"] = torch.stack(_masked_mean(kl_tok.detach(), mask))

        # Audio-attention loss.
        if eta > 0:
            gate = prepared.content_gate[rows]
            a_t = cap.mass if shared else completion_mass(cap.mass, sub.prompt_len, sub.completion_ids.shape[1])  # [n, T]
            with torch.no_grad():
                nu = mapo.targeting_weights(delta_h, gate, mask, tau_base=algo.attn.tau_base, cap=algo.attn.cap)
                w = mapo.temporal_weights(mask, schedule=algo.attn.schedule, kappa=algo.attn.kappa)
                g = mapo.sequence_gate(
                    prepared.accuracy[rows] <= 0, adv,
                    floor=algo.attn.fail_floor, adv_eps=algo.attn.adv_eps, cap=algo.attn.gate_cap,
                )
                g = torch.where(keep, g, torch.zeros_like(g))
            attn = mapo.attention_loss(a_t, mask, nu, w, gate, g, num_seqs=norms.num_seqs)
            total = total + eta * attn
            metrics["loss/attn"] = torch.stack([attn.detach(), torch.ones((), device=attn.device)])
            metrics["mapo/nu_mean"] = torch.stack(_masked_mean(nu, gate))
            metrics["mapo/nu_max"] = torch.stack([nu.max(), torch.ones((), device=nu.device)])
            metrics["mapo/gate_mean"] = torch.stack([g.sum(), torch.full((), float(len(g)), device=g.device)])
            _mass_by_position(a_t.detach(), mask, metrics)

        if backward_scale is not None:
            (total * backward_scale).backward()
            total = total.detach()

    metrics["loss/total"] = torch.stack([total.detach(), torch.ones((), device=total.device)])
    metrics["mapo/omega_mean"] = torch.stack(_masked_mean(omega, mask))
    metrics["mapo/omega_max"] = torch.stack([omega.max(), torch.ones((), device=omega.device)])
    if delta_h is not None:
        metrics["mapo/abs_delta_h"] = torch.stack(_masked_mean(delta_h.abs(), mask))
        metrics["mapo/delta_h"] = torch.stack(_masked_mean(delta_h, mask))
    if prepared.ablated is not None and algo.mask.score == "entropy":
        metrics["mapo/ablated_entropy"] = torch.stack(_masked_mean(prepared.ablated[rows], mask))  # H(π_ref | no audio)
    metrics["policy/entropy"] = torch.stack(_masked_mean(policy_entropy, mask))
    counts = losses.clip_token_counts(logprobs.detach(), old_logprobs, adv, mask, algo.eps_low, algo.eps_high)
    metrics["clip/high"] = torch.stack([counts["clipped_high"], counts["tokens"]]).float()
    metrics["clip/low"] = torch.stack([counts["clipped_low"], counts["tokens"]]).float()
    with torch.no_grad():
        deviation = torch.where(mask, (logprobs.detach() - old_logprobs).exp() - 1.0, torch.zeros_like(old_logprobs))
        metrics["ratio/dev_max"] = torch.stack([deviation.abs().max(), torch.ones((), device=deviation.device)])
    return total, metrics


def mini_batch_rows(num_rows: int, mini_batches: int, seed: int, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """Rows of each optimizer step of one pass: k = mini_batches equal parts of range(num_rows).

    k = 1: all rows in order. k > 1: a permutation from `torch.Generator().manual_seed(seed)` split in k
    contiguous parts (a group's completions may be split). num_rows must be a multiple of k.
    returns: k tensors [num_rows / k] long on `device` (the update loop keeps them on the host).
    """
    if mini_batches < 1 or num_rows % mini_batches:
        raise ValueError(
            f"algo.mini_batches={mini_batches} must divide the {num_rows} rows of this rank's rollout "
            "(prompts_per_step / world_size × group_size)"
        )
    if mini_batches == 1:
        order = torch.arange(num_rows)
    else:
        order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed))
    return list(order.to(device).split(num_rows // mini_batches))


def _pass_rows(
    rollout: Rollout, host_batches: list[torch.Tensor], micro_batch_size: int, clips_of: list[list[int]]
) -> tuple[list[torch.Tensor], list[list[tuple[torch.Tensor, list[int], torch.Tensor | None]]]]:
    """One pass's rows, moved to the device in one copy per pass rather than read back per micro-batch.

    host_batches: `mini_batch_rows` on the host. Returns (each optimizer step's rows on the rollout's device,
    each step's micro-batches as (rows on the device, the same rows as a host list, the index of their
    clips on the features' device or None without features)).
    """
    device = rollout.completion_ids.device
    steps = torch.cat(host_batches).to(device).split([len(rows) for rows in host_batches])
    host = [[idx[i : i + micro_batch_size] for i in range(0, len(idx), micro_batch_size)]
            for idx in (rows.tolist() for rows in host_batches)]
    if rollout.input_features is None:
        clip_parts = [[None] * len(step) for step in host]
    else:
        clips = [[_selected_clips(rollout, idx, clips_of) for idx in step] for step in host]
        flat = torch.tensor([c for step in clips for part in step for c in part], dtype=torch.long)
        parts = iter(flat.to(rollout.input_features.device).split([len(part) for step in clips for part in step]))
        clip_parts = [[next(parts) for _ in step] for step in clips]
    micro = [
        list(zip(rows.split(micro_batch_size), step_host, step_clips))
        for rows, step_host, step_clips in zip(steps, host, clip_parts)
    ]
    return list(steps), micro


def update_on_rollout(
    model: nn.Module,
    rollout: Rollout,
    prepared: PreparedBatch,
    algo: AlgoConfig,
    *,
    micro_batch_size: int,
    optimizer_step: Callable[[], torch.Tensor],
    seed: int,
    temperature: float,
    max_len: int,
    audio_input: str = "cached",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    backward_scale: float = 1.0,
    call: Call | None = None,
    global_sum: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
    on_step_loss: Callable[[torch.Tensor], None] | None = None,
) -> tuple["MetricSums", list[torch.Tensor]]:
    """Every optimizer step one rollout feeds: `updates_per_rollout` passes × `mini_batches` steps.

    Pass p shuffles the rows with seed `seed + p` (`mini_batch_rows`); each step accumulates the
    gradients of its micro-batches (`micro_batch_size` rows each; `mapo_step` runs the backward) and
    then calls `optimizer_step()` (clip, step, schedule, zero_grad; returns the grad norm).
    global_sum: sums a tensor over ranks (identity on one process); one call per pass.
    on_step_loss: called before each `optimizer_step()` with that step's loss (0-d, detached, summed over
    its micro-batches), e.g. for the loop's non-finite guard.
    Returns (metrics, grad norms [one per optimizer step]). `loss/*` metrics are the mean over the
    optimizer steps of each step's loss; with more than one step per rollout, the clip counts and the
    largest |r − 1| are also kept per step as `clip/high_u{j}`, `clip/low_u{j}`, `ratio/dev_u{j}_max`
    (j = 1, 2, …): on the first step r ≡ 1, on later ones it shows how far the policy has moved.
    """
    num_rows = rollout.completion_ids.shape[0]
    num_updates = optimizer_steps_per_rollout(algo)
    if num_updates > 1 and prepared.old_logprobs is None:
        raise ValueError("several optimizer steps per rollout need π_old: prepare_batch(old_pass=True)")
    device = rollout.completion_ids.device
    clips_of = prompt_clips(rollout)  # the same for every micro-batch of the rollout
    sums, grad_norms, update = MetricSums(), [], 0
    for pass_index in range(algo.updates_per_rollout):
        batches, micro = _pass_rows(rollout, mini_batch_rows(num_rows, algo.mini_batches, seed + pass_index),
                                    max(1, micro_batch_size), clips_of)
        counts = global_sum(torch.stack([local_counts(prepared, rollout, rows) for rows in batches]))  # [k, 3]
        for step_micro, step_counts in zip(micro, counts):
            update += 1
            norms = normalisers_from_counts(step_counts, max_len)
            step_loss = torch.zeros((), device=device)
            for chunk, host_rows, clip_index in step_micro:
                loss, m = mapo_step(
                    model, rollout, chunk, prepared, algo, norms, temperature=temperature, audio_input=audio_input,
                    chunk_size=chunk_size, backward_scale=backward_scale, call=call, clips_of=clips_of,
                    host_rows=host_rows, clip_index=clip_index,
                )
                if num_updates > 1:  # loss/* become the mean over the optimizer steps (no host copy)
                    for key in [k for k in m if k.startswith("loss/")]:
                        m[key] = m[key] / num_updates  # their count is never read (`MetricSums.finalize`)
                    m[f"clip/high_u{update}"] = m["clip/high"]
                    m[f"clip/low_u{update}"] = m["clip/low"]
                    m[f"ratio/dev_u{update}_max"] = m["ratio/dev_max"]
                sums.add(m)
                step_loss = step_loss + loss.detach()
            if on_step_loss is not None:
                on_step_loss(step_loss)
            grad_norms.append(optimizer_step())
    return sums, grad_norms


def _policy_forward(model: nn.Module, sub: Rollout, audio_input: str, temperature: float, chunk_size: int,
                    keep_hidden: bool, shared: bool):
    """hidden [n, P+T, H] (None unless keep_hidden), logprobs [n, T], entropy [n, T] of the policy with grad;
    `shared`: the shared-prefix decision the capture was set up for."""
    scores = score_tokens(model, sub, audio=audio_input, temperature=temperature, chunk_size=chunk_size,
                          with_grad=True, keep_hidden=keep_hidden, share_prefix=shared)
    return scores.hidden, scores.logprobs, scores.entropy


def _kl_full(model: nn.Module, hidden: torch.Tensor, ablated_hidden: torch.Tensor, sub: Rollout, temperature: float, chunk_size: int):
    """Full-vocabulary KL(π_θ ‖ π_ablated) per completion token, [n, T] (no grad)."""
    lm_head = get_adapter(model).lm_head(model)
    return kl_full_vocabulary(
        lm_head, hidden, lm_head, ablated_hidden, sub.prompt_len,
        completion_mask=sub.completion_mask, temperature=temperature, chunk_size=chunk_size,
    )


def _mass_by_position(a_t: torch.Tensor, mask: torch.Tensor, metrics: dict[str, torch.Tensor]) -> None:
    """Mean audio mass per relative-position bucket of the completion (t/T in quarters), binned by the
    same rule as the evaluation's collapse curve (`mapo.eval.positions.relative_bins`)."""
    bucket = relative_bins(mask, MASS_BUCKETS)  # [n, T], -1 off the mask
    for b in range(MASS_BUCKETS):
        sel = bucket == b
        metrics[f"audio_mass/q{b + 1}"] = torch.stack(_masked_mean(a_t, sel))


class MetricSums:
    """Accumulates `mapo_step` metrics over micro-batches (and, via `flat` + a sum-reduce, over ranks).

    Entries are (sum, count) pairs averaged as sum/count, except: keys ending in `_max` are (max, 1)
    and keep the maximum; keys under `loss/` are each micro-batch's share of the global loss (the
    global normalisers are already applied), so their sums are reported as they are.
    """

    def __init__(self) -> None:
        self.values: dict[str, torch.Tensor] = {}

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        for k, v in metrics.items():
            v = v.detach().double()
            if k not in self.values:
                self.values[k] = v.clone()
            elif k.endswith("_max"):
                self.values[k] = torch.maximum(self.values[k], v)
            else:
                self.values[k] = self.values[k] + v

    def flat(self) -> dict[str, torch.Tensor]:
        """name_sum / name_count (or name_max) tensors, ready for one cross-rank reduction."""
        out = {}
        for k, v in self.values.items():
            if k.endswith("_max"):
                out[k] = v[0]
            else:
                out[f"{k}__sum"], out[f"{k}__count_sum"] = v[0], v[1]
        return out

    @staticmethod
    def finalize(reduced: dict[str, float]) -> dict[str, float]:
        """Turn reduced sums and counts back into means."""
        out = {}
        for k, v in reduced.items():
            if k.endswith("__sum") and not k.endswith("__count_sum"):
                name = k[: -len("__sum")]
                count = reduced[f"{name}__count_sum"]
                if name.startswith("loss/"):
                    out[name] = v
                else:
                    out[name] = v / count if count else float("nan")
            elif not k.endswith("__count_sum"):
                out[k] = v
        return out


def sft_nll(model: nn.Module, batch: dict[str, torch.Tensor], chunk_size: int = DEFAULT_CHUNK_SIZE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed next-token NLL of the label tokens of a supervised batch (`Collator.supervised`).

    batch: input_ids, attention_mask, position_ids, labels [B, S] (+ input_features [A, M, F],
    feature_attention_mask [A, F]). The audio goes through the tower with grad (the warm start trains
    it). Logits are computed `chunk_size` label positions at a time, never for the whole batch.
    Returns (nll_sum, correct_tokens, num_tokens), scalars; nll_sum has grad.
    """
    adapter = get_adapter(model)
    device = adapter.embed_tokens(model).weight.device
    batch = {k: v.to(device) for k, v in batch.items()}
    rows = None
    if batch.get("input_features") is not None:
        clips = encode_audio(model, batch["input_features"], batch["feature_attention_mask"])
        rows = split_audio_by_row(clips, batch["input_ids"], adapter.audio_token_id(model))
    inputs_embeds = build_inputs_embeds(model, batch["input_ids"], rows)
    hidden = adapter.run_text_model(model, inputs_embeds, batch["attention_mask"], batch["position_ids"])
    hidden = hidden[:, :-1]  # position s predicts token s + 1
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    queries, targets = hidden[keep], targets[keep]  # [M, H], [M]
    nll = hidden.new_zeros((), dtype=torch.float32)
    correct = torch.zeros((), device=device)
    for start in range(0, len(targets), chunk_size):
        logits = adapter.lm_head(model)(queries[start : start + chunk_size]).float()
        tgt = targets[start : start + chunk_size]
        nll = nll + torch.nn.functional.cross_entropy(logits, tgt, reduction="sum")
        correct = correct + (logits.argmax(-1) == tgt).sum()
    return nll, correct, keep.sum()
