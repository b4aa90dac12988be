"""Evaluation bookkeeping: sharding over ranks gives the single-process result; shuffling is a derangement."""

from __future__ import annotations

import pytest

import mapo.evaluate as ev
from mapo.data.schema import Record


def records(n: int) -> list[Record]:
    return [Record(f"r{i}", f"/clips/{i}.wav", "Is it high?", ["high", "low"], ["high", "low"][i % 2], task=f"t{i % 2}")
            for i in range(n)]


@pytest.fixture
def fake_generation(monkeypatch):
    """Answers 'high' when the clip shown has an even number, so a shuffled clip changes the answer."""

    def answers(model, collator, shown, drop_audio, **kw):
        return ["<answer>low</answer>" if drop_audio else f"<answer>{'high' if int(r.audio[7:-4]) % 2 == 0 else 'low'}</answer>"
                for r in shown]

    monkeypatch.setattr(ev, "generate_answers", answers)


@pytest.mark.parametrize("condition", ev.CONDITIONS)
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_evaluation_equals_one_process(fake_generation, condition, world):
    items = records(7)  # 7 items over 2 or 3 ranks: the last shard is padded and the padding dropped
    single = ev.evaluate_split(None, None, items, "test", condition, seed=3)
    per_rank = {}

    class Collected(Exception):
        pass

    def collect(pairs, rank):
        per_rank[rank] = pairs
        raise Collected  # stop here: this rank's share is all we need from this call

    for rank in range(world):  # each rank's own pairs, as the all-gather would receive them
        with pytest.raises(Collected):
            ev.evaluate_split(None, None, items, "test", condition, seed=3, shard=(rank, world),
                              gather=lambda pairs, rank=rank: collect(pairs, rank))
    result = ev.evaluate_split(None, None, items, "test", condition, seed=3, shard=(0, world),
                               gather=lambda pairs: [per_rank[r] for r in range(world)])
    assert result.completions == single.completions and result.accuracy == single.accuracy
    assert sum(len(p) for p in per_rank.values()) == 7


def test_accuracy_values(fake_generation):
    items = records(6)  # answers alternate high/low; the fake answers from the clip it is shown
    assert ev.evaluate_split(None, None, items, "test", "audio").accuracy == 1.0
    assert ev.evaluate_split(None, None, items, "test", "no_audio").accuracy == 0.5  # always "low"
    per_task = ev.evaluate_split(None, None, items, "test", "no_audio").per_task
    assert per_task == {"t0": 0.0, "t1": 1.0}


def test_shuffled_audio_is_a_derangement():
    items = records(9)
    shown = ev.shuffled_audio(items, seed=1)
    assert sorted(r.audio for r in shown) == sorted(r.audio for r in items)
    assert all(a.audio != b.audio for a, b in zip(items, shown))
    assert [r.id for r in shown] == [r.id for r in items]


def test_unknown_condition_lists_valid_ones():
    with pytest.raises(ValueError, match="valid: audio, no_audio, shuffled"):
        ev.evaluate_split(None, None, records(2), "test", "muted")
