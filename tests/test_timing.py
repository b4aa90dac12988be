"""Step timing: phase times accumulate, tokens/s is tokens over that time, memory is reported, and the
evaluation timer counts the tokens its rollouts generate."""

from __future__ import annotations


import pytest
import torch
from toy_model import EOS, PAD, make_batch, tiny_model

from mapo.rollout import generate_rollout, generated_tokens
from mapo.timing import StepTimer, timed_generation


def test_phases_accumulate_and_tokens_per_second():
    clock = iter([10.0, 10.02, 11.0, 11.01, 12.0, 12.0])  # rollout 0.02 s, rollout again 0.01 s, update 0 s
    timer = StepTimer("cpu", clock=lambda: next(clock))
    with timer.phase("rollout"):
        pass
    with timer.phase("rollout"):  # a phase may repeat within a step
        pass
    with timer.phase("update"):
        pass
    timer.add_tokens("rollout", torch.tensor(300))
    m = timer.metrics()
    assert m["time/rollout_s"] == pytest.approx(0.03) and m["time/update_s"] == 0.0
    assert m["throughput/rollout_tok_s"] == pytest.approx(300 / 0.03)
    assert "throughput/update_tok_s" not in m  # no tokens counted for it
    # This process holds torch and the test modules: well over 50 MB resident, peak ≥ current.
    assert m["memory/rss_gib"] > 0.05 and m["memory/max_rss_gib"] >= m["memory/rss_gib"] * 0.99


def test_timed_generation_counts_generated_tokens():
    model = tiny_model(seed=1, eos_bias=3.0)

    def two_rollouts():
        a = generate_rollout(model, make_batch(), group_size=2, max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD, seeds=[1, 2, 3])
        b = generate_rollout(model, make_batch((1,)), group_size=1, max_new_tokens=4, eos_token_id=EOS, pad_token_id=PAD, seeds=[5])
        return int(a.completion_mask.sum() + b.completion_mask.sum())

    before = generated_tokens()
    expected, metrics = timed_generation("eval", "cpu", two_rollouts)
    assert generated_tokens() - before == expected
    assert metrics["throughput/eval_tok_s"] == expected / metrics["time/eval_s"]
    assert expected < 6 * 6 + 4  # some completions ended early: the count is of real tokens, not columns
