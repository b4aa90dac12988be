"""Precision: float32 master weights move by the hand-computed AdamW step where bf16 storage would not;
the runner computes in the compute dtype; frozen parts are stored in the frozen dtype."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from toy_model import make_batch, tiny_model

from mapo.distributed import ModelRunner
from mapo.models.adapter import get_adapter
from mapo.models.embed import position_ids_from_mask
from mapo.optim import build_optimizer
from mapo.precision import (
    Precision,
    check_precision_config,
    frozen_copy,
    reference_staging_device,
    resolve_precision,
    store_frozen,
)
from mapo.rollout import generate_rollout
from mapo.scoring import score_tokens

torch.set_num_threads(1)

F32, BF16 = torch.float32, torch.bfloat16


def model_cfg(master="float32", compute="auto", frozen="auto"):
    return SimpleNamespace(master_dtype=master, compute_dtype=compute, frozen_dtype=frozen)


def test_auto_dtypes_and_refused_settings():
    assert resolve_precision(model_cfg(), torch.device("cpu")) == Precision(F32, F32, F32)
    assert resolve_precision(model_cfg(), torch.device("cuda", 0)) == Precision(F32, BF16, BF16)  # no CUDA needed
    assert resolve_precision(model_cfg(frozen="float32"), torch.device("cuda", 0)) == Precision(F32, BF16, F32)
    assert resolve_precision(model_cfg(compute="bf16"), torch.device("cpu")) == Precision(F32, BF16, BF16)
    with pytest.raises(ValueError, match="master_dtype='bfloat16'.*round away"):
        check_precision_config(model_cfg(master="bfloat16"))
    with pytest.raises(ValueError, match="compute_dtype='float16'.*loss scaling"):
        check_precision_config(model_cfg(compute="float16"))
    with pytest.raises(ValueError, match="frozen_dtype='bfloat16' must be the compute dtype"):
        check_precision_config(model_cfg(compute="float32", frozen="bfloat16"))
    with pytest.raises(ValueError, match="frozen_dtype='bfloat16' resolves to torch.bfloat16, neither"):
        resolve_precision(model_cfg(frozen="bfloat16"), torch.device("cpu"))  # auto compute is float32 on CPU
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        check_precision_config(model_cfg(compute="float8"))


def lm_loss(model, ids, mask):
    """Mean log-prob of token 0 after each position: a forward through the adapter's parts."""
    adapter = get_adapter(model)
    hidden = adapter.run_text_model(model, adapter.embed_tokens(model)(ids), mask, position_ids_from_mask(mask))
    logits = adapter.lm_head(model)(hidden)
    return logits.float().log_softmax(-1)[..., 0].mean(), logits.dtype


DEVICES = ["cpu"] + [pytest.param("cuda", marks=pytest.mark.gpu)] * torch.cuda.is_available()


@pytest.mark.parametrize("device", DEVICES)
def test_fp32_master_weights_take_the_adamw_step_that_bf16_storage_rounds_away(device):
    lr, wd, betas, eps = 1e-6, 0.1, (0.9, 0.95), 1e-8
    model = tiny_model(seed=3).to(device)
    # autocast to bf16: what model.compute_dtype=auto gives on CUDA, asked for explicitly on CPU
    runner = ModelRunner(model, resolve_precision(model_cfg(compute="bfloat16"), torch.device(device)))
    batch = {k: v.to(device) for k, v in make_batch((0, 1, 2)).items()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer(model, lr, wd, betas)
    loss, logits_dtype = runner(lm_loss, batch["input_ids"], batch["attention_mask"])
    loss.backward()
    assert logits_dtype == BF16  # the matmuls ran in the compute dtype ...
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    assert {g.dtype for g in grads.values()} == {F32}  # ... the gradients and weights stay float32
    optimizer.step()
    assert {s["exp_avg"].dtype for s in optimizer.state.values()} == {F32}

    moved_fp32 = moved_bf16 = total = 0
    for name, p in model.named_parameters():
        if name not in grads:
            continue
        w0, g = before[name].double(), grads[name].double()
        decay = wd if p.ndim >= 2 else 0.0  # build_optimizer: no decay on biases and norms
        # AdamW's first step, by hand: m̂ = g, v̂ = g², so the Adam update is lr·g/(|g| + eps) ≈ lr·sign(g);
        # the decoupled decay multiplies the weight by (1 − lr·wd) first.
        expected = w0 * (1 - lr * decay) - lr * g / (g.abs() + eps)
        spacing = torch.finfo(F32).eps * w0.abs().clamp_min(1e-3)  # a few float32 ulps of the weight
        assert (p.detach().double() - expected).abs().le(2 * spacing + 1e-12).all(), name
        live = g.abs() > 1e-4  # weights whose step is essentially lr·sign(g)
        moved_fp32 += int((p.detach() != before[name])[live].sum())
        # The same update applied to bf16 storage: w_bf16 − lr·sign(g) rounds back to w_bf16.
        w_bf16 = before[name].to(BF16)
        stepped = (w_bf16.double() * (1 - lr * decay) - lr * g / (g.abs() + eps)).to(BF16)
        moved_bf16 += int((stepped != w_bf16)[live].sum())
        total += int(live.sum())
    assert total > 1000
    assert moved_fp32 / total > 0.99  # float32: every live weight moved
    assert moved_bf16 / total < 0.05  # bf16 storage: almost all of them rounded away


def test_runner_without_mixed_precision_computes_in_float32():
    model = tiny_model(seed=0)
    batch = make_batch((1,))
    runner = ModelRunner(model, Precision(F32, F32, F32))
    _, dtype = runner(lm_loss, batch["input_ids"], batch["attention_mask"])
    assert dtype == F32
    # autocast only with a compute dtype below the masters (one process; FSDP: tests/test_distributed.py)
    assert (runner.autocast, ModelRunner(model).autocast, ModelRunner(model, Precision(F32, BF16, BF16)).autocast) == (
        False, False, True)


def test_the_reference_is_staged_in_host_memory_only_under_fsdp_on_cuda():
    """One rule for `mapo.train` and the memory plan: several CUDA processes stage the copy on the host."""
    assert reference_staging_device(2, "cuda") == torch.device("cpu")
    assert reference_staging_device(8, "cuda") == torch.device("cpu")
    assert reference_staging_device(1, "cuda") is None
    assert reference_staging_device(2, "cpu") is None
    assert reference_staging_device(1, "cpu") is None


def test_frozen_copy_can_be_staged_on_another_device():
    """device=: the copy's parameters go there in the frozen dtype (what `mapo.train` does with host memory
    before FSDP shards the reference); its buffers, and the policy, stay where they were."""
    model = tiny_model(seed=1)
    staged = frozen_copy(model, BF16, device="meta")
    assert {(p.device.type, p.dtype) for p in staged.parameters()} == {("meta", BF16)}
    assert sum(p.numel() for p in staged.parameters()) == sum(p.numel() for p in model.parameters())
    assert {b.device.type for b in staged.buffers()} == {b.device.type for b in model.buffers()} == {"cpu"}
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("cpu", F32)}


def test_frozen_copy_and_frozen_tower_are_stored_in_the_frozen_dtype_and_still_score():
    model = tiny_model(seed=1, projector_gain=50.0)
    reference = frozen_copy(model, BF16)
    assert {p.dtype for p in reference.parameters()} == {BF16} and not any(p.requires_grad for p in reference.parameters())
    assert {p.dtype for p in model.parameters()} == {F32}  # the policy is untouched
    assert torch.equal(reference.lm_head.weight, model.lm_head.weight.to(BF16))  # values cast, storage separate
    assert reference.lm_head.weight.data_ptr() != model.lm_head.weight.data_ptr()
    adapter = get_adapter(model)
    adapter.audio_tower(model).requires_grad_(False)
    assert store_frozen(model, BF16) == len(list(adapter.audio_tower(model).parameters()))
    assert {p.dtype for p in adapter.audio_tower(model).parameters()} == {BF16}
    assert {p.dtype for p in adapter.text_model(model).parameters()} == {F32}

    # Rollout and scoring of the bf16-stored parts run under the runner's autocast and agree with an
    # all-float32 copy to bf16 accuracy (log-probs of a ~100-token vocabulary).
    precision = Precision(F32, BF16, BF16)
    fp32 = tiny_model(seed=1, projector_gain=50.0)
    rollout = ModelRunner(model, precision)(
        generate_rollout, make_batch(), group_size=2, max_new_tokens=6, eos_token_id=1, pad_token_id=0, do_sample=False
    )
    mixed = ModelRunner(reference, precision)(score_tokens, rollout, audio="recompute", temperature=1.0)
    exact = score_tokens(fp32, rollout, audio="recompute", temperature=1.0)
    assert mixed.logprobs.dtype == F32
    assert torch.allclose(mixed.logprobs, exact.logprobs, atol=0.1)
    assert not torch.equal(mixed.logprobs, exact.logprobs)  # it did run in bf16
