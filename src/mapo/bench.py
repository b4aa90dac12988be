"""`make bench`: speed and memory of mapo's fast paths, as ratios of two measurements taken in one run on one
machine (DESIGN §9). Writes `experiments/bench/<machine>.json` and rewrites the tables of
`experiments/bench/README.md` from every JSON file there.

    python -m mapo.bench [--quick] [--no-trl] [--out experiments/bench]      # CPU suite (the tiny model)
    python -m mapo.bench --suite gpu7b                                        # Qwen2-Audio-7B widths on a GPU
    python -m mapo.bench --tables-only                                        # README tables from the JSON files

CPU suite (one thread; what the tiny model shows):
1. capture:  audio-attention mass, eager softmax weights vs the SDPA indicator (one layer, fwd+bwd); and what
             a captured layer's attention costs over an uncaptured one, with the mass in a second SDPA call
             or fused into the layer's own call (`mapo.capture.bench.capture_overhead`).
2. scoring:  log-prob + entropy of 8×128 positions, V = 32,000: the fused chunked function vs full fp32
             logits with autograd (fwd+bwd): speed and peak memory.
3. rollout:  our decode loop vs `generate` on the G-repeated batch (8 prompts × G = 8, 40 new tokens,
             T = 1.3), with audio and text-only; the preallocated cache vs the growing one, and the per-row
             prompt copies vs the shared-prompt cache.
4. step:     MAPO vs GRPO (tiny_mapo / tiny_grpo configs) on one rollout: everything after the rollout.
5. trl:      steps/s of mapo vs TRL `GRPOTrainer` on the same work (`mapo.bench_trl`), when TRL is installed.
The GPU suite is `mapo.bench_gpu`.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from mapo import paths
from mapo.capture.bench import (
    capture_overhead,
    interleaved_times,
    paired_ratio,
    peak_bytes,
)
from mapo.capture.bench import compare as compare_capture

BENCH_DIR = Path(__file__).resolve().parents[2] / "experiments" / "bench"
#: Targets of issue 10, as (ratio key, comparison, threshold); the table marks each ratio met or not.
TARGETS = {
    "scoring_speed": (">=", 0.9),
    "scoring_memory": ("<=", 0.25),
    "rollout_vs_generate_audio": (">=", 3.0),
    "rollout_vs_generate_text": (">=", 3.0),
    "mapo_over_grpo_step": ("<=", 1.15),
    "mapo_over_trl_steps_per_s": (">=", 2.0),
}


def machine_name(device: torch.device) -> str:
    """A file-name slug of the machine: the GPU's name, or the CPU model and the thread count."""
    if device.type == "cuda":
        text = torch.cuda.get_device_name(device)
    else:
        model = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    model = line.split(":", 1)[1]
                    break
        except OSError:
            pass
        text = f"cpu {model} {torch.get_num_threads()}t"
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# ----------------------------------------------------------------------------------------- scoring
def bench_scoring(rows: int, tokens: int, hidden: int, vocab: int, device: torch.device, repeats: int,
                  dtype: torch.dtype = torch.float32, chunk_size: int | None = None, keep_logits: bool | None = None) -> dict:
    """Fused chunked (mapo.scoring.logprobs_from_hidden) vs full-logits log-probs + entropy, forward + backward.
    The LM head and hidden states are in `dtype`; both sides compute the softmax in fp32. repeats = 0 measures
    the peak memory only (no "speed", no times). chunk_size: positions per chunk (default: scoring's own);
    keep_logits: keep the forward's logits for the backward (default: scoring's own choice, `keeps_logits`)."""
    from mapo.scoring import logprobs_from_hidden

    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=False).to(device, dtype)
    h = torch.randn(rows, tokens + 1, hidden, generator=gen).to(device, dtype).requires_grad_()
    ids = torch.randint(vocab, (rows, tokens), generator=gen).to(device)

    def chunked():
        h.grad = head.weight.grad = None
        lp, ent = logprobs_from_hidden(head, h, ids, 1, keep_logits=keep_logits,
                                       **({} if chunk_size is None else {"chunk_size": chunk_size}))
        (lp.sum() + ent.sum()).backward()

    def full():
        h.grad = head.weight.grad = None
        logp = torch.log_softmax(head(h[:, :-1]).float(), -1)
        lp = logp.gather(-1, ids[..., None]).squeeze(-1)
        ent = -(logp.exp() * logp).sum(-1)
        (lp.sum() + ent.sum()).backward()

    times = interleaved_times({"chunked": chunked, "full": full}, device, repeats) if repeats else None
    out = {"rows": rows, "tokens": tokens, "hidden": hidden, "vocab": vocab, "dtype": str(dtype)}
    for name, step in (("chunked", chunked), ("full", full)):
        out[name] = {"peak_bytes": float(peak_bytes(step, device))}
        if times:
            out[name]["time_s"] = statistics.median(times[name])
    if times:
        out["speed"] = paired_ratio(times["full"], times["chunked"])
    out["memory"] = out["chunked"]["peak_bytes"] / max(out["full"]["peak_bytes"], 1.0)
    return out


# ----------------------------------------------------------------------------------------- rollout
def bench_rollout(model_dir: Path, data_dir: Path, *, prompts: int, group: int, new_tokens: int, temperature: float,
                  text_only: bool, repeats: int, device: torch.device = torch.device("cpu")) -> dict:
    """Our rollout (static cache, and the growing-cache fallback) vs `generate` on the G-repeated batch."""
    import dataclasses

    from mapo.data.collate import Collator
    from mapo.data.validate import read_manifest
    from mapo.evaluate import generation_tokens
    from mapo.models.adapter import get_adapter
    from mapo.models.loader import load_model_and_processor
    from mapo.rollout import generate_rollout

    model, processor = load_model_and_processor(model_dir, device=device)
    records = read_manifest(data_dir / "test.jsonl").records[:prompts]
    if text_only:
        records = [dataclasses.replace(r, audio=None) for r in records]
    batch = Collator(processor).prompts(records)
    tokens = generation_tokens(processor, get_adapter(model).vocab_size(model))  # as training and evaluation decode
    eos, pad, suppress = tokens["eos_token_id"], tokens["pad_token_id"], tokens["suppress_token_ids"]
    clips = {"n": 0}
    hook = get_adapter(model).audio_tower(model).register_forward_hook(
        lambda module, args, output: clips.__setitem__("n", clips["n"] + args[0].shape[0]))
    generated: dict[str, int] = {}

    def ours(cache: str, shared: bool = False):
        def run():
            r = generate_rollout(model, batch, group_size=group, max_new_tokens=new_tokens, eos_token_id=eos,
                                 pad_token_id=pad, suppress_token_ids=suppress, seeds=list(range(prompts)),
                                 temperature=temperature, cache=cache, shared_prompt_cache=shared)
            generated["shared" if shared else cache] = int(r.completion_mask.sum())
        return run

    repeated = {k: v.repeat_interleave(group, 0).to(device) for k, v in batch.items()}

    def hf():
        with torch.no_grad():
            out = model.generate(**repeated, do_sample=True, temperature=temperature, top_p=1.0, top_k=0,
                                 max_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=pad, suppress_tokens=suppress)
        completion = out[:, repeated["input_ids"].shape[1]:]
        ended = (completion == eos).cumsum(-1) - (completion == eos).long()
        generated["generate"] = int((ended == 0).sum())

    steps = {"static": ours("static"), "dynamic": ours("dynamic"), "shared": ours("static", shared=True), "generate": hf}
    encoded = {}
    for name, step in steps.items():
        clips["n"] = 0
        step()
        encoded[name] = clips["n"]
    times = interleaved_times(steps, device, repeats)
    hook.remove()
    out = {"prompts": prompts, "group": group, "new_tokens": new_tokens, "temperature": temperature,
           "text_only": text_only, "prompt_len": int(batch["input_ids"].shape[1])}
    for name in steps:
        key = {"generate": "hf_generate", "shared": "ours_shared_prompt_cache"}.get(name, f"ours_{name}_cache")
        out[key] = {"time_s": statistics.median(times[name]), "times_s": times[name],
                    "tokens_generated": generated[name], "clips_encoded": encoded[name]}
    out["speedup_vs_generate"] = paired_ratio(times["generate"], times["static"])
    out["static_over_dynamic_speed"] = paired_ratio(times["dynamic"], times["static"])
    out["shared_over_per_row_speed"] = paired_ratio(times["static"], times["shared"])
    return out


# ----------------------------------------------------------------------------------------- main
def _ratio_rows(results: dict) -> list[tuple[str, str, float, str]]:
    """(key, what, value, how it was measured) for the table."""
    rows = []
    sc = results.get("scoring")
    if isinstance(sc, dict):
        what = f"{sc['rows']}×{sc['tokens']} positions, V = {sc['vocab']:,}, fwd+bwd"
        rows.append(("scoring_speed", "scoring speed: full logits time / fused chunked time", sc["speed"], what))
        rows.append(("scoring_memory", "scoring memory: fused chunked peak / full logits peak", sc["memory"], what))
    sc = results.get("scoring_bf16")
    if isinstance(sc, dict):
        rows.append(("scoring_memory", "scoring memory, bf16 head (as on a GPU): fused chunked peak / full logits peak",
                     sc["memory"], f"{sc['rows']}×{sc['tokens']} positions, H = {sc['hidden']}, V = {sc['vocab']:,}, "
                     "fwd+bwd; speed not measured (CPU bf16 matmuls)"))
    cap = results.get("capture")
    if isinstance(cap, dict):
        rows.append(("capture_speed", "capture: eager time / SDPA-indicator time", cap["time_ratio"], f"one layer, S = {cap['seq_len']}"))
        rows.append(("capture_memory", "capture: eager peak / SDPA-indicator peak", cap["memory_ratio"], f"one layer, S = {cap['seq_len']}"))
    ov = results.get("capture_overhead")
    if isinstance(ov, dict):
        what = f"one layer's attention, fwd+bwd, {ov['setting']}"
        rows.append(("capture_overhead_sdpa", "captured layer: mass in a second SDPA call / no capture", ov["sdpa_over_none"], what))
        rows.append(("capture_overhead_fused", "captured layer: mass fused into the layer's call / no capture", ov["fused_over_none"], what))
    for key, label in (("rollout_audio", "audio"), ("rollout_text", "text")):
        ro = results.get(key)
        if isinstance(ro, dict):
            what = f"{ro['prompts']} prompts × G = {ro['group']}, {ro['new_tokens']} tokens, T = {ro['temperature']}"
            rows.append((f"rollout_vs_generate_{label}", f"rollout ({label} prompts): generate on the G-repeated batch / ours",
                         ro["speedup_vs_generate"], what))
            rows.append((f"static_cache_{label}", f"rollout ({label}): growing cache / preallocated cache",
                         ro["static_over_dynamic_speed"], what))
            if "shared_over_per_row_speed" in ro:  # files from before 2026-11-28 lack it
                rows.append((f"shared_prompt_{label}", f"rollout ({label}): per-row prompt cache / shared prompt cache",
                             ro["shared_over_per_row_speed"], what))
    st = results.get("step")
    if isinstance(st, dict):
        # older JSON files have no paired ratio: the ratio of the medians
        rows.append(("mapo_over_grpo_step", "step after the rollout: MAPO / GRPO (same rollout)",
                     st.get("mapo_over_grpo", st["mapo"]["time_s"] / st["grpo"]["time_s"]),
                     f"{st['rows']} rows, sequence {st['sequence_length']}, tiny_mapo vs tiny_grpo configs"))
    tr = results.get("trl")
    if isinstance(tr, dict):
        s = tr["setting"]
        rows.append(("mapo_over_trl_steps_per_s", "steps/s: mapo GRPO / TRL GRPOTrainer", tr["speedup"],
                     f"text-only, {s['prompts']}×G={s['group']}, {s['new_tokens']} tokens, T = {s['temperature']}, β = 0"))
    return rows


def _mark(key: str, value: float) -> str:
    if key not in TARGETS:
        return ""
    op, threshold = TARGETS[key]
    met = value >= threshold if op == ">=" else value <= threshold
    return f"{'met' if met else 'MISSED'} ({op} {threshold:g})"


def markdown_table(results: dict) -> str:
    lines = [f"### {results['machine']}", "", f"{results['device']}; torch {results['torch']}, transformers "
             f"{results['transformers']}; {results['date']}; `{results['command']}` ({results['wall_s']:.0f} s)", "",
             "| ratio | value | target | measured on |", "|---|---|---|---|"]
    for key, what, value, how in _ratio_rows(results):
        lines.append(f"| {what} | {value:.2f} | {_mark(key, value)} | {how} |")
    for name in ("rollout_audio", "rollout_text", "step", "trl"):
        if isinstance(results.get(name), str):
            lines.append(f"| {name} | – | – | {results[name]} |")
    return "\n".join(lines)


def write_readme(out_dir: Path) -> Path:
    """Rewrite the tables of out_dir/README.md from every <machine>.json in out_dir (text above them is kept)."""
    readme = out_dir / "README.md"
    marker = "<!-- tables written by `python -m mapo.bench`; edit above this line -->"
    head = readme.read_text().split(marker)[0].rstrip() + "\n\n" if readme.is_file() else (
        "# Benchmarks\n\n`make bench` (`python -m mapo.bench`) measures each ratio as two measurements in one run "
        "on one machine and writes `<machine>.json` here; the GPU suite (`python -m mapo.bench --suite gpu7b`) "
        "writes `<gpu>-gpu7b.json`.\n\n")
    tables = []
    for path in sorted(out_dir.glob("*.json")):
        data = json.loads(path.read_text())
        if data.get("suite") == "gpu7b":
            from mapo.bench_gpu import markdown_table as gpu_table

            tables.append(gpu_table(data))
        elif "machine" in data:
            tables.append(markdown_table(data))
    readme.write_text(head + marker + "\n\n" + "\n\n".join(tables) + "\n")
    return readme


def ensure_tiny(model_dir: Path, data_dir: Path) -> None:
    """Build the synthetic benchmark and the tiny model when missing (as `make tiny` does)."""
    if not (data_dir / "train.jsonl").is_file():
        from mapo.data.synthetic import SyntheticConfig, write_benchmark

        write_benchmark(SyntheticConfig(out_dir=str(data_dir), seed=0))
    if not (model_dir / "config.json").is_file():
        from mapo.models.tiny import TinyModelConfig, write_tiny

        write_tiny(TinyModelConfig(out_dir=str(model_dir), corpus=str(data_dir / "train.jsonl")))


def run_cpu_suite(args) -> dict:
    from mapo.bench_rl import same_rollout_steps
    from mapo.bench_trl import compare as compare_trl
    from mapo.bench_trl import trl_available

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    repeats = 2 if args.quick else 3
    results: dict = {}
    started = time.perf_counter()

    def section(name, fn):
        print(f"[bench] {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            results[name] = fn()
        except Exception as err:  # noqa: BLE001 - a failed section is reported, the others still run
            results[name] = f"failed: {type(err).__name__}: {err}"
        print(f"[bench] {name} done in {time.perf_counter() - t0:.0f} s", flush=True)

    section("capture", lambda: {"seq_len": 512 if args.quick else 1024, **compare_capture(512 if args.quick else 1024, device=device, repeats=repeats)})
    # the tiny model's update shape: 16 rows of 188 positions, 4 query / 2 key-value heads of width 16
    overhead = {"seq_len": 188, "batch": 16, "q_heads": 4, "kv_heads": 2, "head_dim": 16}
    section("capture_overhead", lambda: {"setting": "16 rows × 188 positions, 4/2 heads × 16 (the tiny model's)",
                                         **capture_overhead(**overhead, device=device, repeats=3 * repeats)})
    section("scoring", lambda: bench_scoring(8, 64 if args.quick else 128, 256, 32_000, device, repeats))
    # bf16 head and hidden states, as a GPU run holds them, in the GPU suite's proportions: positions = H (there
    # 4096 = 4096) and 8 chunks (there 8 × 512). Memory only: bf16 matmuls on a CPU say nothing of GPU speed.
    section("scoring_bf16", lambda: bench_scoring(2, 128, 256, 32_000, device, 0, dtype=torch.bfloat16, chunk_size=32))
    model_dir, data_dir = Path(args.model_dir), Path(args.data_dir)
    ensure_tiny(model_dir, data_dir)
    setting = dict(prompts=8, group=8, new_tokens=40, temperature=1.3, repeats=repeats + 2)
    section("rollout_audio", lambda: bench_rollout(model_dir, data_dir, text_only=False, device=device, **setting))
    section("rollout_text", lambda: bench_rollout(model_dir, data_dir, text_only=True, device=device, **setting))
    # 9 interleaved pairs (6 with --quick): a step is ~0.3 s, and a load change in the middle of 5 pairs moved the
    # median ratio from 1.37 to 1.73 in one run.
    section("step", lambda: same_rollout_steps(model_dir, data_dir, ("grpo", "mapo"), overrides=[], repeats=3 * repeats,
                                               device=device))
    if args.no_trl:
        results["trl"] = "skipped (--no-trl)"
    elif not trl_available():
        results["trl"] = "skipped: TRL is not installed (pip install -e .[bench])"
    else:
        section("trl", lambda: compare_trl(model_dir, data_dir, steps=2 if args.quick else 3, warmup=1, rounds=2 if args.quick else 4))
    results["wall_s"] = time.perf_counter() - started
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=("cpu", "gpu7b"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats")
    parser.add_argument("--no-trl", action="store_true", help="skip the TRL comparison")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the targets are for 1)")
    parser.add_argument("--device", default="cpu", help="tiny-model suite: cpu (the targets) | cuda (the same ratios on a GPU)")
    parser.add_argument("--out", default=str(BENCH_DIR), help="folder of <machine>.json and README.md")
    parser.add_argument("--model-dir", default=str(paths.TINY_MODEL_DIR))
    parser.add_argument("--data-dir", default=str(paths.SYNTHETIC_DATA_DIR))
    parser.add_argument("--budget-s", type=float, default=150.0, help="gpu7b: start no section after this many seconds")
    parser.add_argument("--toy", action="store_true", help="gpu7b: toy widths (runs on CPU too; for the tests)")
    parser.add_argument("--bandwidth-tbs", type=float, help="gpu7b: the card's peak memory bandwidth, TB/s")
    parser.add_argument("--peak-tflops", type=float, help="gpu7b: the card's peak dense bf16 TFLOP/s")
    parser.add_argument("--tables-only", action="store_true",
                        help="only rewrite README.md from the JSON files in --out (e.g. after copying a GPU run's JSON in)")
    args = parser.parse_args(argv)
    if args.tables_only:
        print(f"wrote {write_readme(Path(args.out))}")
        return
    import transformers

    if args.suite == "gpu7b":
        from mapo.bench_gpu import run_gpu_suite

        results = run_gpu_suite(args)
        name = f"{results['machine']}-gpu7b"
    else:
        results = run_cpu_suite(args)
        device = torch.device(args.device)
        name = machine_name(device)
        described = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU, {torch.get_num_threads()} thread(s)"
        results.update(machine=name, device=described)
    results.update(torch=torch.__version__, transformers=transformers.__version__, date=time.strftime("%Y-%m-%d"),
                   command=("python -m mapo.bench " + " ".join(argv if argv is not None else sys.argv[1:])).strip())
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{name}.json"
    out.write_text(json.dumps(results, indent=2, default=float) + "\n")
    readme = write_readme(out_dir)
    if args.suite == "gpu7b":
        from mapo.bench_gpu import markdown_table as gpu_table

        print(gpu_table(results))
    else:
        print(markdown_table(results))
    print(f"wrote {out} and {readme}")


if __name__ == "__main__":
    main()
