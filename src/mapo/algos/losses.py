"""Per-token losses (clipped policy surrogate, KL to the reference) and their aggregation (DESIGN §3).

All per-token tensors follow DESIGN §3's alignment rule: column t holds the quantity for completion
token y_t (predicted from the query position just before it); completions are left-aligned, padding
on the right, and `weights` / `mask` say which columns are real.

Padding columns: the per-token functions compute a value everywhere (they do not know the mask);
`aggregate` ignores every column whose weight is 0, even if its loss is inf/NaN there. Gradients are
only guaranteed finite when the caller's log-probs are finite at padded columns too (they are when
they come from a log-softmax over real logits).

Micro-batching and data parallelism: `aggregate` takes its normalisers from the caller (global counts
over every rank and micro-batch), so summing the aggregates of the micro-batches gives exactly the
value and gradient of the whole batch in every mode. Under DDP/FSDP, whose gradient all-reduce
*averages* over ranks, multiply the summed loss by the world size (or reduce with a sum).
"""

from __future__ import annotations

import torch

KL_KINDS = ("k1", "k2", "k3")
AGGREGATION_MODES = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum", "dr_grpo")


def _check_per_token(name: str, tensor: torch.Tensor, like: torch.Tensor) -> None:
    if tensor.shape != like.shape:
        raise ValueError(f"{name} must have shape {tuple(like.shape)} ([B, T]), got {tuple(tensor.shape)}")


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
) -> torch.Tensor:
    """Clipped surrogate (PPO/GRPO) per token, to be minimised.

    ℓ_t = −min(r_t·Â, clip(r_t, 1 − eps_low, 1 + eps_high)·Â),  r_t = exp(logprobs − old_logprobs).
    Where the clipped branch is the smaller one (Â > 0 and r > 1 + eps_high, or Â < 0 and
    r < 1 − eps_low) the token's gradient is exactly 0.

    logprobs:     [B, T] log π_θ(y_t), with grad.
    old_logprobs: [B, T] log π_old(y_t), no grad (the sampling policy).
    advantages:   [B] one advantage per completion, broadcast over its tokens.
    returns:      [B, T] per-token loss (not masked: pass it to `aggregate` with the mask as weights).
    """
    _check_per_token("old_logprobs", old_logprobs, logprobs)
    if logprobs.dim() != 2 or advantages.shape != logprobs.shape[:1]:
        raise ValueError(
            f"policy_loss: need logprobs [B, T] and advantages [B]; got {tuple(logprobs.shape)} "
            f"and {tuple(advantages.shape)}"
        )
    ratio = torch.exp(logprobs - old_logprobs)  # [B, T]
    adv = advantages.unsqueeze(-1)  # [B, 1]
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv
    return -torch.minimum(unclipped, clipped)


def clip_token_counts(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
) -> dict[str, torch.Tensor]:
    """How many valid tokens the clip switched off (zero gradient), as 0-d float tensors (no grad).

    Counts, not fractions, so they can be summed over ranks/micro-batches before dividing.
    logprobs, old_logprobs: [B, T]; advantages: [B]; mask: [B, T] bool or 0/1 (valid tokens).
    returns: {"clipped_high": #(Â > 0 and r > 1 + eps_high), "clipped_low": #(Â < 0 and r < 1 − eps_low),
              "tokens": #valid tokens}.
    """
    _check_per_token("old_logprobs", old_logprobs, logprobs)
    _check_per_token("mask", mask, logprobs)
    with torch.no_grad():
        ratio = torch.exp(logprobs - old_logprobs)
        adv = advantages.unsqueeze(-1)
        valid = mask.bool()
        high = valid & (adv > 0) & (ratio > 1.0 + eps_high)
        low = valid & (adv < 0) & (ratio < 1.0 - eps_low)
        return {
            "clipped_high": high.sum().float(),
            "clipped_low": low.sum().float(),
            "tokens": valid.sum().float(),
        }


def clip_fractions(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
) -> dict[str, torch.Tensor]:
    """Fractions of valid tokens clipped (see `clip_token_counts`); 0 when there is no valid token.

    Shapes as in `clip_token_counts`. returns 0-d tensors "clip_frac_high", "clip_frac_low", "clip_frac".
    """
    counts = clip_token_counts(logprobs, old_logprobs, advantages, mask, eps_low, eps_high)
    tokens = counts["tokens"].clamp_min(1.0)
    return {
        "clip_frac_high": counts["clipped_high"] / tokens,
        "clip_frac_low": counts["clipped_low"] / tokens,
        "clip_frac": (counts["clipped_high"] + counts["clipped_low"]) / tokens,
    }


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(π_θ ‖ π_ref) on the sampled tokens (Schulman's estimators).

    With p = logprobs (policy), q = ref_logprobs (frozen reference), d = q − p:
      k1 = p − q              (unbiased, can be negative)
      k2 = ½ (p − q)²
      k3 = exp(d) − d − 1     (unbiased, ≥ 0; computed as expm1(d) − d for precision near d = 0)
    logprobs, ref_logprobs: [B, T]. returns: [B, T] (not masked).
    """
    _check_per_token("ref_logprobs", ref_logprobs, logprobs)
    if kind == "k1":
        return logprobs - ref_logprobs
    if kind == "k2":
        return 0.5 * (logprobs - ref_logprobs) ** 2
    if kind == "k3":
        log_ratio = ref_logprobs - logprobs
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"kl_penalty: unknown kind {kind!r}; valid: {', '.join(KL_KINDS)}")


def aggregate(
    loss: torch.Tensor,
    weights: torch.Tensor,
    mode: str,
    num_tokens: float | torch.Tensor | None = None,
    max_len: int | None = None,
    num_seqs: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss to the scalar to backpropagate.

    loss:    [B, T] per-token loss (e.g. `policy_loss`, `kl_penalty`).
    weights: [B, T] completion mask × token weight (ω̃ for MAPO, the plain mask for GRPO); a column
             with weight 0 is ignored even if its loss is not finite.
    mode:
      "seq_mean_token_mean" (GRPO):  Σ_i [Σ_t w·ℓ / Σ_t w] / num_seqs   (a row with Σ_t w = 0 adds 0)
      "token_mean":                  Σ_i Σ_t w·ℓ / num_tokens
      "seq_mean_token_sum":          Σ_i Σ_t w·ℓ / num_seqs
      "dr_grpo":                     Σ_i Σ_t w·ℓ / (num_seqs · max_len)
    Global normalisers (sum them over every rank and micro-batch of the step; then the sum of the
    micro-batch aggregates equals the whole-batch aggregate, value and gradient, in every mode):
      num_tokens: global Σ weights (with weights = mask: the global number of valid tokens; with ω̃
                  this is Σ ω̃, so token_mean is the ω̃-weighted token mean of DESIGN §3).
                  Default: this call's Σ weights (only right for a single whole batch).
      num_seqs:   global number of sequences (completions), empty ones included. Default: B.
      max_len:    Dr.GRPO's constant length, normally the generation budget (max_new_tokens); it
                  must be the same for every micro-batch. Default: T (this call's padded width).
    returns: 0-d tensor. A normaliser of 0 gives 0, not NaN.
    """
    _check_per_token("weights", weights, loss)
    if loss.dim() != 2:
        raise ValueError(f"aggregate: loss must be [B, T], got shape {tuple(loss.shape)}")
    if mode not in AGGREGATION_MODES:
        raise ValueError(f"aggregate: unknown mode {mode!r}; valid: {', '.join(AGGREGATION_MODES)}")

    weights = weights.to(loss.dtype)
    # torch.where (not w·ℓ alone) so that an inf/NaN loss in a padded column cannot leak in via 0·inf.
    weighted = torch.where(weights != 0, weights * loss, torch.zeros_like(loss))  # [B, T]

    if mode == "token_mean":
        return safe_divide(weighted.sum(), weights.sum() if num_tokens is None else num_tokens)
    seqs = loss.shape[0] if num_seqs is None else num_seqs
    if mode == "seq_mean_token_mean":
        row_mean = safe_divide(weighted.sum(dim=-1), weights.sum(dim=-1))  # [B]; 0 for an empty row
        return safe_divide(row_mean.sum(), seqs)
    if mode == "seq_mean_token_sum":
        return safe_divide(weighted.sum(), seqs)
    length = loss.shape[1] if max_len is None else max_len
    return safe_divide(weighted.sum(), seqs * length)


def safe_divide(numerator: torch.Tensor, denominator: float | torch.Tensor) -> torch.Tensor:
    """numerator / max(denominator, tiny): 0/0 gives 0, not NaN, with no data-dependent branch.

    numerator: tensor of any shape; denominator: a Python number or a tensor broadcastable to it
    (a Python number stays on the host, so no scalar is copied to the device).
    """
    tiny = torch.finfo(numerator.dtype).tiny
    if isinstance(denominator, torch.Tensor):
        return numerator / denominator.to(numerator.dtype).clamp_min(tiny)
    return numerator / max(float(denominator), tiny)
