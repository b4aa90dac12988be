"""The rollout's decode steps through a compiled text decoder (`rollout.compile`).

Why: a decode step at Qwen2-Audio-7B widths runs ~40 small kernels per layer besides its matmuls and
attention (norms, rotary, residual adds, casts). On an H200 (2026-11-28, 64 rows, prompt 512, CUDA graph on)
those were 2.2 ms of "other" kernels and 0.8 ms of copies in a 12.5 ms eager step. Under
`torch.compile(dynamic=True)` Inductor fuses them: the step went from 14.0-14.6 ms to 12.7 ms (1.82x the
bandwidth bound instead of ~2.0x) in two runs (`experiments/gpu/decode_compile.py`, `followup_20261128.py`).
The first rollout pays the compile: 15-35 s there.

How: while `compiled_text_decoder` is entered, the text decoder module's `forward` is an instance attribute
holding `torch.compile` of its own forward; leaving restores the class's. The prefill runs before the context
is entered, so it stays eager and only the one-token steps are compiled. A `dynamic=True` compile serves
every cache length, batch and layer after a few recompiles at the start (3 for the toy decoders, whatever
their depth; see the comments in `compiled_text_decoder`). The KV-cache writes (`StaticKVCache.update`,
`SharedPromptKVCache.update`) stay eager, under `torch.compiler.disable`. Their in-place `index_copy_` into
the cache buffers, graph inputs, would otherwise be functionalised; unless Inductor re-inplaced it, the step
would copy whole buffers (at 7B widths gigabytes per step). That costs a graph break per layer, and our CUDA
graph replays both sides of it. Compiled code is cached by torch per code object, so later rollouts, and
every rollout of the same process, reuse it.

Not for FSDP runs: their parameter hooks run inside every forward (the rollout warns and stays eager). On CPU
the compiled decoder made audio-prompt rollouts of the tiny model slower (RESULTS.md, 2026-11-28), so the
option is off by default and meant for CUDA.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from mapo.kv_cache import SharedPromptKVCache, StaticKVCache

#: Variants dynamo may compile per code object while decoding (its default is 8; see `compiled_text_decoder`).
RECOMPILE_LIMIT = 64
#: The cache classes whose `update` (the in-place write) stays out of the compiled graph.
EAGER_CACHE_WRITES = (StaticKVCache, SharedPromptKVCache)


@contextmanager
def compiled_text_decoder(text_model: nn.Module, backend: str = "inductor") -> Iterator[nn.Module]:
    """While inside, calls of `text_model` run its forward under `torch.compile(dynamic=True, backend=backend)`,
    with the KV-cache writes left eager (see the module docstring). Yields text_model."""
    own = text_model.__dict__.get("forward")  # an instance attribute already there (restored as it was)
    writes = {cls: cls.__dict__["update"] for cls in EAGER_CACHE_WRITES}
    text_model.forward = torch.compile(own or type(text_model).forward.__get__(text_model), dynamic=True,
                                       backend=backend)
    for cls, update in writes.items():
        cls.update = torch.compiler.disable(update)
    try:
        # Each layer's attention resumes after its cache write in a frame of its own, which dynamo would
        # specialise on `self.layer_idx`: one recompile per layer, and past `recompile_limit` (8) the deeper
        # layers would silently run eager (seen at 12 toy layers: 11 recompiles; with this, 3 for any depth).
        # transformers' `deprecate_kwarg` wrapper is one code object around many forwards (model, layer,
        # attention...), each a variant of its frame: the tiny model alone reached the limit of 8 there.
        limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        with torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True, recompile_limit=limit):
            yield text_model
    finally:
        for cls, update in writes.items():
            cls.update = update
        if own is None:
            del text_model.forward
        else:
            text_model.forward = own
