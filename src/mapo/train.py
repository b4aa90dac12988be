"""The training program: `python -m mapo.train experiment=tiny_mapo [key=value ...]` (or `make train`).

Reads top to bottom (DESIGN §2):

    setup        process group, seeds, data and model (built locally if allowed), logger
    warm start   supervised steps on the reference traces, cached by config hash (`algo=sft` is the
                 same phase run as the main one)
    RL loop      data → rollout → rewards → advantages → no-grad scoring → MAPO step(s) on
                 micro-batches → AdamW (warm-up + schedule, clipping) → metrics → eval → checkpoint
    report       accuracy before/after × with/without audio, plots, final_metrics.json

Everything distributed goes through `mapo.distributed`; the algorithm pieces are pure functions. The
phases live in their own modules: `mapo.phase` (optimizer, schedule, data order, checkpoints),
`mapo.warm_start` (supervised steps, cached warm start), `mapo.rl` (one RL step). Faults are handled
by `mapo.faults` (bad audio mid-run, non-finite steps, failing rewards, SIGTERM/SIGINT), whose counts
end up in final_metrics.json; every manifest is checked (`mapo.assets.load_run_data`) before any model
loads.
"""

from __future__ import annotations

import gc
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from mapo import distributed as dist_utils
from mapo.algos.mapo import build_content_vocab_mask
from mapo.assets import ensure_data, ensure_model, load_run_data
from mapo.atomic import write_json_atomic
from mapo.checkpoint import resolve_resume
from mapo.cluster import export_job_environment
from mapo.config import MapoConfig
from mapo.data.collate import Collator, FeatureCache
from mapo.distributed import say
from mapo.evaluate import evaluate_split, evenly_by_task, flip_rate, generation_tokens
from mapo.export import export_dir, export_policy
from mapo.faults import RunFaults, Stopped
from mapo.interrupt import SignalFlag
from mapo.models.adapter import get_adapter
from mapo.models.loader import (
    enable_activation_checkpointing,
    load_model_and_processor,
    read_feature_extractor_settings,
)
from mapo.models.lora import adapters_off, lora_enabled
from mapo.phase import Phase, prepare_policy
from mapo.plan import check_memory_at_start
from mapo.precision import (
    Precision,
    frozen_copy,
    policy_load_dtype,
    reference_staging_device,
    resolve_precision,
)
from mapo.preflight import check_config
from mapo.report import final_table, write_plots
from mapo.rl import rl_step
from mapo.run_logging import make_logger
from mapo.step import needs_frozen_reference, optimizer_steps_per_rollout
from mapo.timing import timed_generation
from mapo.warm_start import run_warm_start, sft_phase


# ------------------------------------------------------------------------------------------ setup
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


def check_before_loading(cfg: MapoConfig, ctx) -> None:
    """The checks that need the model folder's config.json, then the memory plan (printed; refused on
    CUDA when it does not fit): before any weights or data are read."""
    folder = Path(cfg.model.path)
    config_dict = json.loads((folder / "config.json").read_text())
    check_config(cfg, config_dict, ctx.world_size, read_feature_extractor_settings(folder))
    check_memory_at_start(cfg, config_dict, ctx)


def sampling_summary(cfg: MapoConfig, model_path: str | Path) -> str:
    """The sampling settings rollout uses (from the run config alone), and what of the model folder's
    generation_config.json is ignored, for the run log."""
    r = cfg.rollout
    used = (f"temperature={r.temperature}, top_p={r.top_p}, top_k={r.top_k}, repetition_penalty={r.repetition_penalty}, "
            f"max_new_tokens={r.max_new_tokens}")
    folder_file = Path(model_path) / "generation_config.json"
    ignored = ""
    if folder_file.is_file():
        keys = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty")
        folder_cfg = json.loads(folder_file.read_text())
        found = {k: folder_cfg[k] for k in keys if k in folder_cfg}
        if found:
            ignored = f"; {folder_file.name} of the model folder ({', '.join(f'{k}={v}' for k, v in found.items())}) is not used"
    return f"[mapo] sampling: {used} (from the run config){ignored}"


def generation_kwargs(cfg: MapoConfig, processor, ctx, vocab_size: int | None = None) -> dict:
    """Rollout and evaluation keywords, passed to every rollout of the run (evaluation's included): stop, pad
    and suppressed ids, `rollout.cuda_graph`, `rollout.compile`, and under torchrun the finish sync; `vocab_size` (the LM head's
    rows) suppresses the rows past the tokenizer."""
    kwargs = generation_tokens(processor, vocab_size)  # stop, pad and suppressed ids (shared with mapo.eval)
    kwargs["cuda_graph"] = cfg.rollout.cuda_graph
    kwargs["compile_decoder"] = cfg.rollout.compile
    if ctx.enabled:
        kwargs["sync_finished"] = lambda done: dist_utils.all_done(done, ctx, ctx.device)
    return kwargs


def load_policy(cfg: MapoConfig, ctx, precision: Precision):
    """(model, processor) of `cfg.model.path` on the run's device in `load_dtype`, with the configured
    attention and activation checkpointing: the policy before warm start and `prepare_policy`."""
    model, processor = load_model_and_processor(
        cfg.model.path, dtype=load_dtype(cfg, precision), attn_implementation=cfg.model.attn_implementation,
        device=ctx.device,
    )
    if cfg.model.gradient_checkpointing:
        enable_activation_checkpointing(model)
    return model, processor


def load_dtype(cfg: MapoConfig, precision: Precision) -> torch.dtype:
    """`mapo.precision.policy_load_dtype` of this run (a warm start runs first unless the algorithm is SFT)."""
    warm_start = cfg.trainer.warm_start.enabled and cfg.algo.name != "sft"
    return policy_load_dtype(lora_enabled(cfg.model.lora), warm_start, precision.master, precision.frozen)


@dataclass
class TrainingSetup:
    """What the main phase runs on (`build_setup`): the policy and its runner, the reference's runner (None
    when the phase needs none), the phase (optimizer, schedule, data order), the collator, the rollout's
    generation keywords, the content-vocabulary mask and how the audio reaches the scoring passes."""

    model: torch.nn.Module
    processor: object
    precision: Precision
    collator: Collator
    runner: object
    ref_runner: object | None
    phase: Phase
    gen_kwargs: dict
    content_mask: torch.Tensor
    audio_input: str


def build_setup(cfg: MapoConfig, ctx, precision: Precision, model, processor, train_items,
                collator: Collator | None = None) -> TrainingSetup:
    """The main phase's state for a loaded (and warm-started) `model`, one process or sharded (FSDP) as
    `ctx` says: the frozen reference (a copy in the frozen dtype, or with LoRA the same model with its
    adapters off), `prepare_policy`, the runner, the phase, generation keywords, the content mask.
    `mapo.train` and the bench (`mapo.bench_rl`) both build it here.
    collator: the one warm start used (None: a new one)."""
    is_sft = cfg.algo.name == "sft"
    # a run that never trains (make eval: trainer.steps=0) never uses a reference
    needs_ref = not is_sft and cfg.trainer.steps > 0 and needs_frozen_reference(cfg.algo)
    use_lora = lora_enabled(cfg.model.lora)
    ref_runner = None
    if needs_ref and not use_lora:  # the initial policy, frozen, stored in the frozen dtype
        # Under FSDP the copy is made in host memory: sharding moves it to the GPU one unit at a time, so a
        # GPU holds the whole policy and the reference's shards at start, not both whole models (mapo.plan).
        staged = reference_staging_device(ctx.world_size, ctx.device.type)
        reference = frozen_copy(model, precision.frozen, device=staged)
        ref_runner = dist_utils.apply_fsdp(dist_utils.ModelRunner(reference, precision), ctx)
    prepare_policy(model, cfg, precision, everything=is_sft)
    adapter = get_adapter(model)
    # cached audio embeddings are exact only while the tower and projector do not train
    audio_parts = [adapter.audio_tower(model), adapter.audio_projector(model)]
    audio_input = "recompute" if any(p.requires_grad for part in audio_parts if part is not None for p in part.parameters()) else "cached"
    runner = dist_utils.apply_fsdp(dist_utils.ModelRunner(model, precision), ctx)
    if needs_ref and use_lora:  # the same model with its adapters off: no second copy
        ref_runner = adapters_off(runner)
    phase = Phase("sft" if is_sft else "rl", runner, model, cfg.trainer.lr, cfg.trainer.steps, cfg.trainer.warmup_steps, cfg.trainer.schedule, cfg, train_items,
                  optimizer_steps_per_step=1 if is_sft else optimizer_steps_per_rollout(cfg.algo))
    collator = collator if collator is not None else Collator(processor, feature_cache=FeatureCache())
    vocab_size = adapter.vocab_size(model)
    return TrainingSetup(
        model=model, processor=processor, precision=precision, collator=collator, runner=runner, ref_runner=ref_runner,
        phase=phase, gen_kwargs=generation_kwargs(cfg, processor, ctx, vocab_size), audio_input=audio_input,
        content_mask=build_content_vocab_mask(collator.tokenizer, vocab_size).to(ctx.device),
    )


# ------------------------------------------------------------------------------------------ evaluation
def evaluate_all(runner, collator, eval_sets, cfg, gen_kwargs, conditions, ctx) -> dict[str, dict]:
    """{split/condition: result} for every eval split and condition (greedy; items sharded over ranks)."""
    results = {}
    for split, records in eval_sets.items():
        for condition in conditions:
            results[f"{split}/{condition}"] = runner.decode(  # weights gathered once per split under FSDP
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


# ------------------------------------------------------------------------------------------ main
def run(cfg: MapoConfig) -> dict:
    """Train as configured; returns the final metrics (also written to run_dir/final_metrics.json).

    SIGTERM/SIGINT during training write a checkpoint and raise `mapo.faults.Stopped` (exit 128 + signal).
    """
    with SignalFlag().installed() as flag:
        return _run(cfg, flag)


def _run(cfg: MapoConfig, flag: SignalFlag) -> dict:
    if not isinstance(cfg, MapoConfig):
        cfg = OmegaConf.to_object(cfg)
    export_job_environment()  # a multi-task submitit (SLURM) job: torchrun's variables from the job
    check_config(cfg, None, int(os.environ.get("WORLD_SIZE", "1")))  # every value, before anything is read
    ctx = dist_utils.init_distributed(cfg.trainer.device)
    torch.set_num_threads(cfg.trainer.num_threads)
    seed_everything(cfg.trainer.seed)
    run_dir = resolve_run_dir(cfg)
    if ctx.is_main:
        if not cfg.model.build_tiny_if_missing:
            ensure_model(cfg.model, cfg.data)  # a wrong model.path fails before any data work
            check_before_loading(cfg, ctx)  # layers, window, memory plan: before any data work too
        ensure_data(cfg.data, cfg.trainer.seed)
        ensure_model(cfg.model, cfg.data)
        if cfg.model.build_tiny_if_missing:
            check_before_loading(cfg, ctx)
        say(ctx, sampling_summary(cfg, cfg.model.path))
    if ctx.enabled:
        torch.distributed.barrier()
    # every manifest checked before any model loads (rank 0 decodes the audio; all ranks drop the same rows)
    data = load_run_data(cfg.data, cfg.model.path, is_main=ctx.is_main, share=dist_utils.rank0_share(ctx))
    train_items = data.train
    eval_sets = {s: evenly_by_task(records, cfg.data.eval_max_items) for s, records in data.eval_sets.items()}

    precision = resolve_precision(cfg.model, ctx.device)
    model, processor = load_policy(cfg, ctx, precision)
    collator = Collator(processor, feature_cache=FeatureCache())
    faults = RunFaults.for_run(cfg.trainer.max_nonfinite_steps, ctx, collator.clip_features, data.counts, flag)
    flag.deferring = True  # from here on a signal ends the run after a step, with a checkpoint
    if cfg.trainer.warm_start.enabled and cfg.algo.name != "sft":
        weights = run_warm_start(cfg, model, collator, train_items, ctx, precision, faults=faults)
        if dist_utils.fsdp_units(model.modules()):  # FSDP sharded it in place (a fresh warm start, not a cached one)
            # Free that sharded copy (FSDP's state refers back to the module: a cycle) before a whole one
            # loads, so the reload's peak is the plan's load phase and not that plus the old shards.
            del model
            gc.collect()
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
            model, _ = load_policy(cfg, ctx, precision)
        model.load_state_dict(load_file(str(weights)))
    seed_everything(cfg.trainer.seed)

    is_sft = cfg.algo.name == "sft"
    setup = build_setup(cfg, ctx, precision, model, processor, train_items, collator)
    runner, ref_runner, phase = setup.runner, setup.ref_runner, setup.phase
    gen_kwargs, content_mask, audio_input = setup.gen_kwargs, setup.content_mask, setup.audio_input
    resume = resolve_resume(run_dir, cfg.trainer.resume)
    if resume is not None:
        phase.resume(resume, ctx)
        say(ctx, f"[mapo] resumed from {resume} at step {phase.step}")

    plain_cfg = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    logger = make_logger(cfg.logger.kind, run_dir, plain_cfg, project=cfg.logger.project,
                         run_name=cfg.logger.run_name or f"{cfg.experiment_name}-{run_dir.name}",
                         total_steps=cfg.trainer.steps, enabled=ctx.is_main, wandb_mode=cfg.logger.mode)

    conditions = ("audio", "no_audio", "shuffled")
    before: dict[str, float] = {}  # flat eval metrics before the main phase (kept in the run folder for resumes)
    before_file = run_dir / "eval_before.json"
    if cfg.trainer.eval_on_start and phase.step == 0:
        results, timing = timed_generation("eval", ctx.device, evaluate_all, runner, collator, eval_sets, cfg, gen_kwargs, conditions, ctx)
        before = eval_metrics(results, "")
        logger.log(0, {**{f"eval/{k}": v for k, v in before.items()}, **timing})
        if ctx.is_main:
            write_json_atomic(before_file, before)
    elif before_file.is_file():
        before = json.loads(before_file.read_text())

    model.train()
    t_start = time.perf_counter()
    stop_at = min(phase.steps, cfg.trainer.stop_after) if cfg.trainer.stop_after > 0 else phase.steps
    if is_sft:
        sft_phase(phase, collator, cfg, ctx, logger, run_dir, cfg.trainer.micro_batch_size * ctx.world_size, "", stop_at,
                  faults=faults)
    while phase.step < stop_at and not faults.stop.should_stop():
        t0 = time.perf_counter()
        metrics, samples = rl_step(phase, ref_runner, collator, cfg, ctx, gen_kwargs, content_mask, audio_input, faults=faults)
        metrics["time/step_s"] = time.perf_counter() - t0
        if phase.step % cfg.logger.log_every == 0:
            logger.log(phase.step, metrics)
        logger.progress(phase.step, metrics)
        if cfg.logger.sample_every and phase.step % cfg.logger.sample_every == 0:
            logger.log_samples(phase.step, samples)
        if cfg.trainer.eval_every and phase.step % cfg.trainer.eval_every == 0 and phase.step < phase.steps:
            results, timing = timed_generation("eval", ctx.device, evaluate_all, runner, collator, eval_sets, cfg, gen_kwargs, ("audio",), ctx)
            logger.log(phase.step, {**eval_metrics(results, "eval/"), **timing})
        if cfg.trainer.checkpoint_every and phase.step % cfg.trainer.checkpoint_every == 0 and phase.step < phase.steps:
            phase.save(run_dir, ctx, cfg.trainer.keep_last)
        if cfg.trainer.export_every and phase.step % cfg.trainer.export_every == 0:
            export_policy(runner, model, processor, export_dir(run_dir, phase.step), ctx, precision.master)
    train_seconds = time.perf_counter() - t_start
    if phase.step > 0:
        phase.save(run_dir, ctx, cfg.trainer.keep_last)
    flag.deferring = False
    fault_counts = faults.summary(clips_cut=int(dist_utils.global_sum(torch.tensor(float(len(collator.cut_clips))), ctx)))
    say(ctx, "[mapo] data and faults: " + ", ".join(f"{k}={v}" for k, v in fault_counts.items()))
    if phase.step < phase.steps:
        why = "trainer.stop_after" if faults.stop.stopped_by is None else f"signal {faults.stop.exit_code - 128}"
        say(ctx, f"[mapo] stopped after step {phase.step} of {phase.steps} ({why}); resume with trainer.run_dir={run_dir} trainer.resume=auto")
        logger.finish()
        dist_utils.shutdown(ctx)
        if faults.stop.stopped_by is not None:
            raise Stopped(faults.stop.exit_code)
        return {"step": phase.step, **fault_counts}

    if cfg.trainer.export_final and phase.step > 0:  # make eval ARGS='model.path=<run_dir>/final_model'
        export_policy(runner, model, processor, run_dir / "final_model", ctx, precision.master)

    results, timing = timed_generation("eval", ctx.device, evaluate_all, runner, collator, eval_sets, cfg, gen_kwargs, conditions, ctx)
    after = eval_metrics(results, "")
    final = {"step": phase.step, "train_seconds": train_seconds, **after, **fault_counts}
    logger.log(phase.step, {**{f"eval/{k}": v for k, v in after.items()}, **timing})
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


def hydra_dir_follows_run_dir(argv: list[str]) -> None:
    """With `trainer.run_dir=X` on a single run, Hydra's own files (.hydra/, train.log) go to X too,
    instead of a second folder under ./outputs (append `hydra.run.dir=X` unless one is given)."""
    if any(a in ("-m", "--multirun") or a.startswith("hydra.run.dir=") for a in argv):
        return
    run_dir = next((a.split("=", 1)[1] for a in argv if a.startswith("trainer.run_dir=")), "")
    if run_dir:
        argv.append(f"hydra.run.dir={run_dir}")


def main() -> None:
    import hydra

    from mapo.config import check_override_keys, register_configs

    check_override_keys(sys.argv[1:])
    register_configs()
    hydra_dir_follows_run_dir(sys.argv)
    conf_dir = str(Path(__file__).resolve().parents[2] / "conf")
    hydra.main(config_path=conf_dir, config_name="config", version_base=None)(run)()


if __name__ == "__main__":
    main()
