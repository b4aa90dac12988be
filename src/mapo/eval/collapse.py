"""Collapse diagnostics on the evaluated completions: audio attention mass and |Δh| by relative position.

For every completion generated under the `audio` or `no_audio` condition (greedy by default), two
teacher-forced passes of the *evaluated model* over its own prompt + completion give, per token:

- the audio attention mass a_t (`mapo.capture`: the last 3 decoder layers by default, max over heads, mean
  over layers, at the query position that predicts the token), taken in the pass whose input matches
  how the completion was generated: the audio present for `audio`, the audio features dropped (the
  placeholders keep their bare embedding) for `no_audio`;
- |Δh_t| = |H(π | audio dropped) − H(π | audio)| (`mapo.scoring`, full-vocabulary entropies at the
  scoring temperature), from one pass with the audio and one with the audio features dropped.

Departure from training's Δh (DESIGN §3): there is no reference model here (evaluation loads one
model), so both entropies come from the evaluated model; the ablation is the paper's default
(`drop_features`). The values are binned by relative position (`mapo.eval.positions`, deciles) per
completion; sums and counts travel with the predictions and are pooled over all completions at the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mapo.capture import capture_audio_attention, completion_mass, text_decoder_layers
from mapo.eval.positions import DECILES, binned_sums, means_from_sums, plot_position_curves
from mapo.rollout import Rollout
from mapo.scoring import delta_entropy, score_tokens

#: Conditions the diagnostics are recorded for, and their labels in plots.
COLLAPSE_CONDITIONS = {"audio": "with audio", "no_audio": "audio removed"}


@torch.no_grad()
def collapse_values(
    model: torch.nn.Module,
    rollout: Rollout,
    condition: str,
    *,
    layers: Sequence[int] | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token audio mass and |Δh| of a rollout generated under `condition` ("audio" or "no_audio").

    layers: decoder layers of the attention mass (None: the last 3, or all of a smaller model's).
    Returns (mass [N, T], abs_delta_h [N, T]) float32 on the CPU, 0 where completion_mask is 0.
    """
    if condition not in COLLAPSE_CONDITIONS:
        raise ValueError(f"collapse diagnostics are recorded for {', '.join(COLLAPSE_CONDITIONS)}, not {condition!r}")
    mask = rollout.completion_mask
    # A rollout generated without audio never encoded it: re-encode the kept features for the audio pass.
    with_audio = "cached" if any(e is not None for e in rollout.prompt_audio_embeds) else "recompute"
    as_generated = with_audio if condition == "audio" else "drop_features"
    other = "drop_features" if condition == "audio" else with_audio
    if layers is None:
        layers = range(-min(3, len(text_decoder_layers(model))), 0)
    keys = rollout.audio_mask
    with capture_audio_attention(model, keys, layers=tuple(layers)) as cap:
        generated = score_tokens(model, rollout, audio=as_generated, temperature=temperature)
        mass = completion_mass(cap.mass, rollout.prompt_len, rollout.completion_ids.shape[1])
    contrast = score_tokens(model, rollout, audio=other, temperature=temperature)
    h_audio, h_dropped = (
        (generated.entropy, contrast.entropy) if condition == "audio" else (contrast.entropy, generated.entropy)
    )
    abs_dh = delta_entropy(h_dropped, h_audio, mask).abs()
    mass = mass * mask.to(mass.device, mass.dtype)
    return mass.float().cpu(), abs_dh.float().cpu()


def item_bins(mass: torch.Tensor, abs_dh: torch.Tensor, mask: torch.Tensor, n_bins: int = DECILES) -> list[dict[str, Any]]:
    """One dict per row: bin sums of mass and |Δh| and the token counts per bin (lists, for JSON/gather)."""
    mask = mask.cpu()
    mass_sums, counts = binned_sums(mass, mask, n_bins)
    dh_sums, _ = binned_sums(abs_dh, mask, n_bins)
    return [
        {"mass_sums": m.tolist(), "abs_dh_sums": d.tolist(), "counts": c.tolist()}
        for m, d, c in zip(mass_sums, dh_sums, counts)
    ]


def batch_diagnostics(condition: str, *, layers: Sequence[int] | None = None, temperature: float = 1.0, n_bins: int = DECILES):
    """An `item_extras(model)` factory for `mapo.evaluate.answer_sharded`: per-record bin sums of a batch."""

    def for_model(model: torch.nn.Module):
        def extras(records, rollout: Rollout) -> list[dict[str, Any]]:
            mass, abs_dh = collapse_values(model, rollout, condition, layers=layers, temperature=temperature)
            return item_bins(mass, abs_dh, rollout.completion_mask, n_bins)

        return extras

    return for_model


def item_means(item: dict[str, Any]) -> dict[str, list[float | None]]:
    """Per-completion bin means (None for an empty bin), as written in predictions.jsonl."""
    counts = np.asarray(item["counts"], dtype=np.float64)
    out = {}
    for key, name in (("mass_sums", "audio_mass_bins"), ("abs_dh_sums", "abs_dh_bins")):
        sums = np.asarray(item[key], dtype=np.float64)
        out[name] = [float(s / c) if c > 0 else None for s, c in zip(sums, counts)]
    return out


def pooled_curves(items_by_condition: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """{condition: {"audio_mass": [K], "abs_delta_h": [K], "tokens": [K], "completions": n}}; NaN bins → None."""
    curves = {}
    for condition, items in items_by_condition.items():
        counts = np.array([i["counts"] for i in items], dtype=np.float64)
        entry: dict[str, Any] = {"completions": len(items), "tokens": counts.sum(0).astype(int).tolist()}
        for key, name in (("mass_sums", "audio_mass"), ("abs_dh_sums", "abs_delta_h")):
            means = means_from_sums(np.array([i[key] for i in items]), counts)
            entry[name] = [None if np.isnan(v) else float(v) for v in means]
        curves[condition] = entry
    return curves


def plot_collapse(curves: dict[str, dict[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """collapse.png: audio attention mass (left) and |Δh| (right) by decile, one curve per condition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, label in ((left, "audio_mass", "audio attention mass"), (right, "abs_delta_h", "|Δh| (nats)")):
        lines = {
            COLLAPSE_CONDITIONS.get(c, c): [np.nan if v is None else v for v in entry[key]] for c, entry in curves.items()
        }
        plot_position_curves(lines, ylabel=label, ax=ax)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
