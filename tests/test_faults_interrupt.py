"""The fault suite, part 3: interruptions. SIGTERM/SIGINT write a checkpoint and exit (one rank and two),
kill -9 in the middle of a checkpoint write, a full disk during a save, and `trainer.resume=auto` after
each of them. Written against public behaviour only (the training program, `Phase.save`/`Phase.resume`,
`resolve_resume`), not against the checkpoint's file names.
"""

from __future__ import annotations

import errno
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fault_tools import (compose_config, copy_data, metrics_rows, run_training, spawn_two_ranks, subprocess_env,
                         tiny_overrides, train_command, train_rows)

import mapo.train
from mapo import distributed as dist_utils
from mapo.checkpoint import resolve_resume

SCRIPTS = Path(__file__).resolve().parent / "fault_scripts"
STEPS = 5
COMPARED = ("loss/total", "loss/pg", "loss/attn", "reward/mean", "grad_norm")


def _overrides(env, run_dir, *extra, data_dir=None):
    # MAPO: its attention loss gives a non-zero gradient even when every completion scores the same
    return tiny_overrides(env, run_dir, f"trainer.steps={STEPS}", *extra, data_dir=data_dir, experiment="tiny_mapo")


@pytest.fixture(scope="module")
def reference(tiny_env, tmp_path_factory):
    """An uninterrupted run, started from an empty working folder (which it must leave empty)."""
    root = tmp_path_factory.mktemp("reference")
    cwd = root / "cwd"
    cwd.mkdir()
    run_dir = root / "run"
    run_training(_overrides(tiny_env, run_dir), cwd=cwd)
    rows = train_rows(run_dir)
    assert sorted(rows) == list(range(1, STEPS + 1))
    assert all(rows[s]["grad_norm"] > 0 for s in rows)  # the comparison below can fail
    return {"rows": rows, "cwd": cwd, "run_dir": run_dir}


def test_a_run_writes_only_its_run_folder(reference):
    """Hygiene: Hydra's files (.hydra/, train.log) go into trainer.run_dir, nothing into the working folder."""
    assert list(reference["cwd"].iterdir()) == []
    assert (reference["run_dir"] / ".hydra" / "config.yaml").is_file()


def _wait_for_step(run_dir: Path, proc: subprocess.Popen, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r.get("step", 0) >= step and "reward/mean" in r for r in metrics_rows(run_dir)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc {proc.returncode}) before step {step}: {proc.communicate()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no step {step} within {timeout} s")


def _interrupt(cmd, run_dir, sig, at_step=2, cwd=None, timeout=300):
    proc = subprocess.Popen(cmd, cwd=cwd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_step(run_dir, proc, at_step)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out, err


def _assert_same_as_reference(reference_rows, rows, steps):
    for step in steps:
        for key in COMPARED:
            assert rows[step][key] == pytest.approx(reference_rows[step][key], abs=1e-6), (step, key)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_writes_a_checkpoint_exits_cleanly_and_resume_continues_step_for_step(tiny_env, tmp_path, reference, sig):
    run_dir = tmp_path / "run"
    rc, out, err = _interrupt(train_command(_overrides(tiny_env, run_dir)), run_dir, sig, cwd=tmp_path)
    assert rc == 128 + sig, (rc, out[-2000:], err[-3000:])
    assert f"received {signal.Signals(sig).name}" in out and "Traceback" not in err
    latest = resolve_resume(run_dir, "auto")
    assert latest is not None, "no complete checkpoint after the signal"
    stopped_at = max(train_rows(run_dir))
    assert 2 <= stopped_at < STEPS and f"stopped after step {stopped_at} of {STEPS}" in out
    assert latest.name == f"step_{stopped_at:06d}"  # the checkpoint holds the last finished step
    if sig == signal.SIGINT:
        return  # the same stop path as SIGTERM from here on: resume once (below, for SIGTERM) is enough
    run_training(_overrides(tiny_env, run_dir, "trainer.resume=auto"), cwd=tmp_path)
    rows = train_rows(run_dir)
    assert sorted(rows) == list(range(1, STEPS + 1))
    _assert_same_as_reference(reference["rows"], rows, range(1, STEPS + 1))


def test_sigterm_to_one_of_two_ranks_stops_both_with_a_checkpoint(tiny_env, tmp_path):
    """torchrun, 2 CPU ranks (gloo): rank 1 gets SIGTERM; both ranks agree, save and exit, none hangs.
    Also: rank 0 deletes the audio of a row that rank 1 holds at step 1 (after the manifest check), so
    that row must be replaced on both ranks. Then trainer.resume=auto finishes the run on 2 ranks."""
    data = copy_data(tiny_env, tmp_path / "data")
    run_dir = tmp_path / "run"
    overrides = _overrides(tiny_env, run_dir, "trainer.steps=8", data_dir=data)  # the later steps= wins
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd = [*launcher, str(SCRIPTS / "train_deleting_a_clip.py"), "1", *overrides]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        _wait_for_step(run_dir, proc, 2)
        rank1 = _worker_pid(proc.pid, rank=1)
        os.kill(rank1, signal.SIGTERM)
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "received SIGTERM" in out, err[-3000:]
    stopped_at = max(train_rows(run_dir))
    assert f"stopped after step {stopped_at} of 8 (signal 15)" in out, (out[-2000:], err[-3000:])
    assert resolve_resume(run_dir, "auto").name == f"step_{stopped_at:06d}"
    assert proc.returncode != 0 and re.search(r"exitcode\s*:\s*143", err), err[-3000:]  # 128 + SIGTERM, reported by torchrun
    rows = train_rows(run_dir)
    assert rows[1]["faults/audio_rows_replaced"] == 1.0 and "[fault] deleted" in out
    assert "skipped on every rank" in out + err and "audio file not found" in out + err
    # resume on 2 ranks to the end (the deleted clip is now a bad row of the manifest: skip it)
    resumed = subprocess.run([*launcher, "-m", "mapo.train", *overrides, "trainer.resume=auto", "data.skip_bad=true"], cwd=tmp_path,
                             env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints'}" in resumed.stdout
    assert sorted(train_rows(run_dir)) == list(range(1, 9))


def _worker_pid(launcher_pid: int, rank: int, timeout: float = 60) -> int:
    """The pid of torchrun's worker with RANK=rank (read from /proc, children of the launcher)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                parent = int(stat.rsplit(")", 1)[1].split()[1])
                environ = (entry / "environ").read_bytes().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue
            if parent == launcher_pid and f"RANK={rank}".encode() in environ:
                return int(entry.name)
        time.sleep(0.1)
    raise AssertionError(f"no worker with RANK={rank} under {launcher_pid}")


# ------------------------------------------------------------------------------------------ Phase-level


def _fresh_phase():
    sys.path.insert(0, str(SCRIPTS))
    try:
        from save_loop import build_phase
    finally:
        sys.path.remove(str(SCRIPTS))
    return build_phase()


def _resumed_step_and_weights(run_dir: Path):
    phase, model = _fresh_phase()
    latest = resolve_resume(run_dir, "auto")
    assert latest is not None
    phase.resume(latest, dist_utils.init_distributed("cpu"))
    values = torch.cat([p.detach().flatten() for p in model.parameters()])
    return phase, values


@pytest.mark.parametrize("fraction", [0.1, 0.9])
def test_kill_9_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path, fraction):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(SCRIPTS / "save_loop.py"), str(run_dir)], env=subprocess_env(),
                            stdout=subprocess.PIPE, text=True)
    durations = []
    try:
        for line in proc.stdout:
            if line.startswith("saved"):
                durations.append(float(line.split()[2]))
            if line.strip() == "saving 4":
                time.sleep(fraction * float(np.median(durations)))  # somewhere inside save 4
                proc.kill()
                break
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    phase, values = _resumed_step_and_weights(run_dir)
    assert phase.step in (3, 4)  # 4 only when the kill came after its final rename
    assert torch.equal(values, torch.full_like(values, float(phase.step)))
    assert phase.sampler.state_dict() == {"epoch": (3 * phase.step) // 10, "position": (3 * phase.step) % 10}
    assert phase.optimizer.state_dict()["state"], "optimizer state was not restored"


def test_a_full_disk_during_a_save_fails_loudly_and_keeps_the_previous_checkpoint(tmp_path):
    """A real write failure from the kernel (RLIMIT_FSIZE: EFBIG on every file write past 100 kB)."""
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, str(SCRIPTS / "save_loop.py"), str(run_dir), "100000"], env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, (done.stdout, done.stderr[-2000:])
    assert "FAILED CheckpointWriteError: [Errno 27] checkpoint of step 2 could not be written" in done.stdout
    assert f"The previous checkpoint {run_dir / 'checkpoints' / 'step_000001'} is intact" in done.stdout
    phase, values = _resumed_step_and_weights(run_dir)
    assert phase.step == 1 and torch.equal(values, torch.ones_like(values))
    assert [p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step_000001"]


class DiskFullAfterFirstCheckpoint:
    """Makes every checkpoint writer fail with ENOSPC, after writing part of its file, once a first
    complete checkpoint exists under `run_dir`: Python file objects opened for writing there, `torch.save`
    and safetensors' `save_file` (whichever the checkpoint format uses)."""

    def __init__(self, run_dir: Path, monkeypatch):
        import builtins

        import safetensors.torch

        import mapo.checkpoint

        self.run_dir, self.failures = run_dir, 0
        real_open, real_save, real_save_file = builtins.open, torch.save, safetensors.torch.save_file
        full = self

        class FillingFile:
            def __init__(self, handle):
                self.handle = handle

            def write(self, data):
                self.handle.write(bytes(data)[:100] if isinstance(data, (bytes, bytearray, memoryview)) else data[:100])
                full.failures += 1
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            def __getattr__(self, name):
                return getattr(self.handle, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.handle.close()

        def open_(file, mode="r", *args, **kwargs):
            handle = real_open(file, mode, *args, **kwargs)
            return FillingFile(handle) if any(m in mode for m in "wax") and self.armed(file) else handle

        def fail(target):
            if isinstance(target, (str, os.PathLike)):
                Path(target).write_bytes(b"\0" * 100)
            self.failures += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def save(obj, f, *args, **kwargs):
            return fail(f) if self.armed(f) else real_save(obj, f, *args, **kwargs)

        def save_file(tensors, filename, *args, **kwargs):
            return fail(filename) if self.armed(filename) else real_save_file(tensors, filename, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(torch, "save", save)
        monkeypatch.setattr(safetensors.torch, "save_file", save_file)
        if hasattr(mapo.checkpoint, "save_file"):
            monkeypatch.setattr(mapo.checkpoint, "save_file", save_file)

    def armed(self, target) -> bool:
        """A write to a file in the checkpoints folder (a path, or a file object with that name) once one
        checkpoint is complete; in-memory buffers are not the disk."""
        name = target if isinstance(target, (str, os.PathLike)) else getattr(target, "name", None)
        if not isinstance(name, (str, os.PathLike)) or Path(self.run_dir, "checkpoints") not in Path(name).parents:
            return False
        return resolve_resume(self.run_dir, "auto") is not None


def test_enospc_in_the_training_program_fails_loudly_and_resume_auto_recovers(tiny_env, tmp_path, reference, monkeypatch):
    """Every checkpoint writer raises ENOSPC (after writing part of a file) once checkpoint 2 exists: the
    run stops with the error, checkpoint 2 stays the newest, and resume=auto reproduces the uninterrupted run."""
    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        disk = DiskFullAfterFirstCheckpoint(run_dir, patch)
        cfg = compose_config(_overrides(tiny_env, run_dir, "trainer.checkpoint_every=2"))
        with pytest.raises(OSError) as info:
            mapo.train.run(cfg)
    assert info.value.errno == errno.ENOSPC and disk.failures >= 1
    assert resolve_resume(run_dir, "auto").name == "step_000002"
    mapo.train.run(compose_config(_overrides(tiny_env, run_dir, "trainer.checkpoint_every=2", "trainer.resume=auto")))
    rows = train_rows(run_dir)
    assert sorted(rows) == list(range(1, STEPS + 1))
    _assert_same_as_reference(reference["rows"], rows, range(1, STEPS + 1))


def test_phase_resume_restores_every_rng(tmp_path):
    phase, _ = _fresh_phase()
    ctx = dist_utils.init_distributed("cpu")
    phase.step = 1
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    phase.save(tmp_path, ctx, keep_last=1)
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    torch.rand(100), np.random.rand(100), random.random()  # move every generator on
    fresh, _ = _fresh_phase()
    fresh.resume(resolve_resume(tmp_path, "auto"), ctx)
    got = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_a_signal_during_the_warm_start_keeps_its_progress(tiny_env, tmp_path):
    """SIGTERM while the supervised warm start runs: a checkpoint in its work folder, exit 143; the next
    run resumes the warm start from there instead of starting it again."""
    cache = tmp_path / "warm"
    run_dir = tmp_path / "run"
    overrides = _overrides(tiny_env, run_dir, "trainer.warm_start.enabled=true", f"trainer.warm_start.cache_dir={cache}",
                           "trainer.warm_start.steps=8", "trainer.warm_start.batch_size=4", "trainer.steps=1")
    proc = subprocess.Popen(train_command(overrides), cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not any(len(metrics_rows(work)) >= 2 for work in cache.glob("*.run")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    (work,) = cache.glob("*.run")
    stopped_at = len(metrics_rows(work))
    assert f"warm start stopped at step {stopped_at} of 8" in out and stopped_at < 8
    assert resolve_resume(work, "auto").name == f"step_{stopped_at:06d}"
    done = run_training(overrides, cwd=tmp_path)
    assert f"resumed warm start at step {stopped_at}" in done.stdout  # resumed, not restarted
    assert not work.exists() and any(cache.glob("*/model.safetensors"))  # finished and cached


def test_a_full_disk_on_one_of_two_ranks_stops_both_without_waiting(tmp_path):
    """2 gloo ranks: at step 2 rank 1, at step 3 rank 0, cannot write its files (ENOSPC). Both ranks must
    raise the same clear error each time (none may wait forever at a barrier: the test fails after 120 s),
    and step 1 stays the newest complete checkpoint."""
    import json

    sys.path.insert(0, str(SCRIPTS))  # the spawned ranks import the worker from there
    try:
        from save_loop import two_rank_worker

        spawn_two_ranks(two_rank_worker, str(tmp_path))
    finally:
        sys.path.remove(str(SCRIPTS))
    outcomes = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert outcomes[0]["1"] == outcomes[1]["1"] == "saved"
    for step, failing in (("2", 1), ("3", 0)):
        for rank in (0, 1):
            outcome = outcomes[rank][step]
            assert outcome.startswith("CheckpointWriteError errno=") and f"checkpoint of step {step} could not be written" in outcome
            assert "step_000001 is intact" in outcome
        assert "errno=28" in outcomes[failing][step]  # the rank that met the full disk names it
    assert resolve_resume(tmp_path, "auto").name == "step_000001"
