"""`python -m mapo.eval` (what `make eval MODEL=… DATA=…` and `make eval RUN=… DATA=…` run).

    python -m mapo.eval --model FOLDER --data MANIFEST [--out DIR] [options]
    python -m mapo.eval --run-dir RUN_DIR --data MANIFEST [--out DIR] [options]

Loads the model folder through the common loader (any folder it reads: a Hub download, a run's
final_model, an export), reads the manifest in any supported layout, answers every item under the chosen
conditions (greedy unless --do-sample; batched; items sharded over the ranks of torchrun), scores the
answers as the benchmark does (and strictly, as a second column) and writes to OUT: predictions.jsonl,
summary.json, summary.md, charts/*.png, submission*.json and, with --collapse, collapse.json/png. OUT is
printed at the end. No training config, no training manifest and no reference model are involved.

--run-dir evaluates every exported model folder of a run (`exports/step_XXXXXX/`, `final_model/`) into
OUT/<checkpoint>/ and writes accuracy against step (OUT/accuracy_vs_step.{md,json,png}); a checkpoint
already evaluated in OUT is reused unless --redo.

With several processes (`make eval NPROC=4`, torchrun) each rank holds the whole model and answers its
share of the items (results gathered on every rank, written by rank 0); --fsdp shards the weights
instead, for a model that does not fit one device.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from mapo import distributed as dist_utils
from mapo.data.collate import Collator, FeatureCache
from mapo.data.prompt import INSTRUCTION
from mapo.data.validate import ManifestError
from mapo.eval.benchmark import Benchmark, load_benchmark
from mapo.eval.checkpoints import run_checkpoints, write_step_outputs
from mapo.eval.collapse import (
    COLLAPSE_CONDITIONS,
    batch_diagnostics,
    item_means,
    pooled_curves,
)
from mapo.eval.results import score_rows, summarize, write_evaluation
from mapo.evaluate import CONDITIONS, answer_sharded, generation_tokens
from mapo.models.adapter import get_adapter
from mapo.models.loader import check_model_folder, load_model_and_processor


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mapo.eval", description=__doc__.split("\n\n")[0])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="model folder (Hub download, a run's final_model, an export)")
    which.add_argument("--run-dir", dest="run", help="run folder: evaluate every exports/step_XXXXXX/ and final_model/")
    p.add_argument("--data", required=True, help="manifest: MMAU JSON, MMAR-meta.json, MMSU jsonl/parquet, AVQA or our JSONL")
    p.add_argument("--out", default=None, help="output folder (default: outputs/eval/<model>/<manifest>-<time>; "
                   "with --run-dir: <run>/eval/<manifest>)")
    p.add_argument("--layout", default="auto", help="manifest layout (default: detected from the keys)")
    p.add_argument("--conditions", default="audio",
                   help="comma-separated: audio, no_audio, shuffled, or 'all' (flip rates against audio come with them)")
    p.add_argument("--limit", type=int, default=0,
                   help="about N items: N // tasks from every task, at least one each (0 = all)")
    p.add_argument("--skip-bad", action="store_true", help="skip bad manifest rows (counted in the notes)")
    gen = p.add_argument_group("generation")
    gen.add_argument("--batch-size", type=int, default=8, help="prompts per generation batch")
    gen.add_argument("--max-new-tokens", type=int, default=512, help="completion length cap")
    gen.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --do-sample)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus threshold (with --do-sample)")
    gen.add_argument("--seed", type=int, default=0, help="seeds the shuffled condition and per-item sampling")
    dev = p.add_argument_group("model and device")
    dev.add_argument("--device", default="auto", help="auto | cpu | cuda")
    dev.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16 | float16")
    dev.add_argument("--attn-implementation", default="sdpa", help="text attention kernel (sdpa or eager for --collapse)")
    dev.add_argument("--fsdp", action="store_true", help="shard the weights over the ranks (FSDP2) instead of one copy per rank")
    dev.add_argument("--compile", action="store_true",
                     help="decode through torch.compile of the text decoder (mapo.decode_compile; CUDA, one process: "
                          "~10 %% faster steps at 7B widths on an H200; the first batch compiles for 15-35 s)")
    dev.add_argument("--num-threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    diag = p.add_argument_group("collapse diagnostics")
    diag.add_argument("--collapse", action="store_true",
                      help="record audio attention mass and |Δh| by decile of the completion (audio / no_audio conditions)")
    diag.add_argument("--collapse-layers", default="",
                      help="decoder layers of the attention mass, e.g. -3,-2,-1 (default: the last 3, or all if fewer)")
    p.add_argument("--redo", action="store_true", help="with --run-dir: re-evaluate checkpoints already in OUT")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def parse_conditions(text: str) -> list[str]:
    names = list(CONDITIONS) if text.strip() == "all" else [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONDITIONS]
    if unknown or not names:
        raise SystemExit(f"error: --conditions {text!r}: valid are {', '.join(CONDITIONS)} or 'all'")
    return [c for c in CONDITIONS if c in names]  # canonical order: audio first (the flip-rate reference)


def resolve_dtype(name: str, device: torch.device) -> str:
    if name == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    return name


def default_out(model: str, data: str) -> Path:
    return Path("outputs") / "eval" / Path(model).resolve().name / f"{Path(data).stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def evaluate_folder(model_path: str | Path, bench: Benchmark, args: argparse.Namespace, ctx, out: Path,
                    feature_cache: FeatureCache | None = None) -> dict[str, Any] | None:
    """Evaluate one model folder on `bench`; rank 0 writes OUT and returns the summary (others: None).
    feature_cache: the clips' features, shared by the checkpoints of one run (same processor); None: a new one."""
    conditions = parse_conditions(args.conditions)
    dtype = resolve_dtype(args.dtype, ctx.device)
    model, processor = load_model_and_processor(
        model_path, dtype=dtype, attn_implementation=args.attn_implementation, device=ctx.device
    )
    runner = dist_utils.ModelRunner(model)
    if args.fsdp:
        runner = dist_utils.apply_fsdp(runner, ctx)
    # clips are encoded once for all conditions (and, through a shared cache, for all checkpoints of a run)
    collator = Collator(processor, feature_cache=feature_cache if feature_cache is not None else FeatureCache())
    generation: dict[str, Any] = dict(
        generation_tokens(processor, get_adapter(model).vocab_size(model)), batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample, temperature=args.temperature, top_p=args.top_p, compile_decoder=args.compile,
    )
    if ctx.enabled:
        generation["sync_finished"] = lambda done: dist_utils.all_done(done, ctx, ctx.device)
    layers = tuple(int(x) for x in args.collapse_layers.split(",")) if args.collapse_layers.strip() else None
    scoring_temperature = args.temperature if args.do_sample else 1.0
    outputs: dict[str, list[str]] = {}
    diagnostics: dict[str, list[dict]] = {}
    n = len(bench.records)
    for condition in conditions:
        bar = tqdm(total=-(-n // ctx.world_size), desc=f"{Path(model_path).name} {condition}", unit="item",
                   disable=args.no_progress or not ctx.is_main, file=sys.stderr)
        want = args.collapse and condition in COLLAPSE_CONDITIONS
        factory = batch_diagnostics(condition, layers=layers, temperature=scoring_temperature) if want else None

        def answer(model, condition=condition, factory=factory, bar=bar):
            return answer_sharded(
                model, collator, bench.records, condition, seed=args.seed, shard=(ctx.rank, ctx.world_size),
                gather=lambda items: dist_utils.gather_objects(items, ctx),
                item_extras=None if factory is None else factory(model), progress=bar.update, **generation,
            )

        outputs[condition], items = runner.decode(answer)  # under FSDP: weights gathered once per condition
        bar.close()
        if items is not None:
            diagnostics[condition] = items
    del runner, model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if not ctx.is_main:
        return None
    extras = {c: [item_means(i) for i in items] for c, items in diagnostics.items()}
    rows = score_rows(bench.records, outputs, extras)
    collapse = pooled_curves(diagnostics) if diagnostics else None
    options = {k: getattr(args, k) for k in ("conditions", "batch_size", "max_new_tokens", "do_sample", "temperature",
                                             "top_p", "seed", "limit", "collapse", "attn_implementation", "compile")}
    options.update(dtype=dtype, device=str(ctx.device))
    summary = summarize(
        bench.records, rows, bench.layout, notes=bench.notes, model=str(model_path), manifest=str(bench.path),
        n_items=n, options=options, instruction=INSTRUCTION, world_size=ctx.world_size,
        **({"collapse": collapse} if collapse else {}),
    )
    write_evaluation(out, bench.records, rows, summary, manifest=bench.path, collapse=collapse)
    return summary


def evaluate_run(bench: Benchmark, args: argparse.Namespace, ctx, out: Path) -> None:
    entries, features = [], FeatureCache()
    for checkpoint in run_checkpoints(args.run):
        target = out / checkpoint.label
        done = target / "summary.json"
        if done.is_file() and not args.redo:
            if ctx.is_main:
                print(f"[mapo] {checkpoint.label}: reusing {done} (--redo to evaluate again)")
            entries.append((checkpoint, json.loads(done.read_text())))
            continue
        summary = evaluate_folder(checkpoint.path, bench, args, ctx, target, features)
        if ctx.is_main:
            entries.append((checkpoint, summary))
    if ctx.is_main:
        written = write_step_outputs(out, entries, f"{bench.name} accuracy of {Path(args.run).name} against step")
        print(Path(written["md"]).read_text())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    parse_conditions(args.conditions)  # fail before loading anything
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    ctx = dist_utils.init_distributed(args.device)
    try:
        try:
            bench = load_benchmark(args.data, args.layout, skip_bad=args.skip_bad, limit=args.limit,
                                   is_main=ctx.is_main, share=dist_utils.rank0_share(ctx))
            if args.model:
                check_model_folder(args.model)
            else:
                run_checkpoints(args.run)  # fail now when the run has none
        except (ManifestError, FileNotFoundError, NotADirectoryError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        if ctx.is_main:
            for note in bench.notes:
                print(f"[mapo] note: {note}")
        if args.run:
            out = Path(args.out) if args.out else Path(args.run) / "eval" / bench.name
            evaluate_run(bench, args, ctx, out)
        else:
            out = Path(args.out) if args.out else default_out(args.model, args.data)
            evaluate_folder(args.model, bench, args, ctx, out)
            if ctx.is_main:
                print((out / "summary.md").read_text())
        if ctx.is_main:
            print(f"[mapo] evaluation written to: {out.resolve()}")
    finally:
        dist_utils.shutdown(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
