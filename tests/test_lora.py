"""LoRA (one process; FSDP2, checkpoints and resume in test_distributed.py): targets on the language model
only, the parameter count the memory plan uses, KL = 0 at step 0, the adapter-off reference equal to a
frozen copy of the base model, and a merged export equal to the adapted model."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from toy_model import make_batch, tiny_model

from mapo.config import AlgoConfig
from mapo.distributed import ModelRunner
from mapo.models.adapter import get_adapter
from mapo.models.lora import (
    adapters_off,
    add_lora,
    check_lora_config,
    lora_layers,
    merged_state_dict,
)
from mapo.phase import set_trainable
from mapo.rollout import generate_rollout
from mapo.scoring import score_tokens
from mapo.step import prepare_batch

torch.set_num_threads(1)


def lora(rank=4, alpha=8.0, dropout=0.0, targets="all-linear"):
    return SimpleNamespace(rank=rank, alpha=alpha, dropout=dropout, targets=targets)


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


# toy text model: hidden 64, intermediate 128, 4 heads, 2 KV heads (head_dim 16), 2 layers; rank 4 adds
# 4·(in + out) per linear: q 512, k 384, v 384, o 512, gate 768, up 768, down 768 = 4096 per layer;
# q_proj + v_proj: 896 per layer. (The memory plan's count is tested in test_plan.py.)
@pytest.mark.parametrize("targets, per_layer, expected", [("all-linear", 7, 8192), (["q_proj", "v_proj"], 2, 1792)])
def test_adapters_go_on_the_language_model_only(targets, per_layer, expected):
    model = add_lora(tiny_model(seed=0), lora(rank=4, targets=targets))
    names = [name for name, _ in lora_layers(model)]
    assert len(names) == 2 * per_layer and all(n.startswith("model.language_model.layers.") for n in names)
    set_trainable(model, SimpleNamespace(), everything=True)  # LoRA: only the adapters, whatever the flags
    assert trainable(model) and all(".lora_A." in n or ".lora_B." in n for n in trainable(model))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    adapter = get_adapter(model)  # the adapter still finds every part of the injected model
    assert adapter.lm_head(model) is model.lm_head and type(model.lm_head) is torch.nn.Linear
    assert len(adapter.decoder_layers(model)) == 2 and not list(lora_layers(adapter.audio_tower(model)))


def test_bad_lora_settings_are_refused():
    with pytest.raises(ValueError, match="not linear layers of the language model; valid: down_proj"):
        add_lora(tiny_model(seed=0), lora(targets=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="model.lora.rank=-1"):
        check_lora_config(lora(rank=-1))
    with pytest.raises(ValueError, match="model.lora.targets='all'"):
        check_lora_config(lora(targets="all"))
    with pytest.raises(ValueError, match="model.lora.alpha=0"):
        check_lora_config(lora(alpha=0))


def lm_nll(model, batch):
    """A loss with gradients through every text layer (mean NLL of the prompt tokens)."""
    from mapo.models.embed import position_ids_from_mask

    adapter = get_adapter(model)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    hidden = adapter.run_text_model(model, adapter.embed_tokens(model)(ids), mask, position_ids_from_mask(mask))
    logp = adapter.lm_head(model)(hidden[:, :-1]).float().log_softmax(-1)
    return -(logp.gather(-1, ids[:, 1:, None]).squeeze(-1) * mask[:, 1:]).sum() / mask[:, 1:].sum()


def test_reference_is_the_model_with_adapters_off_kl_zero_at_step_0_and_a_merged_export():
    base = tiny_model(seed=2, projector_gain=50.0)
    frozen = copy.deepcopy(base).requires_grad_(False)  # what the reference must equal, before LoRA
    model = add_lora(base, lora(rank=4, alpha=8.0))
    set_trainable(model, SimpleNamespace(), everything=False)
    runner = ModelRunner(model)
    reference = adapters_off(runner)
    batch = make_batch()
    rollout = runner.decode(generate_rollout, batch, group_size=2, max_new_tokens=6, eos_token_id=1, pad_token_id=0, seeds=[1, 2, 3])
    algo = AlgoConfig(beta=0.04)
    algo.mask.enabled = False
    algo.attn.eta = 0.0
    algo.attn.token_gate = "all"
    n = rollout.completion_ids.shape[0]

    def prepared():
        return prepare_batch(runner, rollout, torch.zeros(n), torch.zeros(n), algo, frozen_reference=reference,
                             feature_extractor=None, content_vocab_mask=None, temperature=1.0, old_pass=True)

    at_start = prepared()
    assert torch.equal(at_start.ref_logprobs, at_start.old_logprobs)  # KL = 0 exactly: lora_B starts at 0

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        runner(lm_nll, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    after = prepared()
    exact = score_tokens(frozen, rollout, temperature=1.0).logprobs
    assert (after.old_logprobs - exact).abs().max() > 1e-3  # the adapters changed the policy ...
    assert torch.allclose(after.ref_logprobs, exact, atol=1e-6, rtol=0)  # ... not the reference
    assert all(not layer.disable_adapters for _, layer in lora_layers(model))  # switched back on

    # Merged export: W + (alpha / rank)·B@A under the original names; a plain model then scores as the adapted one.
    merged = merged_state_dict(model, model.state_dict())
    assert set(merged) == set(frozen.state_dict())
    name = "model.language_model.layers.1.mlp.down_proj"
    layer = dict(lora_layers(model))[name]
    by_hand = frozen.state_dict()[f"{name}.weight"] + 2.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    assert torch.allclose(merged[f"{name}.weight"], by_hand, atol=1e-7)
    plain = tiny_model(seed=99)
    plain.load_state_dict(merged)
    assert torch.allclose(score_tokens(plain, rollout, temperature=1.0).logprobs, after.old_logprobs, atol=1e-5)


def test_lora_rl_run_references_the_model_with_adapters_off_without_a_copy(tiny_env, tmp_path, monkeypatch):
    """The loop end to end (one process, MAPO with β > 0 and the frozen ablated reference): no copy of the
    model is made, KL is 0 at the first step and not after, and the final export is a plain model."""
    import json

    from run_configs import compose_run_config

    import mapo.train as train_module
    from mapo.models.loader import load_model_and_processor

    def no_copy(*args, **kwargs):
        raise AssertionError("a LoRA run must not copy the model for its reference")

    monkeypatch.setattr(train_module, "frozen_copy", no_copy)
    run_dir = tmp_path / "run"
    cfg = compose_run_config(
        tiny_env, run_dir, "tiny_mapo", "model.lora.rank=4", "model.lora.alpha=8", "trainer.steps=2",
        f"trainer.warm_start.cache_dir={tiny_env['root'] / 'warm'}", "trainer.warm_start.steps=3",
        "trainer.warm_start.batch_size=8", "rollout.prompts_per_step=2", "rollout.group_size=4",
        "rollout.max_new_tokens=12", "trainer.micro_batch_size=4",
    )
    assert cfg.algo.beta > 0 and cfg.algo.reference.model == "frozen"
    train_module.run(cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    kl = [r["loss/kl"] for r in rows if "loss/kl" in r]
    assert kl[0] == 0.0 and kl[1] > 0  # adapters start at zero, then move the policy off the reference
    exported, _ = load_model_and_processor(run_dir / "final_model")
    assert not any("lora" in name for name in exported.state_dict())


def test_a_lora_base_loads_in_the_frozen_dtype_and_its_adapters_train_in_the_master_dtype(tiny_env, tmp_path):
    """With LoRA and no warm start no loaded weight trains, so the base loads straight in the frozen dtype (a
    30B model is not held whole in fp32 by every rank before sharding); the adapters peft injects at the
    base's dtype are brought to the master dtype. With a warm start (which trains everything) the base loads
    in the master dtype. Equal weights either way: the plain load cast down."""
    from run_configs import compose_run_config

    from mapo.distributed import DistContext
    from mapo.phase import prepare_policy
    from mapo.precision import resolve_precision
    from mapo.train import load_dtype, load_policy

    def config(*overrides):
        cfg = compose_run_config(tiny_env, tmp_path / "run", "tiny_mapo", "model.compute_dtype=bfloat16",
                                 "model.frozen_dtype=bfloat16", *overrides)
        return cfg, resolve_precision(cfg.model, torch.device("cpu"))

    cfg, precision = config("model.lora.rank=4", "model.lora.alpha=8", "trainer.warm_start.enabled=false")
    assert (precision.master, precision.frozen) == (torch.float32, torch.bfloat16)
    assert load_dtype(cfg, precision) == torch.bfloat16
    model, _ = load_policy(cfg, DistContext(), precision)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    prepare_policy(model, cfg, precision, everything=False)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n and p.dtype == torch.float32 for n, p in trained.items())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad)
    plain_cfg, plain_precision = config("trainer.warm_start.enabled=false")
    plain, _ = load_policy(plain_cfg, DistContext(), plain_precision)  # no LoRA: the master dtype
    assert {p.dtype for p in plain.parameters()} == {torch.float32}
    base = {n.replace(".base_layer", ""): p for n, p in model.named_parameters() if not p.requires_grad}
    for name, param in plain.named_parameters():
        assert torch.equal(base[name], param.to(torch.bfloat16)), name

    warm_cfg, warm_precision = config("model.lora.rank=4", "model.lora.alpha=8", "trainer.warm_start.enabled=true")
    assert load_dtype(warm_cfg, warm_precision) == torch.float32
    sft_cfg, sft_precision = config("model.lora.rank=4", "model.lora.alpha=8", "algo=sft", "trainer.warm_start.enabled=true")
    assert load_dtype(sft_cfg, sft_precision) == torch.bfloat16  # SFT with LoRA: no warm start runs before
