"""One RL step: data → rollout → rewards → advantages → no-grad scoring → MAPO update(s) on
micro-batches → optimizer step(s) → metrics (DESIGN §2). The pieces are pure functions and the model
adapter; this module only composes them for one step of a `Phase`.

Counting: `Phase.step` and `trainer.steps` count RL steps (rollouts); each makes
`algo.updates_per_rollout × algo.mini_batches` optimizer steps, and the learning-rate schedule advances
once per optimizer step (the loop builds it over steps × that many). Checkpoints fall between rollouts.
"""

from __future__ import annotations

import torch

from mapo import distributed as dist_utils
from mapo.algos.advantages import group_advantages
from mapo.config import MapoConfig
from mapo.data.sampler import without_some_audio
from mapo.phase import Phase
from mapo.rewards import compute_rewards
from mapo.rollout import generate_rollout
from mapo.step import MetricSums, prepare_batch, truncated_rows, update_on_rollout
from mapo.timing import StepTimer


def step_seed(seed: int, step_index: int) -> int:
    """Base of RL step `step_index`'s random streams: prompt i of the step samples with step_seed + i, and
    the mini-batch shuffle uses `mini_batch_seed`. A function of the config and the step alone, so a
    resumed run draws exactly as an uninterrupted one."""
    return seed * 1_000_003 + step_index * 10_007


def mini_batch_seed(seed: int, step_index: int) -> int:
    """Seed of the mini-batch shuffle of RL step `step_index` (pass p adds p)."""
    return step_seed(seed, step_index) + 7_777_777


def rl_step(phase: Phase, ref_runner, collator, cfg: MapoConfig, ctx, gen_kwargs, content_mask, audio_input,
            faults=None) -> tuple[dict, list]:
    """One RL step on `rollout.prompts_per_step` prompts (global): one rollout, then
    `updates_per_rollout × mini_batches` optimizer steps on it. Returns (metrics, sample rows).

    faults: the run's `mapo.faults.RunFaults` (rows with bad audio replaced on every rank, non-finite
    optimizer steps skipped, reward failures counted), or None for none of that.
    """
    algo, G = cfg.algo, cfg.rollout.group_size
    n_global = cfg.rollout.prompts_per_step
    step_index = phase.step
    local = dist_utils.shard_indices(n_global, ctx)
    replaced_before, skipped_before = (faults.batches.skipped, faults.nonfinite.skipped) if faults else (0, 0)
    if faults is None:
        records = phase.sampler.next_batch(n_global)
    else:
        records = faults.batches.next_batch(phase.sampler, n_global, local, step_index + 1)
    records = without_some_audio(records, cfg.data.text_only_fraction, cfg.trainer.seed, step_index)
    records = records[local]
    seeds = [step_seed(cfg.trainer.seed, step_index) + i for i in range(local.start, local.stop)]

    # rollout (audio encoded once per prompt, prompt prefilled once per group)
    timer = StepTimer(ctx.device)
    with timer.phase("rollout"):
        batch = collator.prompts(records)
        rollout = phase.runner.decode(  # under FSDP the weights are gathered once for the whole rollout
            generate_rollout, batch, group_size=G, max_new_tokens=cfg.rollout.max_new_tokens,
            temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k,
            repetition_penalty=cfg.rollout.repetition_penalty, seeds=seeds,
            shared_prompt_cache=cfg.rollout.shared_prompt_cache, **gen_kwargs,
        )
    timer.add_tokens("rollout", rollout.completion_mask.sum())
    sequence_tokens = rollout.attention_mask.sum()

    # rewards and advantages (the advantage normaliser may span ranks: gather, compute, slice)
    ids = rollout.completion_ids.masked_fill(rollout.completion_mask == 0, gen_kwargs["pad_token_id"])
    texts = collator.tokenizer.batch_decode(ids.cpu(), skip_special_tokens=True)
    row_records = [r for r in records for _ in range(G)]
    rewards = compute_rewards(texts, row_records, cfg.reward.functions, cfg.reward.weights)
    all_rewards = dist_utils.gather_1d(rewards.total.to(ctx.device), ctx)
    n_local = len(rewards.total)
    adv = group_advantages(all_rewards, G, scale=algo.adv_scale, eps=algo.adv_eps)[ctx.rank * n_local : (ctx.rank + 1) * n_local]

    # no-grad scoring: reference log-probs, ablated reference, π_old (and Δh, ω̃) when the config needs them
    truncated = truncated_rows(rollout.completion_ids, gen_kwargs["eos_token_id"])
    with timer.phase("scoring"):
        prepared = prepare_batch(
            phase.runner, rollout, adv, rewards.accuracy, algo,
            frozen_reference=ref_runner, feature_extractor=collator.feature_extractor,
            content_vocab_mask=content_mask, temperature=cfg.rollout.temperature, audio_input=audio_input,
            truncated=truncated,
        )
    passes = sum(x is not None for x in (prepared.ref_logprobs, prepared.ablated, prepared.old_logprobs))
    timer.add_tokens("scoring", sequence_tokens * passes)

    # updates_per_rollout passes × mini_batches optimizer steps, each on micro-batches; FSDP averages
    # gradients over ranks, so scale by world size. The non-finite guard sees each step's loss and norm.
    step_loss: dict[str, torch.Tensor] = {}
    decide = faults.step_decider(step_index + 1, lambda: step_loss["loss"], [r.id for r in records]) if faults else None
    with timer.phase("update"):
        sums, grad_norms = update_on_rollout(
            phase.model, rollout, prepared, algo, micro_batch_size=cfg.trainer.micro_batch_size,
            optimizer_step=lambda: phase.clip_and_step(cfg.trainer.grad_clip, should_step=decide),
            seed=mini_batch_seed(cfg.trainer.seed, step_index), temperature=cfg.rollout.temperature,
            max_len=cfg.rollout.max_new_tokens, audio_input=audio_input, backward_scale=float(ctx.world_size),
            call=phase.runner, global_sum=lambda x: dist_utils.global_sum(x, ctx),
            on_step_loss=lambda loss: step_loss.update(loss=loss),
        )
    timer.add_tokens("update", sequence_tokens * algo.updates_per_rollout)
    phase.step += 1

    lengths = rollout.completion_mask.sum(-1).float()
    extra = {
        "reward/mean": torch.stack([rewards.total.sum(), torch.tensor(float(n_local))]),
        "completion/length": torch.stack([lengths.sum().cpu(), torch.tensor(float(n_local))]),
        "completion/length_max": torch.stack([lengths.max().cpu(), torch.tensor(1.0)]),
        # rows that hit max_new_tokens without emitting EOS (they score 0 accuracy)
        "completion/truncated": torch.stack([truncated.sum().float().cpu(), torch.tensor(float(n_local))]),
        # rows the overlong filter took out of L_PG and L_attn (0 when the filter is off)
        "completion/overlong_filtered": torch.stack([(~prepared.pg_rows).sum().float().cpu(), torch.tensor(float(n_local))]),
    }
    groups = rewards.total.view(-1, G)
    informative = (groups.amax(-1) > groups.amin(-1)).float()  # groups with a non-zero advantage somewhere
    extra["rollout/informative_groups"] = torch.stack([informative.sum(), torch.tensor(float(len(informative)))])
    for name, values in rewards.per_function.items():
        extra[f"reward/{name}"] = torch.stack([values.sum(), torch.tensor(float(n_local))])
    sums.add(extra)
    metrics = MetricSums.finalize(dist_utils.reduce_metrics(sums.flat(), ctx))
    metrics.update(timer.metrics())
    if faults is not None:
        metrics.update(faults.add_reward_errors(list(cfg.reward.functions), rewards.errors))
        if faults.nonfinite.skipped > skipped_before:
            metrics["faults/step_skipped"] = 1.0
        if faults.batches.skipped > replaced_before:
            metrics["faults/audio_rows_replaced"] = float(faults.batches.skipped - replaced_before)
    metrics["grad_norm"] = sum(float(g) for g in grad_norms) / len(grad_norms)  # mean over the rollout's optimizer steps
    metrics["lr"] = phase.scheduler.get_last_lr()[0]
    samples = [{"id": r.id, "task": r.task, "answer": r.answer, "completion": t, "reward": float(v)}
               for r, t, v in list(zip(row_records, texts, rewards.total.tolist()))[:: G][:8]]
    return metrics, samples


