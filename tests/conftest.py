"""Shared test setup: one CPU thread (steady timings on a shared 2-core machine), offline W&B, and a small
synthetic benchmark + tiny model built once per session for the end-to-end tests."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_env(tmp_path_factory):
    """{'data': folder with train/test/counter_prior.jsonl (12 items per task and split), 'model': tiny model folder}."""
    from mapo.data.synthetic import SyntheticConfig, write_benchmark
    from mapo.models.tiny import TinyModelConfig, write_tiny

    root = tmp_path_factory.mktemp("tiny_env")
    data = root / "data"
    write_benchmark(SyntheticConfig(out_dir=str(data), n_train=12, n_test=4, n_counter_prior=4, seed=0))
    model = write_tiny(TinyModelConfig(out_dir=str(root / "model"), corpus=str(data / "train.jsonl")))
    return {"root": root, "data": data, "model": model}


# ------------------------------------------------------------------------------------------ hygiene
# Tests write only under temporary folders: the session fails when it leaves anything new in the
# repository (a run folder under outputs/, a W&B folder, artifacts, a stray file at the top).
REPO = Path(__file__).resolve().parents[1]
_SCRATCH = {".git", ".venv", ".pytest_cache", "__pycache__"}
_WATCHED = ("outputs", "multirun", "wandb", "artifacts")


def _repo_entries() -> set[str]:
    found = {e.name for e in REPO.iterdir() if e.name not in _SCRATCH and not e.name.endswith(".egg-info")}
    for name in _WATCHED:
        if (REPO / name).is_dir():
            found |= {str(p.relative_to(REPO)) for p in (REPO / name).rglob("*") if "__pycache__" not in p.parts}
    return found


def pytest_sessionstart(session):
    session.config.stash[_BEFORE] = _repo_entries()


def pytest_sessionfinish(session, exitstatus):
    before = session.config.stash.get(_BEFORE, None)
    if before is None or getattr(session.config, "workerinput", None) is not None:
        return
    new = sorted(_repo_entries() - before)
    if new:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = "tests left files in the repository (write under tmp_path instead):\n  " + "\n  ".join(new[:20])
        if reporter is not None:
            reporter.write_line(message, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


_BEFORE = pytest.StashKey[set]()
