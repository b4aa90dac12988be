"""SIGTERM / SIGINT: finish the step, write a checkpoint, exit cleanly (on every rank).

A scheduler pre-empts a job with SIGTERM (then SIGKILL after a grace period); a user stops one with
Ctrl-C (SIGINT). Python's default for SIGINT raises KeyboardInterrupt wherever the program happens to be
(inside a collective, halfway through an optimizer step), and SIGTERM kills it outright: either way
the steps since the last checkpoint are lost. Inside `StopRequest.installed()` both signals only set a
flag; the loop asks `should_stop()` between steps, which agrees on the answer over all ranks with one
all-reduce (the signal may reach only some of them), then saves and returns. A second SIGINT, when the
first is not being honoured fast enough, raises KeyboardInterrupt as usual.

The exit status after such a stop is 128 + the signal number (143 for SIGTERM, 130 for SIGINT), the
shell's convention, so a wrapper script can tell "stopped, resume me" from "finished".
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, Iterator

import torch

HANDLED = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """A flag set by SIGTERM/SIGINT while installed; `should_stop` reduces it over ranks.

    any_rank: a 0-d float tensor → its sum over ranks (identity on one process).
    device:   the collective's device.
    """

    def __init__(self, any_rank: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
                 device: torch.device | str = "cpu") -> None:
        self.any_rank, self.device = any_rank, torch.device(device)
        self.signal: int | None = None  # the first signal received here (or on any rank, once agreed)

    def _handle(self, signum: int, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user wants out now
        if self.signal is None:
            self.signal = signum
            print(f"[mapo] received {signal.Signals(signum).name}: finishing this step, then writing a checkpoint "
                  "(Ctrl-C again to abort without one)", flush=True)

    @contextlib.contextmanager
    def installed(self) -> Iterator["StopRequest"]:
        """Handle SIGTERM and SIGINT inside the block (main thread only: elsewhere nothing is installed)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in HANDLED}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def should_stop(self) -> bool:
        """True on every rank when any rank received a signal (one all-reduce; call it on every rank)."""
        code = torch.tensor(float(self.signal or 0), device=self.device)
        agreed = int(float(self.any_rank(code)))
        if agreed and self.signal is None:
            # Another rank was signalled: take a signal number that is real (both handled ones are).
            self.signal = agreed if agreed in {int(s) for s in HANDLED} else int(signal.SIGTERM)
        return bool(agreed)

    @property
    def exit_code(self) -> int:
        """128 + signal number once stopped, else 0."""
        return 128 + int(self.signal) if self.signal else 0
