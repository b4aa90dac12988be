"""The memory plan (mapo.plan): Qwen2-Audio-7B's dimensions from its config.json, hand-worked components,
the options taking effect, the fit verdict and advice, the start-time refusal, and the plan against the
measured peak of a real RL step on the tiny model."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_preflight import REAL_CONFIG, cfg_of

from mapo import plan as plan_mod
from mapo.models.adapter import Qwen2AudioAdapter
from mapo.plan import GIB, check_memory_at_start, fixes, format_plan, inputs_from_config, lora_parameters, memory_plan, trainable_parts

DIMS = Qwen2AudioAdapter().dims(REAL_CONFIG)


def q_inputs(world: int, *overrides: str):
    return inputs_from_config(cfg_of("experiment=qwen2audio_mapo", "data.dir=/d", *overrides), world, "cuda")


def test_qwen2_audio_7b_dimensions_from_its_config_json():
    d = DIMS  # text_config omits hidden size, layers and heads: Qwen2Config's defaults apply
    assert (d.hidden_size, d.num_layers, d.num_heads, d.num_kv_heads, d.head_dim, d.mlp_width) == (4096, 32, 32, 32, 128, 11008)
    assert (d.vocab_size, d.max_position, d.audio_tokens_per_window, d.audio_frames) == (156032, 8192, 750, 3000)
    # one decoder layer: q, k, v, o (4·4096²) + q/k/v biases (3·4096) + SwiGLU (3·4096·11008) + 2 norms
    assert d.layer_params == 4 * 4096**2 + 3 * 4096 + 3 * 4096 * 11008 + 2 * 4096 == 202_395_648
    assert d.embed_params == d.lm_head_params == 156032 * 4096
    assert d.projector_params == 1280 * 4096 + 4096
    assert d.total_params == 8_397_094_912 and d.audio_params == 636_968_960


def test_hand_worked_components_on_eight_gpus():
    p = memory_plan(DIMS, q_inputs(8))
    trainable = DIMS.text_params + DIMS.lm_head_params + DIMS.projector_params  # the audio tower is frozen
    frozen = DIMS.audio_params
    c = p.components
    assert c["weights"] == (trainable * 4 + frozen * 2) // 8  # fp32 masters + bf16 frozen tower, sharded
    assert c["gradients"] == trainable * 4 // 8 and c["optimizer state"] == trainable * 8 // 8
    assert c["reference"] == DIMS.total_params * 2 // 8  # a bf16 frozen copy (β = 0.02), sharded
    assert c["compute copy (rollout/eval)"] == DIMS.total_params * 2  # the whole model gathered once, bf16
    # 16 prompts / 8 ranks × G = 8 rows; 750 audio + 128 text + 512 new tokens; K and V of 32 layers × 32 heads × 128 in bf16
    assert c["rollout KV cache"] == 16 * (750 + 128 + 512) * 2 * 32 * 32 * 128 * 2
    assert p.fits is True and memory_plan(DIMS, q_inputs(1)).peak > 80 * GIB


def test_options_take_effect():
    base = memory_plan(DIMS, q_inputs(8))
    no_ac = memory_plan(DIMS, q_inputs(8, "model.gradient_checkpointing=false"))
    assert no_ac.components["activations"] == base.activations_without_ac > 5 * base.activations_with_ac
    half = memory_plan(DIMS, q_inputs(8, "trainer.micro_batch_size=2"))
    assert half.components["activations"] < base.components["activations"]
    lora = memory_plan(DIMS, q_inputs(8, "model.lora.rank=8", "model.lora.targets=[q_proj,v_proj]"))
    assert lora.components["reference"] == 0 and lora.components["gradients"] == 32 * 8 * (4096 + 4096) * 2 * 4 // 8
    grpo = memory_plan(DIMS, inputs_from_config(cfg_of("experiment=qwen2audio_grpo", "data.dir=/d", "algo.beta=0"), 8, "cuda"))
    assert grpo.components["reference"] == 0  # no KL, no ablated reference
    evaluation = memory_plan(DIMS, q_inputs(8, "trainer.steps=0"))  # make eval
    assert evaluation.components["reference"] == evaluation.components["gradients"] == evaluation.components["optimizer state"] == 0
    assert set(evaluation.phases) == {"load", "evaluation"}
    longer = memory_plan(DIMS, q_inputs(8, "rollout.max_new_tokens=1024"))
    assert longer.components["rollout KV cache"] == base.components["rollout KV cache"] * (750 + 128 + 1024) // (750 + 128 + 512)


def test_the_load_phase_holds_the_whole_model_on_every_rank():
    """Before FSDP shards anything, each rank holds the whole fp32 model (8 397 094 912 parameters): bytes that
    no world size divides. A frozen reference (β = 0.02, no LoRA) is a whole bf16 copy on one process; under
    FSDP it is staged in host memory and reaches the GPU as its 1/N shards plus the unit being sharded, the
    largest being the root: everything outside the 32 text and 32 audio layers, 8 397 094 912 − 32 · 202 395 648
    − 32 · 19 676 160 = 1 290 797 056 parameters (token table and LM head 2 · 156 032 · 4096, norm, projector,
    the audio tower's stem)."""
    one = memory_plan(DIMS, q_inputs(1))
    assert one.phases["load"] == one.components["load (before sharding)"] == 8_397_094_912 * (4 + 2) == 50_382_569_472
    eight = memory_plan(DIMS, q_inputs(8))
    assert eight.phases["load"] == 8_397_094_912 * 4 + 8_397_094_912 * 2 // 8 + 1_290_797_056 * 2 == 38_269_247_488
    assert any("each rank stages the reference (15.64 GiB)" in note for note in eight.notes)
    assert not any("stages the reference" in note for note in one.notes)
    # CPU processes (gloo): mapo.train stages nothing, so each holds both whole models before sharding
    cpu8 = memory_plan(DIMS, dataclasses.replace(q_inputs(8), device="cpu"))
    assert cpu8.phases["load"] == 50_382_569_472 and not any("stages the reference" in note for note in cpu8.notes)
    assert "whole model float32 + reference bfloat16\n" in format_plan(cpu8, "x", [])
    for world in (1, 8):
        # LoRA: no copy (the reference is the model with adapters off), and no loaded weight trains, so the base
        # loads in bf16; the adapters, 32 layers × 2 targets × rank 8 × (4096 in + 4096 out) = 4 194 304
        # parameters, are fp32
        lora = memory_plan(DIMS, q_inputs(world, "model.lora.rank=8", "model.lora.targets=[q_proj,v_proj]"))
        assert lora.phases["load"] == 8_397_094_912 * 2 + 4_194_304 * 4 == 16_810_967_040
        assert "whole model bfloat16 + adapters float32\n" in format_plan(lora, "x", [])
        # a warm start trains every weight: then the base loads in fp32 (warm start 8 rows)
        warm = memory_plan(DIMS, dataclasses.replace(lora.inputs, warm_start_batch=8))
        assert warm.phases["load"] == (8_397_094_912 + 4_194_304) * 4
        assert memory_plan(DIMS, q_inputs(world, "trainer.steps=0")).phases["load"] == 8_397_094_912 * 4  # make eval: no reference
    assert eight.peak_phase == "rollout" and eight.phases["load"] < eight.phases["rollout"]  # staging keeps load under it


def test_the_load_phase_alone_decides_the_verdict():
    """8 × 38 GiB, 8 prompts per step: every sharded phase fits (rollout 34.21 GiB + reserve), loading does not
    (35.64 GiB + reserve = 38.42 GiB); more GPUs cannot help it, LoRA (no second copy) does."""
    small = ("rollout.prompts_per_step=8", "rollout.eval_batch_size=8")
    eight, capacity = q_inputs(8, *small), 38 * GIB
    plan = memory_plan(DIMS, eight, capacity)
    sharded = max(v for k, v in plan.phases.items() if k != "load")
    assert sharded + int(1 * GIB + 0.05 * sharded) <= capacity < plan.total == 38_269_247_488 + int(1 * GIB + 0.05 * 38_269_247_488)
    assert not plan.fits and not plan.load_fits and memory_plan(DIMS, eight, 40 * GIB).load_fits
    # 64 GPUs shrink only the reference's shards: the whole fp32 policy stays (8 397 094 912 · 4 B = 31.28 GiB)
    wide = memory_plan(DIMS, dataclasses.replace(eight, world_size=64, prompts_per_step=64), capacity)
    assert wide.phases["load"] == 8_397_094_912 * 4 + 8_397_094_912 * 2 // 64 + 1_290_797_056 * 2
    advice = fixes(DIMS, eight, capacity)
    assert advice == ["model.lora.rank=64"]
    # rank 64 on every linear layer: 32 layers × 64 × (4·(4096 + 4096) + 3·(4096 + 11008)) = 159 907 840 adapter
    # parameters in fp32, the base in bf16
    assert memory_plan(DIMS, _apply(eight, advice[0]), capacity).phases["load"] == 8_397_094_912 * 2 + 159_907_840 * 4
    assert memory_plan(DIMS, _apply(eight, advice[0]), capacity).fits
    text = format_plan(plan, "x", advice)
    assert "\n  load, before sharding              35.64 GiB  whole model float32 + reference bfloat16 shards + 1 unit\n" in text
    assert "phases: load 35.64, " in text and "total: peak 35.64 GiB (load)" in text
    assert "\n  loading alone needs 35.6 GiB + reserve per GPU: every rank holds the whole model before FSDP shards it, " \
           "so more GPUs lower only the reference's shards in it\n  would fit with: model.lora.rank=64" in text
    cfg = cfg_of("experiment=qwen2audio_mapo", "data.dir=/d", "trainer.device_memory_gib=38", *small)
    with pytest.raises(plan_mod.MemoryPlanError, match=r"would fit with: model.lora.rank=64; loading alone needs 35.6 GiB \+ reserve"):
        check_memory_at_start(cfg, REAL_CONFIG, SimpleNamespace(device=torch.device("cuda"), world_size=8, is_main=False))
    # with LoRA the load needs 8 397 094 912 · 2 B + 159 907 840 · 4 B = 16.24 GiB: LoRA fits 32 GiB cards too
    # (its peak is the rollout's 23.74 GiB + reserve), and no fix is left for 16 GiB cards
    assert fixes(DIMS, eight, 32 * GIB) == ["model.lora.rank=64"]
    assert memory_plan(DIMS, _apply(eight, "model.lora.rank=64"), 32 * GIB).peak_phase == "rollout"
    assert fixes(DIMS, eight, 16 * GIB) == []


def test_lora_counts_from_dims_and_targets():
    text_only = {"text", "lm_head"}
    assert lora_parameters(DIMS, 16, ("q_proj", "v_proj"), text_only) == 32 * 16 * (4096 + 4096) * 2
    per_layer = 4 * (4096 + 4096) + 3 * (4096 + 11008)
    assert lora_parameters(DIMS, 4, "all-linear", text_only) == 32 * 4 * per_layer  # never the LM head
    with_projector = text_only | {"projector"}
    # adapters go on the language model only (mapo.models.lora): a trainable projector gets none
    assert lora_parameters(DIMS, 4, "all-linear", with_projector) == 32 * 4 * per_layer
    assert trainable_parts(q_inputs(1)) == {"text", "lm_head", "projector"}  # the tower is frozen by default


def test_a_plan_that_does_not_fit_names_what_would():
    one = q_inputs(1)
    capacity = 80 * GIB
    assert not memory_plan(DIMS, one, capacity).fits
    advice = fixes(DIMS, one, capacity)
    # on one GPU: the shared-prompt cache and LoRA together keep all 16 prompts per step
    assert advice == ["4 GPUs (NPROC×NNODES)", "rollout.shared_prompt_cache=true + model.lora.rank=64"]
    assert not memory_plan(DIMS, _apply(one, "rollout.shared_prompt_cache=true"), capacity).fits
    assert not memory_plan(DIMS, _apply(one, "model.lora.rank=64"), capacity).fits
    assert all(memory_plan(DIMS, _apply(one, a), capacity).fits for a in advice)
    assert not memory_plan(DIMS, _apply(one, "2 GPUs (NPROC×NNODES)"), capacity).fits  # the fewest that fit
    eight_tight = dataclasses.replace(q_inputs(8), micro_batch_size=16, gradient_checkpointing=False)
    advice = fixes(DIMS, eight_tight, capacity)
    assert "model.gradient_checkpointing=true" in advice and any(a.startswith("trainer.micro_batch_size=") for a in advice)


def _apply(inputs, advice: str):
    """The PlanInputs an advice string stands for (a combination joins several with ' + ')."""
    fields = {"trainer.micro_batch_size": "micro_batch_size", "rollout.prompts_per_step": "prompts_per_step",
              "rollout.max_new_tokens": "max_new_tokens", "rollout.eval_batch_size": "eval_batch_size", "model.lora.rank": "lora_rank"}
    for item in advice.split(" + "):
        key, _, value = item.partition("=")
        if item.endswith("GPUs (NPROC×NNODES)"):
            inputs = dataclasses.replace(inputs, world_size=int(item.split()[0]))
        elif key == "model.gradient_checkpointing":
            inputs = dataclasses.replace(inputs, gradient_checkpointing=value == "true")
        elif key == "rollout.shared_prompt_cache":
            inputs = dataclasses.replace(inputs, shared_prompt_cache=value == "true")
        else:
            inputs = dataclasses.replace(inputs, **{fields[key]: int(value)})  # LoRA drops the reference copy by itself
    return inputs


def test_make_plan_prints_and_exits_by_the_verdict(capsys):
    assert plan_mod.main(["experiment=qwen2audio_mapo", "--nproc=8", "--gpu-gib=80"]) == 0
    out = capsys.readouterr().out
    assert "Qwen2-Audio-7B-Instruct.json" in out and "no weights read" in out
    for line in ("weights", "gradients", "optimizer state", "reference", "rollout KV cache", "activations, checkpointing on",
                 "activations, checkpointing off", "evaluation batch"):
        assert f"\n  {line}" in out, line
    assert "of 80.0 GiB → fits" in out
    assert plan_mod.main(["experiment=qwen2audio_mapo", "--nproc=1", "--gpu-gib=80"]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "\n  would fit with: " in out
    with pytest.raises(SystemExit, match="unknown option --gpus"):
        plan_mod.main(["--gpus=2"])


def test_training_refuses_on_cuda_and_warns_on_cpu(capsys):
    cfg = cfg_of("experiment=qwen2audio_mapo", "data.dir=/d", "trainer.device_memory_gib=80")
    cuda = SimpleNamespace(device=torch.device("cuda"), world_size=1, is_main=True)
    with pytest.raises(plan_mod.MemoryPlanError, match=r"needs \d+\.\d GiB per GPU of 80.0 GiB; would fit with: "):
        check_memory_at_start(cfg, REAL_CONFIG, cuda)
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert check_memory_at_start(cfg, REAL_CONFIG, SimpleNamespace(device=torch.device("cuda"), world_size=8, is_main=True)).fits
    cpu = SimpleNamespace(device=torch.device("cpu"), world_size=1, is_main=True)
    assert not check_memory_at_start(cfg, REAL_CONFIG, cpu).fits  # printed against the 80 GiB asked for, not refused
    assert "[mapo] warning: the memory plan needs" in capsys.readouterr().out
    warn = cfg_of("experiment=qwen2audio_mapo", "data.dir=/d", "trainer.device_memory_gib=80", "trainer.memory_check=warn")
    assert not check_memory_at_start(warn, REAL_CONFIG, cuda).fits
    off = cfg_of("experiment=qwen2audio_mapo", "data.dir=/d", "trainer.memory_check='off'")
    assert check_memory_at_start(off, REAL_CONFIG, cuda) is None


def test_the_plan_is_within_20_percent_of_a_measured_rl_step(tiny_env):
    """One real RL step (rollout, no-grad scoring, micro-batched update with the capture, AdamW) on the tiny
    model, every tensor byte counted (tests/memory_probe.py), against the plan of the same lengths."""
    from memory_probe import PeakTracker

    import mapo.rl as rl
    from mapo import distributed as dist_utils
    from mapo.algos.mapo import build_content_vocab_mask
    from mapo.assets import load_split
    from mapo.data.collate import Collator, FeatureCache
    from mapo.models.adapter import get_adapter
    from mapo.models.loader import load_model_and_processor
    from mapo.phase import Phase, set_trainable
    from mapo.train import generation_kwargs

    cfg = cfg_of("experiment=tiny_mapo", f"model.path={tiny_env['model']}", f"data.dir={tiny_env['data']}",
                 "rollout.prompts_per_step=4", "rollout.group_size=8", "rollout.max_new_tokens=24", "trainer.micro_batch_size=8")
    ctx = dist_utils.DistContext()
    torch.manual_seed(0)
    model, processor = load_model_and_processor(cfg.model.path)
    collator = Collator(processor, feature_cache=FeatureCache())
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    set_trainable(model, cfg, everything=False)
    phase = Phase("rl", dist_utils.ModelRunner(model), model, 1e-4, 10, 0, "constant", cfg, load_split(cfg.data, cfg.data.train))
    gen = generation_kwargs(cfg, processor, ctx, get_adapter(model).vocab_size(model))
    content = build_content_vocab_mask(collator.tokenizer, get_adapter(model).vocab_size(model))
    model.train()
    step = lambda: rl.rl_step(phase, dist_utils.ModelRunner(reference), collator, cfg, ctx, gen, content, "recompute")  # noqa: E731
    step()  # AdamW state exists from here on, as in every later step
    lengths = {}
    sample = rl.generate_rollout

    def spy(*args, **kwargs):
        out = sample(*args, **kwargs)
        lengths.update(prompt=out.prompt_len, audio=int(out.audio_mask[0].sum()), new=out.completion_ids.shape[1])
        return out

    rl.generate_rollout = spy
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in
                [*model.parameters(), *model.buffers(), *reference.parameters(), *reference.buffers(),
                 *(v for s in phase.optimizer.state.values() for v in s.values() if torch.is_tensor(v))]}
    try:
        with PeakTracker(sum(storages.values())) as probe:
            step()
    finally:
        rl.generate_rollout = sample
    inputs = inputs_from_config(cfg, 1, "cpu", prompt_text_tokens=lengths["prompt"] - lengths["audio"])
    inputs = dataclasses.replace(inputs, max_new_tokens=lengths["new"], warm_start_batch=0)
    dims = get_adapter(model).dims(json.loads((Path(cfg.model.path) / "config.json").read_text()))
    planned = memory_plan(dims, inputs)
    peak = max(v for k, v in planned.phases.items() if k not in ("evaluation", "load"))  # the step's phases only
    ratio = peak / probe.peak
    print(f"\n[plan check] tiny RL step: planned {peak / 2**20:.2f} MiB, measured {probe.peak / 2**20:.2f} MiB, ratio {ratio:.3f}")
    assert 0.8 <= ratio <= 1.2, (planned.phases, probe.peak)


def test_the_shared_prompt_cache_holds_each_prompt_once():
    """rollout.shared_prompt_cache: the rollout's KV cache holds B·P + N·T columns instead of N·(P + T):
    qwen2audio_mapo on 8 GPUs, 16 / 8 = 2 prompts × G = 8 per rank, prompt = 750 audio + 128 text tokens, 512
    new tokens, 32 layers × 32 KV heads × 128 × 2 (K, V) × 2 B = 524 288 B per column: 10.86 → 4.86 GiB, and
    the rollout phase 39.84 → 33.65 GiB, below the evaluation phase, which becomes the peak."""
    per_row = memory_plan(DIMS, q_inputs(8))
    shared = memory_plan(DIMS, q_inputs(8, "rollout.shared_prompt_cache=true"))
    i = per_row.inputs
    prompts = i.prompts_per_step // 8
    rows, prompt, new = prompts * i.group_size, DIMS.audio_tokens_per_window + i.prompt_text_tokens, i.max_new_tokens
    column = 2 * 32 * 32 * 128 * 2
    assert per_row.components["rollout KV cache"] == rows * (prompt + new) * column
    assert shared.components["rollout KV cache"] == (prompts * prompt + rows * new) * column
    assert shared.phases["rollout"] < per_row.phases["rollout"]
    assert (per_row.peak_phase, shared.peak_phase) == ("rollout", "evaluation")


def test_the_auto_capture_method_is_planned_as_the_method_it_takes():
    """algo.attn.method=auto: on CUDA Qwen2-Audio's 128-wide heads take the second SDPA call (8 wider they
    would leave the fast kernel), on CPU the fused call; the plan counts that method's bytes."""
    def plan(method: str, device: str):
        return memory_plan(DIMS, inputs_from_config(cfg_of("experiment=qwen2audio_mapo", "data.dir=/d",
                                                           f"algo.attn.method={method}"), 8, device))

    assert plan("auto", "cuda").components == plan("sdpa", "cuda").components
    assert plan("auto", "cpu").components == plan("fused", "cpu").components
    assert plan("fused", "cuda").components["activations"] != plan("sdpa", "cuda").components["activations"]
