"""Micro-benchmark of the two audio-mass methods on one attention layer (for `make bench`).

It times forward + backward of `audio_mass_eager` (full Q×S softmax) against `audio_mass_sdpa`
(indicator-value SDPA) on random query/key states of a chosen size, and measures the peak extra memory
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
from torch.profiler import ProfilerActivity, profile

from mapo.capture.kernels import audio_mass_eager, audio_mass_sdpa
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


def interleaved_times(steps: dict[str, Callable[[], None]], device: torch.device, repeats: int) -> dict[str, list[float]]:
    """Wall times in seconds of `repeats` rounds in which every step runs once, in turn, after one untimed
    warm-up call each. Interleaving makes a change of machine load hit all steps alike, so ratios of their
    medians are fairer than back-to-back blocks on a shared machine."""
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
