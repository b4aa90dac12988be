"""Shared test setup: one CPU thread (steady timings on a shared 2-core machine), offline W&B, and a small
synthetic benchmark + tiny model built once per session for the end-to-end tests."""

from __future__ import annotations

import os

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
