"""Deterministic, resumable order over a training set: a fresh permutation per epoch from the seed,
and the per-step choice of items shown without their audio (mixed batches)."""

from __future__ import annotations

import dataclasses
from typing import Generic, Sequence, TypeVar

import numpy as np

T = TypeVar("T")


class EpochSampler(Generic[T]):
    """Yields items in epoch-wise shuffled order; its position is two integers, saved with checkpoints."""

    def __init__(self, items: Sequence[T], seed: int):
        if not items:
            raise ValueError("cannot sample from an empty training set")
        self.items, self.seed = items, seed
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.items))

    def next_batch(self, n: int) -> list[T]:
        """The next `n` items (the same for every rank: each rank then takes its own slice)."""
        out = []
        while len(out) < n:
            if self.position == len(self.items):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            out.append(self.items[self._order[self.position]])
            self.position += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)


def without_some_audio(records: list, fraction: float, seed: int, step: int) -> list:
    """Copies of `records` where a `fraction` of them (chosen by (seed, step), the same on every rank)
    have no audio: the prompt is then text only, and batches mix items with and without audio."""
    if fraction <= 0:
        return records
    drop = np.random.default_rng([seed, step, 7]).random(len(records)) < fraction
    return [dataclasses.replace(r, audio=None) if d else r for r, d in zip(records, drop)]
