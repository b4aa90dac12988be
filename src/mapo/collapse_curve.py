"""The evaluation-time collapse curve of a finished run: audio attention mass (and |Δh|) against
relative position in the model's own greedy completions (DESIGN §6), written into the run folder.

For each evaluated split, the run's final policy (`<run_dir>/final_model`) answers every item greedily
with its audio (the same items, length cap and decoding as the run's final evaluation). The per-token
values are the evaluation's collapse diagnostics (`mapo.eval.collapse.collapse_values`, condition
"audio"): a_t, the audio attention mass of the query that predicts completion token t (the run's
`algo.attn.layers`, max over heads, mean over layers: the quantity MAPO's attention loss trains), and
|Δh_t| between the model with the audio and with the audio features dropped (entropies at the run's
sampling temperature). Token k (0-based) of a completion with T valid tokens falls in bin floor(k·K/T)
(`mapo.eval.positions`; K = 4 is the rule of the training metric `audio_mass/q1..q4`); a bin's value is
the mean over all tokens in it (pooled, as in training).

Written to `<run_dir>/collapse.json`:

    {"bins": K, "layers": [...], "splits": {split: {"audio_mass": [K], "abs_delta_h": [K], "tokens": [K],
                                                      "completions": n, "mean_length": float}}}

`python -m mapo.collapse_curve RUN_DIR [RUN_DIR ...] [--bins 4] [--layers -2,-1] [--threads 1]`.
(`make eval ... --collapse` draws the same diagnostics for any model folder and manifest; this module
puts them next to a run's own final metrics, where `mapo.run_groups` reads them.)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from mapo.atomic import write_json_atomic
from mapo.data.collate import Collator, FeatureCache
from mapo.data.schema import Record
from mapo.eval.collapse import batch_diagnostics, pooled_curves
from mapo.evaluate import answer_sharded, evenly_by_task, generation_tokens
from mapo.models.adapter import get_adapter
from mapo.models.loader import load_model_and_processor
from mapo.run_groups import COLLAPSE_FILE

QUARTERS = 4


@torch.no_grad()
def greedy_collapse_curve(
    model: torch.nn.Module,
    collator: Collator,
    records: Sequence[Record],
    *,
    layers: Sequence[int],
    n_bins: int = QUARTERS,
    temperature: float = 1.0,
    batch_size: int = 32,
    max_new_tokens: int = 48,
    eos_token_id: int,
    pad_token_id: int,
    suppress_token_ids: Sequence[int] = (),
) -> dict:
    """Collapse curve of `model` on `records` (greedy completions with audio).

    Returns {"audio_mass": [n_bins], "abs_delta_h": [n_bins] (None for an empty bin), "tokens": [n_bins],
    "completions": N, "mean_length": mean valid completion tokens}.
    """
    # The evaluation's own loop (mapo.evaluate) with the collapse diagnostics on each batch: the curve is
    # taken on the very completions the run's evaluation produces with the same settings.
    extras = batch_diagnostics("audio", layers=layers, temperature=temperature, n_bins=n_bins)(model)
    _, items = answer_sharded(
        model, collator, records, "audio", item_extras=extras, batch_size=batch_size, max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, suppress_token_ids=suppress_token_ids,
    )
    curve = pooled_curves({"audio": items})["audio"]
    curve["mean_length"] = sum(curve["tokens"]) / max(curve["completions"], 1)
    return curve


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
    tokens = generation_tokens(processor, get_adapter(model).vocab_size(model))  # as the run's own evaluation
    layers = list(cfg["algo"]["attn"]["layers"] if layers is None else layers)
    out = {"bins": n_bins, "layers": layers, "splits": {}}
    for split in chosen:
        records = evenly_by_task(load_split(data, data.eval_splits[split]), data.eval_max_items)
        out["splits"][split] = greedy_collapse_curve(
            model, collator, records, layers=layers, n_bins=n_bins, temperature=cfg["rollout"]["temperature"],
            batch_size=cfg["rollout"]["eval_batch_size"], max_new_tokens=cfg["rollout"]["max_new_tokens"], **tokens,
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
