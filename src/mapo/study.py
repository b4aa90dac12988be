"""A study: several algorithms × seeds from one shared warm start per setting, then one summary.

`python -m mapo.study [--settings a,b] [--algos grpo,mapo,...] [--seeds 0,1,2] [--out DIR] [-- overrides]`
(what `make study` runs). A *setting* NAME is two experiment files:

- `conf/experiment/study_NAME_warm.yaml`: the warm start, a supervised (`algo=sft`) run; the generator
  options of its data folder are in `extra.synthetic` (`mapo.data.synthetic.SyntheticConfig` fields);
  its exported `final_model/` is the starting point of every RL run;
- `conf/experiment/study_NAME.yaml`: the RL runs on the same `data.dir`, from that `final_model/`.

The study puts the warm start in `OUT/NAME/warm_start/` (`trainer.run_dir`) and points the RL runs'
`model.path` at its `final_model/`; the files' own values are those of the default OUT, so
`make train EXP=study_NAME` works alone after a study.

Both carry `extra.study_setting: NAME`, the key the summary groups by. For each setting, in order
(every step is skipped when its output exists, so an interrupted study resumes where it stopped):

1. the benchmark: `mapo.data.synthetic` with `extra.synthetic` into `data.dir` (a folder made with other
   options is refused: its `benchmark.json` must match);
2. the warm start: `mapo.train experiment=study_NAME_warm` with the `--warm` overrides (its final
   evaluation is the "before RL" row of the table; all algorithms and seeds start from its weights);
3. the RL runs: one Hydra multirun `mapo.train --multirun experiment=study_NAME algo=… trainer.seed=…`
   into `OUT/NAME/runs/<algo>_seed<seed>/`; after an interruption only the runs without
   final_metrics.json run again (one multirun per algorithm, over its missing seeds), each resuming
   from its last checkpoint;
4. the evaluation-time collapse curve of every finished run and of the warm start
   (`mapo.collapse_curve`, `collapse.json` in each run folder).

Then `OUT/summary.md`, `OUT/summary.csv` (`mapo.run_groups`, grouped by setting and algorithm, mean ±
std over seeds) and `OUT/plots/<setting>_{accuracy,collapse_counter_prior,collapse_test,collapse_train,
reward}.png` (`mapo.group_plots`); `--publish DIR` copies the tables and plots there.
`--jobs 2` runs two settings side by side (one process each, logging to OUT/<name>/study.log): on a
2-core machine with one thread per run that halves the wall time. Every run uses
`trainer.num_threads=--threads` (default 1) and `logger=none`; overrides after `--` go to
the RL runs (e.g. `-- trainer.steps=20`), `--warm '...'` to the warm start. Use one OUT per set of
overrides: a finished run folder is never trained again. A variant of a finished study (e.g.
`--algos mapo -- algo.attn.eta=0.5`) starts from its warm starts with `--warm-from THAT_OUT`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mapo.config import CONF_DIR
from mapo.run_groups import DEFAULT_METRICS

DEFAULT_ALGOS = ("grpo", "mapo", "mapo_mask_only", "mapo_attn_only")
DEFAULT_SEEDS = (0, 1, 2)
BENCHMARK_FILE = "benchmark.json"
#: Columns of the study table: the run-group defaults, the task whose answers the warm starts take from
#: the wording (pilot: tone_count), and the training wall time.
STUDY_METRICS = (*DEFAULT_METRICS, "counter_prior/audio/task/tone_count", "train_seconds")
GROUP_BY = ("extra.study_setting", "algorithm")
BEFORE_RL = "before RL"  # the label of the warm start's row
ROW_ORDER = (BEFORE_RL, "grpo", "mapo", "mask_only", "attn_only")  # rows of a setting, in this order


@dataclass
class Setting:
    """What the study needs to know of one setting, read from its two experiment files."""

    name: str
    data_dir: Path
    synthetic: dict[str, Any]  # generator options of data_dir (SyntheticConfig fields)

    def warm_dir(self, out: Path) -> Path:
        """The warm start's run folder; its final_model/ starts every RL run of the setting."""
        return out / self.name / "warm_start"

    def runs_dir(self, out: Path) -> Path:
        return out / self.name / "runs"


def compose_experiment(name: str, overrides: list[str] = ()) -> Any:
    """The resolved config of `experiment=name` (plus overrides), as Hydra composes it for mapo.train."""
    from mapo.config import compose_overrides

    return compose_overrides([f"experiment={name}", *overrides])


def read_setting(name: str) -> Setting:
    """Read and cross-check `study_NAME_warm` and `study_NAME`; raise ValueError naming the file and field."""
    from omegaconf import OmegaConf

    warm_file, rl_file = CONF_DIR / "experiment" / f"study_{name}_warm.yaml", CONF_DIR / "experiment" / f"study_{name}.yaml"
    for path in (warm_file, rl_file):
        if not path.is_file():
            known = all_settings()
            raise ValueError(f"{path}: not found; settings with both files: {known}")
    warm = compose_experiment(f"study_{name}_warm")
    rl = compose_experiment(f"study_{name}")
    if warm.algo.name != "sft":
        raise ValueError(f"{warm_file}: the warm start must be algo=sft, got {warm.algo.name}")
    for cfg, path in ((warm, warm_file), (rl, rl_file)):
        if cfg.extra.get("study_setting") != name:
            raise ValueError(f"{path}: extra.study_setting must be {name!r}, got {cfg.extra.get('study_setting')!r}")
    # the warm start's final evaluation is the "before RL" row: same data, items and length cap as "after"
    for key in ("data.dir", "data.eval_splits", "data.eval_max_items", "rollout.max_new_tokens", "rollout.eval_batch_size"):
        group, field = key.split(".")
        if rl[group][field] != warm[group][field]:
            raise ValueError(f"{rl_file}: {key} {rl[group][field]!r} differs from the warm start's {warm[group][field]!r} ({warm_file.name})")
    if rl.trainer.warm_start.enabled or rl.algo.name == "sft":
        raise ValueError(f"{rl_file}: RL runs start from the shared warm start: trainer.warm_start.enabled must be false and algo not sft")
    synthetic = OmegaConf.to_container(warm.extra.get("synthetic", {}), resolve=True)
    return Setting(name, Path(warm.data.dir), dict(synthetic))


def ensure_benchmark(setting: Setting, seed: int = 0) -> None:
    """Write the setting's benchmark unless `data_dir` already holds one made with the same options."""
    from mapo.data.synthetic import SyntheticConfig, write_benchmark

    fields = {f.name for f in dataclasses.fields(SyntheticConfig)}
    unknown = sorted(set(setting.synthetic) - fields)
    if unknown:
        raise ValueError(f"study_{setting.name}_warm.yaml: extra.synthetic has unknown fields {unknown}; valid: {sorted(fields)}")
    config = SyntheticConfig(**{"seed": seed, **setting.synthetic, "out_dir": str(setting.data_dir)})
    wanted = {k: v for k, v in dataclasses.asdict(config).items() if k != "out_dir"}
    record = setting.data_dir / BENCHMARK_FILE
    if (setting.data_dir / "train.jsonl").is_file():
        if not record.is_file():
            raise ValueError(f"{setting.data_dir}: holds a benchmark without {BENCHMARK_FILE}; remove the folder or point data.dir elsewhere")
        found = json.loads(record.read_text())
        if found != wanted:
            diff = {k: (found.get(k), v) for k, v in wanted.items() if found.get(k) != v}
            raise ValueError(f"{record}: made with other options (found, wanted): {diff}; remove the folder to rebuild")
        return
    print(f"[study] {setting.name}: benchmark -> {setting.data_dir} ({setting.synthetic})", flush=True)
    print(write_benchmark(config).format(), flush=True)


def train_command(experiment: str, overrides: list[str], multirun: bool = False) -> list[str]:
    return [sys.executable, "-m", "mapo.train", *(["--multirun"] if multirun else []), f"experiment={experiment}", *overrides]


def run_overrides(threads: int, extra: list[str]) -> list[str]:
    """Defaults every study run gets (a later `extra` override of the same key wins)."""
    return [f"trainer.num_threads={threads}", "logger=none", *extra]


def warm_command(setting: Setting, out: Path, threads: int, warm_extra: list[str]) -> list[str]:
    return train_command(f"study_{setting.name}_warm", [*run_overrides(threads, warm_extra), f"trainer.run_dir={setting.warm_dir(out)}"])


#: Run folder of one RL run inside the setting's runs/ folder (Hydra resolves it per job).
RUN_SUBDIR = "${hydra.runtime.choices.algo}_seed${trainer.seed}"


def run_name(algo: str, seed: int) -> str:
    return f"{algo}_seed{seed}"


def rl_multirun_command(setting: Setting, algos: list[str], seeds: list[int], out: Path, threads: int, extra: list[str]) -> list[str]:
    return train_command(
        f"study_{setting.name}",
        [f"algo={','.join(algos)}", f"trainer.seed={','.join(map(str, seeds))}", *run_overrides(threads, extra),
         f"model.path={setting.warm_dir(out) / 'final_model'}", f"hydra.sweep.dir={setting.runs_dir(out)}",
         f"hydra.sweep.subdir={RUN_SUBDIR}"],
        multirun=True,
    )


def missing_runs(runs_dir: Path, algos: list[str], seeds: list[int]) -> dict[str, list[int]]:
    """{algo: seeds} of the runs without final_metrics.json, in the given order (empty when all are done)."""
    missing: dict[str, list[int]] = {}
    for algo in algos:
        todo = [s for s in seeds if not (runs_dir / run_name(algo, s) / "final_metrics.json").is_file()]
        if todo:
            missing[algo] = todo
    return missing


def _run(cmd: list[str]) -> None:
    """Run `cmd`; print its wall and CPU seconds (on a shared machine CPU seconds, with one thread per
    run, are what the same command takes with the machine to itself)."""
    print("[study] $ " + " ".join(cmd), flush=True)
    before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    code = subprocess.call(cmd)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(f"[study] wall {time.perf_counter() - t0:.0f} s, CPU {cpu:.0f} s: {cmd[3] if len(cmd) > 3 else cmd}", flush=True)
    if code != 0:
        raise SystemExit(f"[study] failed (exit {code}): {' '.join(cmd)}")


def link_warm_start(setting: Setting, out: Path, warm_from: Path) -> None:
    """Make OUT/NAME/warm_start a link to WARM_FROM/NAME/warm_start (a variant of a finished study
    starts from the very same weights); refuse when OUT already has another warm start."""
    source = setting.warm_dir(warm_from).resolve()
    if not (source / "final_model" / "config.json").is_file():
        raise SystemExit(f"[study] --warm-from: {source} holds no finished warm start (final_model/)")
    target = setting.warm_dir(out)
    if target.is_symlink() and target.resolve() == source:
        return
    if target.exists() or target.is_symlink():
        raise SystemExit(f"[study] --warm-from: {target} exists already; use a new --out")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(source, target_is_directory=True)


def run_setting(setting: Setting, algos: list[str], seeds: list[int], out: Path, threads: int, extra: list[str],
                warm_extra: list[str], warm_from: Path | None = None) -> None:
    from mapo.collapse_curve import collapse_of_run
    from mapo.run_groups import COLLAPSE_FILE

    ensure_benchmark(setting)
    if warm_from is not None:
        link_warm_start(setting, out, warm_from)
    if not (setting.warm_dir(out) / "final_model" / "config.json").is_file():
        _run(warm_command(setting, out, threads, warm_extra))
    runs_dir = setting.runs_dir(out)
    missing = missing_runs(runs_dir, algos, seeds)
    if missing == {a: seeds for a in algos}:
        _run(rl_multirun_command(setting, algos, seeds, out, threads, extra))
    else:
        for algo, todo in missing.items():
            _run(rl_multirun_command(setting, [algo], todo, out, threads, extra))
    import torch

    torch.set_num_threads(threads)
    finished = [runs_dir / run_name(a, s) for a in algos for s in seeds if (runs_dir / run_name(a, s) / "final_metrics.json").is_file()]
    for run_dir in [setting.warm_dir(out), *finished]:
        if not (run_dir / COLLAPSE_FILE).is_file():
            print(f"[study] collapse curve of {run_dir}", flush=True)
            collapse_of_run(run_dir)


def summarize_study(settings: list[Setting], out: Path, publish: Path | None = None) -> str:
    """Tables and plots of every finished run of `settings` (warm starts included, as algorithm "sft")."""
    from mapo.group_plots import write_group_plots
    from mapo.run_groups import (
        find_runs,
        group_runs,
        read_run,
        summary_rows,
        to_markdown,
        write_csv,
    )

    all_rows = []
    for setting in settings:
        roots = [p for p in (setting.warm_dir(out), setting.runs_dir(out)) if p.is_dir()]
        runs = [read_run(p) for root in roots for p in find_runs([root])]  # the warm start first
        runs = [r for r in runs if r.finished]
        if not runs:
            continue
        groups = group_runs(runs, GROUP_BY)
        for group in groups:  # the warm start's final evaluation is the "before RL" row
            if group.key[1] == "sft":
                group.key = (group.key[0], BEFORE_RL)
        groups.sort(key=lambda g: ROW_ORDER.index(g.key[1]) if g.key[1] in ROW_ORDER else len(ROW_ORDER))
        rows = summary_rows(groups, GROUP_BY, STUDY_METRICS)
        all_rows += rows
        write_group_plots(groups, out / "plots", prefix=f"{setting.name}_")
    table = to_markdown(all_rows, GROUP_BY, STUDY_METRICS, labels=SHORT_LABELS)
    (out / "summary.md").write_text(table, encoding="utf-8")
    write_csv(all_rows, GROUP_BY, STUDY_METRICS, out / "summary.csv")
    if publish is not None:
        publish.mkdir(parents=True, exist_ok=True)
        for name in ("summary.md", "summary.csv"):
            shutil.copy2(out / name, publish / name)
        (publish / "plots").mkdir(exist_ok=True)
        for png in (out / "plots").glob("*.png"):
            shutil.copy2(png, publish / "plots" / png.name)
    return table


SHORT_LABELS = {
    "extra.study_setting": "setting",
    "test/audio/accuracy": "test",
    "test/no_audio/accuracy": "test, no audio",
    "test/shuffled/accuracy": "test, shuffled",
    "counter_prior/audio/accuracy": "counter_prior",
    "counter_prior/no_audio/accuracy": "cp, no audio",
    "counter_prior/shuffled/accuracy": "cp, shuffled",
    "counter_prior/flip_rate": "cp flip rate",
    "gap/test_minus_counter_prior": "test − cp",
    "collapse/counter_prior/q1": "cp mass q1",
    "collapse/counter_prior/q4": "cp mass q4",
    "collapse/counter_prior/late_minus_early": "cp mass q4−q1",
    "train/reward/mean": "reward (last 20)",
    "counter_prior/audio/task/tone_count": "cp tone_count",
    "train_seconds": "train s",
}


def worker_command(name: str, argv: list[str], extra: list[str]) -> list[str]:
    """`python -m mapo.study` for one setting, without the summary (the parent writes it)."""
    kept, skip = [], False
    for arg in argv:  # drop --settings/--jobs/--publish (and their values): the worker gets its own
        if skip:
            skip = False
            continue
        if arg in ("--settings", "--jobs", "--publish"):
            skip = True
            continue
        if arg.startswith(("--settings=", "--jobs=", "--publish=")):
            continue
        kept.append(arg)
    return [sys.executable, "-m", "mapo.study", "--settings", name, "--no-summary", *kept, *(["--", *extra] if extra else [])]


def run_workers(names: list[str], argv: list[str], extra: list[str], out: Path, jobs: int) -> None:
    """Run one worker process per setting, at most `jobs` at a time; each logs to OUT/<name>/study.log."""
    pending, running = list(names), []
    failed = []
    while pending or running:
        while pending and len(running) < jobs:
            name = pending.pop(0)
            log = out / name / "study.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            cmd = worker_command(name, argv, extra)
            print(f"[study] {name}: {' '.join(cmd)}  (log: {log})", flush=True)
            running.append((name, subprocess.Popen(cmd, stdout=open(log, "a"), stderr=subprocess.STDOUT)))
        time.sleep(5)
        for name, proc in list(running):
            if proc.poll() is not None:
                running.remove((name, proc))
                print(f"[study] {name}: finished (exit {proc.returncode})", flush=True)
                if proc.returncode != 0:
                    failed.append(name)
    if failed:
        raise SystemExit(f"[study] settings failed: {failed} (see OUT/<name>/study.log)")


def all_settings() -> list[str]:
    return sorted(p.stem[len("study_"):] for p in (CONF_DIR / "experiment").glob("study_*.yaml")
                  if not p.stem.endswith("_warm") and (CONF_DIR / "experiment" / f"{p.stem}_warm.yaml").is_file())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(prog="python -m mapo.study", description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default=",".join(all_settings()), help="comma-separated setting names (default: all)")
    parser.add_argument("--algos", default=",".join(DEFAULT_ALGOS), help="conf/algo choices")
    parser.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)), help="trainer.seed values")
    parser.add_argument("--out", type=Path, default=Path("artifacts/study"), help="study folder")
    parser.add_argument("--threads", type=int, default=1, help="trainer.num_threads of every run")
    parser.add_argument("--publish", type=Path, default=None, help="copy summary.md/csv and plots/ here")
    parser.add_argument("--warm", default="", help="space-separated overrides of the warm-start runs")
    parser.add_argument("--warm-from", type=Path, default=None, help="reuse the warm starts of this study folder (linked)")
    parser.add_argument("--jobs", type=int, default=1, help="settings run side by side (each one process, --threads threads)")
    parser.add_argument("--summary-only", action="store_true", help="only rebuild the tables and plots")
    parser.add_argument("--no-summary", action="store_true", help=argparse.SUPPRESS)  # a --jobs worker
    args = parser.parse_args(argv)
    from mapo.config import check_override_keys

    warm_extra = args.warm.split()
    check_override_keys(extra + warm_extra)
    if any(o.lstrip("+").startswith("data.dir=") for o in extra + warm_extra):
        print("error: data.dir belongs to the setting's experiment files (it must match extra.synthetic)", file=sys.stderr)
        return 2
    names = [s for s in args.settings.split(",") if s]
    algos = [a for a in args.algos.split(",") if a]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    try:
        settings = [read_setting(n) for n in names]
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    if not args.summary_only and args.jobs > 1 and len(settings) > 1:
        worker = [a for a in argv if a not in ("--no-summary",)]
        run_workers([s.name for s in settings], worker, extra, args.out, args.jobs)
    elif not args.summary_only:
        for setting in settings:
            t_setting = time.perf_counter()
            run_setting(setting, algos, seeds, args.out, args.threads, extra, warm_extra, args.warm_from)
            print(f"[study] {setting.name}: {time.perf_counter() - t_setting:.0f} s", flush=True)
    if args.no_summary:
        return 0
    print(summarize_study(settings, args.out, args.publish))
    print(f"[study] {args.out / 'summary.md'}  plots: {args.out / 'plots'}  wall {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
