"""The training program: `python -m mapo.train experiment=tiny_mapo [key=value ...]` (or `make train`).

Reads top to bottom (DESIGN §2):

    setup        process group, seeds, data and model (built locally if allowed), logger
    warm start   supervised steps on the reference traces, cached by config hash (`algo=sft` is the
                 same phase run as the main one)
    RL loop      data → rollout → rewards → advantages → no-grad scoring → MAPO step(s) on
                 micro-batches → AdamW (warm-up + schedule, clipping) → metrics → eval → checkpoint
    report       accuracy before/after × with/without audio, plots, final_metrics.json

Everything distributed goes through `mapo.distributed`; the algorithm pieces are pure functions.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from mapo import distributed as dist_utils
from mapo.algos.advantages import group_advantages
from mapo.algos.mapo import build_content_vocab_mask
from mapo.assets import ensure_data, ensure_model, load_split
from mapo.checkpoint import capture_rng, load_checkpoint, resolve_resume, restore_rng, save_checkpoint
from mapo.config import MapoConfig
from mapo.data.collate import Collator, FeatureCache
from mapo.data.sampler import EpochSampler
from mapo.evaluate import evaluate_split, evenly_by_task, flip_rate
from mapo.models.loader import enable_activation_checkpointing, generation_suppressed_token_ids, load_model_and_processor
from mapo.optim import build_optimizer, build_scheduler
from mapo.report import final_table, write_plots
from mapo.rewards import compute_rewards
from mapo.rollout import generate_rollout
from mapo.run_logging import make_logger, write_json_atomic
from mapo.step import MetricSums, Normalisers, mapo_step, prepare_batch, sft_nll, uses_ablated_reference, uses_kl_reference


# ------------------------------------------------------------------------------------------ setup
def say(ctx, message: str) -> None:
    """Print once per job (rank 0), not once per process."""
    if ctx.is_main:
        print(message, flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_run_dir(cfg: MapoConfig) -> Path:
    if cfg.trainer.run_dir:
        return Path(cfg.trainer.run_dir)
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # not inside a Hydra app (tests calling run() directly)
        return Path("outputs") / cfg.experiment_name / time.strftime("%Y-%m-%d_%H-%M-%S")


def set_trainable(model: torch.nn.Module, cfg: MapoConfig, everything: bool) -> None:
    """Freeze the audio tower / projector as configured (the warm start trains everything)."""
    model.requires_grad_(True)
    model.model.audio_tower.embed_positions.requires_grad_(False)  # a fixed sinusoid table by design
    if not everything:
        if cfg.model.freeze_audio_tower:
            model.model.audio_tower.requires_grad_(False)
        if cfg.model.freeze_projector:
            model.model.multi_modal_projector.requires_grad_(False)


class Phase:
    """One optimisation phase (warm start or RL): the model behind its runner, optimizer, schedule, data order."""

    def __init__(self, name: str, runner, model, lr: float, steps: int, warmup: int, schedule: str, cfg: MapoConfig, items):
        self.name, self.runner, self.model, self.steps = name, runner, model, steps
        self.optimizer = build_optimizer(model, lr, cfg.trainer.weight_decay, tuple(cfg.trainer.betas))
        self.scheduler = build_scheduler(self.optimizer, warmup, steps, schedule)
        self.sampler = EpochSampler(items, seed=cfg.trainer.seed)
        self.step = 0

    def clip_and_step(self, grad_clip: float) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def save(self, run_dir: Path, ctx, keep_last: int) -> None:
        model_state = {k.removeprefix("model."): v for k, v in dist_utils.full_model_state(self.runner, ctx).items()}
        opt_state = dist_utils.full_optimizer_state(self.runner, self.optimizer, ctx)
        if ctx.is_main:
            save_checkpoint(
                run_dir, self.step, model_state, opt_state, self.scheduler.state_dict(),
                {"step": self.step, "phase": self.name, "sampler": self.sampler.state_dict()},
                keep_last=keep_last, rng=capture_rng(),
            )
        if ctx.enabled:
            torch.distributed.barrier()

    def resume(self, path: Path, ctx) -> None:
        ckpt = load_checkpoint(path)
        dist_utils.load_full_model_state(self.runner, {f"model.{k}": v for k, v in ckpt.model_state.items()}, ctx)
        dist_utils.load_full_optimizer_state(self.runner, self.optimizer, ckpt.optimizer_state, ctx)
        self.scheduler.load_state_dict(ckpt.scheduler_state)
        self.sampler.load_state_dict(ckpt.trainer_state["sampler"])
        self.step = ckpt.step
        restore_rng(ckpt.rng)


def check_reward_config(cfg: MapoConfig) -> None:
    """The accuracy reward must be computed: the MAPO sequence gate and the logs use it."""
    names, weights = list(cfg.reward.functions), list(cfg.reward.weights)
    if len(names) != len(weights):
        raise ValueError(f"reward.functions {names} and reward.weights {weights} must have the same length")
    if cfg.algo.name != "sft" and "accuracy" not in names:
        raise ValueError("reward.functions must include 'accuracy' (the MAPO gate uses it; give it weight 0 to keep it out of the reward)")


def without_some_audio(records: list, fraction: float, seed: int, step: int) -> list:
    """Copies of `records` where a `fraction` of them (chosen by (seed, step), the same on every rank)
    have no audio: the prompt is then text only, and batches mix items with and without audio."""
    if fraction <= 0:
        return records
    drop = np.random.default_rng([seed, step, 7]).random(len(records)) < fraction
    return [dataclasses.replace(r, audio=None) if d else r for r, d in zip(records, drop)]


def generation_kwargs(cfg: MapoConfig, processor, ctx) -> dict:
    tokenizer = processor.tokenizer
    kwargs = dict(
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
        suppress_token_ids=generation_suppressed_token_ids(processor),
    )
    if ctx.enabled:
        kwargs["sync_finished"] = lambda done: dist_utils.all_done(done, ctx, ctx.device)
    return kwargs


# ------------------------------------------------------------------------------------------ warm start
def warm_start_key(cfg: MapoConfig) -> str:
    """Hash of everything the warm-started weights depend on (not where the cache lives)."""
    settings = dataclasses.asdict(cfg.trainer.warm_start)
    settings.pop("cache_dir")
    parts = {"model": dataclasses.asdict(cfg.model), "data": [cfg.data.dir, cfg.data.train], "warm_start": settings, "seed": cfg.trainer.seed}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def sft_phase(phase: Phase, collator: Collator, cfg: MapoConfig, ctx, logger, run_dir: Path, batch_size: int,
              log_prefix: str, stop_at: int | None = None) -> None:
    """Supervised steps on the reference traces (the warm start, or `algo=sft` as the main phase),
    up to `stop_at` (default: the phase's last step)."""
    micro = max(1, cfg.trainer.micro_batch_size)
    while phase.step < (phase.steps if stop_at is None else stop_at):
        t0 = time.perf_counter()
        records = phase.sampler.next_batch(batch_size)
        records = without_some_audio(records, cfg.data.text_only_fraction, cfg.trainer.seed, phase.step)
        records = records[dist_utils.shard_indices(batch_size, ctx)]
        batches = [collator.supervised(records[i : i + micro]) for i in range(0, len(records), micro)]
        num_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        num_tokens = float(dist_utils.global_sum(torch.tensor(float(num_tokens)), ctx))
        sums = MetricSums()
        for batch in batches:
            nll, correct, count = phase.runner(sft_nll, batch)
            (nll / num_tokens * ctx.world_size).backward()
            sums.add({"loss/nll": torch.stack([nll.detach() / num_tokens, torch.ones((), device=nll.device)]),
                      "sft/token_accuracy": torch.stack([correct.float(), count.float()])})
        grad_norm = phase.clip_and_step(cfg.trainer.grad_clip)
        phase.step += 1
        metrics = MetricSums.finalize(dist_utils.reduce_metrics(sums.flat(), ctx))
        metrics.update({"grad_norm": float(grad_norm), "lr": phase.scheduler.get_last_lr()[0], "time/step_s": time.perf_counter() - t0})
        logger.log(phase.step, {f"{log_prefix}{k}": v for k, v in metrics.items()})
        logger.progress(phase.step, {f"{log_prefix}{k}": v for k, v in metrics.items()})
        if cfg.trainer.checkpoint_every and phase.step % cfg.trainer.checkpoint_every == 0 and phase.step < phase.steps:
            phase.save(run_dir, ctx, cfg.trainer.keep_last)


def run_warm_start(cfg: MapoConfig, model, collator: Collator, train_items, ctx) -> Path:
    """The cached warm-start weights (a safetensors file); trains `model` to make them when missing.

    Training shards `model` in place under FSDP: the caller reloads it before loading the weights.
    The work folder keeps checkpoints, so an interrupted warm start resumes; it is removed once the
    weights are in the cache (written to a temporary folder, then renamed).
    """
    ws = cfg.trainer.warm_start
    cache = Path(ws.cache_dir) / warm_start_key(cfg)
    weights = cache / "model.safetensors"
    if weights.is_file():
        say(ctx, f"[mapo] warm start: cached weights {weights}")
        return weights
    say(ctx, f"[mapo] warm start: {ws.steps} supervised steps (cached in {cache})")
    work = cache.with_name(cache.name + ".run")
    set_trainable(model, cfg, everything=True)
    runner = dist_utils.apply_fsdp(dist_utils.ModelRunner(model), ctx)
    phase = Phase("warm_start", runner, model, ws.lr, ws.steps, ws.warmup_steps, "constant", cfg, train_items)
    resume = resolve_resume(work, "auto")
    if resume is not None:
        phase.resume(resume, ctx)
    logger = make_logger("none", work, {}, total_steps=ws.steps, enabled=ctx.is_main,
                         progress_keys={"loss": "warm/loss/nll", "tok_acc": "warm/sft/token_accuracy"})
    sft_phase(phase, collator, cfg, ctx, logger, work, ws.batch_size, "warm/")
    logger.finish()
    state = {k.removeprefix("model."): v for k, v in dist_utils.full_model_state(runner, ctx).items()}
    if ctx.is_main:
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
        (tmp / "warm_start.json").write_text(json.dumps({"steps": ws.steps, "key": cache.name}) + "\n")
        shutil.rmtree(cache, ignore_errors=True)
        os.replace(tmp, cache)
        shutil.rmtree(work, ignore_errors=True)
    if ctx.enabled:
        torch.distributed.barrier()
    return weights


# ------------------------------------------------------------------------------------------ evaluation
def evaluate_all(runner, collator, eval_sets, cfg, gen_kwargs, conditions, ctx) -> dict[str, dict]:
    """{split/condition: result} for every eval split and condition (greedy; items sharded over ranks)."""
    results = {}
    for split, records in eval_sets.items():
        for condition in conditions:
            results[f"{split}/{condition}"] = runner(
                evaluate_split, collator, records, split, condition, seed=cfg.trainer.seed,
                shard=(ctx.rank, ctx.world_size), gather=lambda items: dist_utils.gather_objects(items, ctx),
                batch_size=cfg.rollout.eval_batch_size, max_new_tokens=cfg.rollout.max_new_tokens, **gen_kwargs,
            )
        if "no_audio" in conditions:
            results[f"{split}/flip_rate"] = flip_rate(results[f"{split}/audio"], results[f"{split}/no_audio"])
    return results


def eval_metrics(results: dict, prefix: str) -> dict[str, float]:
    out = {}
    for key, res in results.items():
        if isinstance(res, float):
            out[f"{prefix}{key}"] = res
            continue
        out[f"{prefix}{key}/accuracy"] = res.accuracy
        for task, acc in res.per_task.items():
            out[f"{prefix}{key}/task/{task}"] = acc
    return out


# ------------------------------------------------------------------------------------------ RL step
def rl_step(phase: Phase, ref_runner, collator, cfg: MapoConfig, ctx, gen_kwargs, content_mask, audio_input) -> tuple[dict, list]:
    """One RL optimizer step on `rollout.prompts_per_step` prompts (global). Returns (metrics, sample rows)."""
    algo, G = cfg.algo, cfg.rollout.group_size
    n_global = cfg.rollout.prompts_per_step
    step_index = phase.step
    records = phase.sampler.next_batch(n_global)
    records = without_some_audio(records, cfg.data.text_only_fraction, cfg.trainer.seed, step_index)
    local = dist_utils.shard_indices(n_global, ctx)
    records = records[local]
    seeds = [cfg.trainer.seed * 1_000_003 + step_index * 10_007 + i for i in range(local.start, local.stop)]

    # rollout (audio encoded once per prompt, prompt prefilled once per group)
    batch = collator.prompts(records)
    rollout = phase.runner(
        generate_rollout, batch, group_size=G, max_new_tokens=cfg.rollout.max_new_tokens,
        temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, seeds=seeds, **gen_kwargs,
    )

    # rewards and advantages (the advantage normaliser may span ranks: gather, compute, slice)
    ids = rollout.completion_ids.masked_fill(rollout.completion_mask == 0, gen_kwargs["pad_token_id"])
    texts = collator.tokenizer.batch_decode(ids.cpu(), skip_special_tokens=True)
    row_records = [r for r in records for _ in range(G)]
    rewards = compute_rewards(texts, row_records, cfg.reward.functions, cfg.reward.weights)
    all_rewards = dist_utils.gather_1d(rewards.total.to(ctx.device), ctx)
    n_local = len(rewards.total)
    adv = group_advantages(all_rewards, G, scale=algo.adv_scale, eps=algo.adv_eps)[ctx.rank * n_local : (ctx.rank + 1) * n_local]

    # no-grad scoring: reference log-probs, ablated reference, (old policy when several passes)
    prepared = prepare_batch(
        phase.runner, rollout, adv, rewards.accuracy, algo,
        frozen_reference=ref_runner, feature_extractor=collator.feature_extractor,
        content_vocab_mask=content_mask, temperature=cfg.rollout.temperature, audio_input=audio_input,
        old_pass=algo.updates_per_rollout > 1,
    )
    num_tokens = dist_utils.global_sum(rollout.completion_mask.sum().float(), ctx)
    norms = Normalisers(num_tokens=num_tokens, num_seqs=n_global * G, max_len=cfg.rollout.max_new_tokens)

    # update(s) on micro-batches; FSDP averages gradients over ranks, so scale by world size
    sums = MetricSums()
    rows = torch.arange(n_local, device=rollout.completion_ids.device)
    for _ in range(algo.updates_per_rollout):
        for chunk in rows.split(max(1, cfg.trainer.micro_batch_size)):
            _, m = mapo_step(
                phase.model, rollout, chunk, prepared, algo, norms, temperature=cfg.rollout.temperature,
                audio_input=audio_input, backward_scale=float(ctx.world_size), call=phase.runner,
            )
            sums.add(m)
        grad_norm = phase.clip_and_step(cfg.trainer.grad_clip)
    phase.step += 1

    lengths = rollout.completion_mask.sum(-1).float()
    extra = {
        "reward/mean": torch.stack([rewards.total.sum(), torch.tensor(float(n_local))]),
        "completion/length": torch.stack([lengths.sum().cpu(), torch.tensor(float(n_local))]),
        # rows that hit max_new_tokens without emitting EOS (they score 0 accuracy)
        "completion/truncated": torch.stack([(rollout.completion_ids == gen_kwargs["eos_token_id"]).any(-1).logical_not().sum().float().cpu(),
                                             torch.tensor(float(n_local))]),
    }
    groups = rewards.total.view(-1, G)
    informative = (groups.amax(-1) > groups.amin(-1)).float()  # groups with a non-zero advantage somewhere
    extra["rollout/informative_groups"] = torch.stack([informative.sum(), torch.tensor(float(len(informative)))])
    for name, values in rewards.per_function.items():
        extra[f"reward/{name}"] = torch.stack([values.sum(), torch.tensor(float(n_local))])
    sums.add(extra)
    metrics = MetricSums.finalize(dist_utils.reduce_metrics(sums.flat(), ctx))
    metrics["grad_norm"] = float(grad_norm)
    metrics["lr"] = phase.scheduler.get_last_lr()[0]
    samples = [{"id": r.id, "task": r.task, "answer": r.answer, "completion": t, "reward": float(v)}
               for r, t, v in list(zip(row_records, texts, rewards.total.tolist()))[:: G][:8]]
    return metrics, samples


# ------------------------------------------------------------------------------------------ main
def run(cfg: MapoConfig) -> dict:
    """Train as configured; returns the final metrics (also written to run_dir/final_metrics.json)."""
    if not isinstance(cfg, MapoConfig):
        cfg = OmegaConf.to_object(cfg)
    check_reward_config(cfg)
    ctx = dist_utils.init_distributed(cfg.trainer.device)
    torch.set_num_threads(cfg.trainer.num_threads)
    seed_everything(cfg.trainer.seed)
    run_dir = resolve_run_dir(cfg)
    if ctx.is_main:
        if not cfg.model.build_tiny_if_missing:
            ensure_model(cfg.model, cfg.data)  # a wrong model.path fails before any data work
        ensure_data(cfg.data, cfg.trainer.seed)
        ensure_model(cfg.model, cfg.data)
    if ctx.enabled:
        torch.distributed.barrier()
    train_items = load_split(cfg.data, cfg.data.train)
    eval_sets = {s: evenly_by_task(load_split(cfg.data, f), cfg.data.eval_max_items) for s, f in cfg.data.eval_splits.items()}

    def load():
        model, processor = load_model_and_processor(
            cfg.model.path, dtype=cfg.model.dtype, attn_implementation=cfg.model.attn_implementation, device=ctx.device
        )
        if cfg.model.gradient_checkpointing:
            enable_activation_checkpointing(model)
        return model, processor

    model, processor = load()
    collator = Collator(processor, feature_cache=FeatureCache())
    if cfg.trainer.warm_start.enabled and cfg.algo.name != "sft":
        weights = run_warm_start(cfg, model, collator, train_items, ctx)
        if ctx.enabled:  # FSDP sharded it in place during a fresh warm start
            model, _ = load()
        model.load_state_dict(load_file(str(weights)))
    seed_everything(cfg.trainer.seed)

    is_sft = cfg.algo.name == "sft"
    needs_ref = not is_sft and (uses_kl_reference(cfg.algo) or (uses_ablated_reference(cfg.algo) and cfg.algo.reference.model == "frozen"))
    ref_runner = None
    if needs_ref:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
        ref_runner = dist_utils.apply_fsdp(dist_utils.ModelRunner(reference), ctx)
    set_trainable(model, cfg, everything=is_sft)
    runner = dist_utils.apply_fsdp(dist_utils.ModelRunner(model), ctx)
    phase = Phase("sft" if is_sft else "rl", runner, model, cfg.trainer.lr, cfg.trainer.steps, cfg.trainer.warmup_steps, cfg.trainer.schedule, cfg, train_items)
    resume = resolve_resume(run_dir, cfg.trainer.resume)
    if resume is not None:
        phase.resume(resume, ctx)
        say(ctx, f"[mapo] resumed from {resume} at step {phase.step}")

    # cached audio embeddings are exact only while the tower and projector do not train
    audio_input = "cached" if cfg.model.freeze_audio_tower and cfg.model.freeze_projector else "recompute"
    gen_kwargs = generation_kwargs(cfg, processor, ctx)
    content_mask = build_content_vocab_mask(collator.tokenizer, model.lm_head.out_features).to(ctx.device)
    plain_cfg = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    logger = make_logger(cfg.logger.kind, run_dir, plain_cfg, project=cfg.logger.project,
                         run_name=cfg.logger.run_name or f"{cfg.experiment_name}-{run_dir.name}",
                         total_steps=cfg.trainer.steps, enabled=ctx.is_main, wandb_mode=cfg.logger.mode)

    conditions = ("audio", "no_audio", "shuffled")
    before: dict[str, float] = {}  # flat eval metrics before the main phase (kept in the run folder for resumes)
    before_file = run_dir / "eval_before.json"
    if cfg.trainer.eval_on_start and phase.step == 0:
        before = eval_metrics(evaluate_all(runner, collator, eval_sets, cfg, gen_kwargs, conditions, ctx), "")
        logger.log(0, {f"eval/{k}": v for k, v in before.items()})
        if ctx.is_main:
            write_json_atomic(before_file, before)
    elif before_file.is_file():
        before = json.loads(before_file.read_text())

    model.train()
    t_start = time.perf_counter()
    stop_at = min(phase.steps, cfg.trainer.stop_after) if cfg.trainer.stop_after > 0 else phase.steps
    if is_sft:
        sft_phase(phase, collator, cfg, ctx, logger, run_dir, cfg.trainer.micro_batch_size * ctx.world_size, "", stop_at)
    while phase.step < stop_at:
        t0 = time.perf_counter()
        metrics, samples = rl_step(phase, ref_runner, collator, cfg, ctx, gen_kwargs, content_mask, audio_input)
        metrics["time/step_s"] = time.perf_counter() - t0
        if phase.step % cfg.logger.log_every == 0:
            logger.log(phase.step, metrics)
        logger.progress(phase.step, metrics)
        if cfg.logger.sample_every and phase.step % cfg.logger.sample_every == 0:
            logger.log_samples(phase.step, samples)
        if cfg.trainer.eval_every and phase.step % cfg.trainer.eval_every == 0 and phase.step < phase.steps:
            logger.log(phase.step, eval_metrics(evaluate_all(runner, collator, eval_sets, cfg, gen_kwargs, ("audio",), ctx), "eval/"))
        if cfg.trainer.checkpoint_every and phase.step % cfg.trainer.checkpoint_every == 0 and phase.step < phase.steps:
            phase.save(run_dir, ctx, cfg.trainer.keep_last)
    train_seconds = time.perf_counter() - t_start
    if phase.step > 0:
        phase.save(run_dir, ctx, cfg.trainer.keep_last)
    if phase.step < phase.steps:
        say(ctx, f"[mapo] stopped after step {phase.step} of {phase.steps} (trainer.stop_after); resume with trainer.run_dir={run_dir} trainer.resume=auto")
        logger.finish()
        dist_utils.shutdown(ctx)
        return {"step": phase.step}

    if cfg.trainer.export_final and phase.step > 0:
        state = {k.removeprefix("model."): v for k, v in dist_utils.full_model_state(runner, ctx).items()}
        if ctx.is_main:  # a folder the common loader reads: make eval ARGS='model.path=<run_dir>/final_model'
            model.save_pretrained(run_dir / "final_model", state_dict=state)
            processor.save_pretrained(run_dir / "final_model")

    after = eval_metrics(evaluate_all(runner, collator, eval_sets, cfg, gen_kwargs, conditions, ctx), "")
    final = {"step": phase.step, "train_seconds": train_seconds, **after}
    logger.log(phase.step, {f"eval/{k}": v for k, v in after.items()})
    if ctx.is_main:
        table = final_table(before, after, list(eval_sets), phase_name=phase.name)
        (run_dir / "final_table.md").write_text(table + "\n")
        write_json_atomic(run_dir / "final_metrics.json", final)
        plots = write_plots(run_dir)
        logger.log_images(phase.step, plots)
        print("\n" + table)
        print(f"\n[mapo] run folder: {run_dir.resolve()}")
        print(f"  metrics: {run_dir / 'metrics.jsonl'}   plots: {run_dir / 'plots'}   checkpoints: {run_dir / 'checkpoints'}")
    logger.finish()
    dist_utils.shutdown(ctx)
    return final


def main() -> None:
    import hydra

    from mapo.config import check_override_keys, register_configs

    check_override_keys(sys.argv[1:])
    register_configs()
    conf_dir = str(Path(__file__).resolve().parents[2] / "conf")
    hydra.main(config_path=conf_dir, config_name="config", version_base=None)(run)()


if __name__ == "__main__":
    main()
