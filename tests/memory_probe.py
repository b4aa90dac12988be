"""Peak bytes of CPU tensors during a piece of code: every storage an op creates is counted until it is
freed (a TorchDispatchMode + a finaliser per storage). The CPU allocator keeps no statistics, and the
process RSS mixes in the interpreter and libraries; this counts exactly what the memory plan models."""

import weakref
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

class PeakTracker(TorchDispatchMode):
    """Live bytes of every tensor storage created by an op inside the mode (plus `baseline`, the bytes
    alive before: weights, optimizer state); `peak` is the maximum. Backward ops are seen too (the
    autograd engine carries the mode to the thread that runs them)."""

    def __init__(self, baseline: int = 0):
        super().__init__()
        self.live = baseline
        self.peak = baseline
        self.seen = {}

    def _free(self, key, n):
        self.live -= n
        self.seen.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                st = t.untyped_storage()
                key = st._cdata
                if key in self.seen:
                    continue
                n = st.nbytes()
                self.seen[key] = n
                self.live += n
                weakref.finalize(st, self._free, key, n)
        self.peak = max(self.peak, self.live)
        return out

