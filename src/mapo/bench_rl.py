"""RL steps of the tiny model for `make bench`: the training program's own step (`mapo.rl.rl_step`), set up
by training's own `mapo.train.build_setup` (warm start off, no logger), with its per-phase times (`mapo.timing`).

- `RLHarness(...).run_steps(n)`: n full RL steps (rollout, rewards, no-grad scoring, update).
- `RLHarness.replay(rollout)`: the next steps reuse one rollout and one set of prompts, so two algorithms
  (MAPO, GRPO) can be timed on the same batch: everything after the rollout runs as in training.
"""

from __future__ import annotations

import copy
import time
from collections import defaultdict
from pathlib import Path

import torch
from omegaconf import OmegaConf


def compose_config(experiment: str, overrides: list[str]):
    """The MapoConfig of `experiment=<experiment>` with `overrides`, as `python -m mapo.train` would build it."""
    from mapo.config import compose_overrides

    return OmegaConf.to_object(compose_overrides([f"experiment={experiment}", *overrides]))


def harness_config(model_dir: Path, data_dir: Path, algo: str, overrides: list[str], device: str):
    """The config of `RLHarness`: `experiment=tiny_<algo>` on these folders, warm start off, no logger, a
    10,000-step phase at a constant learning rate, then `overrides`."""
    return compose_config(f"tiny_{algo}", [
        f"model.path={model_dir}", f"data.dir={data_dir}", "trainer.warm_start.enabled=false", "logger=none",
        f"trainer.device={device}", "trainer.steps=10000", "trainer.warmup_steps=0", "trainer.schedule=constant",
        *overrides,
    ])


class _ReplayRunner:
    """The policy's runner, except that a rollout request returns the stored rollout (the same batch again)."""

    def __init__(self, runner, rollout):
        self.runner, self.rollout = runner, rollout

    def __call__(self, fn, *args, **kwargs):
        from mapo.rollout import generate_rollout

        if fn is generate_rollout:
            return self.rollout
        return self.runner(fn, *args, **kwargs)

    def decode(self, fn, *args, **kwargs):
        return self(fn, *args, **kwargs)


class RLHarness:
    """One tiny-model RL setup: config `experiment=tiny_<algo>` + overrides, and the state `mapo.train.build_setup`
    builds from it (model, reference, runner, phase, collator, generation keywords, content mask), as training
    holds it. The phase is long (10,000 steps) with a constant learning rate, so any number of steps runs alike.

    model, processor: an already-loaded policy (`mapo.train.load_policy` of the same config) to use instead of
    loading one; it is prepared for training in place."""

    def __init__(self, model_dir: Path, data_dir: Path, *, algo: str, overrides: list[str], model=None, processor=None,
                 device: str = "cpu"):
        from mapo import distributed as dist_utils
        from mapo.assets import load_split
        from mapo.precision import resolve_precision
        from mapo.train import build_setup, load_policy

        self.cfg = cfg = harness_config(model_dir, data_dir, algo, overrides, device)
        self.ctx = dist_utils.init_distributed(device)
        precision = resolve_precision(cfg.model, self.ctx.device)
        if model is None:
            model, processor = load_policy(cfg, self.ctx, precision)
        self.train_items = load_split(cfg.data, cfg.data.train)
        setup = build_setup(cfg, self.ctx, precision, model, processor, self.train_items)
        self.model, self.processor, self.collator = setup.model, setup.processor, setup.collator
        self.runner, self.ref_runner, self.phase = setup.runner, setup.ref_runner, setup.phase
        self.gen_kwargs, self.content_mask, self.audio_input = setup.gen_kwargs, setup.content_mask, setup.audio_input
        model.train()

    def text_only_records(self, n: int) -> list:
        """The first n training records without their audio (what TRL gets in the comparison)."""
        import dataclasses

        return [dataclasses.replace(r, audio=None) for r in self.train_items[:n]]

    def step(self) -> tuple[float, dict]:
        """One RL step: (seconds, its metrics)."""
        from mapo.rl import rl_step

        start = time.perf_counter()
        metrics, _ = rl_step(self.phase, self.ref_runner, self.collator, self.cfg, self.ctx, self.gen_kwargs,
                             self.content_mask, self.audio_input)
        return time.perf_counter() - start, metrics

    def run_steps(self, n: int) -> tuple[list[float], dict[str, list[float]]]:
        """n steps: ([seconds per step], {phase: [seconds per step]})."""
        times, phases = [], defaultdict(list)
        for _ in range(n):
            seconds, metrics = self.step()
            times.append(seconds)
            for key, value in metrics.items():
                if key.startswith("time/"):
                    phases[key.removeprefix("time/").removesuffix("_s")].append(value)
        return times, dict(phases)

    def sample_rollout(self):
        """(records, rollout) of the next step's prompts, sampled as the step would sample them."""
        from mapo.data.sampler import without_some_audio
        from mapo.rollout import generate_rollout

        cfg = self.cfg
        n = cfg.rollout.prompts_per_step
        records = without_some_audio(self.phase.sampler.next_batch(n), cfg.data.text_only_fraction, cfg.trainer.seed, 0)
        batch = self.collator.prompts(records)
        rollout = self.runner.decode(
            generate_rollout, batch, group_size=cfg.rollout.group_size, max_new_tokens=cfg.rollout.max_new_tokens,
            temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, seeds=list(range(n)),
            shared_prompt_cache=cfg.rollout.shared_prompt_cache, **self.gen_kwargs,
        )
        return records, rollout

    def replay(self, records, rollout) -> None:
        """From now on every step gets these records and this rollout (timing everything after the rollout)."""
        self.phase.runner = _ReplayRunner(self.runner, rollout)
        self.phase.sampler.next_batch = lambda n: list(records)
        self.cfg.data.text_only_fraction = 0.0  # the records already are as the rollout saw them


def same_rollout_steps(model_dir: Path, data_dir: Path, algos: tuple[str, ...], *, overrides: list[str],
                       repeats: int, device: torch.device = torch.device("cpu")) -> dict:
    """Time the step after the rollout (rewards, scoring, update, optimizer) of each algorithm on one rollout,
    interleaving the algorithms so that load changes hit them alike. Returns {algo: {"time_s", phases...}} and,
    for two algorithms (a, b), "b_over_a": the median of the per-round ratios (`paired_ratio`)."""
    import statistics

    from mapo import distributed as dist_utils
    from mapo.capture.bench import paired_ratio
    from mapo.precision import resolve_precision
    from mapo.train import load_policy

    device = torch.device(device)
    cfg = harness_config(model_dir, data_dir, algos[0], overrides, device.type)
    ctx = dist_utils.init_distributed(device.type)
    model, processor = load_policy(cfg, ctx, resolve_precision(cfg.model, ctx.device))
    harnesses = {}
    for algo in algos:
        # each algorithm trains its own copy of the same weights
        harnesses[algo] = RLHarness(model_dir, data_dir, algo=algo, overrides=overrides,
                                    model=copy.deepcopy(model), processor=processor, device=device.type)
    records, rollout = harnesses[algos[0]].sample_rollout()
    for h in harnesses.values():
        h.replay(records, rollout)
        h.step()  # warm-up
    times: dict[str, list[float]] = defaultdict(list)
    phases: dict[str, dict[str, list[float]]] = {a: defaultdict(list) for a in algos}
    for _ in range(repeats):
        for algo, h in harnesses.items():
            seconds, metrics = h.step()
            times[algo].append(seconds)
            for key, value in metrics.items():
                if key.startswith("time/"):
                    phases[algo][key.removeprefix("time/").removesuffix("_s")].append(value)
    out = {"rows": int(rollout.completion_ids.shape[0]), "completion_tokens": int(rollout.completion_mask.sum()),
           "sequence_length": int(rollout.attention_mask.shape[1])}
    for algo in algos:
        out[algo] = {"time_s": statistics.median(times[algo]), "times_s": times[algo],
                     **{f"{k}_s": statistics.median(v) for k, v in phases[algo].items() if k != "rollout"}}
    if len(algos) == 2:
        out[f"{algos[1]}_over_{algos[0]}"] = paired_ratio(times[algos[1]], times[algos[0]])
    return out
