"""Structured configs for the training program, one dataclass per Hydra group (DESIGN §7).

The dataclasses are the schema: Hydra validates every YAML file and command-line override against
them, so a misspelt key fails with the valid ones listed. The YAML files in `conf/<group>/` hold the
named choices (`model=tiny`, `algo=grpo`, …) and `conf/experiment/` the named experiments that
`make train EXP=…` selects. Defaults here are the paper-script defaults of DESIGN §3 where they exist.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class LoraConfig:
    rank: int = 0  # LoRA rank on the language model's linear layers (0 = off: full fine-tuning)
    alpha: float = 16.0  # the adapter is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapter's input while training
    targets: Any = "all-linear"  # "all-linear" (every linear layer of the language model but the LM head) or module names, e.g. [q_proj, v_proj]


@dataclass
class ModelConfig:
    path: str = "artifacts/models/tiny-qwen2-audio"  # local folder of a checkpoint (Qwen2-Audio, Qwen2.5-Omni, Qwen3-Omni; never downloaded)
    name: str = ""  # checkpoint label; with `path` empty, `make plan` reads the bundled config.json of this name (src/mapo/models/configs/)
    build_tiny_if_missing: bool = False  # build the tiny model (and its data) at `path` when absent
    tiny_family: str = "qwen2_audio"  # architecture of that tiny model: qwen2_audio | qwen2_5_omni | qwen3_omni_moe
    master_dtype: str = "float32"  # trainable weights and optimizer state (float32: bf16 rounds small updates away)
    compute_dtype: str = "auto"  # matmuls: auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16
    frozen_dtype: str = "auto"  # frozen weights (reference copy, frozen audio tower): auto (= compute) | float32 | bfloat16
    attn_implementation: str = "sdpa"  # text-model attention kernel: sdpa | eager | flash_attention_2
    gradient_checkpointing: bool = False  # recompute decoder activations in backward (saves memory)
    freeze_audio_tower: bool = True  # keep the audio encoder fixed (its embeddings are then cached per prompt)
    freeze_projector: bool = False  # keep the audio→text projector fixed
    lora: LoraConfig = field(default_factory=LoraConfig)  # with rank > 0 only the adapters train; the reference is the model with them off


@dataclass
class DataConfig:
    name: str = "synthetic"  # label shown in logs and tables
    dir: str = "artifacts/data/synthetic"  # folder holding the manifests (relative paths resolve against it)
    train: str = "train.jsonl"  # training manifest, relative to `dir` or absolute
    eval_splits: dict[str, str] = field(default_factory=dict)  # split name -> manifest evaluated periodically and in the final table (a data config's own list replaces, not extends, this)
    layout: str = "auto"  # manifest layout: auto | jsonl | mmau | avqa
    skip_bad: bool = False  # drop bad manifest rows (counted and reported) instead of stopping
    audio_check: str = "decode"  # pre-run check of every clip: decode (whole body) | header (fast, blind to corrupt bodies)
    allow_outside_paths: bool = False  # follow relative audio paths that leave the manifest's folder ("../x.wav")
    check_workers: int = 0  # threads of the pre-run audio check (0 = one per CPU core, at most 16)
    generate_if_missing: bool = False  # run the synthetic generator when `dir` has no manifests
    eval_max_items: int = 240  # cap on items per eval split (0 = all), taken evenly over tasks
    text_only_fraction: float = 0.0  # fraction of training prompts shown without their audio (mixed batches)


@dataclass
class RolloutConfig:
    prompts_per_step: int = 4  # prompts per RL step (global, over all ranks)
    group_size: int = 8  # G: sampled completions per prompt
    max_new_tokens: int = 48  # completion length cap; truncated completions score 0 accuracy
    temperature: float = 1.0  # sampling temperature (also used when scoring entropies)
    top_p: float = 1.0  # nucleus sampling threshold (1 = off)
    top_k: int = 0  # keep the k most likely tokens (0 = off); transformers' TopKLogitsWarper
    repetition_penalty: float = 1.0  # transformers' repetition penalty, prompt tokens included (1.0 = off)
    cuda_graph: str = "auto"  # decode step as a CUDA graph: auto (on for CUDA, single process) | on | off
    shared_prompt_cache: bool = False  # hold each prompt's keys/values once for its G rows (B·P + N·T columns, not N·(P+T)): saves memory, not time (H200: decode 1.26x slower)
    compile: bool = False  # decode steps through torch.compile of the text decoder (CUDA, single process; H200 7B widths: 0.90x the step; the first rollout compiles 15-35 s)
    eval_batch_size: int = 32  # prompts per greedy evaluation batch


@dataclass
class MaskConfig:
    enabled: bool = True  # weight the policy gradient by the modality relevance mask ω̃ (False: ω̃ ≡ 1)
    kind: str = "soft"  # soft | threshold | topk | quantile
    score: str = "entropy"  # Δh source: entropy (DESIGN Δh) | kl_token | kl_full (KL(π_θ‖π_ablated))
    tau_base: float = 1.0  # τ_T = tau_base·log(max(T, 2)) (soft kind)
    cap: float = 5.0  # C_mask: upper bound of ω̃
    threshold: float = 0.5  # |Δh| threshold (threshold kind)
    floor: float = 0.1  # weight of tokens below threshold / outside top-ρ
    rho: float = 0.3  # fraction of tokens kept (topk, quantile kinds)


@dataclass
class ReferenceConfig:
    model: str = "frozen"  # audio-ablated reference: frozen (copy of the initial policy) | policy (current policy)
    ablation: str = "drop_features"  # drop_features | mask_audio_keys | silence | noise


@dataclass
class AttnConfig:
    eta: float = 0.05  # η: weight of the audio-attention loss (0 disables capture entirely)
    layers: list[int] = field(default_factory=lambda: [-3, -2, -1])  # decoder layers captured (negative = from the top)
    head_reduce: str = "max"  # reduce over heads: max | mean
    layer_reduce: str = "mean"  # reduce over layers: mean | max
    method: str = "auto"  # auto (fused where it pays: CPU, CUDA heads < 121 wide; else sdpa) | fused (indicator in the layer's own attention call) | sdpa (second indicator call, outputs bit-identical) | eager (reference)
    schedule: str = "power"  # temporal weight w_t: power | exp | step | constant
    kappa: float = 1.0  # κ of the power / exp schedules
    token_gate: str = "content"  # p_t: content (letters/digits, no specials or tags) | all
    tau_base: float = 1.0  # τ for the targeting weights ν̃
    cap: float = 5.0  # C_mask for ν̃
    fail_floor: float = 0.1  # f_floor of the sequence gate
    adv_eps: float = 0.02  # ε_A of the sequence gate
    gate_cap: float = 3.0  # C_pref of the sequence gate


@dataclass
class AlgoConfig:
    name: str = "mapo"  # mapo | grpo | sft
    adv_scale: str = "group"  # advantage scaling: group | batch | none (Dr.GRPO)
    adv_eps: float = 1e-4  # added to the std of the advantage normaliser
    eps_low: float = 0.2  # PPO clip range below 1
    eps_high: float = 0.2  # PPO clip range above 1 (DAPO's clip-higher: raise it)
    loss_agg: str = "seq_mean_token_mean"  # seq_mean_token_mean | token_mean | seq_mean_token_sum | dr_grpo
    beta: float = 0.02  # β: weight of the KL penalty to the frozen reference (0 = no reference KL)
    kl_kind: str = "k3"  # k1 | k2 | k3
    updates_per_rollout: int = 1  # full passes over each rollout (>1 makes the ratio ≠ 1); each pass = mini_batches steps
    mini_batches: int = 1  # k: optimizer steps per pass, each on 1/k of the rows (shuffled per pass; π_old from one pass before the first)
    overlong_filter: bool = False  # completions cut at max_new_tokens (no EOS) leave L_PG and L_attn (and their normalisers); KL keeps them
    mask: MaskConfig = field(default_factory=MaskConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    attn: AttnConfig = field(default_factory=AttnConfig)


@dataclass
class RewardConfig:
    functions: list[str] = field(default_factory=lambda: ["accuracy", "format"])  # registry names (mapo.rewards)
    weights: list[float] = field(default_factory=lambda: [1.0, 0.1])  # weight of each function in the total


@dataclass
class WarmStartConfig:
    enabled: bool = False  # supervised warm start on reference traces before RL (cached by config hash)
    steps: int = 400  # optimizer steps
    batch_size: int = 32  # items per step
    lr: float = 3e-3  # AdamW learning rate (constant after warm-up)
    warmup_steps: int = 20  # linear warm-up
    cache_dir: str = "artifacts/warm_start"  # cached checkpoints, keyed by model/data/warm-start config


@dataclass
class TrainerConfig:
    seed: int = 0  # seeds python, numpy, torch and the per-prompt sampling
    steps: int = 100  # steps of the main phase: RL steps = rollouts (each makes updates_per_rollout·mini_batches optimizer steps), or SFT steps
    lr: float = 3e-4  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])  # AdamW betas
    warmup_steps: int = 5  # linear warm-up, in the same steps as `steps` (the schedule itself advances per optimizer step)
    schedule: str = "constant"  # lr after warm-up: constant | cosine | linear
    grad_clip: float = 1.0  # max global grad norm (0 = off)
    micro_batch_size: int = 16  # rows per forward/backward; the global normaliser keeps the loss exact
    device: str = "auto"  # auto | cpu | cuda
    num_threads: int = 2  # torch CPU threads (1 is steadier on a shared 2-core machine)
    eval_every: int = 0  # evaluate every N steps (0 = only before and after)
    eval_on_start: bool = True  # evaluate before training (the "before" column of the final table)
    checkpoint_every: int = 50  # write a checkpoint every N steps (and at the end)
    keep_last: int = 2  # checkpoints kept
    resume: str = "auto"  # auto (latest checkpoint of run_dir, if any) | never | path to a checkpoint
    export_final: bool = True  # save the final policy as a Hugging Face folder (run_dir/final_model) the loader reads
    export_every: int = 0  # also export run_dir/exports/step_XXXXXX every N RL steps, for evaluation as training goes (0 = off)
    stop_after: int = 0  # end this invocation after N steps with a checkpoint, to resume later (0 = run to `steps`)
    max_nonfinite_steps: int = 3  # stop after this many consecutive steps with a non-finite loss or gradient (each is skipped)
    run_dir: Optional[str] = None  # where metrics, plots and checkpoints go (default: Hydra's output folder)
    memory_check: str = "refuse"  # memory plan at start: refuse (stop when it does not fit; CUDA only, CPU warns) | warn | off
    device_memory_gib: float = 0.0  # memory per device the plan is checked against (0 = the device's own; host RAM on CPU)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)


@dataclass
class LoggerConfig:
    kind: str = "wandb"  # wandb (online if configured, else offline files) | none
    project: str = "mapo"  # W&B project
    run_name: Optional[str] = None  # W&B run name (default: experiment name + time)
    mode: Optional[str] = None  # force W&B mode: online | offline | disabled (default: decided from the environment)
    log_every: int = 1  # metrics every N steps
    sample_every: int = 25  # completion sample table every N steps


@dataclass
class MapoConfig:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    rollout: RolloutConfig = MISSING
    algo: AlgoConfig = MISSING
    reward: RewardConfig = MISSING
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = MISSING
    experiment_name: str = "custom"  # set by each experiment file; names runs and tables
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes carried into the run config


GROUPS = {
    "model": ModelConfig,
    "data": DataConfig,
    "rollout": RolloutConfig,
    "algo": AlgoConfig,
    "reward": RewardConfig,
    "trainer": TrainerConfig,
    "logger": LoggerConfig,
}


def register_configs() -> None:
    """Register the schema with Hydra's ConfigStore: `mapo_schema` and one `<group>/schema` per group.

    The YAML choices list `<group>/schema` first in their defaults, so every value is type-checked.
    """
    cs = ConfigStore.instance()
    cs.store(name="mapo_schema", node=MapoConfig)
    for group, node in GROUPS.items():
        cs.store(group=group, name="schema", node=node)


#: The Hydra config folder of the repository (`conf/`).
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def compose_overrides(overrides: list[str]):
    """The config `python -m mapo.train <overrides>` builds (a DictConfig), composed outside a Hydra app."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose("config", overrides=list(overrides))


def check_override_keys(argv: list[str]) -> None:
    """Fail fast on a misspelt `group.key=value` override, listing the valid keys of that group."""
    for arg in argv:
        if "=" not in arg or arg.startswith(("hydra", "+", "~", "-")):
            continue
        key = arg.split("=", 1)[0].lstrip("+")
        parts = key.split(".")
        if len(parts) == 1:
            if parts[0] not in GROUPS and parts[0] not in {f.name for f in dataclasses.fields(MapoConfig)} and parts[0] != "experiment":
                raise SystemExit(f"error: unknown config key {key!r}; valid: experiment, {', '.join(f.name for f in dataclasses.fields(MapoConfig))}")
            continue
        node = GROUPS.get(parts[0])
        if node is None:
            raise SystemExit(f"error: unknown config group {parts[0]!r} in {arg!r}; valid groups: {', '.join(GROUPS)}")
        for depth, name in enumerate(parts[1:], start=1):
            fields = {f.name: f for f in dataclasses.fields(node)}
            if name not in fields:
                where = ".".join(parts[:depth])
                raise SystemExit(f"error: unknown key {key!r}: {where} has no {name!r}; valid: {', '.join(fields)}")
            default = fields[name].default_factory() if fields[name].default_factory is not dataclasses.MISSING else fields[name].default
            if dataclasses.is_dataclass(default):
                node = type(default)
            elif isinstance(default, dict) and depth < len(parts) - 1:
                break  # free-form mapping (e.g. data.eval_splits.<name>)
            elif depth < len(parts) - 1:
                raise SystemExit(f"error: unknown key {key!r}: {'.'.join(parts[:depth + 1])} is a value, not a group")
