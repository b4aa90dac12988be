"""Follow-up GPU run of 2026-11-28 (issue 10), after the first run of that day showed three open questions.

1. Decode: the same `time_decode` setting read 20.4 ms/step in the bench and 14.6 ms in decode_compile.py
   minutes later. Here the per-row, shared-prompt and matmul-attention decodes run 3 interleaved rounds each,
   so their medians and paired ratios say what is noise.
2. Scoring at 0.82x full logits: the chunked function with `keep_logits` (the forward's bf16 logits kept for
   the backward instead of recomputed) against the default, and the update pass with both.
3. Fused capture at 2.60x vs the second call's 1.77x on CUDA: is it the widened head (128 + 8 > 128, off
   the memory-efficient kernel's fast path) or the mask? Head dim 120 (widened to 128) and no padding.
Then the decode with the decoder compiled, per-row and shared-prompt.

    OUT=/tmp/out python3 experiments/gpu/followup_20261128.py

Prints one JSON line per result and appends them to $OUT/followup.jsonl as they come.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from mapo.bench import bench_scoring  # noqa: E402
from mapo.bench_gpu import (  # noqa: E402
    WIDTHS_7B, WIDTHS_TOY, _with, build_model, card_peaks, matmul_decode_attention, time_decode, time_update,
)
from mapo.capture.bench import capture_overhead  # noqa: E402

OUT = Path(os.environ.get("OUT", "/tmp/followup"))
OUT.mkdir(parents=True, exist_ok=True)
STARTED = time.perf_counter()


def emit(name: str, value) -> None:
    line = json.dumps({"name": name, "t": round(time.perf_counter() - STARTED, 1), "value": value}, default=float)
    print(line, flush=True)
    with open(OUT / "followup.jsonl", "a") as f:
        f.write(line + "\n")


def guarded(name: str, fn):
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - report and go on
        emit(name, f"failed: {type(err).__name__}: {str(err)[:300]}")
        torch.cuda.empty_cache()
        return None


def main() -> None:
    toy = not torch.cuda.is_available()  # a dry run of the code at toy widths on CPU
    device = torch.device("cpu" if toy else "cuda")
    dtype = torch.float32 if toy else torch.bfloat16
    widths = WIDTHS_TOY if toy else WIDTHS_7B
    name = "cpu" if toy else torch.cuda.get_device_name(device)
    bandwidth, peak_flops = (1e11, 1e12) if toy else card_peaks(name)
    seq_len, positions, prompt_len, new_tokens, seq = (64, 32, 32, 12, 64) if toy else (4096, 512, 512, 128, 1024)
    heads = dict(q_heads=4, kv_heads=2, head_dim=16) if toy else {}
    emit("device", {"name": name, "torch": torch.__version__})

    # 3. capture (small, first)
    for label, kw in (("hd128_padded", {}), ("hd120_padded", {"head_dim": 120}), ("hd128_unpadded", {"padded": False})):
        r = guarded(label, lambda kw=kw: capture_overhead(seq_len, device=device, repeats=5, **{**heads, **kw}))
        if r:
            emit(f"capture_overhead_{label}", {k: r[k] for k in ("sdpa_over_none", "fused_over_none")}
                 | {"none_ms": r["none"]["time_s"] * 1e3})

    # 2. scoring
    for chunk in (512, 1024):
        for keep in (False, True):
            r = guarded("scoring", lambda: bench_scoring(8, positions, widths["hidden"], widths["vocab"], device, 5,
                                                         dtype=dtype, chunk_size=chunk, keep_logits=keep))
            if r:
                emit(f"scoring_chunk{chunk}_keep{int(keep)}", {"speed": r["speed"], "memory": r["memory"],
                     "chunked_ms": r["chunked"]["time_s"] * 1e3, "full_ms": r["full"]["time_s"] * 1e3})

    model = build_model(widths, device, dtype)
    # 1. decode, interleaved rounds
    shape = dict(prompts=8, group=8, prompt_len=prompt_len, new_tokens=new_tokens, cuda_graph="on", bandwidth=bandwidth, dtype=dtype)
    variants = {
        "per_row": lambda: time_decode(model, widths, **shape),
        "shared_prompt": lambda: time_decode(model, widths, shared_prompt=True, **shape),
        "matmul_attention": lambda: _with(matmul_decode_attention(), lambda: time_decode(model, widths, **shape)),
    }
    steps: dict[str, list[float]] = {k: [] for k in variants}
    for round_ in range(3):
        for name, fn in variants.items():
            r = guarded(name, fn)
            if r:
                steps[name].append(r["step_s"])
                emit(f"decode_{name}_round{round_}", {"step_ms": r["step_s"] * 1e3, "over_bound": r["step_over_bound"],
                                                      "bound_ms": r["bound_s"] * 1e3})
    emit("decode_medians_ms", {k: statistics.median(v) * 1e3 for k, v in steps.items() if v})
    if all(steps.values()):
        emit("decode_paired", {k: statistics.median(a / b for a, b in zip(steps[k], steps["per_row"]))
                               for k in ("shared_prompt", "matmul_attention")})

    # 2b. update with and without kept logits (the update's LM head is the fused chunk function)
    import mapo.scoring as scoring

    original = scoring.logprobs_from_hidden
    for rows in (2, 4, 8):
        for keep in (False, True):
            scoring.logprobs_from_hidden = (lambda *a, keep=keep, **k: original(*a, keep_logits=keep, **k))
            try:
                r = guarded("update", lambda: time_update(model, widths, rows=rows, seq=seq, checkpointing=False,
                                                          peak_flops=peak_flops, repeats=3))
            finally:
                scoring.logprobs_from_hidden = original
            if r:
                emit(f"update_{rows}x1024_keep{int(keep)}", {"time_s": r["time_s"], "mfu": r.get("mfu")})

    # 4. compiled decoder, per-row and shared-prompt (minutes of compiling each; last)
    from mapo.kv_cache import SharedPromptKVCache, StaticKVCache
    from mapo.models.adapter import get_adapter

    text = get_adapter(model).text_model(model)
    eager_forward = text.forward
    for shared in (True, False):
        torch._dynamo.reset()
        cache_class = SharedPromptKVCache if shared else StaticKVCache
        update = cache_class.update  # the cache write stays eager (decode_compile.py's "outside")
        cache_class.update = torch.compiler.disable(update)
        text.forward = torch.compile(eager_forward, dynamic=True)
        try:
            t0 = time.perf_counter()
            r = guarded("compiled", lambda: time_decode(model, widths, shared_prompt=shared, **shape))
            if r:
                emit(f"decode_compiled_shared{int(shared)}", {"step_ms": r["step_s"] * 1e3,
                     "over_bound": r["step_over_bound"], "bound_ms": r["bound_s"] * 1e3,
                     "total_s": time.perf_counter() - t0})
        finally:
            cache_class.update = update
            text.forward = eager_forward


if __name__ == "__main__":
    main()
