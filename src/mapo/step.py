"""One GRPO/MAPO update on (part of) a rollout: L = L_PG(ω̃) + β·L_KL + η·L_attn (DESIGN §3).

The loop (train.py) prepares everything that needs no gradient once per rollout (`prepare_batch`:
advantages, the reference log-probs for the KL, the audio-ablated reference entropies, the sequence gate
inputs) and then calls `mapo_step` on micro-batches of rows. `grpo` is the same function with the mask
off (ω̃ ≡ 1) and η = 0: the config decides, there is no separate code path.

Where this departs from a literal reading of DESIGN §3, and why:
- When each rollout gets one optimizer pass (`updates_per_rollout == 1`), π_old is the policy itself, so
  the old log-probs and the policy entropy used for Δh are taken (detached) from the training forward
  instead of a separate no-grad pass: the same numbers, one forward fewer. With more passes, the
  loop computes them once per rollout before the first update (`prepare_batch(old_pass=True)`).
- The policy entropy in Δh is the entropy at the sampling temperature, like the reference's.
- Token-level aggregation modes weight by ω̃ and normalise by the global Σ ω̃ (DESIGN: "token-level modes
  weight the global sums the same way"); per-sequence modes normalise each row by its own Σ ω̃ inside
  `aggregate` (DESIGN's L_PG formula).
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
from mapo.models.adapter import get_adapter
from mapo.models.embed import build_inputs_embeds, encode_audio, split_audio_by_row
from mapo.rollout import Rollout
from mapo.scoring import (
    DEFAULT_CHUNK_SIZE,
    delta_entropy,
    kl_score,
    pick_reference_model,
    hidden_states,
    kl_full_vocabulary,
    logprobs_from_hidden,
    reference_pass,
    score_tokens,
    sequence_inputs,
)

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
    ablated_hidden:  [N, P+T, H] the ablated reference's hidden states (score "kl_full" only).
    old_logprobs:    [N, T] π_old log-probs, or None (then π_old = the policy of the training forward).
    old_entropy:     [N, T] π_old entropy for Δh, alongside old_logprobs.
    content_gate:    [N, T] bool, p_t of the attention loss (content tokens, or all valid tokens).
    """

    advantages: torch.Tensor
    accuracy: torch.Tensor
    ref_logprobs: torch.Tensor | None
    ablated: torch.Tensor | None
    ablated_hidden: torch.Tensor | None
    old_logprobs: torch.Tensor | None
    old_entropy: torch.Tensor | None
    content_gate: torch.Tensor


@dataclass
class Normalisers:
    """Global (all ranks, all micro-batches) counts that make micro-batched losses exact.

    num_tokens: Σ of the aggregation weights (mask·ω̃) over the global batch (token-level modes).
    num_seqs:   number of sequences in the global batch.
    max_len:    the generation budget (dr_grpo mode).
    """

    num_tokens: torch.Tensor | float
    num_seqs: int
    max_len: int


def uses_ablated_reference(algo: AlgoConfig) -> bool:
    return algo.name != "sft" and (algo.mask.enabled or algo.attn.eta > 0)


def uses_kl_reference(algo: AlgoConfig) -> bool:
    return algo.name != "sft" and algo.beta > 0


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
    old_pass: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> PreparedBatch:
    """Everything the update needs that has no gradient, computed once per rollout.

    policy, frozen_reference: calls into the policy / the initial policy (`plain_call(model)` or a
    ModelRunner); frozen_reference is None when neither β nor the frozen ablated reference needs it.
    advantages, accuracy: [N].
    audio_input: how the policy sees the audio ("cached" while its tower is frozen, else "recompute").
    """
    device = rollout.completion_ids.device
    mask = rollout.completion_mask.bool()
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
    old_logprobs = old_entropy = None
    if old_pass:
        old = policy(score_tokens, rollout, audio=audio_input, temperature=temperature, chunk_size=chunk_size)
        old_logprobs, old_entropy = old.logprobs, old.entropy
    if algo.attn.token_gate == "content":
        if content_vocab_mask is None:
            raise ValueError("algo.attn.token_gate=content needs a content vocabulary mask")
        gate = mapo.content_token_gate(rollout.completion_ids, content_vocab_mask.to(device)) & mask
    elif algo.attn.token_gate == "all":
        gate = mask
    else:
        raise ValueError(f"algo.attn.token_gate must be content or all, got {algo.attn.token_gate!r}")
    gate = gate & rollout.has_audio.to(device)[:, None]  # no audio span, no attention to pull toward it
    return PreparedBatch(
        advantages=advantages.to(device),
        accuracy=accuracy.to(device),
        ref_logprobs=ref_logprobs,
        ablated=ablated,
        ablated_hidden=ablated_hidden,
        old_logprobs=old_logprobs,
        old_entropy=old_entropy,
        content_gate=gate,
    )


def select_rows(rollout: Rollout, rows: torch.Tensor) -> Rollout:
    """The sub-rollout of `rows` ([n] long), as n groups of one (cached audio embeddings shared, not copied).

    Clip features are kept when every prompt has at most one clip (so silence/noise/recompute passes
    still work on a micro-batch); otherwise they are dropped and only cached/drop/mask passes apply.
    """
    idx = rows.tolist()
    prompts = rollout.group_index[rows].tolist()
    features = feature_mask = None
    if rollout.input_features is not None:
        has_audio_prompt = rollout.has_audio[:: rollout.group_size].tolist()
        if len(rollout.input_features) == sum(has_audio_prompt):
            clip_of_prompt, c = {}, 0
            for b, has in enumerate(has_audio_prompt):
                if has:
                    clip_of_prompt[b] = c
                    c += 1
            clips = [clip_of_prompt[b] for b in prompts if b in clip_of_prompt]
            if clips:
                features = rollout.input_features[clips]
                feature_mask = rollout.feature_attention_mask[clips]
    return Rollout(
        prompt_ids=rollout.prompt_ids[rows],
        completion_ids=rollout.completion_ids[rows],
        completion_mask=rollout.completion_mask[rows],
        attention_mask=rollout.attention_mask[rows],
        audio_mask=rollout.audio_mask[rows],
        group_index=torch.arange(len(idx), device=rows.device),
        has_audio=rollout.has_audio[rows],
        prompt_audio_embeds=[rollout.prompt_audio_embeds[b] for b in prompts],
        input_features=features,
        feature_attention_mask=feature_mask,
        group_size=1,
    )


def relevance_score(algo: AlgoConfig, policy_logprobs: torch.Tensor, policy_entropy: torch.Tensor, ablated: torch.Tensor) -> torch.Tensor:
    """Δh_t (or the KL score that replaces it), [N, T], no grad."""
    if algo.mask.score == "entropy":
        return delta_entropy(ablated, policy_entropy)  # H(π_ref | no audio) − H(π_θ | audio)
    if algo.mask.score == "kl_token":
        return kl_score(policy_logprobs, ablated)  # log π_θ(y_t) − log π_ablated(y_t)
    raise ValueError(f"algo.mask.score must be entropy, kl_token or kl_full, got {algo.mask.score!r}")


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
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of the micro-batch `rows` ([n] long indices into the rollout) and its metrics.

    Returns (loss, metrics). loss is this micro-batch's share of the global loss (the global
    normalisers in `norms` make the sum over micro-batches equal the whole-batch loss). When
    `backward_scale` is given, `(loss · backward_scale).backward()` runs inside the attention capture
    (needed with gradient checkpointing) and the returned loss is detached.
    metrics: name → tensor [2] = (sum, count) for means, or name ending in "_max" → [2] = (max, 1);
    the loop accumulates them over micro-batches and ranks (`MetricSums`).
    call: runs `fn(model, *args)`; under FSDP the loop passes its `ModelRunner` so the forward goes
    through the root module (default: a plain call).
    """
    call = call or plain_call(model)
    sub = select_rows(rollout, rows)
    mask = sub.completion_mask.bool()
    adv = prepared.advantages[rows]
    eta = algo.attn.eta
    capture = (
        capture_audio_attention(
            model,
            sub.audio_mask,
            layers=tuple(algo.attn.layers),
            head_reduce=algo.attn.head_reduce,
            layer_reduce=algo.attn.layer_reduce,
            method=algo.attn.method,
        )
        if eta > 0
        else nullcontext()
    )
    metrics: dict[str, torch.Tensor] = {}
    with capture as cap:
        hidden, logprobs, entropy = call(_policy_forward, sub, audio_input, temperature, chunk_size)
        old_logprobs = prepared.old_logprobs[rows] if prepared.old_logprobs is not None else logprobs.detach()
        policy_entropy = prepared.old_entropy[rows] if prepared.old_entropy is not None else entropy.detach()

        # Δh and the relevance mask ω̃ (no grad).
        delta_h = None
        if prepared.ablated is not None:
            with torch.no_grad():
                if algo.mask.score == "kl_full":
                    delta_h = call(_kl_full, hidden.detach(), prepared.ablated_hidden[rows], sub, temperature, chunk_size)
                else:
                    delta_h = relevance_score(algo, old_logprobs, policy_entropy, prepared.ablated[rows]) * mask
        if algo.mask.enabled and delta_h is not None:
            omega = mapo.relevance_weights(
                delta_h, mask, kind=algo.mask.kind, tau_base=algo.mask.tau_base, cap=algo.mask.cap,
                threshold=algo.mask.threshold, floor=algo.mask.floor, rho=algo.mask.rho,
            )
        else:
            omega = mask.to(logprobs.dtype)

        # Policy-gradient term.
        per_token = losses.policy_loss(logprobs, old_logprobs, adv, eps_low=algo.eps_low, eps_high=algo.eps_high)
        pg = losses.aggregate(
            per_token, omega, algo.loss_agg,
            num_tokens=norms.num_tokens, max_len=norms.max_len, num_seqs=norms.num_seqs,
        )
        total = pg
        metrics["loss/pg"] = torch.stack([pg.detach(), torch.ones((), device=pg.device)])

        # KL to the frozen reference (plain mask weights: the penalty does not follow ω̃).
        if prepared.ref_logprobs is not None and algo.beta > 0:
            kl_tok = losses.kl_penalty(logprobs, prepared.ref_logprobs[rows], kind=algo.kl_kind)
            kl = losses.aggregate(kl_tok, mask.to(kl_tok.dtype), "seq_mean_token_mean", num_seqs=norms.num_seqs)
            total = total + algo.beta * kl
            metrics["loss/kl"] = torch.stack([kl.detach(), torch.ones((), device=kl.device)])
            metrics["kl/mean"] = torch.stack(_masked_mean(kl_tok.detach(), mask))

        # Audio-attention loss.
        if eta > 0:
            gate = prepared.content_gate[rows]
            a_t = completion_mass(cap.mass, sub.prompt_len, sub.completion_ids.shape[1])  # [n, T]
            with torch.no_grad():
                nu = mapo.targeting_weights(delta_h, gate, tau_base=algo.attn.tau_base, cap=algo.attn.cap)
                w = mapo.temporal_weights(mask, schedule=algo.attn.schedule, kappa=algo.attn.kappa)
                g = mapo.sequence_gate(
                    prepared.accuracy[rows] <= 0, adv,
                    floor=algo.attn.fail_floor, adv_eps=algo.attn.adv_eps, cap=algo.attn.gate_cap,
                )
            attn = mapo.attention_loss(a_t, mask, nu, w, gate, g, num_seqs=norms.num_seqs)
            total = total + eta * attn
            metrics["loss/attn"] = torch.stack([attn.detach(), torch.ones((), device=attn.device)])
            metrics["mapo/nu_mean"] = torch.stack(_masked_mean(nu, gate))
            metrics["mapo/nu_max"] = torch.stack([nu.max(), torch.ones((), device=nu.device)])
            metrics["mapo/gate_mean"] = torch.stack([g.sum(), torch.tensor(float(len(g)), device=g.device)])
            _mass_by_position(a_t.detach(), mask, metrics)

        if backward_scale is not None:
            (total * backward_scale).backward()
            total = total.detach()

    metrics["loss/total"] = torch.stack([total.detach(), torch.ones((), device=total.device)])
    metrics["mapo/omega_mean"] = torch.stack(_masked_mean(omega, mask))
    metrics["mapo/omega_max"] = torch.stack([omega.max(), torch.ones((), device=omega.device)])
    if delta_h is not None:
        metrics["mapo/abs_delta_h"] = torch.stack(_masked_mean(delta_h.abs(), mask))
    metrics["policy/entropy"] = torch.stack(_masked_mean(policy_entropy, mask))
    counts = losses.clip_token_counts(logprobs.detach(), old_logprobs, adv, mask, algo.eps_low, algo.eps_high)
    metrics["clip/high"] = torch.stack([counts["clipped_high"], counts["tokens"]]).float()
    metrics["clip/low"] = torch.stack([counts["clipped_low"], counts["tokens"]]).float()
    return total, metrics


def _policy_forward(model: nn.Module, sub: Rollout, audio_input: str, temperature: float, chunk_size: int):
    """hidden [n, P+T, H], logprobs [n, T], entropy [n, T] of the policy with grad."""
    inputs = sequence_inputs(model, sub, audio_input)
    hidden = hidden_states(model, *inputs)
    logprobs, entropy = logprobs_from_hidden(
        get_adapter(model).lm_head(model), hidden, sub.completion_ids, sub.prompt_len,
        completion_mask=sub.completion_mask, temperature=temperature, chunk_size=chunk_size,
    )
    return hidden, logprobs, entropy


def _kl_full(model: nn.Module, hidden: torch.Tensor, ablated_hidden: torch.Tensor, sub: Rollout, temperature: float, chunk_size: int):
    """Full-vocabulary KL(π_θ ‖ π_ablated) per completion token, [n, T] (no grad)."""
    lm_head = get_adapter(model).lm_head(model)
    return kl_full_vocabulary(
        lm_head, hidden, lm_head, ablated_hidden, sub.prompt_len,
        completion_mask=sub.completion_mask, temperature=temperature, chunk_size=chunk_size,
    )


def _mass_by_position(a_t: torch.Tensor, mask: torch.Tensor, metrics: dict[str, torch.Tensor]) -> None:
    """Mean audio mass per relative-position bucket of the completion (t/T in quarters)."""
    lengths = mask.sum(-1, keepdim=True).clamp(min=1)
    rel = (torch.cumsum(mask.long(), -1) - 1).float() / lengths  # 0 ≤ rel < 1 on valid tokens
    bucket = (rel * MASS_BUCKETS).long().clamp(max=MASS_BUCKETS - 1)
    for b in range(MASS_BUCKETS):
        sel = mask & (bucket == b)
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
