"""One optimisation phase (the warm start, SFT or RL): the model behind its runner, its optimizer and
learning-rate schedule, its data order, and the checkpoints that save and restore all of them.

`set_trainable` decides which parameters train (the audio tower / projector may be frozen); the model
adapter names those parts, so nothing here depends on the model family.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import torch

from mapo.checkpoint import TrainingState, load_checkpoint, read_trainer_state, restore_rng, save_checkpoint
from mapo.config import MapoConfig
from mapo.data.sampler import EpochSampler
from mapo.models import lora as lora_utils
from mapo.models.adapter import get_adapter
from mapo.optim import build_optimizer, build_scheduler
from mapo.precision import Precision, store_frozen, store_trainable
from mapo.run_logging import redact_secrets


def set_trainable(model: torch.nn.Module, cfg: MapoConfig, everything: bool) -> None:
    """Freeze the audio tower / projector as configured (the warm start trains everything); parameters
    the architecture fixes (e.g. a sinusoid table) never train. A model with LoRA layers trains its
    adapters and nothing else, so that switching them off gives back the initial model exactly."""
    if lora_utils.has_lora(model):
        model.requires_grad_(False)
        for p in lora_utils.adapter_parameters(model):
            p.requires_grad_(True)
        return
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


def prepare_policy(model: torch.nn.Module, cfg: MapoConfig, precision: Precision, everything: bool) -> torch.nn.Module:
    """Make a loaded model the policy a phase trains: add LoRA layers when `model.lora.rank > 0`, choose
    what trains (`set_trainable`), store the frozen rest (e.g. a frozen audio tower, the LoRA base
    weights) in the frozen dtype and what trains in the master dtype (LoRA adapters injected into a base
    loaded in the frozen dtype). Training and `make export` both go through it, so an export rebuilds
    exactly what was trained. Returns the same model object."""
    if lora_utils.lora_enabled(cfg.model.lora):
        lora_utils.add_lora(model, cfg.model.lora)
    set_trainable(model, cfg, everything=everything)
    store_frozen(model, precision.frozen)  # e.g. a frozen audio tower
    store_trainable(model, precision.master)
    return model


class Phase:
    """One optimisation phase (warm start or RL): the model behind its runner, optimizer, schedule, data order."""

    def __init__(self, name: str, runner, model, lr: float, steps: int, warmup: int, schedule: str, cfg: MapoConfig, items,
                 optimizer_steps_per_step: int = 1):
        # `steps` and `warmup` count phase steps (RL steps = rollouts); the schedule advances once per
        # optimizer step, `optimizer_steps_per_step` of them per phase step (PPO mini-batches, passes).
        self.name, self.runner, self.model, self.steps = name, runner, model, steps
        self.optimizer = build_optimizer(model, lr, cfg.trainer.weight_decay, tuple(cfg.trainer.betas))
        self.scheduler = build_scheduler(self.optimizer, warmup * optimizer_steps_per_step, steps * optimizer_steps_per_step, schedule)
        self.sampler = EpochSampler(items, seed=cfg.trainer.seed)
        self.step = 0
        # Frozen weights are not saved: resume and export rebuild them from the run config kept here,
        # and refuse a resume whose phase or LoRA settings differ (the saved keys would not fit), or whose
        # optimizer steps per phase step differ (the schedule's position would be misplaced).
        self.run_config = dataclasses.asdict(cfg)
        self.must_match = {"phase": name, "lora": self.run_config["model"].get("lora"),
                           "optimizer_steps_per_step": optimizer_steps_per_step}

    def clip_and_step(self, grad_clip: float, should_step=None) -> torch.Tensor:
        """Clip the gradients, step the optimizer and the schedule, zero the gradients; returns the norm.

        should_step: optional `norm -> bool` (e.g. the non-finite guard); False skips the optimizer step
        (the schedule still advances, so the learning rate stays tied to the step count).
        """
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
        stepped = should_step is None or should_step(norm)
        if stepped:
            self.optimizer.step()
        with warnings.catch_warnings():  # torch warns when the very first optimizer step was the skipped one
            if not stepped:
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def save(self, run_dir: Path, ctx, keep_last: int) -> Path:
        """Checkpoint this phase (every rank: each writes its own shards; see `mapo.checkpoint`)."""
        precision = getattr(self.runner, "precision", None)
        trainer_state = {
            "step": self.step, "sampler": self.sampler.state_dict(), **self.must_match,
            "precision": precision.names() if precision is not None else None,
            "config": redact_secrets(self.run_config),  # the checkpoint is a file like any log: no API key in it
        }
        return save_checkpoint(
            run_dir, self.step, TrainingState(self.runner, self.optimizer), self.scheduler.state_dict(), trainer_state,
            keep_last=keep_last,
        )

    def resume(self, path: Path, ctx) -> None:
        """Load a checkpoint of this phase (every rank) and restore this rank's RNG last."""
        saved = read_trainer_state(path)
        for key, value in self.must_match.items():
            if saved.get(key) != value:
                raise ValueError(f"cannot resume from {path}: it was saved with {key}={saved.get(key)!r}, this run has {value!r}")
        if saved["config"]["model"]["path"] != self.run_config["model"]["path"]:
            warnings.warn(f"resuming {path} (trained from {saved['config']['model']['path']}) on model.path="
                          f"{self.run_config['model']['path']}: its frozen weights come from the new folder", stacklevel=2)
        ckpt = load_checkpoint(path, TrainingState(self.runner, self.optimizer))
        self.scheduler.load_state_dict(ckpt.scheduler_state)
        self.sampler.load_state_dict(ckpt.trainer_state["sampler"])
        self.step = ckpt.step
        restore_rng(ckpt.rng)
