"""GPU check of issue 7 item 8: one MAPO step of a full-depth, random-weight Qwen2-Audio-7B on one card, with
time and peak memory per phase next to the memory plan's numbers (mapo.plan).

    python experiments/gpu/full_step.py                      # the check: 4 prompts × G=8 × 512 new tokens, 30 s clips
    python experiments/gpu/full_step.py --lora-rank 0        # full fine-tuning (fp32 masters + autocast), if the plan fits
    python experiments/gpu/full_step.py --tiny --device cpu  # the same code at toy widths on CPU (tests run this)

The model has Qwen2-Audio-7B-Instruct's config.json (bundled: 32 text layers of 4096, vocabulary 156,032,
32 encoder layers of 1280, 30 s window = 750 audio tokens) and is built on the device directly (no host
copy, no weights read). Precision follows the run config's names: trainable masters fp32, compute bf16
(autocast on one card), frozen parts bf16 — the training program's own pieces: `mapo.precision`
(`ModelRunner` enters autocast, `frozen_copy` makes the bf16 reference) and `mapo.models.lora`.
`--lora-rank auto` (default) asks the plan: full fine-tuning when it fits the card, else LoRA rank 64
on every linear layer of the text model (peft, as `model.lora.targets=all-linear`); the reference is then
the same model with the adapters off (`adapters_off`), never a copy.

Phases, each timed and with its own peak (`torch.cuda.max_memory_allocated` after a reset):
rollout (our decode loop, every row at its longest: random weights rarely emit EOS), scoring (the
frozen-reference KL pass and the audio-ablated pass), update (micro-batches with the attention capture and
activation checkpointing), optimizer step (AdamW), evaluation (greedy, `--eval-batch` prompts). Prints
a table and one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

from mapo.bench_gpu import device_timer, random_qwen2_audio  # noqa: E402
from mapo.config import LoraConfig  # noqa: E402
from mapo.distributed import ModelRunner  # noqa: E402
from mapo.models.adapter import get_adapter  # noqa: E402
from mapo.models.loader import enable_activation_checkpointing  # noqa: E402
from mapo.models.lora import adapter_parameters, add_lora, adapters_off  # noqa: E402
from mapo.precision import Precision, frozen_copy  # noqa: E402
from mapo.plan import BUNDLED_CONFIGS, GIB, PlanInputs, format_plan, memory_plan  # noqa: E402
from mapo.rollout import generate_rollout  # noqa: E402
from mapo.step import Normalisers, mapo_step, prepare_batch  # noqa: E402

AUDIO_TOKEN, PAD, IM_START, IM_END = 151646, 151643, 151644, 151645
TINY_TEXT = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 128}
TINY_AUDIO = {"d_model": 32, "encoder_layers": 2, "encoder_attention_heads": 2, "encoder_ffn_dim": 64}
LORA_TARGETS = "all-linear"


# ------------------------------------------------------------------------------------------ setup
def model_config(tiny: bool) -> dict:
    config = json.loads((BUNDLED_CONFIGS / "Qwen2-Audio-7B-Instruct.json").read_text())
    if tiny:
        config["text_config"].update(TINY_TEXT)
        config["audio_config"].update(TINY_AUDIO)
    return config


def build_model(config: dict, device: torch.device, lora_rank: int, precision: Precision):
    """The random model on `device` as the training program holds it: the trainable text model in the
    master dtype (fp32), the frozen audio tower in the frozen dtype; with LoRA every base weight is frozen
    (frozen dtype) and only the peft adapters train (fp32)."""
    # the bundled Hub file says torch_dtype bfloat16; random_qwen2_audio ignores it, the dtypes here are ours
    base_dtype = precision.frozen if lora_rank > 0 else precision.master
    model = random_qwen2_audio(config, device, base_dtype)
    get_adapter(model).audio_tower(model).to(precision.frozen).requires_grad_(False)  # frozen tower, frozen dtype
    if lora_rank > 0:
        model.requires_grad_(False)
        add_lora(model, LoraConfig(rank=lora_rank, alpha=2.0 * lora_rank, targets=LORA_TARGETS))
        for p in adapter_parameters(model):  # adapters are trainable masters
            p.data = p.data.to(precision.master)
            p.requires_grad_(True)
    return model


def prompt_batch(num_prompts: int, text_tokens: int, audio_tokens: int, frames: int, device, seed: int) -> dict:
    """Prompts of a full audio window each: [text head | 750 × <|AUDIO|> | text tail], random features."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 150000, (num_prompts, text_tokens + audio_tokens), generator=g)
    ids[:, 0] = IM_START
    ids[:, 20 : 20 + audio_tokens] = AUDIO_TOKEN
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "input_features": torch.randn(num_prompts, 128, frames, generator=g).to(device),
        "feature_attention_mask": torch.ones(num_prompts, frames, dtype=torch.long).to(device),
    }


class Phases:
    """Times and peak memory of each phase: CUDA's allocator statistics, or on CPU the tensor-byte probe of
    the tests (tests/memory_probe.py, counting every storage since the model was built)."""

    def __init__(self, device, probe=None):
        self.device, self.probe, self.rows = device, probe, {}

    @contextlib.contextmanager
    def __call__(self, name):
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        elif self.probe is not None:
            self.probe.peak = self.probe.live
        with device_timer(self.device) as timer:
            yield
        peak = torch.cuda.max_memory_allocated() if cuda else (self.probe.peak if self.probe is not None else None)
        self.rows[name] = {"seconds": timer.seconds, "peak_bytes": peak}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="toy widths (2 layers of 64) for a CPU run")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--lora-rank", default="auto", help="auto (the plan decides) | 0 (full fine-tuning) | r")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--text-tokens", type=int, default=128, help="text tokens per prompt besides the audio")
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--eval-batch", type=int, default=16)
    ap.add_argument("--gpu-gib", type=float, default=0, help="card memory the plan uses (0 = the card's own)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    compute = torch.bfloat16 if cuda else torch.float32
    config = model_config(args.tiny)
    from mapo.models.adapter import adapter_for_config

    dims = adapter_for_config(config).dims(config)
    capacity = int(args.gpu_gib * GIB) if args.gpu_gib else (torch.cuda.get_device_properties(device).total_memory if cuda else None)

    def plan_inputs(rank: int) -> PlanInputs:
        return PlanInputs(
            world_size=1, device=device.type, master_dtype="float32", compute_dtype="bfloat16" if cuda else "float32",
            frozen_dtype="bfloat16" if cuda else "float32", phase="rl", prompts_per_step=args.prompts, group_size=args.group,
            max_new_tokens=args.new_tokens, eval_batch_size=args.eval_batch, micro_batch_size=args.micro,
            gradient_checkpointing=True, lora_rank=rank, lora_targets=LORA_TARGETS, freeze_audio_tower=True,
            reference=rank == 0, capture_layers=3 if dims.num_layers >= 3 else dims.num_layers, prompt_text_tokens=args.text_tokens)

    if args.lora_rank == "auto":
        rank = 0 if capacity is None or memory_plan(dims, plan_inputs(0), capacity).fits else 64
    else:
        rank = int(args.lora_rank)
    plan = memory_plan(dims, plan_inputs(rank), capacity)
    print(format_plan(plan, f"full_step ({'LoRA r=' + str(rank) if rank else 'full fine-tuning'})"), flush=True)
    if not plan.fits:
        print("[full_step] the plan does not fit this card; pass --lora-rank or fewer --prompts", flush=True)

    torch.manual_seed(0)
    probe = None
    if not cuda:
        sys.path.insert(0, str(ROOT / "tests"))
        from memory_probe import PeakTracker

        probe = PeakTracker()
        probe.__enter__()
    t0 = time.perf_counter()
    precision = Precision(master=torch.float32, compute=compute, frozen=compute)
    model = build_model(config, device, rank, precision)
    runner = ModelRunner(model, precision)  # the one place autocast is entered, as in training
    frozen = adapters_off(runner) if rank else ModelRunner(frozen_copy(model, precision.frozen), precision)
    build_s = time.perf_counter() - t0
    from mapo.config import AlgoConfig

    algo = AlgoConfig()
    algo.attn.layers = [-3, -2, -1] if dims.num_layers >= 3 else list(range(-dims.num_layers, 0))
    text_head = args.text_tokens
    batch = prompt_batch(args.prompts, text_head, dims.audio_tokens_per_window, dims.audio_frames, device, seed=0)
    suppress = [AUDIO_TOKEN, 151647, 151648, IM_START, PAD, *range(154931, dims.vocab_size)]
    gen = dict(eos_token_id=IM_END, pad_token_id=PAD, suppress_token_ids=suppress)
    phases = Phases(device, probe)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-6, betas=(0.9, 0.95))
    for p in trainable:  # AdamW's state exists in every step but the first: create it, as the plan assumes
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with phases("rollout"):
        rollout = runner.decode(generate_rollout, batch, group_size=args.group, max_new_tokens=args.new_tokens,
                                seeds=list(range(args.prompts)), **gen)
    n = rollout.completion_ids.shape[0]
    adv = torch.randn(n, device=device)
    accuracy = (torch.rand(n, device=device) > 0.5).float()
    content = torch.ones(dims.vocab_size, dtype=torch.bool, device=device)
    with phases("scoring"):
        prepared = prepare_batch(runner, rollout, adv, accuracy, algo, frozen_reference=frozen, feature_extractor=None,
                                 content_vocab_mask=content, temperature=1.0)
    norms = Normalisers(num_tokens=rollout.completion_mask.sum().float(), num_seqs=n, max_len=args.new_tokens)
    model.train()
    enable_activation_checkpointing(model)
    with phases("update"):
        for rows in torch.arange(n, device=device).split(args.micro):
            mapo_step(model, rollout, rows, prepared, algo, norms, temperature=1.0, backward_scale=1.0, call=runner)
    with phases("optimizer step"):
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    del rollout, prepared
    model.eval()
    eval_batch = prompt_batch(args.eval_batch, text_head, dims.audio_tokens_per_window, dims.audio_frames, device, seed=1)
    with phases("evaluation"):
        runner.decode(generate_rollout, eval_batch, group_size=1, max_new_tokens=args.new_tokens, do_sample=False, **gen)

    if probe is not None:
        probe.__exit__(None, None, None)
    result = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "lora_rank": rank, "build_s": build_s,
              "trainable_params": sum(p.numel() for p in trainable), "rows": n, "new_tokens": args.new_tokens,
              "phases": {}}
    print(f"\n[full_step] {result['device']}: build {build_s:.1f} s; {n} rows × {args.new_tokens} new tokens", flush=True)
    print("| phase | time (s) | peak measured (GiB) | plan (GiB) | plan / measured |\n|---|---|---|---|---|")
    for name, row in phases.rows.items():
        planned = plan.phases.get(name)
        measured = row["peak_bytes"]
        ratio = planned / measured if (planned and measured) else None
        result["phases"][name] = {**row, "plan_bytes": planned, "plan_over_measured": ratio}
        cell = lambda x: f"{x / GIB:.2f}" if x else "–"  # noqa: E731
        print(f"| {name} | {row['seconds']:.2f} | {cell(measured)} | {cell(planned)} | {f'{ratio:.2f}' if ratio else '–'} |")
    measured_peak = max((r["peak_bytes"] or 0) for r in phases.rows.values())
    result["plan_peak_bytes"], result["measured_peak_bytes"] = plan.peak, measured_peak or None
    if measured_peak:
        print(f"peak: plan {plan.peak / GIB:.2f} GiB, measured {measured_peak / GIB:.2f} GiB, ratio {plan.peak / measured_peak:.3f}")
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
