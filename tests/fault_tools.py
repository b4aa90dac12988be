"""Helpers of the fault suite (not a test module): tiny training configs, in-process and subprocess runs,
manifests with planted faults. Imported by the test_faults_*.py files (tests/ is on sys.path)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mapo.config import register_configs

CONF = Path(__file__).resolve().parents[1] / "conf"
register_configs()


def tiny_overrides(env: dict, run_dir: Path, *extra: str, data_dir: Path | None = None,
                   experiment: str = "tiny_grpo") -> list[str]:
    """A small, fast run of the tiny model: no warm start, 2 prompts × 2 samples, 6 new tokens, 3 steps."""
    return [
        f"experiment={experiment}", "logger=none", f"model.path={env['model']}", f"data.dir={data_dir or env['data']}",
        f"trainer.run_dir={run_dir}", "trainer.warm_start.enabled=false", "trainer.steps=3", "trainer.num_threads=1",
        "trainer.eval_on_start=false", "trainer.export_final=false", "data.eval_max_items=2",
        "data.eval_splits={test: test.jsonl}", "rollout.prompts_per_step=2", "rollout.group_size=2",
        "rollout.max_new_tokens=6", "trainer.micro_batch_size=4", "trainer.checkpoint_every=100", "trainer.warmup_steps=0",
        "trainer.lr=1e-3", *extra,
    ]


def compose_config(overrides: list[str]):
    """The typed MapoConfig the training program would get from these command-line overrides."""
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return OmegaConf.to_object(compose("config", overrides=overrides))


def train_command(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "mapo.train", *overrides]


def subprocess_env() -> dict:
    src = str(Path(__file__).resolve().parents[1] / "src")
    path = os.environ.get("PYTHONPATH", "")
    return dict(os.environ, WANDB_MODE="offline", HYDRA_FULL_ERROR="1", OMP_NUM_THREADS="1",
                PYTHONPATH=src + (os.pathsep + path if path else ""))


def run_training(overrides: list[str], cwd: Path, timeout: float = 600, expect: int | None = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(train_command(overrides), cwd=cwd, capture_output=True, text=True, env=subprocess_env(),
                          timeout=timeout)
    if expect is not None:
        assert proc.returncode == expect, f"rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def metrics_rows(run_dir: Path) -> list[dict]:
    file = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in file.read_text().splitlines()] if file.is_file() else []


def train_rows(run_dir: Path) -> dict[int, dict]:
    """step -> the training metrics row of that step (the last one written, after a resume)."""
    return {row["step"]: row for row in metrics_rows(run_dir) if "reward/mean" in row}


def copy_data(env: dict, dest: Path) -> Path:
    """A private copy of the tiny benchmark (manifests and audio), so a test may break files in it."""
    shutil.copytree(env["data"], dest)
    return dest


def write_clip(path: Path, seconds: float, sr: int = 16_000, channels: int = 1, value: float | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = int(round(seconds * sr))
    t = np.arange(n) / sr
    mono = 0.3 * np.sin(2 * np.pi * 440 * t) if value is None else np.full(n, value)
    samples = np.stack([mono] * channels, axis=1) if channels > 1 else mono
    sf.write(str(path), samples.astype(np.float32), sr, subtype="FLOAT")
    return path


def manifest_row(row_id: str, audio: str | None, answer: str = "higher", **extra) -> str:
    row = {"id": row_id, "audio": audio, "question": "Is the second tone higher or lower than the first?",
           "choices": ["higher", "lower"], "answer": answer, "task": "pitch_compare", "split": "train", **extra}
    return json.dumps(row)


def free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def spawn_two_ranks(worker, *args, timeout: float = 120) -> None:
    """Run `worker(rank, 2, port, *args)` in 2 spawned processes (gloo needs the port); fail the test
    when they have not all finished after `timeout` seconds: a rank waiting forever is the fault."""
    import time

    import pytest
    import torch.multiprocessing as mp

    context = mp.start_processes(worker, args=(2, free_port(), *args), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"a rank was still waiting after {timeout} s")
