"""Benchmark evaluation: any model folder on any supported manifest, scored as the benchmarks score.

Modules (each one job):
- `benchmark`:   a manifest read for evaluation (hidden answers allowed, counted notes, --limit).
- `matching`:    the benchmarks' own answer matching (token sets) next to our strict option matching.
- `breakdowns`:  which groupings each benchmark reports (MMAU by task / difficulty / sub-category, …).
- `results`:     prediction rows, summary.json / summary.md and the files of one evaluation.
- `predictions`: reading and writing predictions (ours, a plain {"id", "model_output"} list, MMAU's
                 submission layout).
- `charts`:      PNG bar charts and the accuracy-against-step plot.
- `positions`:   per-token values by relative position in the completion (deciles) and their plots.
- `collapse`:    audio attention mass and |Δh| along greedy completions (the collapse curve).
- `checkpoints`: the exported model folders of a run and accuracy against step.
- `cli`:         `python -m mapo.eval` (`make eval`); `score`: `python -m mapo.eval.score` (`make score`).
Reusable for other studies: `positions.binned_means(values, mask)` (decile means of per-token values)
and `positions.plot_position_curves(curves, path)` (several curves on one figure).
"""
