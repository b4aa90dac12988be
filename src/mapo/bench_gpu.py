"""GPU bench at Qwen2-Audio-7B widths, full depth: `python -m mapo.bench --suite gpu7b` (a few minutes on one
H100/H200; writes `experiments/bench/<gpu>-gpu7b.json` and its table in experiments/bench/README.md).

The text decoder has Qwen2-Audio-7B's shape (hidden 4096, 32 layers, 32 heads = 32 KV heads, MLP 11008,
vocabulary 156,032), random weights built directly on the GPU in bf16; the audio tower is a one-layer stub
(the sections below run text-only prompts: decoding and the update are the text decoder's work).

Sections (each fails soft: an error or the time budget is recorded and the next section runs):
- decode: our rollout (`generate_rollout`, B prompts × G = 8 rows, random prompt tokens) with the CUDA graph
  on and off. Step time = (time of a rollout of n new tokens − time of one of 1 token) / (n − 1), sampling
  included. Memory-bandwidth bound of a step = (bytes of the weights read per step + bytes of the KV cache
  read at the mean context length) / the card's peak bandwidth; the ratio step / bound is the target
  (≤ 2). Our cache rounds the columns it reads up to a multiple of `GRAPH_BUCKET` with graphs on; the bound
  counts only the columns that hold tokens.
- decode_profile: where a decode step's device time goes, for the gap between the step and the bound.
  `torch.profiler` over an eager rollout of 1 token and one of n tokens (same prompts); the difference of
  each kernel category's summed time (matmul, attention, sampling, copies, other) divided by n − 1 is the
  device time per step, next to the bound and the timed step (CUDA graphs remove the host's launch gaps,
  not kernel time, so the graph step is at least the summed kernel time). On CPU (--toy) the categories are
  the operators' own CPU time.
- decode_64rows_graph_shared_prompt: decode_64rows_graph with `rollout.shared_prompt_cache` (each prompt's
  keys/values held and read once for its G = 8 rows, `mapo.kv_cache.SharedPromptKVCache`); its bound counts
  the bytes that cache reads (each prompt once), so step/bound stays an honest ratio. (H200, 2026-11-28:
  1.26x the per-row step; the option saves memory, not time.)
- decode_*_graph_compiled: the 64-, 32- and 128-row decodes with `rollout.compile` (`mapo.decode_compile`);
  the first one's untimed warm-up compiles (`warmup_s`), the others reuse the compiled code.
- (`matmul_decode_attention`, the one-query attention as two batched matmuls, was a section until the H200
  run of 2026-11-28 measured it at 1.13x the SDPA step; `experiments/gpu/followup_20261128.py` still uses it.)
- update: forward + backward of the policy's log-probs and entropies (`hidden_states` +
  `logprobs_from_hidden`, every position scored) on rows × sequence tokens; model-FLOPs utilisation =
  6 · N · tokens / time / peak dense bf16 FLOP/s, N = the decoder layers' and LM head's parameters
  (attention score FLOPs and activation-checkpointing recompute are not counted, as usual for MFU).
  Without and with activation checkpointing (the latter is what the 7B configs train with).
- scoring: the fused chunked log-prob/entropy vs full fp32 logits at V = 156,032 (`mapo.bench.bench_scoring`).
- capture: eager vs SDPA-indicator audio mass on one layer at S = 4096 (`mapo.capture.bench.compare`).
- capture_overhead: one layer's attention at S = 4096 without capture, with the mass in a second SDPA call,
  and with it fused into the layer's own call (`mapo.capture.bench.capture_overhead`), fwd+bwd.

Peaks: detected from the device name (`CARD_PEAKS`); override with --bandwidth-tbs / --peak-tflops. `--toy`
runs the same code at toy widths (on CPU too) for the tests.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from types import SimpleNamespace

import torch

from mapo.timing import sync_device

#: (substring of torch.cuda.get_device_name, peak memory bandwidth in TB/s, peak dense bf16 TFLOP/s), first match
#: wins (so "H100 PCIe" and "H100 NVL" come before the SXM part's plain "H100"). Vendor data sheets.
CARD_PEAKS = (
    ("H200", 4.8, 989.0),
    ("H100 NVL", 3.9, 835.0),
    ("H100 PCIe", 2.0, 756.0),
    ("H100", 3.35, 989.0),
    ("H800", 3.35, 989.0),
    ("A100-SXM4-80GB", 2.039, 312.0),
    ("A100 80GB PCIe", 1.935, 312.0),
    ("A100", 1.555, 312.0),
    ("L40S", 0.864, 362.0),
    ("A10G", 0.6, 125.0),
)

WIDTHS_7B = dict(hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, vocab=156_032)
WIDTHS_TOY = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512)


def card_peaks(name: str) -> tuple[float | None, float | None]:
    """(bytes/s, FLOP/s) of a device name from CARD_PEAKS, or (None, None)."""
    for key, tbs, tflops in CARD_PEAKS:
        if key.lower() in name.lower():
            return tbs * 1e12, tflops * 1e12
    return None, None


def build_model(widths: dict, device: torch.device, dtype: torch.dtype):
    """Qwen2-Audio with the given text widths and a one-layer audio stub, random weights made on `device`."""
    config = dict(
        audio_config=dict(d_model=64, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
                          num_mel_bins=128, max_source_positions=50),
        text_config=dict(hidden_size=widths["hidden"], num_hidden_layers=widths["layers"],
                         num_attention_heads=widths["heads"], num_key_value_heads=widths["kv_heads"],
                         intermediate_size=widths["intermediate"], vocab_size=widths["vocab"],
                         max_position_embeddings=8192),
        audio_token_index=widths["vocab"] - 1,
    )
    return random_qwen2_audio(config, device, dtype).eval()


def random_qwen2_audio(config: dict, device: torch.device | str, dtype: torch.dtype):
    """Qwen2-Audio of `config` (the fields of a config.json; its model_type and torch_dtype are ignored) with
    SDPA attention and random weights made directly on `device` in `dtype` (no CPU fp32 copy first: at 7B that
    copy alone is 28 GB)."""
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    plain = {k: v for k, v in config.items() if k not in ("model_type", "torch_dtype")}
    if isinstance(plain.get("text_config"), dict):
        plain["text_config"] = {k: v for k, v in plain["text_config"].items() if k != "torch_dtype"}
    hf_config = Qwen2AudioConfig(**plain)
    hf_config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return Qwen2AudioForConditionalGeneration(hf_config)
    finally:
        torch.set_default_dtype(previous)


@contextmanager
def device_timer(device: torch.device):
    """Times its block in wall seconds (`timer.seconds` after the block), the device's queued work waited for
    on entry and on exit, so the time covers the block's kernels and not just their launch."""
    timer = SimpleNamespace(seconds=None)
    sync_device(device)
    start = time.perf_counter()
    yield timer
    sync_device(device)
    timer.seconds = time.perf_counter() - start


def weight_bytes_per_step(model) -> int:
    """Bytes of the parameters a decode step reads: decoder layers, final norm, LM head (not the token table,
    of which a step reads one row per sequence)."""
    from mapo.models.adapter import get_adapter

    adapter = get_adapter(model)
    text = adapter.text_model(model)
    modules = [*adapter.decoder_layers(model), text.norm, adapter.lm_head(model)]
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def kv_bytes_per_token(widths: dict, dtype: torch.dtype) -> int:
    """Keys + values of one token of one row over all layers."""
    head_dim = widths["hidden"] // widths["heads"]
    return 2 * widths["layers"] * widths["kv_heads"] * head_dim * torch.tensor([], dtype=dtype).element_size()


def _decoder(model, widths: dict, *, prompts: int, group: int, prompt_len: int, cuda_graph: str,
             shared_prompt: bool = False, compile_decoder: bool | str = False):
    """(device, rollout(n)): our rollout of n new tokens on `prompts` random prompts of `prompt_len` tokens.
    Random weights: a row samples EOS with probability ~1/V per step, so a rollout runs all n steps (the
    longest row decides), and rollouts of 1 and of n tokens differ by n − 1 whole decode steps."""
    from mapo.rollout import generate_rollout

    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, widths["vocab"] - 10, (prompts, prompt_len), generator=gen).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def rollout(n: int):
        return generate_rollout(model, batch, group_size=group, max_new_tokens=n, eos_token_id=widths["vocab"] - 2,
                                pad_token_id=0, temperature=1.0, seeds=list(range(prompts)), cuda_graph=cuda_graph,
                                shared_prompt_cache=shared_prompt, compile_decoder=compile_decoder)

    return device, rollout


def _bound(model, widths: dict, dtype: torch.dtype, rows: int, prompt_len: int, steps: int,
           bandwidth: float | None, prompts: int | None = None) -> dict:
    """The step's bytes (weights read per step, KV cache at the mean context length) and, with a bandwidth,
    the bound in seconds. prompts: with the shared-prompt cache, the prompt is read once per prompt, not per
    row (the bytes that cache really reads)."""
    weights = weight_bytes_per_step(model)
    prompt_reads = rows if prompts is None else prompts
    kv = kv_bytes_per_token(widths, dtype) * (prompt_reads * prompt_len + rows * steps / 2)
    return {"weight_bytes": weights, "kv_bytes_mean": kv, **({"bound_s": (weights + kv) / bandwidth} if bandwidth else {})}


def time_decode(model, widths: dict, *, prompts: int, group: int, prompt_len: int, new_tokens: int, cuda_graph: str,
                bandwidth: float | None, dtype: torch.dtype, shared_prompt: bool = False, repeats: int = 3,
                compile_decoder: bool | str = False) -> dict:
    """Decode step time of `generate_rollout` and its memory-bandwidth bound (see the module docstring);
    shared_prompt: decode with `rollout.shared_prompt_cache` (the bound then counts each prompt once);
    compile_decoder: with `rollout.compile` (the untimed warm-up rollout compiles).

    The step time is the median over `repeats` rounds of (rollout of new_tokens − rollout of 1) / (steps − 1),
    after one untimed rollout of the full length. Why rounds: on an H200 (2026-11-28) the same setting read
    20.4 ms/step as the first decode of one process and 14.0-14.6 ms in every later round or process
    (`experiments/gpu/followup_20261128.py`); one round reported whichever it met. Every rollout captures its
    own CUDA graphs, so their capture stays inside every timed round, as in training."""
    from mapo.rollout import graph_stats

    device, rollout = _decoder(model, widths, prompts=prompts, group=group, prompt_len=prompt_len, cuda_graph=cuda_graph,
                               shared_prompt=shared_prompt, compile_decoder=compile_decoder)

    def timed(n: int) -> tuple[float, int]:
        with device_timer(device) as timer:
            out = rollout(n)
        return timer.seconds, int(out.completion_ids.shape[1])

    started = time.perf_counter()
    timed(new_tokens)  # warm-up (kernels, allocator, graph capture path, every buffer at its full size)
    warmup_s = time.perf_counter() - started  # with compile_decoder: mostly the compile
    rounds, ones = [], []
    graphs_before = graph_stats()
    for _ in range(max(1, repeats)):
        one, _ = timed(1)
        full, steps = timed(new_tokens)
        rounds.append((full - one) / max(steps - 1, 1))
        ones.append(one)
    graphs = {k: (v - graphs_before[k]) // max(1, repeats) for k, v in graph_stats().items()}
    step_s = statistics.median(rounds)
    rows = prompts * group
    out = {"rows": rows, "prompt_len": prompt_len, "new_tokens": steps, "cuda_graph": cuda_graph,
           "shared_prompt": shared_prompt, "compile_decoder": compile_decoder, "warmup_s": warmup_s, "step_s": step_s, "step_s_rounds": rounds, "tokens_per_s": rows / step_s,
           "prefill_and_first_token_s": statistics.median(ones), "graphs": graphs,
           **_bound(model, widths, dtype, rows, prompt_len, steps, bandwidth, prompts if shared_prompt else None)}
    if "bound_s" in out:
        out["step_over_bound"] = step_s / out["bound_s"]
    return out


@contextmanager
def matmul_decode_attention():
    """While inside: transformers' "sdpa" attention computes one-query calls with a boolean mask (our decode
    steps) as softmax(q·Kᵀ·scale, masked) · V with two batched matmuls, the scores [B, h_kv, h/h_kv, L] in fp32;
    every other call (prefill, scoring) goes to the original function. Query heads that share a KV head
    (GQA) are batched against it, so K and V are read once, never repeated."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    original = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        if query.shape[2] != 1 or attention_mask is None or attention_mask.dtype != torch.bool:
            return original(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        batch, heads, _, dim = query.shape
        kv_heads = key.shape[1]
        scale = dim ** -0.5 if scaling is None else scaling
        grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim)  # [B, h_kv, rep, d]
        scores = torch.matmul(grouped, key.transpose(-1, -2)).float().mul_(scale)  # [B, h_kv, rep, L]
        scores.masked_fill_(~attention_mask, float("-inf"))  # mask [B, 1, 1, L] broadcasts
        out = torch.matmul(scores.softmax(dim=-1).to(value.dtype), value)  # [B, h_kv, rep, d]
        return out.reshape(batch, 1, heads, dim), None  # transformers' layout: [B, q, h, d]

    ALL_ATTENTION_FUNCTIONS["sdpa"] = attention  # a local override of the registry's class-wide entry
    try:
        yield attention
    finally:
        del ALL_ATTENTION_FUNCTIONS["sdpa"]
        if ALL_ATTENTION_FUNCTIONS["sdpa"] is not original:  # it was a local override already
            ALL_ATTENTION_FUNCTIONS["sdpa"] = original


#: Kernel-name fragments (lower case) of each category of `profile_decode`, first match wins.
KERNEL_CATEGORIES = (
    ("attention", ("fmha", "flash", "attention", "mem_eff", "efficient")),
    ("sampling", ("topk", "sort", "radix", "scan", "cumsum", "multinomial", "argmax", "gather", "scatter", "where")),
    ("matmul", ("gemm", "cutlass", "matmul", "nvjet", "cublas", "addmm", "bmm", "linear", "mm")),
    ("copy", ("memcpy", "memset", "copy", "cat", "index")),
)


def kernel_category(name: str) -> str:
    """The `KERNEL_CATEGORIES` entry a kernel (or CPU operator) name falls in, else "other"."""
    lower = name.lower()
    for category, fragments in KERNEL_CATEGORIES:
        if any(fragment in lower for fragment in fragments):
            return category
    return "other"


def _profiled_category_seconds(run, device: torch.device) -> dict[str, float]:
    """Seconds per category of the kernels (CUDA) or operators' self CPU time (CPU) that `run()` launched."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync_device(device)
    with profile(activities=activities) as prof:
        run()
        sync_device(device)
    totals: dict[str, float] = {}
    for event in prof.events():
        if device.type == "cuda":
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            micros = event.time_range.elapsed_us()
        else:
            micros = event.self_cpu_time_total
        category = kernel_category(event.name)
        totals[category] = totals.get(category, 0.0) + micros * 1e-6
    return totals


def per_step_categories(one: dict[str, float], full: dict[str, float], steps: int) -> dict[str, float]:
    """Seconds per decode step by category from the profiles of a 1-token and a `steps`-token rollout: the
    difference, divided by the steps - 1 it holds (a category that shrank counts 0)."""
    return {c: max(full.get(c, 0.0) - one.get(c, 0.0), 0.0) / max(steps - 1, 1) for c in sorted({*one, *full})}


def profile_decode(model, widths: dict, *, prompts: int, group: int, prompt_len: int, new_tokens: int,
                   bandwidth: float | None, dtype: torch.dtype) -> dict:
    """Device time per eager decode step by kernel category (see the module docstring), and its sum over
    the bandwidth bound."""
    device, rollout = _decoder(model, widths, prompts=prompts, group=group, prompt_len=prompt_len, cuda_graph="off")
    steps: list[int] = []

    def run(n: int):
        steps.append(int(rollout(n).completion_ids.shape[1]))

    run(2)  # warm-up
    one = _profiled_category_seconds(lambda: run(1), device)
    full = _profiled_category_seconds(lambda: run(new_tokens), device)
    n = steps[-1]
    per_step = per_step_categories(one, full, n)
    total = sum(per_step.values())
    rows = prompts * group
    out = {"rows": rows, "prompt_len": prompt_len, "new_tokens": n, "measure": "kernels" if device.type == "cuda" else "cpu ops",
           "per_step_s": per_step, "total_s": total,
           "share": {c: v / total for c, v in per_step.items()} if total else {}}
    bound = _bound(model, widths, dtype, rows, prompt_len, n, bandwidth)
    if "bound_s" in bound:
        out["bound_s"] = bound["bound_s"]
        out["total_over_bound"] = total / out["bound_s"]
    return out


def time_update(model, widths: dict, *, rows: int, seq: int, checkpointing: bool, peak_flops: float | None,
                repeats: int) -> dict:
    """Forward + backward of log-probs and entropies at every position; MFU against `peak_flops`."""
    from mapo.capture.bench import median_time
    from mapo.models.adapter import get_adapter
    from mapo.models.embed import position_ids_from_mask
    from mapo.scoring import hidden_states, logprobs_from_hidden

    adapter = get_adapter(model)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(10, widths["vocab"] - 10, (rows, seq), generator=gen).to(device)
    mask = torch.ones_like(ids)
    positions = position_ids_from_mask(mask)
    layers = list(adapter.decoder_layers(model))
    if checkpointing:
        from mapo.models.loader import enable_activation_checkpointing

        enable_activation_checkpointing(model)
    model.train().requires_grad_(True)
    params = [p for m in (*layers, adapter.lm_head(model)) for p in m.parameters()]

    def step():
        for p in model.parameters():
            p.grad = None
        hidden = hidden_states(model, adapter.embed_tokens(model)(ids), mask, positions)
        lp, ent = logprobs_from_hidden(adapter.lm_head(model), hidden, ids[:, 1:], 1)
        (lp.sum() + ent.sum()).backward()

    try:
        seconds = median_time(step, device, repeats)  # after one warm-up call
    finally:
        for p in model.parameters():
            p.grad = None
        model.eval().requires_grad_(False)
        if checkpointing:
            for layer in layers:
                layer.gradient_checkpointing = False
    n_params = sum(p.numel() for p in params)
    flops = 6 * n_params * rows * seq
    out = {"rows": rows, "seq": seq, "tokens": rows * seq, "checkpointing": checkpointing, "time_s": seconds,
           "params_counted": n_params, "model_flops": flops, "tokens_per_s": rows * seq / seconds}
    if peak_flops:
        out["mfu"] = flops / seconds / peak_flops
    return out


def _with(context, fn):
    """fn() inside `context`."""
    with context:
        return fn()


def run_gpu_suite(args) -> dict:
    """All sections, in order of importance, each failing soft, within `args.budget_s` seconds of starting."""
    from mapo.bench import bench_scoring, machine_name
    from mapo.capture.bench import capture_overhead
    from mapo.capture.bench import compare as compare_capture

    toy = getattr(args, "toy", False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not toy:
        raise SystemExit("the gpu7b suite needs a CUDA device (use --toy to run its code at toy widths on CPU)")
    widths = WIDTHS_TOY if toy else WIDTHS_7B
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    bandwidth, peak_flops = card_peaks(name)
    source = "CARD_PEAKS table" if bandwidth else "unknown card: pass --bandwidth-tbs/--peak-tflops"
    if getattr(args, "bandwidth_tbs", None):
        bandwidth, source = args.bandwidth_tbs * 1e12, "command line"
    if getattr(args, "peak_tflops", None):
        peak_flops, source = args.peak_tflops * 1e12, "command line"
    results: dict = {"suite": "gpu7b", "machine": machine_name(device), "device": name, "toy": toy,
                     "widths": widths, "dtype": str(dtype), "peak_bandwidth_Bps": bandwidth, "peak_flops": peak_flops,
                     "peaks_source": source,
                     "sections": {}}
    started = time.perf_counter()
    budget = float(getattr(args, "budget_s", 170.0))

    def section(key: str, fn) -> None:
        elapsed = time.perf_counter() - started
        if elapsed > budget:
            results["sections"][key] = f"skipped: time budget ({elapsed:.0f} s > {budget:.0f} s)"
            return
        print(f"[gpu7b] {key} ...", flush=True)
        t0 = time.perf_counter()
        try:
            results["sections"][key] = fn()
        except Exception as err:  # noqa: BLE001 - report and go on (OOM, capture failure, ...)
            results["sections"][key] = f"failed: {type(err).__name__}: {str(err)[:300]}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"[gpu7b] {key}: {time.perf_counter() - t0:.1f} s", flush=True)

    t0 = time.perf_counter()
    model = build_model(widths, device, dtype)
    results["build_s"] = time.perf_counter() - t0
    results["weight_bytes_per_step"] = weight_bytes_per_step(model)
    small = dict(prompt_len=32, new_tokens=12) if toy else dict(prompt_len=512, new_tokens=128)
    decode = dict(model=model, widths=widths, group=8, bandwidth=bandwidth, dtype=dtype)
    section("decode_64rows_graph", lambda: time_decode(prompts=8, cuda_graph="on", **small, **decode))
    section("decode_profile", lambda: profile_decode(prompts=8, **{**small, "new_tokens": 17 if not toy else 6}, **decode))
    section("decode_64rows_eager", lambda: time_decode(prompts=8, cuda_graph="off", repeats=1,  # ~7x slower: one round
                                                       **{**small, "new_tokens": small["new_tokens"] // 2}, **decode))
    section("decode_64rows_graph_shared_prompt", lambda: time_decode(
        prompts=8, cuda_graph="on", shared_prompt=True, **small, **decode))
    update = dict(model=model, widths=widths, peak_flops=peak_flops, repeats=2 if toy else 3)
    seq = 64 if toy else 1024
    section(f"update_2x{seq}", lambda: time_update(rows=2, seq=seq, checkpointing=False, **update))
    section(f"update_4x{seq}", lambda: time_update(rows=4, seq=seq, checkpointing=False, **update))
    section("decode_32rows_graph", lambda: time_decode(prompts=4, cuda_graph="on", **small, **decode))
    section("decode_128rows_graph", lambda: time_decode(prompts=16, cuda_graph="on", **{**small, "prompt_len": small["prompt_len"] // 2}, **decode))
    # rollout.compile: the first section compiles (its warm-up, seconds to a minute); the others reuse the code.
    # --toy (the tests, on CPU) traces with dynamo's "eager" backend: Inductor's C++ compile takes minutes there.
    compiler = "eager" if toy else True
    section("decode_64rows_graph_compiled", lambda: time_decode(prompts=8, cuda_graph="on", compile_decoder=compiler, **small, **decode))
    section("decode_32rows_graph_compiled", lambda: time_decode(prompts=4, cuda_graph="on", compile_decoder=compiler, **small, **decode))
    section("decode_128rows_graph_compiled", lambda: time_decode(
        prompts=16, cuda_graph="on", compile_decoder=compiler, **{**small, "prompt_len": small["prompt_len"] // 2}, **decode))
    section(f"update_8x{seq}_checkpointed", lambda: time_update(rows=8, seq=seq, checkpointing=True, **update))
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    section("scoring", lambda: bench_scoring(8, 64 if toy else 512, widths["hidden"], widths["vocab"], device, 2 if toy else 3, dtype=dtype))
    heads = dict(q_heads=4, kv_heads=2, head_dim=16) if toy else {}
    section("capture", lambda: {"seq_len": 128 if toy else 4096,
                                **compare_capture(128 if toy else 4096, device=device, repeats=2 if toy else 3, **heads)})
    section("capture_overhead", lambda: {"seq_len": 128 if toy else 4096,
                                         **capture_overhead(128 if toy else 4096, device=device, repeats=2 if toy else 3, **heads)})
    results["wall_s"] = time.perf_counter() - started
    return results


def markdown_table(results: dict) -> str:
    """The suite's table for experiments/bench/README.md."""
    lines = [f"### {results['machine']} — gpu7b suite{' (toy widths)' if results.get('toy') else ''}", "",
             f"{results['device']}; widths {results['widths']}; {results['dtype']}; peaks: "
             f"{(results['peak_bandwidth_Bps'] or 0) / 1e12:.2f} TB/s, {(results['peak_flops'] or 0) / 1e12:.0f} TFLOP/s "
             f"({results['peaks_source']}); `{results.get('command', '')}` ({results.get('wall_s', 0):.0f} s)", "",
             "| section | result |", "|---|---|"]
    for key, sec in results["sections"].items():
        if isinstance(sec, str):
            lines.append(f"| {key} | {sec} |")
        elif key == "decode_profile":
            parts = ", ".join(f"{c} {v * 1e3:.2f} ms ({sec['share'][c]:.0%})" for c, v in
                              sorted(sec["per_step_s"].items(), key=lambda kv: -kv[1]) if sec["share"])
            bound = f"; sum / bound **{sec['total_over_bound']:.2f}**" if "total_over_bound" in sec else ""
            lines.append(f"| decode_profile | {sec['rows']} rows, eager, {sec['measure']} per step: {parts}; "
                         f"sum {sec['total_s'] * 1e3:.2f} ms{bound} |")
        elif key.startswith("decode"):
            bound = f", bound {sec['bound_s'] * 1e3:.2f} ms → step/bound **{sec['step_over_bound']:.2f}** (target ≤ 2)" if "bound_s" in sec else ""
            g = sec.get("graphs", {})
            compiled = f", compiled (warm-up {sec['warmup_s']:.0f} s)" if sec.get("compile_decoder") else ""
            lines.append(f"| {key} | {sec['rows']} rows, prompt {sec['prompt_len']}, {sec['new_tokens']} tokens{compiled}, graph "
                         f"{sec['cuda_graph']} (captured {g.get('captured', 0)}, replayed {g.get('replayed', 0)}, failed "
                         f"{g.get('failed', 0)}): {sec['step_s'] * 1e3:.2f} ms/step, {sec['tokens_per_s']:.0f} tok/s{bound} |")
        elif key.startswith("update"):
            mfu = f", MFU **{sec['mfu']:.1%}** (target ≥ 40 %)" if "mfu" in sec else ""
            lines.append(f"| {key} | {sec['tokens']} tokens, checkpointing {sec['checkpointing']}: {sec['time_s']:.3f} s, "
                         f"{sec['tokens_per_s']:.0f} tok/s{mfu} |")
        elif key == "scoring":
            lines.append(f"| scoring | fused chunked vs full logits, {sec['rows']}×{sec['tokens']}, V = {sec['vocab']:,}: "
                         f"speed {sec['speed']:.2f}×, memory {sec['memory']:.2f} of full |")
        elif key == "capture_overhead":
            lines.append(f"| capture_overhead | S = {sec['seq_len']}, one layer's attention fwd+bwd over no capture: "
                         f"second SDPA call {sec['sdpa_over_none']:.2f}×, fused **{sec['fused_over_none']:.2f}×** |")
        elif key == "capture":
            lines.append(f"| capture | S = {sec['seq_len']}: eager/SDPA-indicator time {sec['time_ratio']:.2f}, "
                         f"memory {sec['memory_ratio']:.1f} |")
    return "\n".join(lines)
