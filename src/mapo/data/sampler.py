"""Deterministic, resumable order over a training set: a fresh permutation per epoch from the seed."""

from __future__ import annotations

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
