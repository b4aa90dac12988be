"""Sweep summary over a fake Hydra multirun folder: rows, columns and values in CSV and Markdown."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from mapo.sweep_summary import main, parse_overrides_file, summarize_sweep

torch.set_num_threads(1)


def make_run(sweep: Path, name: str, overrides: list[str], final: dict | None = None,
             metrics_lines: list[str] | None = None) -> Path:
    """One Hydra run folder: .hydra/overrides.yaml in Hydra's format (a YAML list of strings)."""
    run = sweep / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (run / ".hydra" / "config.yaml").write_text("algo: {}\n")
    if final is not None:
        (run / "final_metrics.json").write_text(json.dumps(final))
    if metrics_lines is not None:
        (run / "metrics.jsonl").write_text("".join(line + "\n" for line in metrics_lines))
    return run


@pytest.fixture
def sweep(tmp_path) -> Path:
    sweep = tmp_path / "multirun" / "2026-01-01" / "12-00-00"
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    # Run 0 finished: final_metrics.json wins over metrics.jsonl; nested dicts flatten; text is dropped.
    make_run(sweep, "0", ["experiment=tiny_mapo", "algo.mask.tau_base=0.5", "algo.attn.schedule=power"],
             final={"step": 100, "reward/mean": 0.123456, "eval": {"accuracy": 0.98765}, "note_text": "x"},
             metrics_lines=['{"step": 99, "reward/mean": 0.0}'])
    # Run 1 failed at startup: nothing but its overrides.
    make_run(sweep, "1", ["experiment=tiny_mapo", "algo.mask.tau_base=1", "algo.attn.schedule=power"])
    # Run 10 (after 1 in natural order) has no final file: last complete line of metrics.jsonl,
    # the partial line of a run killed mid-write is skipped.
    make_run(sweep, "10", ["experiment=tiny_mapo", "algo.mask.tau_base=2", "+algo.attn.schedule=exp"],
             metrics_lines=['{"step": 1, "reward/mean": 0.5}', '{"step": 2, "reward/mean": 2.0e-5, "kl": 1234567.0}',
                            '{"step": 3, "rew'])
    return sweep


def test_rows_and_columns(sweep):
    rows = summarize_sweep(sweep)
    assert [r["run"] for r in rows] == ["0", "1", "10"]  # natural order: 1 before 10
    assert [r["status"] for r in rows] == ["ok", "failed", "ok"]
    assert list(rows[0]) == ["run", "status", "experiment", "algo.mask.tau_base", "algo.attn.schedule",
                             "step", "reward/mean", "eval/accuracy", "kl", "note"]
    assert rows[0] == {
        "run": "0", "status": "ok", "experiment": "tiny_mapo", "algo.mask.tau_base": "0.5",
        "algo.attn.schedule": "power", "step": 100, "reward/mean": 0.123456, "eval/accuracy": 0.98765,
        "kl": None, "note": "",
    }
    assert rows[1]["algo.mask.tau_base"] == "1"
    assert [rows[1][k] for k in ("step", "reward/mean", "eval/accuracy", "kl")] == [None] * 4
    assert rows[1]["note"] == "no final_metrics.json or metrics.jsonl"
    # "+algo.attn.schedule" is the same column as "algo.attn.schedule".
    assert (rows[2]["algo.attn.schedule"], rows[2]["step"], rows[2]["reward/mean"], rows[2]["kl"]) == (
        "exp", 2, 2.0e-5, 1234567.0)
    assert rows[2]["note"] == "from last line of metrics.jsonl"


def test_csv_file(sweep):
    summarize_sweep(sweep)
    with open(sweep / "summary.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["run", "status", "experiment", "algo.mask.tau_base", "algo.attn.schedule",
                        "step", "reward/mean", "eval/accuracy", "kl", "note"]
    assert len(table) == 4  # header + every run, the failed one included
    # CSV keeps full precision; empty cells for what a run does not have.
    assert table[1] == ["0", "ok", "tiny_mapo", "0.5", "power", "100", "0.123456", "0.98765", "", ""]
    assert table[2] == ["1", "failed", "tiny_mapo", "1", "power", "", "", "", "",
                        "no final_metrics.json or metrics.jsonl"]
    assert table[3][:9] == ["10", "ok", "tiny_mapo", "2", "exp", "2", "2e-05", "", "1234567.0"]


def test_markdown_file(sweep):
    summarize_sweep(sweep)
    lines = (sweep / "summary.md").read_text().splitlines()
    assert lines[0] == ("| run | status | experiment | algo.mask.tau_base | algo.attn.schedule | step | "
                        "reward/mean | eval/accuracy | kl | note |")
    assert lines[1] == "|---|---|---|---|---|---|---|---|---|---|"
    # 4 significant digits: 0.123456 -> 0.1235, 0.98765 -> 0.9877 (the double nearest 0.98765 is
    # 0.98765000000000002789..., just above the half, so it rounds up); the int step stays "100".
    assert lines[2] == "| 0 | ok | tiny_mapo | 0.5 | power | 100 | 0.1235 | 0.9877 |  |  |"
    assert lines[3] == "| 1 | failed | tiny_mapo | 1 | power |  |  |  |  | no final_metrics.json or metrics.jsonl |"
    # 2.0e-5 -> 2e-05; 1234567.0 -> 1.235e+06 (4 significant digits switch to exponent form).
    assert lines[4] == "| 10 | ok | tiny_mapo | 2 | exp | 2 | 2e-05 |  | 1.235e+06 | from last line of metrics.jsonl |"
    assert len(lines) == 5


def test_chosen_metrics_and_output_paths(sweep, tmp_path):
    out_csv, out_md = tmp_path / "o" / "s.csv", tmp_path / "o" / "s.md"
    rows = summarize_sweep(sweep, out_csv=out_csv, out_md=out_md, metrics=["eval/accuracy", "missing"])
    assert list(rows[0]) == ["run", "status", "experiment", "algo.mask.tau_base", "algo.attn.schedule",
                             "eval/accuracy", "missing", "note"]
    assert [r["eval/accuracy"] for r in rows] == [0.98765, None, None]
    assert out_csv.read_text().splitlines()[0].endswith("eval/accuracy,missing,note")
    assert out_md.is_file() and not (sweep / "summary.csv").exists()


def test_cli(sweep, capsys):
    assert main([str(sweep), "--metrics", "reward/mean"]) == 0
    out = capsys.readouterr()
    assert out.out.splitlines()[2] == "| 0 | ok | tiny_mapo | 0.5 | power | 0.1235 |  |"
    assert "3 runs (1 failed)" in out.err
    assert main([str(sweep / "nope")]) == 2
    assert "sweep folder not found" in capsys.readouterr().err


def test_empty_sweep_and_bad_overrides(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run folders"):
        summarize_sweep(tmp_path)
    bad = tmp_path / "overrides.yaml"
    bad.write_text("algo.eta: 0.1\n")
    with pytest.raises(ValueError, match=r"overrides.yaml: expected a YAML list"):
        parse_overrides_file(bad)
    bad.write_text("- algo.eta\n")
    with pytest.raises(ValueError, match=r"entry 0 'algo.eta' has no '='"):
        parse_overrides_file(bad)
    bad.write_text("- ~algo.attn\n- ++trainer.steps=5\n- data.path=a=b\n")
    assert parse_overrides_file(bad) == {"algo.attn": "~deleted", "trainer.steps": "5", "data.path": "a=b"}
    bad.write_text("[]\n")
    assert parse_overrides_file(bad) == {}


def test_eval_columns_come_from_the_evaluated_splits(tmp_path):
    sweep = tmp_path / "sweep"
    # Run 0 evaluated MMAU (audio, no_audio) and the built-in test split (audio only); run 1 also
    # shuffled MMAU and a new split; per-task keys and other metrics are not evaluation columns.
    make_run(sweep, "0", ["algo.eta=0"], final={
        "step": 5, "train_seconds": 12.5, "mmau/audio/accuracy": 0.5, "mmau/no_audio/accuracy": 0.25,
        "mmau/flip_rate": 0.4, "mmau/audio/task/sound": 1.0, "test/audio/accuracy": 0.75, "reward/mean": 0.3})
    make_run(sweep, "1", ["algo.eta=0.05"], final={
        "step": 5, "mmau/shuffled/accuracy": 0.125, "mmau/audio/accuracy": 0.625, "mmar/audio/accuracy": 0.375})
    make_run(sweep, "2", ["algo.eta=0.1"])  # failed: no metrics, still listed
    rows = summarize_sweep(sweep, eval_only=True)
    assert list(rows[0]) == ["run", "status", "algo.eta", "step", "mmau/audio/accuracy", "mmau/no_audio/accuracy",
                             "mmau/shuffled/accuracy", "mmau/flip_rate", "test/audio/accuracy",
                             "mmar/audio/accuracy", "train_seconds", "note"]
    assert [rows[0][k] for k in ("mmau/audio/accuracy", "mmau/shuffled/accuracy", "test/audio/accuracy", "train_seconds")] == [
        0.5, None, 0.75, 12.5]
    assert [rows[1][k] for k in ("mmau/audio/accuracy", "mmau/shuffled/accuracy", "mmar/audio/accuracy")] == [0.625, 0.125, 0.375]
    assert rows[2]["status"] == "failed"
    with pytest.raises(ValueError, match="not both"):
        summarize_sweep(sweep, metrics=["step"], eval_only=True)
    assert main([str(sweep), "--eval-columns"]) == 0
    assert (sweep / "summary.md").read_text().splitlines()[0].startswith("| run | status | algo.eta | step | mmau/audio/accuracy |")
