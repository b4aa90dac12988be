"""Which dtype holds what, and the one place compute precision is switched on (DESIGN §10).

Three dtypes, named in the model config:

- `model.master_dtype` (float32): the trainable weights and, through them, the gradients and AdamW's
  moments. Small updates must survive: at lr 1e-6 an AdamW step moves a weight by ~1e-6, while bf16's
  spacing near 0.02 is ~1.2e-4, so a bf16 weight would not move at all (FIELD-NOTES, tested).
- `model.compute_dtype` (`auto` = bfloat16 on CUDA, float32 on CPU): the dtype of the matmuls. On one
  process it is `torch.autocast` around every model call (`compute_context`, entered by
  `ModelRunner`); under FSDP2 it is the `MixedPrecisionPolicy` (param_dtype = compute, reduce_dtype =
  float32), which gathers the weights in the compute dtype, so no autocast is needed there.
- `model.frozen_dtype` (`auto` = the compute dtype): storage of weights that never train: the frozen
  reference copy, a frozen audio tower, the LoRA base weights. It must be the compute or the master
  dtype, so that a frozen weight meets inputs it can multiply (autocast casts both to the compute dtype).

Rollout, scoring, evaluation and the update all call the model through a `ModelRunner`, so they all
run under the same compute precision. Log-probabilities are taken from logits cast to float32 by the
callers (rollout / scoring).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import nn

from mapo.models.loader import resolve_dtype

#: What each field accepts (names as in mapo.models.loader.DTYPES).
MASTER_DTYPES = ("float32",)
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")
FROZEN_DTYPES = ("auto", "float32", "bfloat16")


@dataclass(frozen=True)
class Precision:
    """Resolved dtypes of a run (see the module docstring)."""

    master: torch.dtype
    compute: torch.dtype
    frozen: torch.dtype

    @property
    def mixed(self) -> bool:
        """True when the matmuls run in a lower dtype than the master weights."""
        return self.compute != self.master

    def names(self) -> dict[str, str]:
        """{"master": "float32", ...}: recorded in checkpoints so an export stores what training stored."""
        return {k: str(getattr(self, k)).removeprefix("torch.") for k in ("master", "compute", "frozen")}


def _canonical(name: str) -> str:
    return str(resolve_dtype(name)).removeprefix("torch.") if name != "auto" else "auto"


def _field(model_cfg, key: str) -> str:
    """The canonical name of `model.<key>`, or an error naming the key."""
    value = getattr(model_cfg, key)
    try:
        return _canonical(value)
    except ValueError as err:
        raise ValueError(f"model.{key}={value!r}: {err}") from None


def check_precision_config(model_cfg) -> None:
    """Raise a clear error for a precision setting mapo does not train with (before any model loads)."""
    master, compute, frozen = (_field(model_cfg, key) for key in ("master_dtype", "compute_dtype", "frozen_dtype"))
    if master not in MASTER_DTYPES:
        raise ValueError(
            f"model.master_dtype={model_cfg.master_dtype!r}: trainable weights and optimizer state must be float32 "
            "(at lr 1e-6 AdamW's updates are smaller than bf16's spacing and round away); lower the compute "
            "precision with model.compute_dtype instead"
        )
    if compute not in COMPUTE_DTYPES:
        raise ValueError(
            f"model.compute_dtype={model_cfg.compute_dtype!r}: valid are {', '.join(COMPUTE_DTYPES)} "
            "(float16 would need loss scaling, which mapo does not do)"
        )
    if frozen not in FROZEN_DTYPES:
        raise ValueError(f"model.frozen_dtype={model_cfg.frozen_dtype!r}: valid are {', '.join(FROZEN_DTYPES)}")
    if "auto" not in (frozen, compute) and frozen not in (master, compute):
        raise ValueError(
            f"model.frozen_dtype={model_cfg.frozen_dtype!r} must be the compute dtype ({model_cfg.compute_dtype}) "
            f"or the master dtype ({model_cfg.master_dtype}): a frozen weight in another dtype cannot meet the activations"
        )


def resolve_precision(model_cfg, device: torch.device) -> Precision:
    """The run's dtypes on `device` (`auto` compute = bfloat16 on CUDA, float32 elsewhere)."""
    check_precision_config(model_cfg)
    master = resolve_dtype(model_cfg.master_dtype)
    if model_cfg.compute_dtype == "auto":
        compute = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    else:
        compute = resolve_dtype(model_cfg.compute_dtype)
    frozen = compute if model_cfg.frozen_dtype == "auto" else resolve_dtype(model_cfg.frozen_dtype)
    if frozen not in (master, compute):
        raise ValueError(
            f"model.frozen_dtype={model_cfg.frozen_dtype!r} resolves to {frozen}, neither the compute ({compute}) "
            f"nor the master ({master}) dtype on {device}"
        )
    return Precision(master=master, compute=compute, frozen=frozen)


def compute_context(precision: Precision | None, device: torch.device):
    """The context every model call runs in: autocast to the compute dtype when it is lower than the
    master dtype, nothing otherwise (and nothing under FSDP2, whose policy already does it)."""
    if precision is None or not precision.mixed:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=precision.compute)


def _cast_parameters(module: nn.Module, dtype: torch.dtype, trainable: bool) -> int:
    """Cast every floating parameter of `module` whose requires_grad is `trainable` to `dtype`, in place
    (buffers untouched); returns how many."""
    count = 0
    for param in module.parameters():
        if param.requires_grad == trainable and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
            count += 1
    return count


def store_frozen(module: nn.Module, dtype: torch.dtype) -> int:
    """Cast every parameter of `module` that does not require grad to `dtype`, in place; returns how many.

    Only parameters: floating buffers (e.g. rotary inverse frequencies) keep their precision.
    Call before FSDP wraps the module.
    """
    return _cast_parameters(module, dtype, trainable=False)


def store_trainable(module: nn.Module, dtype: torch.dtype) -> int:
    """Cast every floating parameter of `module` that requires grad to `dtype` (the master dtype), in place;
    returns how many. peft injects LoRA adapters in their base layer's dtype, which is the frozen dtype when
    the base was loaded in it (`policy_load_dtype`). Call before FSDP wraps the module."""
    return _cast_parameters(module, dtype, trainable=True)


def policy_load_dtype(lora: bool, warm_start: bool, master, frozen):
    """The dtype the policy loads in (torch dtypes or their names alike): the master one, except with LoRA and
    no warm start before it, when no loaded weight ever trains (only the adapters `prepare_policy` injects
    do, brought to the master dtype by `store_trainable`), so the base loads straight in the frozen one: every
    rank holds the whole model before FSDP shards it (Qwen3-Omni-30B: ~60 GB in bf16 against ~120 GB in
    fp32). One rule for `mapo.train` and the memory plan's load phase."""
    return frozen if lora and not warm_start else master


def reference_staging_device(world_size: int, device_type: str) -> torch.device | None:
    """Where `frozen_copy` stages the frozen reference: host memory when FSDP will shard it on CUDA
    (several processes), else None (where the policy is). One rule for `mapo.train` and the memory plan
    (`mapo.plan.PlanInputs.staged_reference`); on CPU processes the copy is whole in each process anyway."""
    return torch.device("cpu") if world_size > 1 and device_type == "cuda" else None


def frozen_copy(model: nn.Module, dtype: torch.dtype, device: torch.device | str | None = None) -> nn.Module:
    """A deep copy of `model` in eval mode with every parameter frozen and stored in `dtype`.

    The copy's parameters are cast one by one (a pre-filled deepcopy memo), so a float32 model never
    exists twice: at 7B that is the difference between 28 GB and 14 GB extra for a bf16 reference.
    device: where the copy's parameters go (None: where the model's are; buffers stay with the model's).
    `mapo.train` stages the copy in host memory when FSDP will shard it: `fully_shard` moves each unit to
    the GPU only as it shards that unit, so the whole copy never sits on a GPU beside the whole policy.
    """
    memo = {id(p): nn.Parameter(p.detach().to(device=device, dtype=dtype, copy=True), requires_grad=False)
            for p in model.parameters()}
    return copy.deepcopy(model, memo).eval()
