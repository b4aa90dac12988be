"""`python -m mapo.eval` end to end with the tiny model: files, values, options, checkpoints, ranks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmark_files import FIXTURES
from mapo.data.collate import Collator
from mapo.eval.cli import main as eval_main
from mapo.eval.collapse import collapse_values
from mapo.eval.score import main as score_main
from mapo.evaluate import generation_tokens
from mapo.models.loader import load_model_and_processor
from mapo.rollout import generate_rollout

MMAU = FIXTURES / "mmau" / "mmau-test-mini.json"
SRC = Path(__file__).resolve().parents[1] / "src"


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_eval(*args: str) -> None:
    assert eval_main([*map(str, args), "--no-progress", "--num-threads", "1"]) == 0


@pytest.fixture(scope="module")
def full_eval(tiny_env, tmp_path_factory):
    """All three conditions with collapse diagnostics on the MMAU fixture (4 items, 4 new tokens)."""
    out = tmp_path_factory.mktemp("eval") / "out"
    run_eval("--model", tiny_env["model"], "--data", MMAU, "--out", out, "--conditions", "all",
             "--max-new-tokens", 4, "--batch-size", 3, "--collapse")
    return out


def test_files_and_values_agree(full_eval):
    out = full_eval
    for name in ("predictions.jsonl", "summary.json", "summary.md", "submission.json", "submission_no_audio.json",
                 "submission_shuffled.json", "collapse.json", "collapse.png", "charts/accuracy_by_condition.png",
                 "charts/accuracy_by_task.png", "charts/accuracy_by_difficulty.png", "charts/accuracy_by_sub-category.png"):
        assert (out / name).stat().st_size > 0, name
    rows = read_rows(out / "predictions.jsonl")
    assert [(r["id"], r["condition"]) for r in rows] == [
        (f"mmau-{k}", c) for c in ("audio", "no_audio", "shuffled") for k in (1, 2, 3, 4)]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["benchmark"] == "mmau" and summary["conditions"] == ["audio", "no_audio", "shuffled"]
    for condition in summary["conditions"]:
        part = [r for r in rows if r["condition"] == condition]
        overall = summary["by_condition"][condition]["overall"]
        assert overall["n"] == 4 and overall["correct"] == sum(r["correct"] for r in part)
        assert overall["accuracy"] == sum(r["correct"] for r in part) / 4
        assert overall["correct_strict"] == sum(r["correct_strict"] for r in part)
    audio = {r["id"]: r["matched_choice"] for r in rows if r["condition"] == "audio"}
    for condition in ("no_audio", "shuffled"):
        flips = [audio[r["id"]] != r["matched_choice"] for r in rows if r["condition"] == condition]
        assert summary["flip_rate"][condition] == sum(flips) / 4
    assert summary["overall"] == summary["by_condition"]["audio"]["overall"]
    assert summary["notes"][0].startswith("2 row(s) have duplicated choice strings")
    # the submission file is the fixture's rows with the raw audio outputs
    submission = json.loads((out / "submission.json").read_text())
    assert [s["model_prediction"] for s in submission] == [r["model_output"] for r in rows[:4]]
    assert [{k: v for k, v in s.items() if k != "model_prediction"} for s in submission] == json.loads(MMAU.read_text())


def test_collapse_outputs(full_eval):
    rows = read_rows(full_eval / "predictions.jsonl")
    curves = json.loads((full_eval / "collapse.json").read_text())
    assert sorted(curves) == ["audio", "no_audio"]
    assert all("audio_mass_bins" not in r for r in rows if r["condition"] == "shuffled")
    for condition, curve in curves.items():
        assert curve["completions"] == 4 and len(curve["audio_mass"]) == len(curve["abs_delta_h"]) == 10
        assert 4 <= sum(curve["tokens"]) <= 16  # at most 4 new tokens per completion (--max-new-tokens 4)
        # the pooled curve is the token-weighted mean of the per-completion bins written with the rows
        part = [r for r in rows if r["condition"] == condition]
        for b, (mass, tokens) in enumerate(zip(curve["audio_mass"], curve["tokens"])):
            cells = [r["audio_mass_bins"][b] for r in part if r["audio_mass_bins"][b] is not None]
            if tokens == 0:
                assert mass is None and not cells
            else:
                assert 0 < mass < 1 and min(cells) - 1e-6 <= mass <= max(cells) + 1e-6


def test_rescoring_reproduces_the_summary(full_eval, tmp_path):
    assert score_main([str(full_eval / "predictions.jsonl"), "--data", str(MMAU), "--out", str(tmp_path)]) == 0
    first = json.loads((full_eval / "summary.json").read_text())
    again = json.loads((tmp_path / "summary.json").read_text())
    for key in ("overall", "breakdowns", "by_condition", "flip_rate"):
        assert again[key] == first[key], key
    strip = lambda r: {k: v for k, v in r.items() if not k.endswith("_bins")}  # noqa: E731
    assert [strip(r) for r in read_rows(tmp_path / "predictions.jsonl")] == [strip(r) for r in read_rows(full_eval / "predictions.jsonl")]


def test_collapse_values_match_an_eager_full_forward(tiny_env):
    """Mass and |Δh| from the capture + scoring path equal an eager forward's attention weights and logits."""
    from mapo.eval.benchmark import load_benchmark

    records = load_benchmark(MMAU).records[:2]
    model, processor = load_model_and_processor(tiny_env["model"])
    collator = Collator(processor)
    batch = collator.prompts(records)
    rollout = generate_rollout(model, batch, group_size=1, max_new_tokens=5, do_sample=False, **generation_tokens(processor))
    mass, abs_dh = collapse_values(model, rollout, "audio")

    eager, _ = load_model_and_processor(tiny_env["model"], attn_implementation="eager")
    ids, mask = rollout.full_ids, rollout.attention_mask
    P, T = rollout.prompt_len, rollout.completion_ids.shape[1]
    with torch.no_grad():
        with_audio = eager(input_ids=ids, attention_mask=mask, input_features=batch["input_features"],
                           feature_attention_mask=batch["feature_attention_mask"], output_attentions=True)
        dropped = eager(inputs_embeds=eager.get_input_embeddings()(ids), attention_mask=mask)
    audio_keys = rollout.audio_mask.float()  # [N, S]
    per_layer = [(a * audio_keys[:, None, None, :]).sum(-1).amax(1) for a in with_audio.attentions]  # [N, S] each
    expected_mass = torch.stack(per_layer).mean(0)[:, P - 1 : P - 1 + T]
    entropy = lambda logits: -(logits.log_softmax(-1).exp() * logits.log_softmax(-1)).sum(-1)  # noqa: E731
    h_audio = entropy(with_audio.logits[:, P - 1 : P - 1 + T].float())
    h_dropped = entropy(dropped.logits[:, P - 1 : P - 1 + T].float())
    valid = rollout.completion_mask.bool()
    assert valid.sum() >= 2
    torch.testing.assert_close(mass[valid], expected_mass[valid], atol=2e-4, rtol=0)
    torch.testing.assert_close(abs_dh[valid], (h_dropped - h_audio).abs()[valid], atol=2e-4, rtol=0)
    assert (mass[~valid] == 0).all() and (abs_dh[~valid] == 0).all()


def test_options_take_effect(tiny_env, tmp_path, monkeypatch):
    model = tiny_env["model"]
    # --compile reaches every rollout (the spy decodes uncompiled: Inductor compiles for minutes on a CPU;
    # the compiled decode is tested in test_rollout) and is recorded in the summary
    import mapo.evaluate as evaluate

    real, received = evaluate.generate_rollout, []
    monkeypatch.setattr(evaluate, "generate_rollout", lambda *a, **kw: received.append(kw["compile_decoder"])
                        or real(*a, **{**kw, "compile_decoder": False}))
    run_eval("--model", model, "--data", MMAU, "--out", tmp_path / "c", "--max-new-tokens", 2, "--compile")
    assert received and set(received) == {True}
    assert json.loads((tmp_path / "c" / "summary.json").read_text())["options"]["compile"] is True
    monkeypatch.undo()
    # one condition: only its rows, it is the main condition, no flip rate, no collapse files
    run_eval("--model", model, "--data", MMAU, "--out", tmp_path / "a", "--conditions", "no_audio", "--max-new-tokens", 3)
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["conditions"] == ["no_audio"] and summary["main_condition"] == "no_audio"
    assert summary["flip_rate"] == {} and not (tmp_path / "a" / "collapse.json").exists()
    assert summary["options"]["max_new_tokens"] == 3
    # --limit 2 keeps one item per task (3 tasks); sampling with a seed is reproducible and not greedy
    sampled = []
    for name in ("s1", "s2"):
        run_eval("--model", model, "--data", MMAU, "--out", tmp_path / name, "--limit", 2, "--do-sample",
                 "--temperature", 1.5, "--seed", 3, "--max-new-tokens", 8)
        sampled.append([r["model_output"] for r in read_rows(tmp_path / name / "predictions.jsonl")])
    assert len(sampled[0]) == 3 and sampled[0] == sampled[1]
    run_eval("--model", model, "--data", MMAU, "--out", tmp_path / "g", "--limit", 2, "--max-new-tokens", 8)
    assert [r["model_output"] for r in read_rows(tmp_path / "g" / "predictions.jsonl")] != sampled[0]
    run_eval("--model", model, "--data", MMAU, "--out", tmp_path / "s3", "--limit", 2, "--do-sample",
             "--temperature", 1.5, "--seed", 4, "--max-new-tokens", 8)
    assert [r["model_output"] for r in read_rows(tmp_path / "s3" / "predictions.jsonl")] != sampled[0]


def test_hidden_answers_write_a_submission(tiny_env, tmp_path, capsys):
    out = tmp_path / "test-split"
    run_eval("--model", tiny_env["model"], "--data", FIXTURES / "mmau" / "mmau-test.json", "--out", out, "--max-new-tokens", 3)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accuracy_computable"] is False and summary["overall"]["accuracy"] is None
    assert not (out / "charts").exists()
    rows = read_rows(out / "predictions.jsonl")
    submission = json.loads((out / "submission.json").read_text())
    assert [(s["id"], s["answer"], s["model_prediction"]) for s in submission] == [
        (r["id"], "", r["model_output"]) for r in rows]
    printed = capsys.readouterr().out
    assert "accuracy cannot be computed" in printed and f"evaluation written to: {out.resolve()}" in printed


def test_bad_inputs_exit_2(tiny_env, tmp_path, capsys):
    assert eval_main(["--model", str(tmp_path / "nope"), "--data", str(MMAU)]) == 2
    assert "model folder not found" in capsys.readouterr().err
    assert eval_main(["--model", str(tiny_env["model"]), "--data", str(FIXTURES / "mmau" / "missing.json")]) == 2
    assert "manifest not found" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="valid are audio, no_audio, shuffled"):
        eval_main(["--model", str(tiny_env["model"]), "--data", str(MMAU), "--conditions", "muted"])


def test_every_layout_evaluates(tiny_env, tmp_path):
    for name, path, expected_breakdowns in (
        ("mmar", FIXTURES / "mmar" / "MMAR-meta.json", ["modality", "category", "sub-category"]),
        ("mmsu", FIXTURES / "MMSU" / "question" / "mmsu.jsonl", ["task", "category", "sub-category"]),
        ("ours", tiny_env["data"] / "test.jsonl", ["task"]),
    ):
        run_eval("--model", tiny_env["model"], "--data", path, "--out", tmp_path / name, "--max-new-tokens", 2, "--limit", 6)
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["benchmark"] == name and list(summary["breakdowns"]) == expected_breakdowns


def test_checkpoint_wise_evaluation(tiny_env, tmp_path, capsys):
    run = tmp_path / "run"
    for step in (2, 4):
        shutil.copytree(tiny_env["model"], run / "exports" / f"step_{step:06d}")
    shutil.copytree(tiny_env["model"], run / "final_model")
    (run / "final_metrics.json").write_text(json.dumps({"step": 6}))
    (run / "exports" / "step_000009").mkdir()  # no config.json: not an export, ignored
    run_eval("--run-dir", run, "--data", MMAU, "--max-new-tokens", 3, "--conditions", "audio,no_audio")
    out = run / "eval" / "mmau-test-mini"
    table = json.loads((out / "accuracy_vs_step.json").read_text())
    assert [(r["checkpoint"], r["step"]) for r in table] == [("step_000002", 2), ("step_000004", 4), ("final_model", 6)]
    for row in table:
        summary = json.loads((out / row["checkpoint"] / "summary.json").read_text())
        assert row["audio/accuracy"] == summary["by_condition"]["audio"]["overall"]["accuracy"]
        assert row["no_audio/accuracy"] == summary["by_condition"]["no_audio"]["overall"]["accuracy"]
        assert row["no_audio/flip_rate"] == summary["flip_rate"]["no_audio"] and row["n"] == 4
    md = (out / "accuracy_vs_step.md").read_text()
    assert "| checkpoint | step | n | with audio accuracy | with audio accuracy strict |" in md
    assert md.count("\n| step_0000") == 2 and "| final_model | 6 | 4 |" in md
    assert (out / "accuracy_vs_step.png").stat().st_size > 0
    # a second call reuses what is there
    stamp = (out / "step_000002" / "summary.json").stat().st_mtime_ns
    capsys.readouterr()
    run_eval("--run-dir", run, "--data", MMAU, "--max-new-tokens", 3, "--conditions", "audio,no_audio")
    assert "step_000002: reusing" in capsys.readouterr().out
    assert (out / "step_000002" / "summary.json").stat().st_mtime_ns == stamp
    (tmp_path / "empty").mkdir()
    assert eval_main(["--run-dir", str(tmp_path / "empty"), "--data", str(MMAU)]) == 2
    assert "no exported model folders" in capsys.readouterr().err


def test_two_ranks_give_the_single_process_result(tiny_env, full_eval, tmp_path):
    """torchrun with 2 CPU processes (gloo): items sharded, answers gathered; the same files as one process."""
    out = tmp_path / "two"
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mapo.eval",
           "--model", str(tiny_env["model"]), "--data", str(MMAU), "--out", str(out), "--conditions", "audio,shuffled",
           "--max-new-tokens", "4", "--batch-size", "3", "--collapse", "--no-progress", "--num-threads", "1"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    one = [r for r in read_rows(full_eval / "predictions.jsonl") if r["condition"] != "no_audio"]
    two = read_rows(out / "predictions.jsonl")
    assert [(r["id"], r["condition"]) for r in two] == [(r["id"], r["condition"]) for r in one]
    assert [r["model_output"] for r in two] == [r["model_output"] for r in one]
    for a, b in zip(one, two):
        for key in ("audio_mass_bins", "abs_dh_bins"):
            if key in a:
                np.testing.assert_allclose(np.array(b[key], dtype=float), np.array(a[key], dtype=float), atol=1e-5)
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
