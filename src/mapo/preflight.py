"""Start-time checks of a run config: every value the run will use, checked before any model loads.

`check_config(cfg, model_config_dict, world_size)` runs every registered check and raises one
`ConfigError` listing all problems, each naming the key, the value given and the valid range, e.g.

    rollout.group_size=1: group-relative advantages (R − group mean) are 0 for every completion of a
    group of one; valid: ≥ 2 (paper: 8)

Checks that need the model (capture layers against the layer count, the text window against the audio
tokens) run when `model_config_dict` (the folder's config.json) is given; the others run without it, so
the training program calls `check_config` twice: on the config alone at once, then with config.json
before any weights or data are read.

Adding a check for a new option: write `def check_<name>(cfg, ctx: CheckContext) -> list[str]` returning
problem strings (use `problem(...)`), decorate it with `@config_check`, keep it short.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mapo.models.adapter import ModelDims


class ConfigError(ValueError):
    """A run config that cannot work; `problems` lists each one (key, value, valid range)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config (nothing was loaded):\n  - " + "\n  - ".join(problems))


@dataclass
class CheckContext:
    """What a check may need besides the config. dims/model_config are None before config.json is read."""

    world_size: int = 1
    model_config: dict | None = None
    dims: ModelDims | None = None
    preprocessor_config: dict | None = None


Check = Callable[[Any, CheckContext], list[str]]
CHECKS: list[Check] = []


def config_check(fn: Check) -> Check:
    """Register a check (run by `check_config` in registration order)."""
    CHECKS.append(fn)
    return fn


def problem(key: str, value: Any, why: str, valid: str) -> str:
    return f"{key}={value!r}: {why}; valid: {valid}"


def _one_of(key: str, value: Any, options: Iterable[str]) -> list[str]:
    options = list(options)
    return [] if value in options else [problem(key, value, "unknown choice", ", ".join(map(str, options)))]


def _at_least(key: str, value: float, low: float, why: str = "too small") -> list[str]:
    return [] if value >= low else [problem(key, value, why, f"≥ {low}")]


def _positive(key: str, value: float, why: str = "must be positive") -> list[str]:
    return [] if value > 0 and math.isfinite(value) else [problem(key, value, why, "> 0")]


def _within(key: str, value: float, low: float, high: float, closed_high: bool = True) -> list[str]:
    ok = low <= value <= high if closed_high else low <= value < high
    return [] if ok else [problem(key, value, "out of range", f"[{low}, {high}{']' if closed_high else ')'}")]


def is_rl(cfg) -> bool:
    return cfg.algo.name != "sft" and cfg.trainer.steps > 0


# ------------------------------------------------------------------------------------------ rollout
@config_check
def check_rollout(cfg, ctx: CheckContext) -> list[str]:
    r, out = cfg.rollout, []
    out += _at_least("rollout.prompts_per_step", r.prompts_per_step, 1)
    out += _at_least("rollout.max_new_tokens", r.max_new_tokens, 1, "a completion needs at least one token")
    out += _positive("rollout.temperature", r.temperature, "sampling divides the logits by it")
    if not 0 < r.top_p <= 1:
        out.append(problem("rollout.top_p", r.top_p, "nucleus mass out of range", "(0, 1] (1 = off)"))
    out += _at_least("rollout.eval_batch_size", r.eval_batch_size, 1)
    if is_rl(cfg):
        if r.group_size < 2:
            out.append(problem(
                "rollout.group_size", r.group_size,
                f"advantages are relative to the group (R − group mean, algo.adv_scale={cfg.algo.adv_scale}), so a group "
                "of one gives every completion advantage 0", "≥ 2 (paper: 8)"))
        if r.prompts_per_step >= 1 and r.prompts_per_step % ctx.world_size:
            out.append(problem(
                "rollout.prompts_per_step", r.prompts_per_step,
                f"each of the {ctx.world_size} ranks takes an equal share of the prompts",
                f"a multiple of the world size {ctx.world_size}"))
    return out


@config_check
def check_sampler(cfg, ctx: CheckContext) -> list[str]:
    """rollout.top_k, rollout.repetition_penalty, rollout.cuda_graph (mapo.sampling; the last through
    `mapo.rollout.resolve_cuda_graph`, the run's own reading of it)."""
    import torch

    from mapo.rollout import resolve_cuda_graph

    r, out = cfg.rollout, []
    if not (isinstance(r.top_k, int) and r.top_k >= 0):
        out.append(problem("rollout.top_k", r.top_k, "keeps the k most likely tokens", "an integer ≥ 0 (0 = off)"))
    out += _positive("rollout.repetition_penalty", r.repetition_penalty, "divides/multiplies the logits of seen tokens")
    try:
        resolve_cuda_graph(r.cuda_graph, torch.device("cpu"), multi_process=False)
    except ValueError:
        out.append(problem("rollout.cuda_graph", r.cuda_graph, "unknown choice", "auto, on, off"))
    if r.shared_prompt_cache:
        from mapo.models.attention_override import SUPPORTED_IMPLEMENTATIONS

        if cfg.model.attn_implementation not in SUPPORTED_IMPLEMENTATIONS:
            out.append(problem("model.attn_implementation", cfg.model.attn_implementation,
                               "rollout.shared_prompt_cache decodes through the text decoder's attention function "
                               "and a prepared mask", f"{', '.join(SUPPORTED_IMPLEMENTATIONS)} (or rollout.shared_prompt_cache=false)"))
    return out


# ------------------------------------------------------------------------------------------ algorithm
@config_check
def check_algo(cfg, ctx: CheckContext) -> list[str]:
    from mapo.algos.advantages import ADVANTAGE_SCALES
    from mapo.algos.losses import AGGREGATION_MODES, KL_KINDS
    from mapo.algos.mapo import RELEVANCE_KINDS

    a, out = cfg.algo, []
    out += _one_of("algo.name", a.name, ("mapo", "grpo", "sft"))
    out += _one_of("algo.adv_scale", a.adv_scale, ADVANTAGE_SCALES)
    out += _at_least("algo.adv_eps", a.adv_eps, 0)
    out += _within("algo.eps_low", a.eps_low, 0, 1, closed_high=False)
    out += _at_least("algo.eps_high", a.eps_high, 0)
    out += _one_of("algo.loss_agg", a.loss_agg, AGGREGATION_MODES)
    out += _at_least("algo.beta", a.beta, 0, "the KL weight cannot be negative")
    out += _one_of("algo.kl_kind", a.kl_kind, KL_KINDS)
    out += _at_least("algo.updates_per_rollout", a.updates_per_rollout, 1)
    m = a.mask
    out += _one_of("algo.mask.kind", m.kind, RELEVANCE_KINDS)
    out += _one_of("algo.mask.score", m.score, ("entropy", "kl_token", "kl_full"))
    out += _positive("algo.mask.tau_base", m.tau_base, "τ_T divides |Δh|")
    out += _positive("algo.mask.cap", m.cap, "C_mask caps ω̃; a cap ≤ 0 zeroes the policy gradient")
    out += _at_least("algo.mask.threshold", m.threshold, 0)
    out += _at_least("algo.mask.floor", m.floor, 0)
    out += _within("algo.mask.rho", m.rho, 0, 1)
    from mapo.scoring import ABLATION_MODES

    out += _one_of("algo.reference.model", a.reference.model, ("frozen", "policy"))
    out += _one_of("algo.reference.ablation", a.reference.ablation, ABLATION_MODES)
    return out


@config_check
def check_mini_batches(cfg, ctx: CheckContext) -> list[str]:
    """algo.mini_batches = k must split every rank's rows of a rollout into k equal optimizer steps."""
    a, r = cfg.algo, cfg.rollout
    if not is_rl(cfg):
        return []
    out = _at_least("algo.mini_batches", a.mini_batches, 1)
    if out or r.prompts_per_step < 1 or r.prompts_per_step % ctx.world_size:
        return out  # the prompt split is check_rollout's
    rows = r.prompts_per_step // ctx.world_size * r.group_size
    if rows % a.mini_batches:
        out.append(problem(
            "algo.mini_batches", a.mini_batches,
            f"each optimizer step takes 1/k of the {rows} rows a rank gets per step (rollout.prompts_per_step="
            f"{r.prompts_per_step} / {ctx.world_size} ranks × rollout.group_size={r.group_size})",
            f"a divisor of {rows}"))
    return out


@config_check
def check_attention_loss(cfg, ctx: CheckContext) -> list[str]:
    from mapo.algos.mapo import TEMPORAL_SCHEDULES
    from mapo.capture.attention import CAPTURE_METHODS, HEAD_REDUCTIONS, LAYER_REDUCTIONS
    from mapo.models.attention_override import SUPPORTED_IMPLEMENTATIONS

    t, out = cfg.algo.attn, []
    if not t.eta >= 0:
        return [problem("algo.attn.eta", t.eta, "η weighs the attention loss; negative pushes attention away from the audio", "≥ 0 (0 = off)")]
    if t.eta == 0:
        return out
    out += _one_of("algo.attn.head_reduce", t.head_reduce, HEAD_REDUCTIONS)
    out += _one_of("algo.attn.layer_reduce", t.layer_reduce, LAYER_REDUCTIONS)
    out += _one_of("algo.attn.method", t.method, CAPTURE_METHODS)
    out += _one_of("algo.attn.schedule", t.schedule, TEMPORAL_SCHEDULES)
    out += _at_least("algo.attn.kappa", t.kappa, 0)
    out += _one_of("algo.attn.token_gate", t.token_gate, ("content", "all"))
    out += _positive("algo.attn.tau_base", t.tau_base, "τ_T divides |Δh|")
    out += _positive("algo.attn.cap", t.cap, "C_mask caps ν̃; a cap ≤ 0 zeroes the attention loss")
    out += _within("algo.attn.fail_floor", t.fail_floor, 0, 1)
    out += _at_least("algo.attn.adv_eps", t.adv_eps, 0)
    out += _positive("algo.attn.gate_cap", t.gate_cap, "C_pref caps the sequence gate")
    impl = cfg.model.attn_implementation
    if impl not in SUPPORTED_IMPLEMENTATIONS:
        out.append(problem("model.attn_implementation", impl,
                           f"the audio-attention capture (algo.attn.eta={t.eta} > 0) needs the text decoder's attention "
                           "function and mask format", f"{', '.join(SUPPORTED_IMPLEMENTATIONS)} (or set algo.attn.eta=0)"))
    layers = list(t.layers)
    if not layers:
        out.append(problem("algo.attn.layers", layers, "the capture needs at least one decoder layer", "a non-empty list of layer indices"))
    elif len(set(layers)) != len(layers):
        out.append(problem("algo.attn.layers", layers, "a layer is listed twice", "distinct indices"))
    if layers and ctx.dims is not None:
        n = ctx.dims.num_layers
        bad = [i for i in layers if not -n <= i < n]
        if bad:
            out.append(problem("algo.attn.layers", layers, f"{bad} do not exist: the text decoder has {n} layers (config.json)",
                               f"indices in [{-n}, {n - 1}] (negative count from the top)"))
        else:
            resolved = [i % n for i in layers]
            if len(set(resolved)) != len(resolved):
                out.append(problem("algo.attn.layers", layers, f"two indices name the same layer of {n}", "distinct layers"))
    return out


# ------------------------------------------------------------------------------------------ model
@config_check
def check_model(cfg, ctx: CheckContext) -> list[str]:
    """The precision and LoRA settings through the checks the run itself applies (mapo.precision,
    mapo.models.lora), and LoRA target names against the text model's linears in config.json (the only
    ones `add_lora` adapts)."""
    from mapo.models.lora import check_lora_config
    from mapo.precision import check_precision_config

    m, out = cfg.model, []
    out += _one_of("model.attn_implementation", m.attn_implementation, ("sdpa", "eager", "flash_attention_2", "flex_attention"))
    for check, settings in ((check_precision_config, m), (check_lora_config, m.lora)):
        try:
            check(settings)
        except ValueError as err:
            out.append(str(err))
    targets = m.lora.targets
    if m.lora.rank > 0 and ctx.dims is not None and not isinstance(targets, str) and list(targets):
        names = sorted({g.name for g in ctx.dims.linears if g.part == "text"})
        unknown = [t for t in targets if t not in names]
        if unknown:
            out.append(problem("model.lora.targets", list(targets), f"{unknown} name no linear layer of the language model", ", ".join(names)))
    return out


@config_check
def check_audio_window(cfg, ctx: CheckContext) -> list[str]:
    """The text window must hold a full audio window's tokens plus the completion; the processor's window
    must be the one the encoder was built for (it requires 2·max_source_positions mel frames)."""
    out = []
    d = ctx.dims
    if d is not None:
        need = d.audio_tokens_per_window + cfg.rollout.max_new_tokens
        if need > d.max_position:
            out.append(problem(
                "rollout.max_new_tokens", cfg.rollout.max_new_tokens,
                f"a full audio window gives {d.audio_tokens_per_window} audio tokens, and with the completion that exceeds "
                f"the text model's {d.max_position} positions (config.json max_position_embeddings)",
                f"≤ {d.max_position - d.audio_tokens_per_window} minus the prompt's text"))
    pre = ctx.preprocessor_config
    if d is not None and pre and d.audio_window_fixed:  # the Omni towers take any number of frames
        frames = pre.get("nb_max_frames") or (pre.get("chunk_length", 0) * pre.get("sampling_rate", 0) // max(1, pre.get("hop_length", 1)))
        if frames and frames != d.audio_frames:
            out.append(problem(
                "preprocessor_config.json nb_max_frames", frames,
                f"the audio encoder takes exactly {d.audio_frames} mel frames (2 × max_source_positions in config.json); "
                f"this window gives {frames}", f"{d.audio_frames} (chunk_length {d.audio_frames * pre.get('hop_length', 160) // max(1, pre.get('sampling_rate', 16000))} s)"))
    return out


# ------------------------------------------------------------------------------------------ trainer
@config_check
def check_trainer(cfg, ctx: CheckContext) -> list[str]:
    t, out = cfg.trainer, []
    out += _at_least("trainer.steps", t.steps, 0)
    out += _positive("trainer.lr", t.lr)
    out += _at_least("trainer.weight_decay", t.weight_decay, 0)
    betas = list(t.betas)
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        out.append(problem("trainer.betas", betas, "AdamW takes two decay rates", "two values in [0, 1)"))
    out += _at_least("trainer.warmup_steps", t.warmup_steps, 0)
    out += _one_of("trainer.schedule", t.schedule, ("constant", "cosine", "linear"))
    out += _at_least("trainer.grad_clip", t.grad_clip, 0)
    out += _at_least("trainer.micro_batch_size", t.micro_batch_size, 1)
    out += _one_of("trainer.device", t.device, ("auto", "cpu", "cuda"))
    out += _at_least("trainer.num_threads", t.num_threads, 1)
    out += _at_least("trainer.eval_every", t.eval_every, 0)
    out += _at_least("trainer.checkpoint_every", t.checkpoint_every, 0)
    out += _at_least("trainer.keep_last", t.keep_last, 1)
    out += _at_least("trainer.stop_after", t.stop_after, 0)
    out += _one_of("trainer.memory_check", t.memory_check, ("refuse", "warn", "off"))
    out += _at_least("trainer.device_memory_gib", t.device_memory_gib, 0)
    w = t.warm_start
    if w.enabled and cfg.algo.name != "sft":
        out += _at_least("trainer.warm_start.steps", w.steps, 0)
        out += _at_least("trainer.warm_start.batch_size", w.batch_size, 1)
        out += _positive("trainer.warm_start.lr", w.lr)
        if w.batch_size >= 1 and w.batch_size % ctx.world_size:
            out.append(problem("trainer.warm_start.batch_size", w.batch_size, f"each of the {ctx.world_size} ranks takes an equal share",
                               f"a multiple of the world size {ctx.world_size}"))
    return out


# ------------------------------------------------------------------------------------------ data, rewards, logger
@config_check
def check_data(cfg, ctx: CheckContext) -> list[str]:
    from mapo.data.adapters import LAYOUTS

    d, out = cfg.data, []
    manifests = {"train": d.train, **{f"eval split {k}": v for k, v in d.eval_splits.items()}}
    relative = {k: v for k, v in manifests.items() if not Path(v).is_absolute()}
    if not d.dir and relative:
        listed = ", ".join(f"{v} ({k})" for k, v in relative.items())
        out.append(problem("data.dir", d.dir, f"data={d.name} reads {listed} from it", "a folder holding those files (set data.dir=/path/to/folder)"))
    out += _within("data.text_only_fraction", d.text_only_fraction, 0, 1)
    out += _at_least("data.eval_max_items", d.eval_max_items, 0)
    out += _one_of("data.layout", d.layout, ["auto", *LAYOUTS])
    return out


@config_check
def check_fault_options(cfg, ctx: CheckContext) -> list[str]:
    """The fault-handling options (mapo.faults, the manifest check)."""
    from mapo.data.validate import AUDIO_CHECKS

    out = _one_of("data.audio_check", cfg.data.audio_check, AUDIO_CHECKS)
    out += _at_least("data.check_workers", cfg.data.check_workers, 0, "a thread count (0 = one per core)")
    out += _at_least("trainer.max_nonfinite_steps", cfg.trainer.max_nonfinite_steps, 1,
                     "the K-th non-finite step in a row stops the run, so K = 0 could never train")
    return out


@config_check
def check_rewards(cfg, ctx: CheckContext) -> list[str]:
    from mapo.rewards import REWARDS

    names, weights = list(cfg.reward.functions), list(cfg.reward.weights)
    out = []
    if len(names) != len(weights):
        out.append(problem("reward.weights", weights, f"reward.functions {names} and reward.weights must have the same length",
                           f"{len(names)} weights"))
    unknown = [n for n in names if n not in REWARDS]
    if unknown:
        out.append(problem("reward.functions", names, f"{unknown} are not registered", ", ".join(sorted(REWARDS))))
    if cfg.algo.name != "sft" and "accuracy" not in names:
        out.append(problem("reward.functions", names, "must include 'accuracy' (the MAPO gate uses it; give it weight 0 to keep it out of the reward)",
                           "a list containing 'accuracy'"))
    return out


@config_check
def check_logger(cfg, ctx: CheckContext) -> list[str]:
    lg, out = cfg.logger, []
    out += _one_of("logger.kind", lg.kind, ("wandb", "none"))
    out += _at_least("logger.log_every", lg.log_every, 1)
    out += _at_least("logger.sample_every", lg.sample_every, 0)
    return out


# ------------------------------------------------------------------------------------------ entry point

def check_config(cfg, model_config_dict: dict | None = None, world_size: int = 1, preprocessor_dict: dict | None = None) -> None:
    """Raise `ConfigError` listing every problem of `cfg` (None: nothing wrong).

    model_config_dict: the model folder's config.json (enables the checks against the model);
    world_size: ranks of the run; preprocessor_dict: the folder's preprocessor_config.json, if any.
    """
    from mapo.models.adapter import dims_for_config

    dims = dims_for_config(model_config_dict) if model_config_dict is not None else None
    ctx = CheckContext(world_size=world_size, model_config=model_config_dict, dims=dims, preprocessor_config=preprocessor_dict)
    problems = [p for check in CHECKS for p in check(cfg, ctx)]
    if problems:
        raise ConfigError(problems)
