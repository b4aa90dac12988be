"""RL steps of the tiny model for `make bench`: the training program's own step (`mapo.rl.rl_step`), set up
as `mapo.train` sets it up (warm start off, no logger), with its per-phase times (`mapo.timing`).

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
    """One tiny-model RL setup: config `experiment=tiny_<algo>` + overrides, model, reference, phase, collator."""

    def __init__(self, model_dir: Path, data_dir: Path, *, algo: str, overrides: list[str], model=None, processor=None,
                 device: str = "cpu"):
        from mapo import distributed as dist_utils
        from mapo.algos.mapo import build_content_vocab_mask
        from mapo.assets import load_split
        from mapo.data.collate import Collator, FeatureCache
        from mapo.models.adapter import get_adapter
        from mapo.models.loader import load_model_and_processor
        from mapo.phase import Phase, prepare_policy
        from mapo.precision import frozen_copy, resolve_precision
        from mapo.step import needs_frozen_reference
        from mapo.train import generation_kwargs

        self.cfg = cfg = compose_config(f"tiny_{algo}", [
            f"model.path={model_dir}", f"data.dir={data_dir}", "trainer.warm_start.enabled=false", "logger=none",
            f"trainer.device={device}", *overrides,
        ])
        self.ctx = dist_utils.init_distributed(device)
        precision = resolve_precision(cfg.model, self.ctx.device)
        if model is None:
            model, processor = load_model_and_processor(cfg.model.path, dtype=precision.master, device=self.ctx.device)
        self.model, self.processor = model, processor
        self.train_items = load_split(cfg.data, cfg.data.train)
        self.collator = Collator(processor, feature_cache=FeatureCache())
        self.ref_runner = None
        if needs_frozen_reference(cfg.algo):
            self.ref_runner = dist_utils.ModelRunner(frozen_copy(model, precision.frozen), precision)
        prepare_policy(model, cfg, precision, everything=False)
        adapter = get_adapter(model)
        audio_parts = [p for part in (adapter.audio_tower(model), adapter.audio_projector(model)) if part is not None
                       for p in part.parameters()]
        self.audio_input = "recompute" if any(p.requires_grad for p in audio_parts) else "cached"  # as mapo.train
        self.runner = dist_utils.ModelRunner(model, precision)
        self.phase = Phase("rl", self.runner, model, cfg.trainer.lr, 10_000, 0, "constant", cfg, self.train_items)
        self.gen_kwargs = generation_kwargs(cfg, processor, self.ctx, adapter.vocab_size(model))
        self.content_mask = build_content_vocab_mask(self.collator.tokenizer, adapter.vocab_size(model))
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
            temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, seeds=list(range(n)), **self.gen_kwargs,
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
    interleaving the algorithms so that load changes hit them alike. Returns {algo: {"time_s", phases...}}."""
    import statistics

    from mapo.models.loader import load_model_and_processor

    model, processor = load_model_and_processor(model_dir, device=device)
    harnesses = {}
    for algo in algos:
        # each algorithm trains its own copy of the same weights
        harnesses[algo] = RLHarness(model_dir, data_dir, algo=algo, overrides=overrides,
                                    model=copy.deepcopy(model), processor=processor, device=torch.device(device).type)
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
    return out
