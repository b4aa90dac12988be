"""AdamW over the trainable parameters and a warm-up + schedule learning-rate multiplier."""

from __future__ import annotations

import math

import torch


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW on parameters with requires_grad; no weight decay on biases and norms (1-D tensors)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters (check model.freeze_* settings)")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based): linear warm-up, then the schedule.

    constant: 1; linear: decays to 0 at total_steps; cosine: half cosine to 0 at total_steps.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"trainer.schedule must be constant, linear or cosine, got {schedule!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, schedule: str) -> torch.optim.lr_scheduler.LambdaLR:
    lr_multiplier(warmup_steps, warmup_steps, total_steps, schedule)  # validate the name now, not mid-run
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, warmup_steps, total_steps, schedule))
