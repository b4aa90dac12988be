"""The run's fault handlers in one bundle, built once by the training program and handed to the loops.

- `batches` (`data.guard.LoadableBatches`): rows whose audio fails to load mid-run are replaced the same
  way on every rank;
- `nonfinite` (`nonfinite.NonFiniteGuard`): a step with a non-finite loss or gradient is skipped; K in
  a row stop the run;
- `stop` (`interrupt.StopRequest`): SIGTERM/SIGINT end the run after the step, with a checkpoint;
- reward functions that fail are counted here (`add_reward_errors`) after `mapo.rewards` scored them 0.

`summary()` is what the run reports at its end (final_metrics.json, console): every fault met and how
often, alongside the data check's counts. Each collective here is one small all-reduce per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mapo import distributed as dist_utils
from mapo.data.guard import LoadableBatches
from mapo.interrupt import SignalFlag, StopRequest
from mapo.nonfinite import NonFiniteGuard


class Stopped(SystemExit):
    """A signal stopped the run after a checkpoint; the exit status is 128 + the signal number."""


@dataclass
class RunFaults:
    batches: LoadableBatches
    nonfinite: NonFiniteGuard
    stop: StopRequest
    ctx: object
    reward_errors: dict[str, int] = field(default_factory=dict)
    data_counts: dict[str, int] = field(default_factory=dict)  # from the pre-run manifest check

    @classmethod
    def for_run(cls, max_nonfinite_steps: int, ctx, load_clip, data_counts: dict[str, int] | None = None,
                flag: SignalFlag | None = None) -> "RunFaults":
        """Handlers whose collectives run over `ctx`'s ranks; `load_clip(path)` loads (and caches) a clip;
        `flag` is the process's installed `SignalFlag` (None: signals are not watched)."""
        def any_rank(x: torch.Tensor) -> torch.Tensor:
            return dist_utils.global_sum(x.to(ctx.device), ctx)

        return cls(
            batches=LoadableBatches(load_clip, any_rank, ctx.device),
            nonfinite=NonFiniteGuard(max_nonfinite_steps, any_rank),
            stop=StopRequest(flag, any_rank, ctx.device),
            ctx=ctx,
            data_counts=dict(data_counts or {}),
        )

    def step_decider(self, step: int, loss, rows: list[str]):
        """`norm -> bool` for `Phase.clip_and_step`: False (skip the optimizer step) when the loss or the
        gradient norm is non-finite on any rank. loss: a 0-d tensor, or a function returning the loss of
        the optimizer step being taken; step: the RL/SFT step (1-based); rows: this rank's row ids, for the log."""
        def decide(norm: torch.Tensor) -> bool:
            value = loss() if callable(loss) else loss
            return self.nonfinite.step_is_finite(step, torch.as_tensor(value), norm, rows)

        return decide

    def add_reward_errors(self, names: list[str], local_errors: dict[str, int]) -> dict[str, float]:
        """Sum this step's reward-function failures over ranks (every rank calls it); returns the
        per-step metrics ("faults/reward_errors/<name>") of the functions that failed anywhere."""
        counts = torch.tensor([float(local_errors.get(n, 0)) for n in names])
        counts = dist_utils.global_sum(counts.to(self.ctx.device), self.ctx).cpu().tolist()
        out = {}
        for name, count in zip(names, counts):
            if count:
                self.reward_errors[name] = self.reward_errors.get(name, 0) + int(count)
                out[f"faults/reward_errors/{name}"] = count
        return out

    def summary(self, clips_cut: int = 0) -> dict[str, int]:
        """Every count the run reports at its end (all ranks agree on them)."""
        out = dict(self.data_counts)
        out["data/clips_cut_while_loading"] = clips_cut
        out["faults/audio_rows_replaced"] = self.batches.skipped
        out["faults/nonfinite_steps_skipped"] = self.nonfinite.skipped
        for name, count in sorted(self.reward_errors.items()):
            out[f"faults/reward_errors/{name}"] = count
        return out

    def exit_if_stopped(self) -> None:
        """Raise `Stopped` with 128 + the signal number when a signal stopped the run."""
        if self.stop.stopped_by is not None:
            raise Stopped(self.stop.exit_code)
