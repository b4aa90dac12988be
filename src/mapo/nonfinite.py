"""Skip an optimizer step whose loss or gradient is not finite; stop after K such steps in a row.

One NaN in a loss or gradient, applied by AdamW, turns every weight it touches into NaN and the run is
lost from then on. The guard looks at the step's loss and global gradient norm before the optimizer
steps: when either is NaN/inf on any rank it says "skip" (the caller zeroes the gradients and does not
step the optimizer), logs the step and the rows of the batch, and counts. After `max_consecutive`
skipped steps in a row it raises `NonFiniteError`: something is broken for good, and stopping before a
checkpoint is written keeps the last good checkpoint the newest one.

The decision is taken from one all-reduced flag, so every rank skips or steps together.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


class NonFiniteGuard:
    """Tracks consecutive non-finite steps.

    max_consecutive: K ≥ 1; the K-th non-finite step in a row raises NonFiniteError.
    any_rank:        a 0-d float tensor → its sum over ranks (identity on one process).
    """

    def __init__(self, max_consecutive: int, any_rank: Callable[[torch.Tensor], torch.Tensor] = lambda x: x) -> None:
        if max_consecutive < 1:
            raise ValueError(f"trainer.max_nonfinite_steps must be ≥ 1, got {max_consecutive}")
        self.max_consecutive, self.any_rank = max_consecutive, any_rank
        self.consecutive = 0
        self.skipped = 0  # non-finite steps skipped in this process's run so far

    def step_is_finite(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, rows: Sequence[str] = ()) -> bool:
        """False when `loss` or `grad_norm` (0-d tensors) is non-finite on any rank; then logs and counts.

        step: the optimizer step about to be taken (1-based); rows: ids of this rank's rows, for the log.
        Raises NonFiniteError on the `max_consecutive`-th non-finite step in a row.
        """
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: clip_grad_norm_ returns a (replicated) DTensor
            grad_norm = grad_norm.full_tensor()
        grad_norm = grad_norm.detach()
        bad_here = ~(torch.isfinite(loss.detach().to(grad_norm.device)) & torch.isfinite(grad_norm))
        bad = float(self.any_rank(bad_here.to(grad_norm.device, torch.float32).reshape(()))) > 0
        if not bad:
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.skipped += 1
        shown = ", ".join(map(str, list(rows)[:8])) + (" …" if len(rows) > 8 else "")
        where = f"loss {float(loss):.4g}, grad norm {float(grad_norm):.4g}" if bool(bad_here) else "on another rank"
        log.warning("step %d: non-finite loss or gradient (%s); optimizer step skipped (%d in a row, limit %d); "
                    "batch rows: %s", step, where, self.consecutive, self.max_consecutive, shown)
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"step {step}: {self.consecutive} consecutive steps with a non-finite loss or gradient "
                f"(trainer.max_nonfinite_steps={self.max_consecutive}); stopping without a new checkpoint, so "
                "the last checkpoint written is the last good one. Lower the learning rate or check the data."
            )
        return False
