"""The evaluation-time collapse curve of a finished run: audio attention mass against relative position
in the model's own greedy completions (DESIGN §6).

For each evaluated split, the run's final policy (`<run_dir>/final_model`) answers every item greedily
with its audio (the same items, length cap and decoding as the run's final evaluation); one
teacher-forced pass over prompt + completion under `mapo.capture` then gives a_t, the audio attention
mass of the query that predicts completion token t (the run's `algo.attn.layers`, max over heads, mean
over layers: the quantity MAPO's attention loss trains). Token k (0-based) of a completion with T valid
tokens falls in bin floor(k·K/T), the rule of the training metric `audio_mass/q1..q4` (K = 4); a bin's
value is the mean over all tokens in it (pooled: long completions weigh more, as in training).

Written to `<run_dir>/collapse.json`:

    {"bins": K, "layers": [...], "splits": {split: {"audio_mass": [K], "tokens": [K], "completions": n,
                                                      "mean_length": float}}}

`python -m mapo.collapse_curve RUN_DIR [RUN_DIR ...] [--bins 4] [--threads 1]`.

This is the study's own small version; the evaluation CLI's collapse diagnostics (deciles, |Δh|, the
audio-removed condition) are the general tool once they land.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from mapo.capture import capture_audio_attention, completion_mass
from mapo.data.collate import Collator, FeatureCache
from mapo.data.schema import Record
from mapo.evaluate import evenly_by_task
from mapo.models.loader import generation_suppressed_token_ids, load_model_and_processor
from mapo.rollout import generate_rollout
from mapo.run_logging import write_json_atomic
from mapo.scoring import score_tokens

COLLAPSE_FILE = "collapse.json"
QUARTERS = 4


def position_bin_sums(values: torch.Tensor, mask: torch.Tensor, n_bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums of `values` and token counts per relative-position bin, over all rows.

    values, mask: [N, T] (mask 1 on valid completion tokens, left-aligned or not). Token k (0-based
    among the valid tokens of its row, T_row of them) goes to bin floor(k·n_bins / T_row).
    Returns (sums [n_bins] float64, counts [n_bins] int64).
    """
    if values.shape != mask.shape:
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(mask.shape)} differ")
    valid = mask.bool()
    lengths = valid.sum(-1, keepdim=True).clamp(min=1)
    index = valid.long().cumsum(-1) - 1
    bins = torch.div(index * n_bins, lengths, rounding_mode="floor").clamp(0, n_bins - 1)
    sums = torch.zeros(n_bins, dtype=torch.float64)
    counts = torch.zeros(n_bins, dtype=torch.int64)
    sums.index_add_(0, bins[valid], values[valid].detach().double().cpu())
    counts.index_add_(0, bins[valid], torch.ones_like(bins[valid]))
    return sums, counts


@torch.no_grad()
def greedy_audio_mass(
    model: torch.nn.Module,
    collator: Collator,
    records: Sequence[Record],
    *,
    layers: Sequence[int],
    n_bins: int = QUARTERS,
    batch_size: int = 32,
    max_new_tokens: int = 48,
    eos_token_id: int,
    pad_token_id: int,
    suppress_token_ids: Sequence[int] = (),
) -> dict:
    """Collapse curve of `model` on `records` (greedy completions with audio).

    Returns {"audio_mass": [n_bins] (None for an empty bin), "tokens": [n_bins], "completions": N,
    "mean_length": mean valid completion tokens}.
    """
    sums = torch.zeros(n_bins, dtype=torch.float64)
    counts = torch.zeros(n_bins, dtype=torch.int64)
    total_tokens, n = 0, 0
    for start in range(0, len(records), batch_size):
        batch = collator.prompts(list(records[start : start + batch_size]))
        rollout = generate_rollout(
            model, batch, group_size=1, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
            pad_token_id=pad_token_id, do_sample=False, suppress_token_ids=suppress_token_ids,
        )
        with capture_audio_attention(model, rollout.audio_mask, layers=tuple(layers)) as cap:
            score_tokens(model, rollout, audio="cached")
            mass = completion_mass(cap.mass, rollout.prompt_len, rollout.completion_ids.shape[1])  # [N, T]
        mask = rollout.completion_mask.to(mass.device)
        s, c = position_bin_sums(mass.float(), mask, n_bins)
        sums += s
        counts += c
        total_tokens += int(mask.sum())
        n += mask.shape[0]
    means = [float(s / c) if c > 0 else None for s, c in zip(sums.tolist(), counts.tolist())]
    return {"audio_mass": means, "tokens": counts.tolist(), "completions": n, "mean_length": total_tokens / max(n, 1)}


def _run_config(run_dir: Path) -> dict:
    path = run_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: run config not found (is {run_dir} a finished mapo run folder?)")
    return json.loads(path.read_text())["config"]


def collapse_of_run(run_dir: str | Path, *, n_bins: int = QUARTERS, splits: Sequence[str] | None = None,
                    layers: Sequence[int] | None = None) -> dict:
    """Compute and write `<run_dir>/collapse.json` for the run's final policy; returns its content.

    The data folder, eval splits and item cap, the length cap, eval batch size and captured layers
    (unless `layers` is given) come from the run's own config.json, so the curve describes the same
    completions as the run's final accuracy table.
    """
    from mapo.assets import load_split
    from mapo.config import DataConfig

    run_dir = Path(run_dir)
    cfg = _run_config(run_dir)
    model_dir = run_dir / "final_model"
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no final model (the run did not finish, or trainer.export_final=false)")
    data = DataConfig(**{k: v for k, v in cfg["data"].items() if k in DataConfig.__dataclass_fields__})
    chosen = list(splits) if splits is not None else list(data.eval_splits)
    unknown = [s for s in chosen if s not in data.eval_splits]
    if unknown:
        raise ValueError(f"{run_dir}: splits {unknown} are not eval splits of the run ({list(data.eval_splits)})")
    model, processor = load_model_and_processor(model_dir, attn_implementation="sdpa")
    collator = Collator(processor, feature_cache=FeatureCache())
    tokenizer = processor.tokenizer
    layers = list(cfg["algo"]["attn"]["layers"] if layers is None else layers)
    out = {"bins": n_bins, "layers": layers, "splits": {}}
    for split in chosen:
        records = evenly_by_task(load_split(data, data.eval_splits[split]), data.eval_max_items)
        out["splits"][split] = greedy_audio_mass(
            model, collator, records, layers=layers, n_bins=n_bins,
            batch_size=cfg["rollout"]["eval_batch_size"], max_new_tokens=cfg["rollout"]["max_new_tokens"],
            eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tokenizer.pad_token_id,
            suppress_token_ids=generation_suppressed_token_ids(processor),
        )
    write_json_atomic(run_dir / COLLAPSE_FILE, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mapo.collapse_curve", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, help="finished run folders (with final_model/ and config.json)")
    parser.add_argument("--bins", type=int, default=QUARTERS, help="relative-position bins (default 4: quarters)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--layers", default=None, help="decoder layers, e.g. -2,-1 (default: the run's algo.attn.layers)")
    parser.add_argument("--skip-done", action="store_true", help="leave runs that already hold collapse.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    layers = None if args.layers is None else [int(x) for x in args.layers.split(",")]
    failed = 0
    for run_dir in args.run_dirs:
        if args.skip_done and (run_dir / COLLAPSE_FILE).is_file():
            continue
        try:
            result = collapse_of_run(run_dir, n_bins=args.bins, layers=layers)
        except (FileNotFoundError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            failed += 1
            continue
        curves = "  ".join(f"{s}: " + " ".join("–" if v is None else f"{v:.3f}" for v in r["audio_mass"])
                           for s, r in result["splits"].items())
        print(f"[mapo] {run_dir / COLLAPSE_FILE}  {curves}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
