"""GPU experiment for the decode gap (issue 10): the decode step with the text decoder compiled by
`torch.compile` (Inductor fuses the norms, rotary, residual adds and cache writes that run as separate small
kernels), against the same step uncompiled, both under our CUDA graph, in one process on one model.

    python3 experiments/gpu/decode_compile.py                 # 7B widths, 64 rows, prompt 512, 128 tokens
    python3 experiments/gpu/decode_compile.py --toy           # the same code at toy widths (CPU: needs a C++ compiler)
    python3 experiments/gpu/decode_compile.py --cache-write both   # also with the cache write compiled in

Why: the recorded H200 runs put the non-KV part of a 32-row step at ~8 ms against ~3 ms for reading the
weights at peak bandwidth (experiments/RESULTS.md); at ~40 kernels per layer and 32 layers, the small kernels
alone can take milliseconds even when a graph replays them. Prints one JSON line: both steps, their ratio,
the bound, and how long compiling took (it happens in the untimed warm-up). On an H200 (2026-11-28) it
measured the compiled step at 0.87x the eager one (1.82x the bound), which led to `rollout.compile`
(`mapo.decode_compile`, the "outside" variant plus one recompile per layer avoided); the gpu7b suite times
that option itself now. This script stays for the "inside" variant and as the record of that measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from mapo.bench_gpu import WIDTHS_7B, WIDTHS_TOY, build_model, card_peaks, time_decode  # noqa: E402
from mapo.models.adapter import get_adapter  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toy", action="store_true")
    parser.add_argument("--prompts", type=int, default=8, help="prompts; rows = prompts × 8")
    parser.add_argument("--cache-write", choices=("inside", "outside", "both"), default="outside",
                        help="compile the KV-cache write with the decoder, leave it eager, or time both")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    widths = WIDTHS_TOY if args.toy else WIDTHS_7B
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    bandwidth, _ = card_peaks(torch.cuda.get_device_name(device)) if device.type == "cuda" else (None, None)
    model = build_model(widths, device, dtype)
    shape = dict(prompt_len=32, new_tokens=12) if args.toy else dict(prompt_len=512, new_tokens=128)
    setting = dict(model=model, widths=widths, prompts=args.prompts, group=8, cuda_graph="on", bandwidth=bandwidth,
                   dtype=dtype, **shape)
    out: dict = {"device": str(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
                 "torch": torch.__version__, "widths": widths}
    out["eager_kernels"] = time_decode(**setting)
    text = get_adapter(model).text_model(model)
    eager_forward = text.forward
    # "outside" (the default) is `rollout.compile` itself (`mapo.decode_compile`): the cache write stays eager,
    # and each layer is two compiled pieces around it (graph breaks, all replayed by our CUDA graph, so on a
    # GPU they cost only the fusion across them). "inside" compiles the write with the decoder: its in-place
    # index_copy_ into the cache buffers (graph inputs) is functionalised, and unless Inductor re-inplaces it
    # the step copies whole buffers back, which at 7B widths would be gigabytes per step. On CPU at toy widths
    # (2026-11-28, loaded machine): with a 32-token prompt inside ran at 0.51x the eager step in one run and
    # 1.35x in another, outside at 1.34x; with a 512-token prompt inside took 9.4 ms against 5.4 ms eager, its
    # extra time growing with the cache as a copy of the buffers would.
    variants = ("inside", "outside") if args.cache_write == "both" else (args.cache_write,)
    for variant in variants:
        torch._dynamo.reset()
        started = time.perf_counter()
        if variant == "outside":
            out["compiled_cache_outside"] = time_decode(**setting, compile_decoder=True)  # warm-up compiles
        else:
            try:
                # dynamic=True: the cache's visible length changes by bucket; one graph should serve them all
                text.forward = torch.compile(eager_forward, dynamic=True)
                out["compiled_cache_inside"] = time_decode(**setting)  # its warm-up rollouts do the compiling
            finally:
                text.forward = eager_forward
        out[f"compiled_cache_{variant}_total_s"] = time.perf_counter() - started
        out[f"compiled_cache_{variant}_over_eager_kernels"] = (
            out[f"compiled_cache_{variant}"]["step_s"] / out["eager_kernels"]["step_s"])
    print(json.dumps(out, default=float))
    return out


if __name__ == "__main__":
    main()
