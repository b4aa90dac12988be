"""Micro-benchmarks of the audio-mass methods on one attention layer (for `make bench`).

`compare` times forward + backward of `audio_mass_eager` (full Q×S softmax) against `audio_mass_sdpa`
(indicator-value SDPA) on random query/key states of a chosen size. `capture_overhead` times what a
captured layer costs over an uncaptured one: the layer's own attention alone, then with the mass from a
second SDPA call ("sdpa"), then fused into the one call ("fused", `mapo.capture.kernels.fused_inputs`).
Both measure the peak extra memory
each one allocates: `torch.cuda.max_memory_allocated` on a GPU; on CPU, the running sum of the torch
profiler's allocation records (tracemalloc cannot see torch's allocator). Only ratios measured in one
run are meaningful (DESIGN §9).

Example:  python -c "from mapo.capture.bench import compare; print(compare(2048))"
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from mapo.capture.kernels import (
    audio_mass_eager,
    audio_mass_sdpa,
    fused_inputs,
    split_fused_output,
)
from mapo.timing import sync_device

_METHODS: dict[str, Callable[..., torch.Tensor]] = {"eager": audio_mass_eager, "sdpa": audio_mass_sdpa}


def _inputs(
    seq_len: int, batch: int, q_heads: int, kv_heads: int, head_dim: int, audio_len: int, padded: bool,
    device: torch.device, dtype: torch.dtype, seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Random inputs of one layer.

    Returns query [B, Hq, S, d] and key [B, Hkv, S, d] (leaf tensors), audio_keys [B, S] bool,
    mask [B, 1, S, S] bool | None, weights [B, Hq, S] (the linear functional that is backpropagated).
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    query = torch.randn(batch, q_heads, seq_len, head_dim, generator=gen).to(device, dtype).requires_grad_()
    key = torch.randn(batch, kv_heads, seq_len, head_dim, generator=gen).to(device, dtype).requires_grad_()
    # Row b is left-padded by b·seq_len/(4·batch) positions; its audio span starts right after the padding.
    pads = [b * seq_len // (4 * batch) if padded else 0 for b in range(batch)]
    positions = torch.arange(seq_len)
    audio_keys = torch.stack([(positions >= p) & (positions < p + audio_len) for p in pads]).to(device)
    mask = None
    if padded:
        not_pad = torch.stack([positions >= p for p in pads])  # [B, S]
        causal = positions[None, :] <= positions[:, None]  # [S, S]
        mask = (causal[None] & not_pad[:, None, :])[:, None].to(device)
    weights = torch.randn(batch, q_heads, seq_len, generator=gen).to(device)
    return query, key, audio_keys, mask, weights


def median_time(step: Callable[[], None], device: torch.device, repeats: int) -> float:
    """Median wall time in seconds of `repeats` calls of `step`, after one untimed warm-up call.

    The warm-up takes kernel selection and allocator growth out of the timings; on CUDA the device is
    synchronised around each call so the time covers the queued kernels, not just their launch.
    """
    return statistics.median(interleaved_times({"step": step}, device, repeats)["step"])


def paired_ratio(numerators: list[float], denominators: list[float]) -> float:
    """Median over rounds of numerators[i] / denominators[i]: the ratio of two interleaved measurements.

    Each round's pair ran back to back under the same machine load, so its ratio is what a load change
    moves least; the ratio of the two medians can pair a quiet-time median with a busy-time one (seen here:
    MAPO / GRPO read 1.07 from the medians of one run whose per-round ratios had a median of 1.21).
    """
    if len(numerators) != len(denominators) or not numerators:
        raise ValueError(f"paired_ratio needs two equally long, non-empty lists; got {len(numerators)} and {len(denominators)}")
    return statistics.median(a / b for a, b in zip(numerators, denominators))


def interleaved_times(steps: dict[str, Callable[[], None]], device: torch.device, repeats: int) -> dict[str, list[float]]:
    """Wall times in seconds of `repeats` rounds in which every step runs once, in turn, after one untimed
    warm-up call each. Interleaving makes a change of machine load hit all steps alike; compare two steps
    with `paired_ratio` of their lists."""
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            sync_device(device)
            start = time.perf_counter()
            step()
            sync_device(device)
            times[name].append(time.perf_counter() - start)
    return times


def peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated by `step` above what was allocated before it."""
    if device.type == "cuda":
        sync_device(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync_device(device)
        return torch.cuda.max_memory_allocated(device) - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    records = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    current = peak = 0
    for record in records:
        current += record.nbytes()
        peak = max(peak, current)
    return peak


def compare(
    seq_len: int,
    batch: int = 1,
    q_heads: int = 32,
    kv_heads: int = 32,
    head_dim: int = 128,
    audio_len: int | None = None,
    padded: bool = True,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    repeats: int = 3,
    seed: int = 0,
    value_width: int | None = None,
) -> dict[str, dict[str, float] | float]:
    """Time and peak memory of forward + backward of each method on one layer.

    seq_len: S (queries = keys); audio_len: audio keys per row (default S // 2); padded: left-pad the rows
    (a materialised bool mask, as transformers passes for a padded batch) or not (mask None, is_causal).
    Defaults: Qwen2-Audio-7B's attention shape (32 heads × 128), CUDA + bf16 when a GPU is present,
    else CPU + float32. value_width: the sdpa method's indicator width (default: its own choice).
    Returns {"eager": {"time_s", "peak_bytes"}, "sdpa": {...}, "time_ratio": eager/sdpa,
    "memory_ratio": eager/sdpa, "max_abs_diff": max |mass_eager − mass_sdpa| (padding rows are 0 in both)}.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    audio_len = seq_len // 2 if audio_len is None else audio_len
    query, key, audio_keys, mask, weights = _inputs(
        seq_len, batch, q_heads, kv_heads, head_dim, audio_len, padded, device, dtype, seed
    )
    scaling = head_dim**-0.5
    per_method: dict[str, dict[str, float]] = {}
    masses: dict[str, torch.Tensor] = {}
    for name, mass_fn in _METHODS.items():

        def step() -> None:
            query.grad = key.grad = None
            extra = {"value_width": value_width} if name == "sdpa" and value_width is not None else {}
            mass = mass_fn(query, key, audio_keys, mask, scaling, **extra)
            (mass * weights).sum().backward()
            masses[name] = mass.detach()

        per_method[name] = {"time_s": median_time(step, device, repeats), "peak_bytes": float(peak_bytes(step, device))}
    eager, sdpa = per_method["eager"], per_method["sdpa"]
    return {
        "eager": eager,
        "sdpa": sdpa,
        "time_ratio": eager["time_s"] / sdpa["time_s"],
        "memory_ratio": eager["peak_bytes"] / max(sdpa["peak_bytes"], 1.0),
        "max_abs_diff": (masses["eager"] - masses["sdpa"]).abs().max().item(),
    }


def _layer_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     scaling: float) -> torch.Tensor:
    """The layer's own attention as transformers' SDPA function computes it: [B, Q, Hq, dv] (keys and values
    repeated to the query heads when a mask is given, grouped heads otherwise)."""
    n_rep = query.shape[1] // key.shape[1]
    if mask is None:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=n_rep > 1)
    else:
        key, value = key.repeat_interleave(n_rep, 1), value.repeat_interleave(n_rep, 1)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2)


def capture_overhead(
    seq_len: int,
    batch: int = 1,
    q_heads: int = 32,
    kv_heads: int = 32,
    head_dim: int = 128,
    padded: bool = True,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    repeats: int = 3,
    seed: int = 0,
) -> dict[str, dict[str, float] | float]:
    """Forward + backward of one layer's attention without capture ("none"), with the second-call capture
    ("sdpa") and with the fused one ("fused"); sizes and defaults as in `compare` (audio on half the keys).

    The backpropagated functional is Σ out·u + Σ mass·w with random u, w, so both outputs carry gradient.
    Returns {"none" | "sdpa" | "fused": {"time_s", "peak_bytes"}, "sdpa_over_none", "fused_over_none" (time
    ratios), "fused_vs_sdpa_max_abs_diff" (mass) and "fused_output_max_abs_diff" (attention output vs none)}.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    query, key, audio_keys, mask, weights = _inputs(
        seq_len, batch, q_heads, kv_heads, head_dim, seq_len // 2, padded, device, dtype, seed
    )
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    value = torch.randn(key.shape, generator=gen).to(device, dtype).requires_grad_()
    out_weights = torch.randn(batch, seq_len, q_heads, head_dim, generator=gen).to(device, dtype)
    scaling = head_dim**-0.5
    results: dict[str, torch.Tensor] = {}

    def run(method: str) -> Callable[[], None]:
        def step() -> None:
            query.grad = key.grad = value.grad = None
            if method == "fused":
                wide = _layer_attention(*fused_inputs(query, key, value, audio_keys), mask, scaling)
                out, mass = split_fused_output(wide, head_dim, mask)
            else:
                out = _layer_attention(query, key, value, mask, scaling)
                mass = audio_mass_sdpa(query, key, audio_keys, mask, scaling) if method == "sdpa" else None
            loss = (out.float() * out_weights.float()).sum()
            if mass is not None:
                loss = loss + (mass * weights).sum()
                results[method + "_mass"] = mass.detach()
            loss.backward()
            results[method + "_out"] = out.detach()
        return step

    steps = {name: run(name) for name in ("none", "sdpa", "fused")}
    times = interleaved_times(steps, device, repeats)
    out: dict = {name: {"time_s": statistics.median(times[name]), "peak_bytes": float(peak_bytes(step, device))}
                 for name, step in steps.items()}
    out["sdpa_over_none"] = paired_ratio(times["sdpa"], times["none"])
    out["fused_over_none"] = paired_ratio(times["fused"], times["none"])
    out["fused_vs_sdpa_max_abs_diff"] = (results["fused_mass"] - results["sdpa_mass"]).abs().max().item()
    out["fused_output_max_abs_diff"] = (results["fused_out"].float() - results["none_out"].float()).abs().max().item()
    return out
