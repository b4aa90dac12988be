"""The supervised phases: the cached warm start on the reference traces before RL, and `algo=sft` run
as the main phase. Both are `sft_phase` on a `Phase`; the warm start caches its weights by a hash of
everything they depend on, so a second run (or a sweep) reuses them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from mapo import distributed as dist_utils
from mapo.atomic import replacing
from mapo.checkpoint import resolve_resume
from mapo.config import MapoConfig
from mapo.data.collate import Collator
from mapo.data.sampler import without_some_audio
from mapo.distributed import say
from mapo.phase import Phase, set_trainable
from mapo.run_logging import make_logger
from mapo.step import MetricSums, sft_nll


#: Bytes read from each end of a weights file for its fingerprint (a whole file when it is smaller).
FINGERPRINT_BYTES = 1 << 20


def file_fingerprint(path: Path) -> str:
    """Size and a hash of the first and last MiB of a file: cheap for 15 GB of shards, and it changes when
    a model or manifest at the same path is rebuilt differently (a rebuilt file keeps its name)."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as f:
        digest.update(f.read(FINGERPRINT_BYTES))
        if size > 2 * FINGERPRINT_BYTES:
            f.seek(size - FINGERPRINT_BYTES)
        digest.update(f.read(FINGERPRINT_BYTES))
    return f"{size}:{digest.hexdigest()[:16]}"


def inputs_fingerprint(cfg: MapoConfig) -> dict[str, str]:
    """Fingerprints of the model folder's config and weights and of the training manifest (what the cache
    key must follow besides the settings)."""
    from mapo.assets import manifest_path

    folder = Path(cfg.model.path)
    files = sorted(folder.glob("*.safetensors")) + [folder / "config.json", manifest_path(cfg.data, cfg.data.train)]
    return {p.name: file_fingerprint(p) for p in files if p.is_file()}


def warm_start_key(cfg: MapoConfig) -> str:
    """Hash of everything the warm-started weights depend on (not where the cache lives): the settings, and
    the contents of the model folder and training manifest they start from."""
    settings = dataclasses.asdict(cfg.trainer.warm_start)
    settings.pop("cache_dir")
    model = dataclasses.asdict(cfg.model)
    model.pop("frozen_dtype")  # the warm start trains every weight: nothing is stored frozen
    model.pop("lora")  # LoRA layers are added after the warm start
    parts = {"model": model, "data": [cfg.data.dir, cfg.data.train], "warm_start": settings, "seed": cfg.trainer.seed,
             "files": inputs_fingerprint(cfg)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


WEIGHTS_FILE = "model.safetensors"


def cached_warm_start(cfg: MapoConfig) -> Path | None:
    """The cached warm-start weights for this config, or None when they have not been made."""
    weights = Path(cfg.trainer.warm_start.cache_dir) / warm_start_key(cfg) / WEIGHTS_FILE
    return weights if weights.is_file() else None


def sft_phase(phase: Phase, collator: Collator, cfg: MapoConfig, ctx, logger, run_dir: Path, batch_size: int,
              log_prefix: str, stop_at: int | None = None, faults=None) -> None:
    """Supervised steps on the reference traces (the warm start, or `algo=sft` as the main phase),
    up to `stop_at` (default: the phase's last step), or until a signal stops the run (`faults.stop`:
    the caller then saves and exits). faults: the run's `mapo.faults.RunFaults`, or None."""
    micro = max(1, cfg.trainer.micro_batch_size)
    while phase.step < (phase.steps if stop_at is None else stop_at):
        if faults is not None and faults.stop.should_stop():
            return
        t0 = time.perf_counter()
        local = dist_utils.shard_indices(batch_size, ctx)
        if faults is None:
            records = phase.sampler.next_batch(batch_size)
        else:
            records = faults.batches.next_batch(phase.sampler, batch_size, local, phase.step + 1)
        records = without_some_audio(records, cfg.data.text_only_fraction, cfg.trainer.seed, phase.step)
        records = records[local]
        batches = [collator.supervised(records[i : i + micro]) for i in range(0, len(records), micro)]
        num_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        num_tokens = float(dist_utils.global_sum(torch.tensor(float(num_tokens)), ctx))
        sums = MetricSums()
        loss = 0.0
        for batch in batches:
            nll, correct, count = phase.runner(sft_nll, batch)
            (nll / num_tokens * ctx.world_size).backward()
            loss = loss + nll.detach() / num_tokens
            sums.add({"loss/nll": torch.stack([nll.detach() / num_tokens, torch.ones((), device=nll.device)]),
                      "sft/token_accuracy": torch.stack([correct.float(), count.float()])})
        skipped_before = faults.nonfinite.skipped if faults else 0
        decide = faults.step_decider(phase.step + 1, loss, [r.id for r in records]) if faults else None
        grad_norm = phase.clip_and_step(cfg.trainer.grad_clip, should_step=decide)
        phase.step += 1
        metrics = MetricSums.finalize(dist_utils.reduce_metrics(sums.flat(), ctx))
        if faults is not None and faults.nonfinite.skipped > skipped_before:
            metrics["faults/step_skipped"] = 1.0
        metrics.update({"grad_norm": float(grad_norm), "lr": phase.scheduler.get_last_lr()[0], "time/step_s": time.perf_counter() - t0})
        logger.log(phase.step, {f"{log_prefix}{k}": v for k, v in metrics.items()})
        logger.progress(phase.step, {f"{log_prefix}{k}": v for k, v in metrics.items()})
        if cfg.trainer.checkpoint_every and phase.step % cfg.trainer.checkpoint_every == 0 and phase.step < phase.steps:
            phase.save(run_dir, ctx, cfg.trainer.keep_last)


def run_warm_start(cfg: MapoConfig, model, collator: Collator, train_items, ctx, precision=None, faults=None) -> Path:
    """The cached warm-start weights (a safetensors file); trains `model` to make them when missing.

    Training shards `model` in place under FSDP: the caller reloads it before loading the weights.
    The work folder keeps checkpoints, so an interrupted warm start resumes; it is removed once the
    weights are in the cache (written to a temporary folder, then renamed). A signal (`faults.stop`)
    saves a checkpoint in the work folder and raises `mapo.faults.Stopped`.
    """
    ws = cfg.trainer.warm_start
    cache = Path(ws.cache_dir) / warm_start_key(cfg)
    weights = cache / WEIGHTS_FILE
    if weights.is_file():
        say(ctx, f"[mapo] warm start: cached weights {weights}")
        return weights
    say(ctx, f"[mapo] warm start: {ws.steps} supervised steps (cached in {cache})")
    work = cache.with_name(cache.name + ".run")
    set_trainable(model, cfg, everything=True)
    runner = dist_utils.apply_fsdp(dist_utils.ModelRunner(model, precision), ctx)
    phase = Phase("warm_start", runner, model, ws.lr, ws.steps, ws.warmup_steps, "constant", cfg, train_items)
    resume = resolve_resume(work, "auto")
    if resume is not None:
        phase.resume(resume, ctx)
        say(ctx, f"[mapo] resumed warm start at step {phase.step} from {resume}")
    logger = make_logger("none", work, {}, total_steps=ws.steps, enabled=ctx.is_main,
                         progress_keys={"loss": "warm/loss/nll", "tok_acc": "warm/sft/token_accuracy"})
    sft_phase(phase, collator, cfg, ctx, logger, work, ws.batch_size, "warm/", faults=faults)
    logger.finish()
    if faults is not None and faults.stop.stopped_by is not None:
        if phase.step > 0:
            phase.save(work, ctx, cfg.trainer.keep_last)
        say(ctx, f"[mapo] warm start stopped at step {phase.step} of {ws.steps} with a checkpoint in {work}; "
                 "the next run resumes it")
        faults.exit_if_stopped()
    state = {k.removeprefix("model."): v for k, v in dist_utils.full_model_state(runner, ctx).items()}
    if ctx.is_main:
        with replacing(cache) as tmp:
            tmp.mkdir()
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / WEIGHTS_FILE))
            (tmp / "warm_start.json").write_text(json.dumps({"steps": ws.steps, "key": cache.name}) + "\n")
        shutil.rmtree(work, ignore_errors=True)
    if ctx.enabled:
        torch.distributed.barrier()
    return weights


