"""SIGTERM / SIGINT: finish the step, write a checkpoint, exit cleanly (on every rank).

A scheduler pre-empts a job with SIGTERM (then SIGKILL after a grace period); a user stops one with
Ctrl-C (SIGINT). Python's default for SIGINT raises KeyboardInterrupt wherever the program happens to be
(inside a collective, halfway through an optimizer step), and SIGTERM kills it outright: either way
the steps since the last checkpoint are lost.

`SignalFlag.installed()` handles both signals for a whole run. While `deferring` is True (the training
loops) a signal only sets the flag; the loop asks `StopRequest.should_stop()` between steps, which
agrees on the answer over all ranks with one all-reduce (a signal may reach only some of them), then
saves and exits. Outside the loops (loading, final evaluation) there is nothing to save, so a signal
acts at once as usual (SIGINT: KeyboardInterrupt; SIGTERM: exit 143). A second SIGINT while deferring
also raises KeyboardInterrupt: the user wants out now.

The exit status after a deferred stop is 128 + the signal number (143 for SIGTERM, 130 for SIGINT),
the shell's convention, so a wrapper script can tell "stopped, resume me" from "finished".
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, Iterator

import torch

HANDLED = (signal.SIGTERM, signal.SIGINT)


class SignalFlag:
    """Records SIGTERM/SIGINT while installed; `signal` is the first one received in this process."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.deferring = False  # True inside the training loops: a signal is only recorded

    def _handle(self, signum: int, frame) -> None:
        if not self.deferring or (self.signal is not None and signum == signal.SIGINT):
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        if self.signal is None:
            self.signal = signum
            print(f"[mapo] received {signal.Signals(signum).name}: finishing this step, then writing a checkpoint "
                  "(Ctrl-C again to abort without one)", flush=True)

    @contextlib.contextmanager
    def installed(self) -> Iterator["SignalFlag"]:
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


class StopRequest:
    """Whether to stop after this step, agreed over ranks.

    flag:     the process's `SignalFlag` (a fresh, never-installed one when None).
    any_rank: a 0-d float tensor → its sum over ranks (identity on one process).
    device:   the collective's device.
    """

    def __init__(self, flag: SignalFlag | None = None, any_rank: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
                 device: torch.device | str = "cpu") -> None:
        self.flag = flag or SignalFlag()
        self.any_rank, self.device = any_rank, torch.device(device)
        self.stopped_by: int | None = None  # the agreed signal, once `should_stop` said True (same on all ranks)

    def should_stop(self) -> bool:
        """True on every rank when any rank received a signal (one all-reduce: call it on every rank)."""
        if self.stopped_by is not None:
            return True
        code = torch.tensor(float(self.flag.signal or 0), device=self.device)
        agreed = int(float(self.any_rank(code)))
        if agreed:
            # A sum of several ranks' signal numbers is no signal: then report SIGTERM (pre-emption).
            own = self.flag.signal
            self.stopped_by = own if own is not None else (agreed if agreed in {int(s) for s in HANDLED} else int(signal.SIGTERM))
        return agreed > 0

    @property
    def exit_code(self) -> int:
        """128 + the agreed signal number once stopped, else 0."""
        return 128 + int(self.stopped_by) if self.stopped_by else 0
