"""Group-relative advantages (GRPO, DESIGN §3): one scalar per completion from its group's rewards.

Rows are grouped contiguously: rows [k·G, (k+1)·G) are the G completions of prompt k.

Standard deviation: we use the *unbiased* (Bessel, divide by G−1) estimate, as the reference GRPO
implementations do (TRL's and verl's `torch.std`), so advantages — and therefore learning rates and
clip fractions — are comparable with published runs. It differs from the population std by the factor
sqrt(G/(G−1)) (≈ 1.07 at G = 8). A single-element group or batch has no unbiased estimate; there we
use 0, which is also what the population formula gives, and the centred reward is 0 anyway.

A group whose rewards are all identical gets advantage exactly 0 (not a rounding residue of
R − mean, e.g. mean(0.1, 0.1, 0.1) ≠ 0.1 in floating point): it carries no learning signal.
"""

from __future__ import annotations

import torch

ADVANTAGE_SCALES = ("group", "batch", "none")


def _std(values: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Unbiased std along `dim` (all elements when None); 0 where only one element is present."""
    count = values.numel() if dim is None else values.shape[dim]
    correction = 1 if count > 1 else 0  # a Python int (a shape), not a tensor value: no host sync
    if dim is None:
        return values.std(correction=correction)
    return values.std(dim=dim, correction=correction, keepdim=keepdim)


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4
) -> torch.Tensor:
    """Advantage of each completion relative to its prompt's group.

    rewards: [N] total reward per completion, N = num_prompts · group_size, groups contiguous.
    scale:   "group": (R − mean_G) / (std_G + eps)            (GRPO)
             "batch": (R − mean_G) / (std over all N + eps)    (batch-level scaling)
             "none":  R − mean_G                               (Dr.GRPO, no std scaling)
             std is the unbiased estimate (see module docstring).
    returns: [N] advantages, float (int/bool rewards are promoted to float32); exactly 0 for every
             member of a group whose rewards are identical.
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"group_advantages: unknown scale {scale!r}; valid: {', '.join(ADVANTAGE_SCALES)}")
    if rewards.dim() != 1:
        raise ValueError(f"group_advantages: rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.shape[0] % group_size != 0:
        raise ValueError(
            f"group_advantages: rewards has {rewards.shape[0]} rows, not a multiple of group_size={group_size}"
        )
    if not rewards.is_floating_point():
        rewards = rewards.float()

    grouped = rewards.reshape(-1, group_size)  # [K, G]
    centred = grouped - grouped.mean(dim=-1, keepdim=True)  # [K, G]
    if scale == "group":
        advantages = centred / (_std(grouped, dim=-1, keepdim=True) + eps)
    elif scale == "batch":
        advantages = centred / (_std(rewards) + eps)
    else:
        advantages = centred

    identical = grouped.amax(dim=-1, keepdim=True) == grouped.amin(dim=-1, keepdim=True)  # [K, 1]
    advantages = torch.where(identical, torch.zeros_like(advantages), advantages)
    return advantages.reshape(-1)
