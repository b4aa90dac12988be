"""The fault handlers on their own: the non-finite guard, the signal flag and its agreement over ranks,
and the optimizer step they may skip."""

from __future__ import annotations

import logging
import os
import signal

import pytest
import torch

from mapo.interrupt import SignalFlag, StopRequest
from mapo.nonfinite import NonFiniteError, NonFiniteGuard

NAN, ONE = torch.tensor(float("nan")), torch.tensor(1.0)


def test_guard_skips_non_finite_steps_and_stops_after_k_in_a_row(caplog):
    guard = NonFiniteGuard(max_consecutive=3)
    with caplog.at_level(logging.WARNING, logger="mapo.nonfinite"):
        assert guard.step_is_finite(1, ONE, ONE)
        assert not guard.step_is_finite(2, NAN, ONE, ["a", "b"])  # loss
        assert not guard.step_is_finite(3, ONE, torch.tensor(float("inf")))  # gradient
        assert guard.step_is_finite(4, ONE, ONE)  # a good step resets the count
        assert not guard.step_is_finite(5, NAN, ONE)
        assert not guard.step_is_finite(6, NAN, ONE)
        with pytest.raises(NonFiniteError, match=r"step 7: 3 consecutive .* \(trainer.max_nonfinite_steps=3\)"):
            guard.step_is_finite(7, NAN, NAN)
    assert guard.skipped == 5
    assert "step 2: non-finite loss or gradient (loss nan, grad norm 1); optimizer step skipped (1 in a row, limit 3); " \
           "batch rows: a, b" in caplog.text
    with pytest.raises(ValueError, match="max_nonfinite_steps must be ≥ 1"):
        NonFiniteGuard(0)


def test_guard_follows_the_other_ranks():
    """Finite here, non-finite on another rank (the all-reduce says 1): every rank skips."""
    guard = NonFiniteGuard(2, any_rank=lambda flag: flag + 1.0)
    assert not guard.step_is_finite(1, ONE, ONE)


def test_a_skipped_step_leaves_the_weights_and_advances_the_schedule():
    from mapo.config import AlgoConfig, DataConfig, LoggerConfig, MapoConfig, ModelConfig, RewardConfig, RolloutConfig, TrainerConfig
    from mapo.distributed import ModelRunner
    from mapo.phase import Phase

    cfg = MapoConfig(ModelConfig(), DataConfig(), RolloutConfig(), AlgoConfig(), RewardConfig(), TrainerConfig(), LoggerConfig())
    model = torch.nn.Linear(3, 2)
    phase = Phase("rl", ModelRunner(model), model, 0.1, 10, 0, "linear", cfg, [0, 1])
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.ones(1, 3)).sum().backward()
    lr = phase.scheduler.get_last_lr()[0]
    phase.clip_and_step(1.0, should_step=lambda norm: False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters()) and phase.scheduler.get_last_lr()[0] < lr
    model(torch.ones(1, 3)).sum().backward()
    phase.clip_and_step(1.0, should_step=lambda norm: True)
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_signals_are_deferred_inside_the_loops_and_act_at_once_outside():
    # whatever the handlers were (a job started in the background inherits SIGINT ignored), they come back
    before = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))
    flag = SignalFlag()
    with flag.installed():
        with pytest.raises(SystemExit) as info:  # not deferring: SIGTERM ends the program now
            os.kill(os.getpid(), signal.SIGTERM)
        assert info.value.code == 143
        flag.deferring = True
        os.kill(os.getpid(), signal.SIGTERM)  # recorded only
        assert flag.signal == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C while deferring: out now
            os.kill(os.getpid(), signal.SIGINT)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_stop_request_is_agreed_over_ranks():
    quiet = StopRequest(SignalFlag())
    assert not quiet.should_stop() and quiet.exit_code == 0
    here = SignalFlag()
    here.signal = signal.SIGINT
    stop = StopRequest(here)
    assert stop.should_stop() and stop.exit_code == 130
    elsewhere = StopRequest(SignalFlag(), any_rank=lambda code: code + float(signal.SIGTERM))  # rank 1 got SIGTERM
    assert elsewhere.should_stop() and elsewhere.stopped_by == signal.SIGTERM and elsewhere.exit_code == 143
    both = StopRequest(here, any_rank=lambda code: code + float(signal.SIGTERM))  # 2 + 15: keep our own
    assert both.should_stop() and both.exit_code == 130


@pytest.mark.parametrize("override, expected", [
    ("data.audio_check=full", "data.audio_check='full': unknown choice; valid: decode, header"),
    ("data.check_workers=-2", "data.check_workers=-2: a thread count (0 = one per core); valid: ≥ 0"),
    ("trainer.max_nonfinite_steps=0", "trainer.max_nonfinite_steps=0: the K-th non-finite step in a row stops the run"),
])
def test_fault_options_are_checked_before_anything_loads(override, expected):
    from fault_tools import compose_config

    from mapo.preflight import ConfigError, check_config

    with pytest.raises(ConfigError) as info:
        check_config(compose_config(["experiment=tiny_mapo", override]), None, 1)
    assert any(expected in p for p in info.value.problems), info.value.problems
    check_config(compose_config(["experiment=tiny_mapo"]), None, 1)  # the defaults pass
