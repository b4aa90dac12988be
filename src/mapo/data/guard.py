"""Batches whose audio loads on every rank: a clip that goes bad during a run is skipped, never waited on.

The manifest is checked before training, but a file can still be deleted, truncated or rewritten while
a multi-day run goes on. Loading happens per rank (each rank loads only its slice of the global batch),
so a rank that failed alone would leave the others blocked in the next collective forever. Here every
rank first tries its own slice, then one all-reduce of a [n] flag vector tells every rank which rows
failed anywhere; all ranks replace exactly those rows with the sampler's next items (the sampler is the
same on every rank) and try again. The batch keeps its size, so every shape downstream is unchanged.

Bad paths are remembered (every rank learns the same set), so a clip that failed once is skipped without
a new read; each failure is logged once, with the path and the problem, by the rank that saw it, and
counted (`skipped`). A checkpoint stores the sampler position after the replacements, so a resumed run
draws the same batches.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch

from mapo.data.audio import AudioError
from mapo.data.sampler import EpochSampler
from mapo.data.schema import Record

log = logging.getLogger(__name__)


class AudioGone(RuntimeError):
    """More rows failed than the training set holds: the data went away under the run."""


class LoadableBatches:
    """Draws global batches whose every row's audio loaded on the rank that holds it.

    load_clip:  path → anything; raises AudioError when the clip cannot be used (e.g. the collator's
                `clip_features`, which also caches the features for the batch that follows).
    any_rank:   [n] float tensor → its sum over ranks (identity on one process).
    device:     where the flag vector lives (the collective's device).
    """

    def __init__(self, load_clip: Callable[[str], object], any_rank: Callable[[torch.Tensor], torch.Tensor],
                 device: torch.device | str = "cpu") -> None:
        self.load_clip, self.any_rank, self.device = load_clip, any_rank, torch.device(device)
        self.bad_paths: set[str] = set()
        self.skipped = 0  # rows replaced so far (all ranks agree on it)

    def _failed_here(self, records: Sequence[Record], local: slice, step: int) -> torch.Tensor:
        """[n] flags: 1 where this rank holds the row and its clip is known bad or fails to load now."""
        flags = torch.zeros(len(records), device=self.device)
        for i in range(*local.indices(len(records))):
            path = records[i].audio
            if path is None:
                continue
            if path in self.bad_paths:
                flags[i] = 1
                continue
            try:
                self.load_clip(path)
            except AudioError as err:
                log.warning("step %d: row %r skipped on every rank: %s", step, records[i].id, err)
                flags[i] = 1
        return flags

    def next_batch(self, sampler: EpochSampler, n: int, local: slice, step: int = 0) -> list[Record]:
        """The next `n` items of `sampler` (the same list on every rank), with rows whose audio failed on
        any rank replaced by further items; `local` is this rank's slice, the rows it loads."""
        records = sampler.next_batch(n)
        limit = len(sampler.items)
        while True:
            failed = self.any_rank(self._failed_here(records, local, step)) > 0  # [n] bool, same on all ranks
            rows = failed.nonzero().flatten().tolist()
            if not rows:
                return records
            self.skipped += len(rows)
            if self.skipped > limit:
                raise AudioGone(f"{self.skipped} rows skipped for bad audio, more than the {limit} training "
                                f"items; last bad: {sorted(self.bad_paths)[:5]}")
            self.bad_paths.update(records[i].audio for i in rows)
            for i, item in zip(rows, sampler.next_batch(len(rows))):
                records[i] = item
