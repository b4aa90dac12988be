"""Relative-position bins and their means, worked by hand; the curve plot writes a PNG."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mapo.eval.positions import binned_means, binned_sums, means_from_sums, plot_position_curves, relative_bins


def test_bins_by_hand():
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    # K = 4: row 0 (T=5) floor(4k/5) for k=0..4 → 0,0,1,2,3; row 1 (T=2) → 0,2; row 2 (T=7) → 0,0,1,1,2,2,3
    assert relative_bins(mask, 4).tolist() == [[0, 0, 1, 2, 3, -1, -1], [0, 2, -1, -1, -1, -1, -1], [0, 0, 1, 1, 2, 2, 3]]
    # deciles of a 10-token completion: one token per bin; of 20 tokens: two per bin
    assert relative_bins(torch.ones(1, 10), 10).tolist() == [list(range(10))]
    assert relative_bins(torch.ones(1, 20), 10).tolist() == [[k // 2 for k in range(20)]]
    # padding in the middle is skipped (the k-th valid token counts)
    assert relative_bins(torch.tensor([[1, 0, 1]]), 2).tolist() == [[0, -1, 1]]
    # K = 4 is the training metric's quarters: (cumsum - 1) / T · 4
    with pytest.raises(ValueError):
        relative_bins(mask, 0)


def test_pooled_and_per_sequence_means_by_hand():
    values = torch.tensor([[1.0, 3.0, 5.0, 7.0], [10.0, 20.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    # K = 2: row 0 bins 0,0,1,1 → sums (4, 12), counts (2, 2); row 1 bins 0,1 → sums (10, 20), counts (1, 1)
    sums, counts = binned_sums(values, mask, 2)
    assert sums.tolist() == [[4.0, 12.0], [10.0, 20.0]] and counts.tolist() == [[2, 2], [1, 1]]
    # pooled: (4 + 10) / 3, (12 + 20) / 3; per sequence: mean of (2, 10) and of (6, 20)
    assert binned_means(values, mask, 2).tolist() == pytest.approx([14 / 3, 32 / 3])
    assert binned_means(values, mask, 2, per_sequence=True).tolist() == pytest.approx([6.0, 13.0])


def test_empty_bins_are_nan_and_sums_combine_across_batches():
    values = torch.tensor([[2.0, 4.0]])
    means = binned_means(values, torch.ones(1, 2), 4)  # T=2, K=4: bins 0 and 2
    assert means[0] == 2.0 and means[2] == 4.0 and math.isnan(means[1]) and math.isnan(means[3])
    # sums of two batches stacked give the same means as one batch of both
    a, b = torch.rand(3, 7), torch.rand(2, 5)
    ma, mb = (torch.rand(3, 7) > 0.3).long(), torch.ones(2, 5, dtype=torch.long)
    sa, ca = binned_sums(a, ma, 10)
    sb, cb = binned_sums(b, mb, 10)
    joint = means_from_sums(np.concatenate([sa, sb]), np.concatenate([ca, cb]))
    padded = torch.cat([a, torch.nn.functional.pad(b, (0, 2))])
    padded_mask = torch.cat([ma, torch.nn.functional.pad(mb, (0, 2))])
    np.testing.assert_allclose(joint, binned_means(padded, padded_mask, 10), equal_nan=True)


def test_plot_writes_a_png(tmp_path):
    path = plot_position_curves({"with audio": [0.5, 0.4, float("nan")], "audio removed": [0.2, 0.2, 0.1]},
                                tmp_path / "p" / "curves.png", ylabel="mass", title="t")
    assert (tmp_path / "p" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(path.get_lines()) == 2
    with pytest.raises(ValueError, match="needs a path"):
        plot_position_curves({"a": [1.0]}, ylabel="x")
