"""The fault suite, part 2: faults met by a running training program (in-process, faults injected).

One short run (`faulty_run`) meets, in order: a manifest with a non-UTF-8 line, a missing clip and a
path leaving its folder (skipped with data.skip_bad and counted), a clip longer than the window and a
44.1 kHz stereo clip (counted), a clip deleted after the check (replaced mid-run), a reward function
that raises once (scores 0, logged once), a NaN gradient at step 2 (step skipped, logged); W&B gets a
recorder instead of the network, and the environment holds an API key. Each test checks one of these
in the run's outputs. A second run meets K non-finite losses in a row and must stop with the last good
checkpoint the newest.
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from fault_tools import compose_config, copy_data, manifest_row, tiny_overrides, train_rows, write_clip

import mapo.step
import mapo.train
from mapo.checkpoint import resolve_resume
from mapo.data.sampler import EpochSampler
from mapo.nonfinite import NonFiniteError
from mapo.rewards import REWARDS, register_reward

API_KEY = "fedcba9876543210fedcba9876543210fedcba98"


class FakeWandbRun:
    """Records what the logger sends to W&B."""

    def __init__(self, **init_kwargs):
        self.init_kwargs, self.logged = init_kwargs, []

    def log(self, values, step=None):
        self.logged.append(values)

    def finish(self):
        pass


@pytest.fixture(scope="module")
def faulty_run(tiny_env, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("faulty_run")
    data = copy_data(tiny_env, root / "data")
    write_clip(data / "audio" / "long.wav", 5.0)  # the tiny model's window is 3 s
    write_clip(data / "audio" / "stereo44k.wav", 2.0, sr=44_100, channels=2)
    write_clip(root / "outside.wav", 2.0)
    with open(data / "train.jsonl", "ab") as manifest:
        # a Latin-1 "é" (byte 0xe9) where UTF-8 is expected
        manifest.write(manifest_row("bad_utf8", "audio/long.wav").encode()[:-1] + b', "note": "caf\xe9"}\n')
        manifest.write((manifest_row("missing_clip", "audio/nope.wav") + "\n").encode())
        manifest.write((manifest_row("escapes", "../outside.wav") + "\n").encode())
        manifest.write((manifest_row("long_clip", "audio/long.wav") + "\n").encode())
        manifest.write((manifest_row("stereo_44k", "audio/stereo44k.wav") + "\n").encode())

    # a reward that raises on its second completion only
    calls = {"n": 0}

    def flaky(completion, record):
        calls["n"] += 1
        if calls["n"] == 2:
            raise ZeroDivisionError("planted reward failure")
        return 0.5

    register_reward("_flaky_test")(flaky)

    # a clip deleted after the data check: the first row of step 1
    real_load = mapo.train.load_run_data
    deleted = {}

    def load_then_delete(*args, **kwargs):
        result = real_load(*args, **kwargs)
        record = EpochSampler(result.train, seed=0).next_batch(2)[0]
        deleted["id"], deleted["path"] = record.id, record.audio
        import os

        os.remove(record.audio)
        return result

    mp.setattr(mapo.train, "load_run_data", load_then_delete)

    # NaN gradients on the second call of mapo_step (step 2: one micro-batch per step)
    real_step = mapo.step.mapo_step
    step_calls = {"n": 0}

    def nan_grad_on_second(model, *args, **kwargs):
        out = real_step(model, *args, **kwargs)
        step_calls["n"] += 1
        if step_calls["n"] == 2:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
        return out

    mp.setattr(mapo.step, "mapo_step", nan_grad_on_second)

    import wandb

    runs = []
    mp.setattr(wandb, "init", lambda **kw: runs.append(FakeWandbRun(**kw)) or runs[-1])
    mp.setenv("WANDB_API_KEY", API_KEY)

    run_dir = root / "run"
    cfg = compose_config(tiny_overrides(
        tiny_env, run_dir, "data.skip_bad=true", "reward.functions=[accuracy,format,_flaky_test]",
        "reward.weights=[1.0,0.1,1.0]", "logger=wandb", "logger.mode=offline", "logger.sample_every=1",
        f"+extra.wandb_api_key={API_KEY}", data_dir=data,
    ))
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("mapo")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        final = mapo.train.run(cfg)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        REWARDS.pop("_flaky_test", None)
        mp.undo()
    log_text = "\n".join(r.getMessage() for r in records)
    return {"final": final, "run_dir": run_dir, "log": log_text, "wandb": runs, "deleted": deleted, "data": data}


def test_bad_rows_are_skipped_and_counted_in_the_summary(faulty_run):
    """non-UTF-8 line + missing clip + path leaving the folder: 3 rows dropped with data.skip_bad."""
    final = faulty_run["final"]
    assert final["data/skipped_rows"] == 3
    saved = json.loads((faulty_run["run_dir"] / "final_metrics.json").read_text())
    assert saved["data/skipped_rows"] == 3 and saved["step"] == 3


def test_clip_over_the_window_and_converted_clips_are_counted(faulty_run):
    final = faulty_run["final"]
    assert final["data/clips_over_window"] == 1  # long.wav, 5 s > 3 s (row long_clip)
    assert final["data/clips_resampled"] == 1 and final["data/clips_downmixed"] == 1  # stereo44k.wav


def test_audio_deleted_mid_run_is_replaced_and_logged(faulty_run):
    rows = train_rows(faulty_run["run_dir"])
    assert rows[1]["faults/audio_rows_replaced"] == 1.0 and "faults/audio_rows_replaced" not in rows[2]
    assert faulty_run["final"]["faults/audio_rows_replaced"] == 1
    assert f"step 1: row {faulty_run['deleted']['id']!r} skipped on every rank" in faulty_run["log"]
    assert f"{faulty_run['deleted']['path']}: audio file not found" in faulty_run["log"]


def test_nan_gradient_skips_the_step_and_names_it(faulty_run):
    rows = train_rows(faulty_run["run_dir"])
    assert rows[2]["faults/step_skipped"] == 1.0 and math.isnan(rows[2]["grad_norm"])
    assert "faults/step_skipped" not in rows[1] and "faults/step_skipped" not in rows[3]
    assert math.isfinite(rows[3]["grad_norm"]) and math.isfinite(rows[3]["loss/total"])  # weights intact
    assert faulty_run["final"]["faults/nonfinite_steps_skipped"] == 1
    assert "step 2: non-finite loss or gradient" in faulty_run["log"] and "batch rows: " in faulty_run["log"]


def test_a_reward_that_raises_scores_zero_and_is_logged_once(faulty_run):
    assert faulty_run["final"]["faults/reward_errors/_flaky_test"] == 1
    rows = train_rows(faulty_run["run_dir"])
    assert sum(r.get("faults/reward_errors/_flaky_test", 0) for r in rows.values()) == 1
    log = faulty_run["log"]
    assert log.count("reward '_flaky_test' raised ZeroDivisionError: planted reward failure") == 1
    assert "The completion was:" in log
    # 2 prompts × 2 samples per step; one of the 12 completions scored 0 instead of 0.5
    assert sum(r["reward/_flaky_test"] for r in rows.values()) == pytest.approx((12 * 0.5 - 0.5) / 4)


def test_wandb_gets_no_audio_and_no_api_key(faulty_run):
    import wandb

    (run,) = faulty_run["wandb"]
    assert API_KEY not in json.dumps(run.init_kwargs, default=str)
    assert run.init_kwargs["config"]["extra"]["wandb_api_key"] == "<redacted>"
    values = [v for logged in run.logged for v in logged.values()]
    assert any(isinstance(v, wandb.Table) for v in values)  # samples were logged (so the check sees them)
    assert not any(isinstance(v, wandb.Audio) for v in values)
    cells = [str(c) for v in values if isinstance(v, wandb.Table) for row in v.data for c in row]
    assert cells and not any(c.endswith((".wav", ".flac", ".mp3", ".ogg")) for c in cells)
    for file in faulty_run["run_dir"].rglob("*"):
        if file.is_file() and file.suffix in (".json", ".jsonl", ".log", ".md", ".yaml"):
            assert API_KEY not in file.read_text(errors="replace"), file


def test_consecutive_non_finite_losses_stop_with_the_last_good_checkpoint(tiny_env, tmp_path, monkeypatch):
    real_step = mapo.step.mapo_step
    calls = {"n": 0}

    def nan_loss_from_step_3(model, *args, **kwargs):
        loss, metrics = real_step(model, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] >= 3:  # the loss only (the gradients stay finite): still a skipped step
            metrics = {**metrics, "loss/total": metrics["loss/total"] * float("nan")}
            return loss * float("nan"), metrics
        return loss, metrics

    monkeypatch.setattr(mapo.step, "mapo_step", nan_loss_from_step_3)
    run_dir = tmp_path / "run"
    cfg = compose_config(tiny_overrides(tiny_env, run_dir, "trainer.steps=6", "trainer.checkpoint_every=1",
                                        "trainer.keep_last=5", "trainer.max_nonfinite_steps=2"))
    with pytest.raises(NonFiniteError, match=r"step 4: 2 consecutive steps with a non-finite loss or gradient"):
        mapo.train.run(cfg)
    rows = train_rows(run_dir)
    assert sorted(rows) == [1, 2, 3] and rows[3]["faults/step_skipped"] == 1.0
    latest = resolve_resume(run_dir, "auto")
    assert latest is not None and latest.name == "step_000003"  # nothing written at or after the failure
    # The skipped step 3 did not move the weights: checkpoint 3 holds step 2's weights, all finite.
    step2 = _weights_after_resume(tiny_env, run_dir / "checkpoints" / "step_000002")
    step3 = _weights_after_resume(tiny_env, latest)
    assert step2.keys() == step3.keys()
    for name in step2:
        assert torch.equal(step2[name], step3[name]) and torch.isfinite(step3[name]).all(), name


def _weights_after_resume(env, checkpoint) -> dict[str, torch.Tensor]:
    """The trainable weights a fresh Phase holds after `Phase.resume(checkpoint)` (the public path)."""
    from mapo import distributed as dist_utils
    from mapo.models.loader import load_model_and_processor
    from mapo.phase import Phase, set_trainable

    cfg = compose_config(tiny_overrides(env, checkpoint.parent.parent))
    model, _ = load_model_and_processor(env["model"])
    set_trainable(model, cfg, everything=False)
    ctx = dist_utils.init_distributed("cpu")
    phase = Phase("rl", dist_utils.ModelRunner(model), model, 1e-3, 6, 0, "constant", cfg, [object()])
    phase.resume(checkpoint, ctx)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
