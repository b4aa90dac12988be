"""Per-token values by relative position in the completion, and plots of such curves (DESIGN §6).

The collapse curve puts a per-token quantity (audio attention mass, |Δh|, …) against how far into its
completion the token is. Completions have different lengths, so positions are relative: token t
(0-based) of a completion with T valid tokens falls in bin floor(t·K / T) of K bins (K = 10: deciles),
the same rule as the training metric `audio_mass/q*` with K = 4. Every bin of a completion with T ≥ K
tokens gets at least one token; a shorter completion leaves some bins empty.

Two ways to average a bin over completions:
- pooled (default): every token counts once; long completions weigh more (as the training metric);
- per sequence: each completion's bin mean counts once, over the completions that have tokens there.

`binned_sums` gives per-completion sums and counts, which add up across batches and ranks exactly, so
callers can collect them piecewise and combine with `means_from_sums`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

DECILES = 10


def relative_bins(mask: torch.Tensor, n_bins: int = DECILES) -> torch.Tensor:
    """Bin of each token by its relative position. mask: [N, T] (1 = valid token, left-aligned or not).

    Returns [N, T] long: floor(k·n_bins / T_row) for the k-th valid token of its row (0-based),
    -1 where the mask is 0.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    valid = mask.bool()
    lengths = valid.sum(-1, keepdim=True).clamp(min=1)  # [N, 1]
    index = valid.long().cumsum(-1) - 1  # [N, T]: k for the k-th valid token
    bins = torch.div(index * n_bins, lengths, rounding_mode="floor").clamp(max=n_bins - 1)
    return bins.masked_fill(~valid, -1)


def binned_sums(values: torch.Tensor, mask: torch.Tensor, n_bins: int = DECILES) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-completion bin sums and token counts. values, mask: [N, T]. Returns (sums [N, K] float64, counts [N, K] long)."""
    if values.shape != mask.shape:
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(mask.shape)} must have the same [N, T] shape")
    bins = relative_bins(mask, n_bins)
    onehot = torch.nn.functional.one_hot(bins.clamp(min=0), n_bins) * (bins >= 0).unsqueeze(-1)  # [N, T, K]
    sums = (values.detach().double().unsqueeze(-1) * onehot).sum(1)
    return sums, onehot.sum(1)


def means_from_sums(sums: np.ndarray | torch.Tensor, counts: np.ndarray | torch.Tensor, per_sequence: bool = False) -> np.ndarray:
    """Bin means from per-completion sums and counts ([N, K] each): [K] float64, NaN for an empty bin."""
    sums = np.asarray(sums, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        if not per_sequence:
            return sums.sum(0) / counts.sum(0)
        seq_means = np.where(counts > 0, sums / np.where(counts > 0, counts, 1), np.nan)  # [N, K]
        filled = counts > 0
        return np.where(filled.any(0), np.nansum(seq_means, 0) / filled.sum(0), np.nan)


def binned_means(values: torch.Tensor, mask: torch.Tensor, n_bins: int = DECILES, per_sequence: bool = False) -> np.ndarray:
    """Mean of `values` [N, T] over valid tokens (`mask` [N, T]) in each relative-position bin: [K], NaN if empty."""
    sums, counts = binned_sums(values, mask, n_bins)
    return means_from_sums(sums.numpy(), counts.numpy(), per_sequence=per_sequence)


def plot_position_curves(
    curves: Mapping[str, Sequence[float]],
    path: str | Path | None = None,
    *,
    ylabel: str,
    title: str | None = None,
    ax=None,
):
    """Several binned curves on one axes (x = relative position, bin centres in %); NaN bins are gaps.

    curves: label -> K values. With `ax` the curves are drawn there (a panel of a larger figure) and
    nothing is saved; otherwise a new figure is written to `path` (PNG). Returns the axes.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    own = ax is None
    if own:
        if path is None:
            raise ValueError("plot_position_curves needs a path to write to, or an axes to draw on")
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for label, values in curves.items():
        values = np.asarray(values, dtype=np.float64)
        centres = (np.arange(len(values)) + 0.5) * 100.0 / len(values)
        ax.plot(centres, values, marker="o", lw=1.2, label=label)
    ax.set_xlabel("relative position in the completion (%)")
    ax.set_ylabel(ylabel)
    ax.set_xlim(0, 100)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    if own:
        fig.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return ax
