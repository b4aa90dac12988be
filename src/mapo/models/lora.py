"""LoRA adapters (peft) on the language model, and the reference that is the same model with them off.

`add_lora(model, settings)` injects peft LoRA layers in place (`peft.inject_adapter_in_model`) into the
linear layers of the adapter's text model only (`model.lora.targets`: short module names such as
`[q_proj, v_proj]`, or `all-linear`; the LM head, the audio tower and the projector never get one).
The model object stays the one the family adapter knows, so `get_adapter(model)` and its part
accessors keep working; a targeted `nn.Linear` becomes a peft `Linear` holding the original as
`base_layer` and the adapter as `lora_A` ([rank, in]) and `lora_B` ([out, rank], zero at the start).

With LoRA only the adapters train (`mapo.phase.set_trainable`). The KL reference and the frozen
audio-ablated reference are then the same model with the adapters switched off (`adapters_off`): the
initial policy, without a second copy. At step 0 the adapters add exactly zero (lora_B = 0), so KL is 0.

Switching off sets peft's per-layer `_disable_adapters` flag directly rather than calling
`enable_adapters(False)`: the latter also flips `requires_grad` of the adapter weights, which FSDP2
caches in its unsharded parameters, so a toggle in the middle of training could leave a unit's
adapters without gradients. The flag is what peft's own forward reads (tested against a frozen copy).

`merged_state_dict` folds `scaling · B @ A` into each adapted weight (float32) for exports, with the
original key names, so an exported folder is a plain model. The memory plan counts what LoRA trains
from config.json alone (`mapo.plan.lora_parameters`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable

import torch
from torch import nn

from mapo.models.adapter import get_adapter

ADAPTER = "default"  # peft's adapter name; mapo uses one adapter
ALL_LINEAR = "all-linear"


def lora_enabled(settings) -> bool:
    """`model.lora.rank > 0` (settings: the config's `model.lora`, or None)."""
    return settings is not None and int(settings.rank) > 0


def check_lora_config(settings) -> None:
    """Clear errors for LoRA settings that cannot work (before any model loads)."""
    if settings.rank < 0:
        raise ValueError(f"model.lora.rank={settings.rank}: must be 0 (off) or a positive rank")
    if settings.rank == 0:
        return
    if not settings.alpha > 0:
        raise ValueError(f"model.lora.alpha={settings.alpha}: must be > 0 (the adapter is scaled by alpha / rank)")
    if not 0 <= settings.dropout < 1:
        raise ValueError(f"model.lora.dropout={settings.dropout}: must be in [0, 1)")
    targets = settings.targets
    if isinstance(targets, str):
        if targets != ALL_LINEAR:
            raise ValueError(f"model.lora.targets={targets!r}: a list of module names (e.g. [q_proj, v_proj]) or {ALL_LINEAR!r}")
    elif not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"model.lora.targets={targets!r}: a non-empty list of module names, or {ALL_LINEAR!r}")


def _text_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(full name in `model`, module) of every nn.Linear inside the adapter's text model."""
    text = get_adapter(model).text_model(model)
    prefix = next(name for name, module in model.named_modules() if module is text)
    return [(f"{prefix}.{name}", m) for name, m in text.named_modules() if isinstance(m, nn.Linear)]


def target_module_names(model: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Full names of the text model's linear layers that `targets` selects (see the module docstring)."""
    linears = [name for name, _ in _text_linears(model)]
    if isinstance(targets, str):
        if targets != ALL_LINEAR:
            raise ValueError(f"model.lora.targets={targets!r}: a list of module names or {ALL_LINEAR!r}")
        return linears
    short = sorted({name.rsplit(".", 1)[-1] for name in linears})
    unknown = [t for t in targets if t not in short]
    if unknown:
        raise ValueError(f"model.lora.targets: {unknown} are not linear layers of the language model; valid: {', '.join(short)}")
    return [name for name in linears if name.rsplit(".", 1)[-1] in set(targets)]


def add_lora(model: nn.Module, settings) -> nn.Module:
    """Inject LoRA layers (rank, alpha, dropout, targets from `settings`) in place; returns `model` itself."""
    from peft import LoraConfig, inject_adapter_in_model

    check_lora_config(settings)
    if has_lora(model):
        raise ValueError("the model already has LoRA layers")
    config = LoraConfig(
        r=int(settings.rank), lora_alpha=float(settings.alpha), lora_dropout=float(settings.dropout),
        target_modules=target_module_names(model, settings.targets), bias="none",
    )
    injected = inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    assert injected is model  # peft mutates in place; the adapter-based code keeps this object
    return model


def lora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, layer) of every peft LoRA layer in `model`."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def has_lora(model: nn.Module) -> bool:
    return next(lora_layers(model), None) is not None


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LoRA weights (lora_A, lora_B of every layer): what trains when LoRA is on."""
    return [p for _, layer in lora_layers(model) for part in (layer.lora_A, layer.lora_B) for p in part.parameters()]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Run `model` as its base (every LoRA layer returns its base layer's output); restored on exit."""
    layers = [layer for _, layer in lora_layers(model)]
    before = [layer._disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = True  # see the module docstring for why not enable_adapters(False)
    try:
        yield model
    finally:
        for layer, state in zip(layers, before):
            layer._disable_adapters = state


def adapters_off(call: Callable[..., Any]) -> Callable[..., Any]:
    """A `call(fn, *args)` (e.g. the policy's ModelRunner) turned into the reference's: the same model
    with its adapters switched off for the duration of `fn`. Under FSDP the forward still goes
    through the runner, so the sharded weights are gathered as usual."""

    def reference_call(fn, *args, **kwargs):
        def with_adapters_off(model, *a, **k):
            with adapters_disabled(model):
                return fn(model, *a, **k)

        return call(with_adapters_off, *args, **kwargs)

    return reference_call


def merged_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (full, names as in `model.state_dict()`) with every LoRA layer folded into its base:
    W + scaling · B @ A and the base bias under the original names; adapter entries dropped.
    Computed in float32. A model without LoRA layers gets `state` back as a dict."""
    out = dict(state)
    for name, layer in lora_layers(model):
        if getattr(layer, "fan_in_fan_out", False):
            raise NotImplementedError(f"{name}: LoRA on a fan_in_fan_out layer is not merged by mapo")
        base = out.pop(f"{name}.base_layer.weight")
        a = out.pop(f"{name}.lora_A.{ADAPTER}.weight").float()
        b = out.pop(f"{name}.lora_B.{ADAPTER}.weight").float()
        out[f"{name}.weight"] = base.float() + layer.scaling[ADAPTER] * (b @ a)
        if f"{name}.base_layer.bias" in out:
            out[f"{name}.bias"] = out.pop(f"{name}.base_layer.bias")
    leftover = [k for k in out if ".lora_" in k or ".base_layer." in k]
    if leftover:
        raise ValueError(f"LoRA entries without a layer to merge into: {leftover[:5]}")
    return out
