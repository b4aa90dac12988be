"""Send chosen attention modules of a transformers decoder through a wrapper of their own attention function,
for the length of a `with` block. The audio-attention capture (`mapo.capture`) and the rollout's
shared-prompt decode (`mapo.kv_cache.SharedPromptKVCache`) use it.

How, and why this way: every transformers attention module looks its function up by
`self.config._attn_implementation` in the attention-function registry its modeling file uses. Inside the
block *only the chosen modules* get a read-through view of the shared text config (`ConfigView`) that
reports a private name, registered in that registry; its function calls

    wrapper(module, original, query, key, value, attention_mask, *args, **kwargs)

where `original` is the function the module would have called (`sdpa` or `eager`, whatever the model was
loaded with). The attention mask is built by the text model from its own config, which is never touched, so
the wrapper receives exactly the mask the original function would (a custom `_attn_implementation` on the
model config would instead need its own mask function, and silently get `attention_mask=None` without one —
FIELD-NOTES "Attention"). On exit (normal or exception) the original config objects are put back and the
private name leaves the registry; nothing stays installed. One override per module at a time.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

#: The attention implementations a wrapper can stand in front of: their functions take the mask formats
#: mapo prepares (bool for sdpa, additive for eager) and return (output [B, Q, H, dv], weights or None).
SUPPORTED_IMPLEMENTATIONS = ("sdpa", "eager")


class ConfigView:
    """Read-through view of a config that reports another attention implementation.

    Reads of every other attribute go to the shared config (so later changes stay visible) and writes go
    to it too; only `_attn_implementation` differs. `purpose` names the override that installed it.
    """

    def __init__(self, base: Any, attn_implementation: str, purpose: str) -> None:
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_attn_implementation", attn_implementation)
        object.__setattr__(self, "_override_purpose", purpose)

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "_base"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(object.__getattribute__(self, "_base"), name, value)


class AttentionOverride:
    """Context manager: inside it, each of `modules` calls `wrapper(module, original, query, key, value,
    attention_mask, *args, **kwargs)` instead of its attention function (see the module docstring).

    modules: attention modules (each with a `config`), e.g. the `self_attn` of chosen decoder layers.
    purpose: what the override is for, in errors and in the private registry name ("audio capture").
    labels: one name per module for errors (default "attention module i").
    """

    def __init__(self, modules: Sequence[nn.Module], wrapper: Callable, purpose: str,
                 labels: Sequence[str] | None = None) -> None:
        self.modules = list(modules)
        self.wrapper = wrapper
        self.purpose = purpose
        self.labels = list(labels) if labels is not None else [f"attention module {i}" for i in range(len(self.modules))]
        if len(self.labels) != len(self.modules):
            raise ValueError(f"{len(self.labels)} labels for {len(self.modules)} attention modules")
        self._name = f"mapo_{purpose.replace(' ', '_')}_{id(self):x}"
        self._originals: dict[nn.Module, Callable] = {}
        self._saved_configs: list[tuple[nn.Module, Any]] = []
        self._registries: list[Any] = []

    def __enter__(self) -> AttentionOverride:
        if self._saved_configs:
            raise RuntimeError(f"this {self.purpose} is already installed")
        try:
            self._install()
        except BaseException:
            self._uninstall()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._uninstall()

    def _install(self) -> None:
        for label, attn in zip(self.labels, self.modules):
            config = attn.config
            if isinstance(config, ConfigView):
                raise RuntimeError(f"{label} is already inside another {object.__getattribute__(config, '_override_purpose')}")
            implementation = config._attn_implementation
            if implementation not in SUPPORTED_IMPLEMENTATIONS:
                raise ValueError(
                    f"the {self.purpose} supports attn_implementation {list(SUPPORTED_IMPLEMENTATIONS)} for the text "
                    f"decoder; {label} uses {implementation!r}"
                )
            modeling_module = sys.modules[type(attn).__module__]
            registry = getattr(modeling_module, "ALL_ATTENTION_FUNCTIONS", ALL_ATTENTION_FUNCTIONS)
            eager_default = getattr(modeling_module, "eager_attention_forward", None)
            # The same lookup the attention module itself performs, so the wrapper gets what it would call.
            original = registry.get_interface(implementation, eager_default)
            if original is None:
                raise ValueError(f"{modeling_module.__name__} has no eager_attention_forward to fall back to")
            if not any(r is registry for r in self._registries):
                if self._name in registry:
                    raise RuntimeError(f"attention function name {self._name!r} is already registered")
                registry[self._name] = self._dispatch
                self._registries.append(registry)
            self._originals[attn] = original
            self._saved_configs.append((attn, config))
            attn.config = ConfigView(config, self._name, self.purpose)

    def _uninstall(self) -> None:
        for attn, config in reversed(self._saved_configs):
            attn.config = config
        self._saved_configs.clear()
        for registry in self._registries:
            if self._name in registry:
                del registry[self._name]
        self._registries.clear()
        self._originals.clear()

    def _dispatch(self, module: nn.Module, query, key, value, attention_mask, *args: Any, **kwargs: Any):
        original = self._originals.get(module)
        if original is None:
            raise RuntimeError(f"{type(module).__name__} called the {self.purpose} function but is not overridden")
        return self.wrapper(module, original, query, key, value, attention_mask, *args, **kwargs)
