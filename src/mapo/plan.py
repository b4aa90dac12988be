"""The memory plan: what one GPU (or the host, on CPU) holds during a run, from config.json and the run
config alone (DESIGN §10). No weights are read.

    make plan EXP=qwen2audio_mapo NPROC=8 GPU_GIB=80 [ARGS='key=value ...']
    python -m mapo.plan experiment=qwen2audio_mapo --nproc=8 --gpu-gib=80 [key=value ...]

Training prints the same plan at start and, on CUDA, refuses a config whose plan does not fit
(`trainer.memory_check`), naming the single settings that would make it fit.

What is counted, per GPU (N ranks; FSDP2 shards over all of them when N > 1):

  weights        trainable masters in `model.master_dtype` (4 B), sharded 1/N; frozen parts (a frozen
                 audio tower, every base weight under LoRA) in `model.frozen_dtype`, sharded 1/N.
  gradients      trainable parameters in the master dtype, sharded 1/N (present from the first backward
                 to the optimizer step, `zero_grad(set_to_none=True)` frees them).
  optimizer      AdamW m and v in the master dtype (8 B/param), sharded 1/N; its step's temporary
                 (foreach on CUDA: one more master-sized buffer; per tensor on CPU).
  reference      a frozen copy of the whole model in the frozen dtype, sharded 1/N, when β > 0 or the
                 audio-ablated reference is the frozen model; none under LoRA (adapters off) or when
                 the run never trains (`trainer.steps=0`).
  load           before FSDP shards anything (`mapo.train`), every rank holds the whole model in the master
                 dtype (with LoRA and no warm start: in the frozen dtype, plus its adapters in the master
                 dtype): not divided by N, so more GPUs never lower it. A reference
                 copy is whole on one process (and on CPU); under FSDP on CUDA it is staged in host memory
                 and only its shards plus the unit being sharded reach the GPU (the notes give the host bytes).
  compute copy   bf16 weights the compute needs besides the masters: on one GPU autocast's cast of the
                 trainable weights (kept for the autocast region); under FSDP the rollout and evaluation
                 gather the whole model once (full bf16 model per GPU) and the update holds the root unit
                 (token table, LM head, norms, projector) plus two decoder layers (current + prefetch).
  rollout KV     rows × (prompt + new tokens) × 2·layers·kv_heads·head_dim in the compute dtype (with
                 `rollout.shared_prompt_cache`: prompts × prompt + rows × new tokens), every row
                 at its longest (the prompt is a full audio window + `prompt_text_tokens` of text); plus
                 one layer's copy while the cache grows and the sampling buffers (rows × vocabulary).
  scoring        the no-grad passes run over all local rows at once: one layer's transient + hidden states.
  activations    one micro-batch of the update, with and without activation checkpointing: the tensors
                 autograd keeps per token per decoder layer (derived for Qwen2-style layers: two RMSNorms,
                 q/k/v/o, SDPA, SwiGLU MLP; see `layer_activation_bytes`), the audio tower when it is
                 re-encoded with grad, the captured layers' extra, and the chunked log-prob workspace.
  evaluation     greedy batches of `rollout.eval_batch_size` prompts: KV cache + sampling buffers.

The total is the largest of the phases (load, rollout, scoring, update, optimizer step, evaluation, warm
start) plus, on CUDA, a reserve for the CUDA context and allocator fragmentation. Assumptions that
depart from the real run are said in the printed plan: every row is as long as the budget allows, and
every prompt carries one clip of a full window.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mapo.capture.kernels import FUSED_EXTRA_WIDTH, fused_capture_pays
from mapo.models.adapter import ModelDims, dims_for_config
from mapo.models.loader import DTYPES
from mapo.precision import policy_load_dtype, reference_staging_device
from mapo.scoring import lm_head_workspace_bytes
from mapo.shared_prefix import expanded_kv_bytes, pass_positions

GIB = 2**30
DTYPE_BYTES = {name: dtype.itemsize for name, dtype in DTYPES.items()}
#: Text tokens of a prompt besides its audio (system turn, question, options, instruction): an assumption.
PROMPT_TEXT_TOKENS = 128
#: Token positions per LM-head chunk (mapo.scoring.DEFAULT_CHUNK_SIZE).
CHUNK_SIZE = 512
#: CUDA context + allocator fragmentation, added to the peak on CUDA before comparing with the card.
CUDA_RESERVE_FIXED = 1 * GIB
CUDA_RESERVE_FRACTION = 0.05
#: Bundled config.json files of known checkpoints (for planning before the weights are on disk).
BUNDLED_CONFIGS = Path(__file__).resolve().parent / "models" / "configs"


# ------------------------------------------------------------------------------------------ inputs
@dataclass(frozen=True)
class PlanInputs:
    """Everything the plan reads from the run config, the world size and the device kind."""

    world_size: int
    device: str  # "cuda" | "cpu"
    master_dtype: str
    compute_dtype: str
    frozen_dtype: str
    phase: str  # "rl" | "sft" | "eval" (trainer.steps = 0)
    prompts_per_step: int
    group_size: int
    max_new_tokens: int
    eval_batch_size: int
    micro_batch_size: int
    gradient_checkpointing: bool
    shared_prompt_cache: bool = False  # rollout.shared_prompt_cache: B·P + N·T cached columns instead of N·(P+T)
    lora_rank: int = 0
    lora_targets: tuple[str, ...] | str = "all-linear"
    lora_dropout: float = 0.0
    freeze_audio_tower: bool = True
    freeze_projector: bool = False
    reference: bool = True  # the algorithm uses a frozen reference model (β > 0, or the ablated reference is frozen)
    old_pass: bool = False
    keep_hidden: bool = False
    capture_layers: int = 0
    capture_method: str = "auto"  # as algo.attn.method; "auto" is resolved for the plan's device and head width
    top_p: bool = False
    warm_start_batch: int = 0  # supervised warm start before RL (0 = none)
    prompt_text_tokens: int = PROMPT_TEXT_TOKENS
    chunk_size: int = CHUNK_SIZE

    @property
    def load_dtype(self) -> str:
        """The dtype the policy loads in (`mapo.precision.policy_load_dtype`, as `mapo.train` loads it)."""
        return policy_load_dtype(self.lora_rank > 0, self.warm_start_batch > 0, self.master_dtype, self.frozen_dtype)

    @property
    def staged_reference(self) -> bool:
        """The reference copy is made in host memory and reaches each GPU as its shards (`mapo.train` does so
        under FSDP on CUDA; on CPU processes the copy is whole in each process before sharding)."""
        return self.reference_copy and reference_staging_device(self.world_size, self.device) is not None

    @property
    def reference_copy(self) -> bool:
        """A second, frozen copy of the model exists: an RL run whose algorithm uses a frozen reference,
        without LoRA (under LoRA the reference is the same model with its adapters off; `mapo.train`)."""
        return self.reference and self.phase == "rl" and self.lora_rank == 0


def inputs_from_config(cfg, world_size: int, device: str, prompt_text_tokens: int = PROMPT_TEXT_TOKENS) -> PlanInputs:
    """PlanInputs of a run config (a MapoConfig or its DictConfig) on `world_size` ranks of `device`."""
    from mapo.precision import resolve_precision
    from mapo.step import needs_frozen_reference, uses_ablated_reference

    model, algo, rollout, trainer = cfg.model, cfg.algo, cfg.rollout, cfg.trainer
    dtypes = resolve_precision(model, torch.device(device)).names()  # the run's own resolution of "auto"
    phase = "eval" if trainer.steps == 0 else ("sft" if algo.name == "sft" else "rl")
    lora = model.lora
    targets = lora.targets if isinstance(lora.targets, str) else tuple(lora.targets)
    warm = trainer.warm_start
    return PlanInputs(
        world_size=world_size,
        device=device,
        master_dtype=dtypes["master"],
        compute_dtype=dtypes["compute"],
        frozen_dtype=dtypes["frozen"],
        phase=phase,
        prompts_per_step=rollout.prompts_per_step,
        group_size=rollout.group_size,
        shared_prompt_cache=bool(rollout.shared_prompt_cache),
        max_new_tokens=rollout.max_new_tokens,
        eval_batch_size=rollout.eval_batch_size,
        micro_batch_size=trainer.micro_batch_size,
        gradient_checkpointing=bool(model.gradient_checkpointing),
        lora_rank=int(lora.rank),
        lora_targets=targets,
        lora_dropout=float(lora.dropout),
        freeze_audio_tower=bool(model.freeze_audio_tower),
        freeze_projector=bool(model.freeze_projector),
        reference=needs_frozen_reference(algo),
        old_pass=algo.updates_per_rollout > 1,
        keep_hidden=uses_ablated_reference(algo) and algo.mask.score == "kl_full",
        capture_layers=len(algo.attn.layers) if phase == "rl" and algo.attn.eta > 0 else 0,
        capture_method=algo.attn.method,
        top_p=rollout.top_p < 1.0,
        warm_start_batch=warm.batch_size if (warm.enabled and phase == "rl") else 0,
        prompt_text_tokens=prompt_text_tokens,
    )


# ------------------------------------------------------------------------------------------ counts
def lora_parameters(dims: ModelDims, rank: int, targets: tuple[str, ...] | str, trainable_parts: set[str]) -> int:
    """Σ count·rank·(in + out) over the targeted linear layers of the trainable parts.

    Adapters go on the language model only (`mapo.models.lora`): "all-linear" targets every linear layer
    of the text decoder (never the LM head, the audio tower or the projector); a list names modules by
    their attribute name (q_proj, …).
    """
    if rank <= 0 or "text" not in trainable_parts:
        return 0
    total = 0
    for group in dims.linears:
        if group.part != "text":
            continue
        if targets == "all-linear" or group.name in targets:
            total += group.count * rank * (group.in_features + group.out_features)
    return total


def trainable_parts(inputs: PlanInputs) -> set[str]:
    """Parts whose weights train (before LoRA): the warm start and SFT train everything."""
    parts = {"text", "lm_head"}
    if inputs.phase == "sft" or not inputs.freeze_audio_tower:
        parts.add("audio")
    if inputs.phase == "sft" or not inputs.freeze_projector:
        parts.add("projector")
    return parts


def parameter_split(dims: ModelDims, inputs: PlanInputs) -> tuple[int, int, int]:
    """(trainable params, frozen base params, LoRA params). Under LoRA every base weight is frozen."""
    parts = trainable_parts(inputs)
    by_part = {"text": dims.text_params, "lm_head": dims.lm_head_params, "audio": dims.audio_params,
                "projector": dims.projector_params}
    if inputs.lora_rank > 0:
        lora = lora_parameters(dims, inputs.lora_rank, inputs.lora_targets, parts)
        return lora, dims.total_params, lora
    trainable = sum(n for part, n in by_part.items() if part in parts)
    return trainable, dims.total_params - trainable, 0


def layer_activation_bytes(dims: ModelDims, seq: int, act: int, residual: int, casts: bool, lora_extra: int = 0) -> int:
    """Bytes autograd keeps per token for one Qwen2-style decoder layer (checked op by op on CPU).

    act: activation element size (the compute dtype); residual: the residual stream's (fp32 under
    one-GPU autocast with fp32 embeddings, else = act); casts: autocast casts each linear's input
    separately (q, k, v and gate, up each keep their own bf16 copy of the normed input).
    Per token, h = hidden, i = MLP width, S = sequence length:
      2 RMSNorms   each keeps its input (residual·h), its fp32 normalised value (4h; the same tensor when
                   the stream is fp32) and its output, the next linears' input (act·h; autocast: 3 or 2 copies)
      attention    SDPA keeps q, k, v (k and v repeated to every query head when grouped) and its output,
                   and the padding mask SDPA converts to the query dtype: [B, 1, S, S] → S·act per token
      MLP          SwiGLU keeps gate, silu(gate), up and their product: 4·act·i
    """
    h, i = dims.hidden_size, dims.mlp_width
    grouped = dims.num_kv_heads < dims.num_heads
    kv = 2 * act * (h if grouped else dims.num_kv_heads * dims.head_dim)
    norms = 2 * (residual * h + (4 * h if residual != 4 else 0))
    linear_inputs = (5 if casts else 2) * act * h  # q/k/v input and gate/up input
    return norms + linear_inputs + 2 * act * h + kv + seq * act + 4 * act * i + lora_extra


def capture_bytes(dims: ModelDims, seq: int, act: int, device: str) -> int:
    """Extra bytes per token of one captured layer (the SDPA-indicator capture, `mapo.capture`): its
    output (indicator width 8 on CUDA, head_dim on CPU), keys repeated to every head when grouped, its
    own copy of the padding mask (bool, then converted by SDPA), the fp32 mass and log-sum-exp."""
    h = dims.hidden_size
    width = 8 if device == "cuda" else dims.head_dim
    grouped = dims.num_kv_heads < dims.num_heads
    return act * dims.num_heads * width + (act * h if grouped else 0) + seq * (1 + act) + 8 * dims.num_heads


def fused_capture_bytes(dims: ModelDims, queries: int, keys: int, act: int) -> int:
    """Extra bytes of one layer under the fused capture (`mapo.capture.kernels.fused_inputs`): the attention
    kernel saves query, output and keys/values FUSED_EXTRA_WIDTH (8) channels wider than without capture
    (keys/values counted at every query head: transformers repeats them for a masked grouped batch), plus
    the fp32 mass per query and head. queries, keys: positions in the micro-batch."""
    extra = FUSED_EXTRA_WIDTH * act * dims.num_heads
    return queries * (2 * extra + 4 * dims.num_heads) + keys * 2 * extra


def nograd_layer_bytes(dims: ModelDims, act: int, residual: int) -> int:
    """Peak bytes per token inside one decoder layer without grad: residual in/out, normed input, q/k/v and
    the attention output, then the MLP's silu(gate), up and their product."""
    h, i = dims.hidden_size, dims.mlp_width
    return 2 * residual * h + max(6 * act * h, 3 * act * i + act * h)


def audio_activation_bytes(dims: ModelDims, clips: int, act: int, checkpointing: bool) -> int:
    """The audio tower re-encoding `clips` full windows with grad (a trainable tower or projector).

    Per encoder position (d = width, f = FFN width): two LayerNorms, q/k/v input, SDPA q/k/v/out, out
    input, fc1 input, GELU input, fc2 input ≈ 9·d + 2·f elements; the convolutions keep their inputs and
    GELU inputs over the full frames. Every row of a micro-batch re-encodes its prompt's clip.
    """
    positions = dims.audio_frames // 2
    d, f = dims.audio_hidden, dims.audio_ffn
    convs = dims.audio_frames * (dims.num_mel_bins + 2 * d) * act + positions * 3 * d * act
    # With checkpointing only each layer's input stays: the tower's backward (and its recomputation) runs
    # after the text model's, when the text activations are already freed.
    layers = dims.audio_layers * d * act if checkpointing else dims.audio_layers * (9 * d + 2 * f) * act
    return clips * (convs + positions * layers)


# ------------------------------------------------------------------------------------------ the plan
@dataclass
class MemoryPlan:
    """Bytes per GPU by component and by phase; `peak` is the largest phase, `total` adds the reserve."""

    inputs: PlanInputs
    dims: ModelDims
    components: dict[str, int]
    phases: dict[str, int]
    activations_with_ac: int
    activations_without_ac: int
    reserve: int
    capacity: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def total(self) -> int:
        return self.peak + self.reserve

    @property
    def fits(self) -> bool:
        return self.capacity is None or self.total <= self.capacity

    @property
    def load_fits(self) -> bool:
        """The load phase with its own reserve fits. More GPUs shrink only a staged reference's shards in it: the
        whole policy model is on every rank before FSDP shards it."""
        load = self.phases["load"]
        return self.capacity is None or load + _reserve(self.inputs.device, load) <= self.capacity


def load_note(plan: MemoryPlan) -> str:
    """Why more GPUs cannot help when the load phase alone does not fit ("" when it fits)."""
    if plan.load_fits:
        return ""
    staged = plan.inputs.staged_reference
    return (f"loading alone needs {plan.phases['load'] / GIB:.1f} GiB + reserve per {'GPU' if plan.inputs.device == 'cuda' else 'process'}: "
            "every rank holds the whole model before FSDP shards it, so more GPUs "
            + ("lower only the reference's shards in it" if staged else "do not lower it"))


def _reserve(device: str, peak: int) -> int:
    """Bytes added to a `peak` of bytes before comparing with the card: CUDA context + fragmentation."""
    return int(CUDA_RESERVE_FIXED + CUDA_RESERVE_FRACTION * peak) if device == "cuda" else 0


def memory_plan(dims: ModelDims, inputs: PlanInputs, capacity: int | None = None) -> MemoryPlan:
    """The plan of `inputs` for a model of `dims` against `capacity` bytes per device (None: no check)."""
    n = inputs.world_size
    fsdp = n > 1
    mb, cb, fb = (DTYPE_BYTES[inputs.master_dtype], DTYPE_BYTES[inputs.compute_dtype], DTYPE_BYTES[inputs.frozen_dtype])
    lora = inputs.lora_rank > 0
    trainable, frozen, lora_params = parameter_split(dims, inputs)
    total_params = dims.total_params
    training = inputs.phase != "eval"

    # Persistent state (sharded under FSDP).
    weights = (trainable * mb + frozen * fb) // n
    grads = trainable * mb // n if training else 0
    optimizer = 2 * trainable * mb // n if training else 0
    if inputs.device == "cuda":
        optimizer_step = trainable * mb // n  # foreach AdamW: one master-sized temporary (sqrt of v)
    else:
        optimizer_step = 2 * min(trainable, dims.largest_param) * mb  # per-tensor loop: the largest tensor's temporaries
    reference = total_params * fb // n if inputs.reference_copy else 0
    # Loading (mapo.train): the whole model before FSDP shards it, in the master dtype, or with LoRA and no warm
    # start in the frozen dtype (`policy_load_dtype`: no loaded weight trains), plus its LoRA adapters in the
    # master dtype; and the reference copy: whole, except under FSDP
    # on CUDA, where it is staged in host memory and moved one unit at a time as it is sharded (before the
    # policy is), so the GPU holds its shards plus the unit being sharded (the largest: the root unit).
    root_params = total_params - dims.num_layers * dims.layer_params - dims.audio_layers * dims.audio_layer_params
    if not inputs.reference_copy:
        load_reference = 0
    elif inputs.staged_reference:
        load_reference = total_params * fb // n + max(root_params, dims.layer_params, dims.audio_layer_params) * fb
    else:
        load_reference = total_params * fb
    load = total_params * DTYPE_BYTES[inputs.load_dtype] + lora_params * mb + load_reference

    # Compute copies: what the bf16 compute needs besides the stored weights.
    cast_trainable = trainable * cb if cb < mb else 0  # one-GPU autocast: bf16 copy of the trainable masters
    if fsdp:
        # gathered once for rollout / evaluation (the scale helper's design): the mixed-precision policy
        # casts the masters to the compute dtype; frozen weights come as stored (or cast down)
        generation_copy = trainable * cb + frozen * min(cb, fb)
        update_copy = scoring_copy = (root_params + 2 * max(dims.layer_params, dims.audio_layer_params)) * cb
    else:
        generation_copy = update_copy = scoring_copy = cast_trainable

    # Sequence lengths: a full audio window + the prompt's text + every new token.
    prompt_len = dims.audio_tokens_per_window + inputs.prompt_text_tokens
    seq = prompt_len + inputs.max_new_tokens
    prompts_local = max(1, inputs.prompts_per_step // n)
    rows = prompts_local * inputs.group_size
    kv_per_token = 2 * dims.num_layers * dims.num_kv_heads * dims.head_dim * cb
    vocab = dims.vocab_size

    # The step's batch, alive from the rollout to the optimizer step: each prompt's audio features (the
    # collator's batch and its copy) and the rows' ids and masks.
    batch = prompts_local * 2 * dims.num_mel_bins * dims.audio_frames * 4 + rows * seq * 8 * 4

    # Rollout: the KV cache at its longest, one layer's copy as it grows, the sampling buffers. With the
    # shared-prompt cache each prompt is held once for its G rows (mapo.kv_cache.SharedPromptKVCache).
    if inputs.shared_prompt_cache and inputs.group_size >= 2:
        kv_columns = prompts_local * prompt_len + rows * inputs.max_new_tokens
    else:
        kv_columns = rows * seq
    kv = kv_columns * kv_per_token
    kv_grow = kv_columns * kv_per_token // dims.num_layers
    sampling = rows * vocab * (44 if inputs.top_p else 20)
    rollout_extra = kv + kv_grow + sampling

    # One-GPU autocast keeps a fp32 residual stream when the token table is a fp32 master.
    embed_fp32 = not fsdp and cb < mb and not lora
    residual = 4 if embed_fp32 else cb
    casts = embed_fp32

    # One LM-head chunk (only completion positions go through the head): mapo.scoring's fused chunks.
    def lm_workspace(positions: int, with_grad: bool = False) -> int:
        return lm_head_workspace_bytes(positions, vocab, inputs.chunk_size, inputs.device, cb, with_grad)

    # Scoring: no-grad passes over all local rows at once (one pass at a time); each prompt is computed once
    # per group unless the full hidden states are kept (mapo.shared_prefix).
    scoring_tokens = pass_positions(prompts_local, inputs.group_size, prompt_len, inputs.max_new_tokens,
                                    shared=not inputs.keep_hidden)
    scoring_pass = scoring_tokens * (nograd_layer_bytes(dims, cb, residual) + 2 * residual * dims.hidden_size)
    scoring_pass += lm_workspace(rows * inputs.max_new_tokens)
    if not inputs.keep_hidden and inputs.group_size >= 2:
        scoring_pass += expanded_kv_bytes(rows, seq, dims.num_kv_heads, dims.head_dim, cb)  # one layer at a time
    if inputs.keep_hidden:
        scoring_pass += scoring_tokens * dims.hidden_size * residual  # ablated hidden states kept for the full KL

    # Update: one micro-batch's activations.
    micro = max(1, min(inputs.micro_batch_size, rows)) if inputs.phase != "sft" else max(1, inputs.micro_batch_size)
    tokens = micro * seq
    captured_queries, clips, shared_kv = tokens, micro, 0  # capture queries, clips encoded, expanded K/V
    group = inputs.group_size
    if (inputs.phase == "rl" and not fsdp and not inputs.gradient_checkpointing and not inputs.keep_hidden
            and group >= 2 and micro % group == 0):
        # micro-batches of whole groups share their prompts and clips (mapo.shared_prefix; not under FSDP2 or
        # checkpointing); the capture then records the completion queries only
        tokens = pass_positions(micro // group, group, prompt_len, inputs.max_new_tokens, shared=True)
        captured_queries, clips = micro * inputs.max_new_tokens, micro // group
        shared_kv = dims.num_layers * expanded_kv_bytes(micro, seq, dims.num_kv_heads, dims.head_dim, cb)
    lora_extra = 0
    if lora:
        text_groups = [g for g in dims.linears if g.part == "text" and (inputs.lora_targets == "all-linear" or g.name in inputs.lora_targets)]
        lora_extra = sum(g.count for g in text_groups) * inputs.lora_rank * cb // max(1, dims.num_layers)
        if inputs.lora_dropout > 0:
            lora_extra += sum(g.count * g.in_features for g in text_groups) * (cb + 1) // max(1, dims.num_layers)
    per_layer = layer_activation_bytes(dims, seq, cb, residual, casts, lora_extra)
    outside = tokens * (3 * residual * dims.hidden_size + 4 * dims.hidden_size)  # embeddings, final norm, hidden out
    capture_with = capture_without = 0
    if inputs.capture_layers:
        method = inputs.capture_method
        if method == "auto":
            method = "fused" if fused_capture_pays(inputs.device, dims.head_dim) else "sdpa"
        if method == "fused":
            per = fused_capture_bytes(dims, captured_queries, micro * seq, cb)
            # under checkpointing only the fp32 mass outlives a layer's recomputation
            capture_with = inputs.capture_layers * captured_queries * 4 * dims.num_heads + per
        else:
            if method == "eager":
                per = micro * dims.num_heads * seq * seq * (cb + 4)  # the full attention weights
            else:
                per = captured_queries * capture_bytes(dims, seq, cb, inputs.device)
            # Under checkpointing the captured layers' query and keys stay referenced by the capture until the
            # end of backward; the extra above is transient, one layer's at a time as each is recomputed
            # (measured with experiments/gpu/full_step.py --tiny: the capture adds 7 MiB, not 2 × the extra).
            capture_with = inputs.capture_layers * tokens * 2 * cb * dims.hidden_size + per
        capture_without = inputs.capture_layers * per
    logits_ws = lm_workspace(micro * inputs.max_new_tokens, with_grad=True)
    audio_grad = not (inputs.freeze_audio_tower and inputs.freeze_projector) and not lora
    audio_with = audio_activation_bytes(dims, clips, cb, True) if audio_grad else 0
    audio_without = audio_activation_bytes(dims, clips, cb, False) if audio_grad else 0
    # Backward: gradients in flight are about a quarter of one layer's saved bytes (measured on CPU);
    # with checkpointing the layer being recomputed holds its full activations on top.
    backward = tokens * per_layer * 3 // 10
    # The fused LM-head chunks (mapo.scoring) live at the end of the forward and the start of the backward,
    # before any layer's gradients or recomputation: they take the larger of the two, not the sum.
    act_without = (tokens * dims.num_layers * per_layer + shared_kv + max(backward, logits_ws) + outside
                   + capture_without + audio_without)
    act_with = (tokens * dims.num_layers * residual * dims.hidden_size + max(tokens * per_layer + backward, logits_ws)
                + outside + capture_with + audio_with)
    activations = act_with if inputs.gradient_checkpointing else act_without

    # Evaluation: greedy batches of eval_batch_size prompts per rank.
    eval_rows = max(1, inputs.eval_batch_size)
    evaluation = eval_rows * seq * kv_per_token + eval_rows * seq * kv_per_token // dims.num_layers + eval_rows * vocab * 12

    persistent = weights + optimizer + reference
    phases: dict[str, int] = {"load": load, "evaluation": persistent + generation_copy + evaluation}
    if inputs.phase == "rl":
        persistent += batch
        phases["rollout"] = persistent + generation_copy + rollout_extra
        phases["scoring"] = persistent + scoring_copy + scoring_pass
    if training:
        phases["update"] = persistent + grads + update_copy + activations
        phases["optimizer step"] = persistent + grads + optimizer_step
    if inputs.warm_start_batch:
        ws_inputs = dataclasses.replace(inputs, phase="sft", warm_start_batch=0, lora_rank=0)
        phases["warm start"] = memory_plan(dims, ws_inputs).phases["update"]

    components = {
        "weights": weights,
        "gradients": grads,
        "optimizer state": optimizer,
        "reference": reference,
        "load (before sharding)": load,
        "compute copy (rollout/eval)": generation_copy,
        "compute copy (update)": update_copy,
        "step batch (features, ids)": batch if inputs.phase == "rl" else 0,
        "rollout KV cache": kv,
        "rollout sampling + cache growth": kv_grow + sampling,
        "scoring pass": scoring_pass,
        "activations": activations,
        "optimizer step temporary": optimizer_step,
        "evaluation batch": evaluation,
    }
    reserve = _reserve(inputs.device, max(phases.values()))
    plan = MemoryPlan(inputs, dims, components, phases, act_with, act_without, reserve, capacity)
    plan.notes.append(
        f"rows at their longest: prompt = {dims.audio_tokens_per_window} audio + {inputs.prompt_text_tokens} text tokens, "
        f"+ {inputs.max_new_tokens} new = {seq} tokens"
    )
    if lora_params:
        plan.notes.append(f"LoRA rank {inputs.lora_rank}: {lora_params / 1e6:.1f} M trainable parameters; the reference is the model with adapters off")
    if inputs.staged_reference:
        plan.notes.append(f"host memory at start: each rank stages the reference ({total_params * fb / GIB:.2f} GiB) "
                          "while FSDP shards it")
    return plan


# ------------------------------------------------------------------------------------------ advice
#: The settings a move changes on the same number of GPUs (PlanInputs field: its override), in the order advice
#: lists them; the greedy search prefers the earlier of two equal moves.
_SETTING = {"shared_prompt_cache": "rollout.shared_prompt_cache",
            "micro_batch_size": "trainer.micro_batch_size", "prompts_per_step": "rollout.prompts_per_step",
            "max_new_tokens": "rollout.max_new_tokens", "eval_batch_size": "rollout.eval_batch_size",
            "gradient_checkpointing": "model.gradient_checkpointing", "lora_rank": "model.lora.rank"}


def _step(inputs: PlanInputs, move: str, max_world: int) -> PlanInputs | None:
    """`inputs` after one step of `move` (a PlanInputs field: double the GPUs, halve a batch or length, turn
    the shared-prompt cache or checkpointing on, LoRA rank 64), or None when that move has no step left."""
    if move == "world_size":
        world = inputs.world_size * 2  # prompts must still split evenly over the ranks
        ok = world <= max_world and inputs.prompts_per_step % world == 0
        return dataclasses.replace(inputs, world_size=world) if ok else None
    if move == "gradient_checkpointing":
        return None if inputs.gradient_checkpointing else dataclasses.replace(inputs, gradient_checkpointing=True)
    # the same tokens, only the rollout's cache shrinks (its decode step ran 1.26x slower on an H200): first to try
    if move == "shared_prompt_cache":
        useful = not inputs.shared_prompt_cache and inputs.group_size >= 2 and inputs.phase == "rl"
        return dataclasses.replace(inputs, shared_prompt_cache=True) if useful else None
    if move == "lora_rank":
        return dataclasses.replace(inputs, lora_rank=64) if inputs.lora_rank == 0 and inputs.phase != "eval" else None
    value = getattr(inputs, move) // 2
    if move == "prompts_per_step":  # at least one prompt per rank, the same number on each
        ok = value >= inputs.world_size and value % inputs.world_size == 0
    else:
        ok = value >= _LOWEST[move]
    return dataclasses.replace(inputs, **{move: value}) if ok else None


#: The smallest value a halving move may reach.
_LOWEST = {"micro_batch_size": 1, "max_new_tokens": 64, "eval_batch_size": 1}
#: Every move: more GPUs first, then the same-GPU settings.
_MOVES = ("world_size", *_SETTING)


def _describe(base: PlanInputs, changed: PlanInputs) -> str:
    parts = []
    if changed.world_size != base.world_size:
        parts.append(f"{changed.world_size} GPUs (NPROC×NNODES)")
    for key, name in _SETTING.items():
        if getattr(changed, key) != getattr(base, key):
            value = getattr(changed, key)
            parts.append(f"{name}={str(value).lower() if isinstance(value, bool) else value}")
    return " + ".join(parts)


def fixes(dims: ModelDims, inputs: PlanInputs, capacity: int, max_world: int = 64) -> list[str]:
    """Changes of the settings that make the plan fit, each as the overrides to give.

    Every single change that fits alone (more GPUs, the shared-prompt cache, the largest micro-batch /
    prompts per step / new tokens / evaluation batch that fits, activation checkpointing, LoRA); then, when no single change
    fits on the current number of GPUs, the greedy combination there (each step the change that lowers
    the total most), and when nothing fits alone, the greedy combination allowing more GPUs too. Every
    candidate is judged by recomputing its whole plan, so a change that does not lower the phase that
    misses is never named (more GPUs against the load phase; see `load_note`).
    """
    def total(trial: PlanInputs) -> int:
        return memory_plan(dims, trial, capacity).total

    single = []
    for move in _MOVES:  # push one setting as far as it goes until the plan fits
        trial = _step(inputs, move, max_world)
        while trial is not None and total(trial) > capacity:
            trial = _step(trial, move, max_world)
        if trial is not None:
            single.append(_describe(inputs, trial))
    combos = []
    same_gpus_only = not single or all("GPUs" in option for option in single)
    for more_gpus in ((False,) if single else (False, True)):
        if not same_gpus_only:
            break
        moves = _MOVES if more_gpus else tuple(_SETTING)
        current = inputs
        for _ in range(16):
            if total(current) <= capacity:
                break
            options = [t for t in (_step(current, move, max_world) for move in moves) if t is not None]
            if not options:
                break
            best = min(options, key=total)
            if total(best) >= total(current):
                break
            current = best
        if total(current) <= capacity:
            combos.append(_describe(inputs, current))
    return list(dict.fromkeys(single + combos))


# ------------------------------------------------------------------------------------------ output
def _unit(plan: MemoryPlan) -> tuple[int, str]:
    """GiB for real models, MiB when the whole plan is under 1 GiB (the tiny model)."""
    return (GIB, "GiB") if plan.total >= GIB else (2**20, "MiB")


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def format_plan(plan: MemoryPlan, name: str = "", suggestions: list[str] | None = None) -> str:
    """The plan as printed by `make plan` and at the start of training."""
    i, d = plan.inputs, plan.dims
    scale, unit = _unit(plan)

    def gib(x: int | float) -> str:
        return f"{x / scale:8.2f} {unit}"

    trainable, frozen, lora = parameter_split(d, i)
    where = f"{i.world_size} × {'GPU' if i.device == 'cuda' else 'CPU process'}" + (" (FSDP2)" if i.world_size > 1 else "")
    lines = [
        f"Memory plan per {'GPU' if i.device == 'cuda' else 'process'}{f' — {name}' if name else ''}: {where}, {d.family}, "
        f"{_count(d.total_params)} parameters ({_count(trainable)} trainable{', LoRA' if lora else ''})",
        f"  precision: masters {i.master_dtype}, compute {i.compute_dtype}, frozen {i.frozen_dtype}; phase {i.phase}",
    ]
    prompts_local = max(1, i.prompts_per_step // i.world_size)
    lines.append(
        f"  rollout: {prompts_local} prompt(s) × G={i.group_size} = {prompts_local * i.group_size} rows per rank; "
        f"micro-batch {i.micro_batch_size}; eval batch {i.eval_batch_size}"
    )
    lines += [f"  note: {note}" for note in plan.notes]
    c = plan.components
    ac = "on" if i.gradient_checkpointing else "off"
    rows = [
        ("weights", c["weights"], f"masters {i.master_dtype} + frozen {i.frozen_dtype}" + (f", 1/{i.world_size}" if i.world_size > 1 else "")),
        ("gradients", c["gradients"], i.master_dtype),
        ("optimizer state", c["optimizer state"], f"AdamW m, v in {i.master_dtype}"),
        ("reference", c["reference"], "frozen copy" if c["reference"] else ("adapters off" if lora else "not needed")),
        ("load, before sharding", c["load (before sharding)"],
         f"whole model {i.load_dtype}" + (f" + adapters {i.master_dtype}" if lora else "") + (f" + reference {i.frozen_dtype}" + (" shards + 1 unit" if i.staged_reference else "")
                                        if i.reference_copy else "")),
        ("compute copy (rollout/eval)", c["compute copy (rollout/eval)"], "gathered full model" if i.world_size > 1 else "autocast casts"),
        ("compute copy (update)", c["compute copy (update)"], "root unit + 2 layers" if i.world_size > 1 else "autocast casts"),
        ("rollout KV cache", c["rollout KV cache"], i.compute_dtype),
        ("rollout sampling + growth", c["rollout sampling + cache growth"], ""),
        ("scoring pass", c["scoring pass"], "no grad, all rows"),
        ("activations, checkpointing on", plan.activations_with_ac, "← config" if ac == "on" else ""),
        ("activations, checkpointing off", plan.activations_without_ac, "← config" if ac == "off" else ""),
        ("optimizer step temporary", c["optimizer step temporary"], ""),
        ("evaluation batch", c["evaluation batch"], "KV + sampling"),
    ]
    lines += [f"  {label:<32}{gib(value)}  {note}".rstrip() for label, value, note in rows]
    lines.append("  phases: " + ", ".join(f"{k} {v / scale:.2f}" for k, v in plan.phases.items()) + f" {unit}")
    verdict = ""
    if plan.capacity is not None:
        verdict = f" of {plan.capacity / GIB:.1f} GiB → " + ("fits" if plan.fits else "DOES NOT FIT")
    reserve = f" + reserve {plan.reserve / scale:.2f}" if plan.reserve else ""
    lines.append(f"  total: peak {plan.peak / scale:.2f} {unit} ({plan.peak_phase}){reserve} = {plan.total / scale:.2f} {unit}{verdict}")
    loading = load_note(plan)
    if loading:
        lines.append(f"  {loading}")
    if suggestions:
        lines.append("  would fit with: " + "; or ".join(suggestions))
    elif suggestions is not None and not plan.fits:
        lines.append("  no single change tried (more GPUs, micro-batch, checkpointing, prompts, tokens, LoRA) makes it fit")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ entry points
def model_config_dict(cfg) -> tuple[dict, str]:
    """(config.json dict, where it came from): model.path's, else the bundled one named model.name."""
    if cfg.model.path:
        path = Path(cfg.model.path) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found (model.path={cfg.model.path}); the plan reads only this file")
    elif cfg.model.name and (BUNDLED_CONFIGS / f"{cfg.model.name}.json").is_file():
        path = BUNDLED_CONFIGS / f"{cfg.model.name}.json"
    else:
        known = ", ".join(sorted(p.stem for p in BUNDLED_CONFIGS.glob("*.json")))
        raise ValueError(f"model.path is empty and model.name {cfg.model.name!r} has no bundled config.json (bundled: {known}); set model.path")
    try:
        return json.loads(path.read_text()), str(path)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def plan_for_run(cfg, config_dict: dict, world_size: int, device: str, capacity: int | None) -> tuple[MemoryPlan, list[str]]:
    """The plan of a run and, when it does not fit, the settings that would make it fit."""
    dims = dims_for_config(config_dict)
    inputs = inputs_from_config(cfg, world_size, device)
    plan = memory_plan(dims, inputs, capacity)
    return plan, ([] if plan.fits or capacity is None else fixes(dims, inputs, capacity))


def device_capacity(device) -> int:
    """Bytes of the device's memory (CUDA: the card's total; CPU: the host's available RAM)."""
    import torch

    if getattr(device, "type", device) == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    import psutil

    return psutil.virtual_memory().available


class MemoryPlanError(RuntimeError):
    """The run's memory plan does not fit the device (raised before any weights are read)."""


def check_memory_at_start(cfg, config_dict: dict, ctx) -> MemoryPlan | None:
    """Print the run's plan (rank 0) and, on CUDA with `trainer.memory_check=refuse`, refuse one that does
    not fit, naming the settings that would make it fit. On CPU the plan is printed against the host's
    available RAM and a misfit only warns: host memory swaps and is shared, so the arithmetic is a guide
    there, not a limit worth stopping a laptop run for."""
    mode = cfg.trainer.memory_check
    if mode == "off":
        return None
    device = ctx.device.type
    capacity = int(cfg.trainer.device_memory_gib * GIB) if cfg.trainer.device_memory_gib > 0 else device_capacity(ctx.device)
    plan, suggestions = plan_for_run(cfg, config_dict, ctx.world_size, device, capacity)
    text = format_plan(plan, cfg.experiment_name, suggestions if not plan.fits else None)
    if ctx.is_main:
        print(text, flush=True)
    if not plan.fits:
        where = "GPU" if device == "cuda" else "host RAM (available)"
        note = load_note(plan)
        message = (f"the memory plan needs {plan.total / GIB:.1f} GiB per {where} of {capacity / GIB:.1f} GiB; "
                   + ("would fit with: " + "; or ".join(suggestions) if suggestions else "no single setting change makes it fit")
                   + (f"; {note}" if note else "")
                   + " (trainer.memory_check=warn runs anyway)")
        if device == "cuda" and mode == "refuse":
            raise MemoryPlanError(message)
        if ctx.is_main:
            print(f"[mapo] warning: {message}", flush=True)
    return plan


def main(argv: list[str] | None = None) -> int:
    """`python -m mapo.plan experiment=NAME [--nproc=N] [--gpu-gib=G] [--prompt-text-tokens=T] [key=value ...]`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    options = {"nproc": "1", "gpu-gib": "80", "prompt-text-tokens": str(PROMPT_TEXT_TOKENS), "device": "cuda"}
    overrides = []
    for arg in argv:
        if arg.startswith("--"):
            key, _, value = arg[2:].partition("=")
            if key not in options:
                raise SystemExit(f"error: unknown option --{key}; valid: {', '.join('--' + k for k in options)}")
            options[key] = value
        else:
            overrides.append(arg)
    from omegaconf import OmegaConf

    from mapo.config import MapoConfig, check_override_keys, compose_overrides

    check_override_keys(overrides)
    cfg: MapoConfig = OmegaConf.to_object(compose_overrides(overrides))
    world = int(options["nproc"])
    try:
        config_dict, source = model_config_dict(cfg)
        dims = dims_for_config(config_dict, source)
        inputs = inputs_from_config(cfg, world, options["device"], int(options["prompt-text-tokens"]))
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    capacity = int(float(options["gpu-gib"]) * GIB)
    plan = memory_plan(dims, inputs, capacity)
    print(f"[mapo] plan from {source} and experiment {cfg.experiment_name} (no weights read)")
    print(format_plan(plan, cfg.experiment_name, fixes(dims, inputs, capacity) if not plan.fits else None))
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
