"""The GPU check script (experiments/gpu/full_step.py) runs end to end at toy widths on CPU, measuring each
phase with the tensor-byte probe, and its peaks agree with the memory plan."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "gpu" / "full_step.py"


def load_script():
    spec = importlib.util.spec_from_file_location("full_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("rank", [4])  # LoRA; full fine-tuning against the plan: tests/test_plan.py
def test_full_step_runs_at_toy_widths_and_meets_the_plan(rank, capsys):
    script = load_script()
    result = script.main(["--tiny", "--device", "cpu", "--prompts", "2", "--group", "4", "--new-tokens", "8", "--micro", "4",
                          "--eval-batch", "2", "--lora-rank", str(rank)])
    assert list(result["phases"]) == ["rollout", "scoring", "update", "optimizer step", "evaluation"]
    assert result["rows"] == 8 and result["lora_rank"] == rank
    if rank:  # only the adapters train: rank·(in + out) per adapted linear of the text model (7 per layer × 2 layers)
        per_layer = 4 * (64 + 64) + 3 * (64 + 128)
        assert result["trainable_params"] == rank * 2 * per_layer
    ratio = result["plan_peak_bytes"] / result["measured_peak_bytes"]
    print(f"\n[plan check] full_step --tiny (vocabulary 156,032, 30 s window), LoRA rank {rank}: plan/measured peak {ratio:.3f}")
    assert 0.8 <= ratio <= 1.2
    assert "| update |" in capsys.readouterr().out
