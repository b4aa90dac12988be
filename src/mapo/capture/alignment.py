"""Align per-position attention mass with completion tokens (DESIGN §3 alignment rule).

The batch layout is [left-padded prompt | completion]: every row's prompt occupies the first P positions
(P fixed for the batch, padding on the left), and completion token t (0-based) sits at position P + t.
The logits that predict y_t come from the query position just before it, P + t − 1 — the same position
whose attention mass a_t the attention loss uses. So a_t = mass[:, P + t − 1] for t = 0..T−1: the last
prompt position predicts the first completion token, and the mass at the last completion position
(which predicts nothing inside the completion) is never used.
"""

from __future__ import annotations

import torch


def predicting_positions(prompt_width: int, completion_len: int, device: torch.device | None = None) -> torch.Tensor:
    """[T] long: the query position that predicts completion token t, i.e. prompt_width + t − 1."""
    _check_widths(prompt_width, completion_len)
    return torch.arange(completion_len, device=device) + (prompt_width - 1)


def completion_mass(mass: torch.Tensor, prompt_width: int, completion_len: int) -> torch.Tensor:
    """Per-completion-token audio mass.

    mass: [B, S] per query position of the full sequence (e.g. `AudioAttentionCapture.mass`).
    prompt_width: P, the (left-padded) prompt width shared by the batch.
    completion_len: T, the width of the left-aligned completion tensor [B, T].
    Returns [B, T] = mass[:, P − 1 : P − 1 + T] (a view; gradients flow to `mass`).
    Requires P + T − 1 <= S.
    """
    if mass.dim() != 2:
        raise ValueError(f"mass must be [B, S]; got shape {tuple(mass.shape)}")
    _check_widths(prompt_width, completion_len)
    start = prompt_width - 1
    if start + completion_len > mass.shape[1]:
        raise ValueError(
            f"prompt_width {prompt_width} + completion_len {completion_len} - 1 exceeds the {mass.shape[1]} "
            "positions of mass"
        )
    return mass[:, start : start + completion_len]


def _check_widths(prompt_width: int, completion_len: int) -> None:
    if prompt_width < 1:
        raise ValueError(
            f"prompt_width must be >= 1 (a completion token needs a position before it); got {prompt_width}"
        )
    if completion_len < 0:
        raise ValueError(f"completion_len must be >= 0; got {completion_len}")
