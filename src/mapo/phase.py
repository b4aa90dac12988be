"""One optimisation phase (the warm start, SFT or RL): the model behind its runner, its optimizer and
learning-rate schedule, its data order, and the checkpoints that save and restore all of them.

`set_trainable` decides which parameters train (the audio tower / projector may be frozen); the model
adapter names those parts, so nothing here depends on the model family.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mapo import distributed as dist_utils
from mapo.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from mapo.config import MapoConfig
from mapo.data.sampler import EpochSampler
from mapo.models.adapter import get_adapter
from mapo.optim import build_optimizer, build_scheduler


def set_trainable(model: torch.nn.Module, cfg: MapoConfig, everything: bool) -> None:
    """Freeze the audio tower / projector as configured (the warm start trains everything); parameters
    the architecture fixes (e.g. a sinusoid table) never train."""
    adapter = get_adapter(model)
    model.requires_grad_(True)
    if not everything:
        if cfg.model.freeze_audio_tower:
            adapter.audio_tower(model).requires_grad_(False)
        projector = adapter.audio_projector(model)
        if cfg.model.freeze_projector and projector is not None:
            projector.requires_grad_(False)
    for p in adapter.fixed_parameters(model):
        p.requires_grad_(False)


class Phase:
    """One optimisation phase (warm start or RL): the model behind its runner, optimizer, schedule, data order."""

    def __init__(self, name: str, runner, model, lr: float, steps: int, warmup: int, schedule: str, cfg: MapoConfig, items):
        self.name, self.runner, self.model, self.steps = name, runner, model, steps
        self.optimizer = build_optimizer(model, lr, cfg.trainer.weight_decay, tuple(cfg.trainer.betas))
        self.scheduler = build_scheduler(self.optimizer, warmup, steps, schedule)
        self.sampler = EpochSampler(items, seed=cfg.trainer.seed)
        self.step = 0

    def clip_and_step(self, grad_clip: float, should_step=None) -> torch.Tensor:
        """Clip the gradients, step the optimizer and the schedule, zero the gradients; returns the norm.

        should_step: optional `norm -> bool` (e.g. the non-finite guard); False skips the optimizer step
        (the schedule still advances, so the learning rate stays tied to the step count).
        """
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
        if should_step is None or should_step(norm):
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def save(self, run_dir: Path, ctx, keep_last: int) -> None:
        model_state = {k.removeprefix("model."): v for k, v in dist_utils.full_model_state(self.runner, ctx).items()}
        opt_state = dist_utils.full_optimizer_state(self.runner, self.optimizer, ctx)
        if ctx.is_main:
            save_checkpoint(
                run_dir, self.step, model_state, opt_state, self.scheduler.state_dict(),
                {"step": self.step, "phase": self.name, "sampler": self.sampler.state_dict()},
                keep_last=keep_last, rng=capture_rng(),
            )
        if ctx.enabled:
            torch.distributed.barrier()

    def resume(self, path: Path, ctx) -> None:
        ckpt = load_checkpoint(path)
        dist_utils.load_full_model_state(self.runner, {f"model.{k}": v for k, v in ckpt.model_state.items()}, ctx)
        dist_utils.load_full_optimizer_state(self.runner, self.optimizer, ckpt.optimizer_state, ctx)
        self.scheduler.load_state_dict(ckpt.scheduler_state)
        self.sampler.load_state_dict(ckpt.trainer_state["sampler"])
        self.step = ckpt.step
        restore_rng(ckpt.rng)


