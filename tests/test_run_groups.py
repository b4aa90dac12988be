"""Run-group summaries over seeds (mapo.run_groups), their plots (mapo.group_plots) and the collapse-curve
binning (mapo.collapse_curve), on hand-made run folders with hand-worked numbers."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from mapo.group_plots import accuracy_bars, collapse_curves, moving_average, step_curves, write_group_plots
from mapo.run_groups import (
    algorithm_label,
    config_value,
    find_runs,
    format_mean_std,
    group_runs,
    main,
    mean_std,
    read_run,
    run_metrics,
    summarize,
    summary_rows,
    to_markdown,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def algo(name="mapo", mask=True, eta=0.05):
    return {"name": name, "mask": {"enabled": mask}, "attn": {"eta": eta, "layers": [-2, -1]}}


ALGOS = {"grpo": algo("grpo", False, 0.0), "mapo": algo(), "mask_only": algo(eta=0.0), "attn_only": algo(mask=False)}


def make_run(root: Path, name: str, *, experiment="study_x", algorithm="grpo", final=None, rewards=(), collapse=None,
             seed=0) -> Path:
    run = root / name
    run.mkdir(parents=True)
    config = {"experiment_name": experiment, "algo": ALGOS[algorithm], "trainer": {"seed": seed}}
    (run / "config.json").write_text(json.dumps({"config": config, "git": None}))
    lines = [json.dumps({"step": 0, "eval/test/audio/accuracy": 0.5})]
    lines += [json.dumps({"step": i + 1, "reward/mean": r, "audio_mass/q1": 0.4, "audio_mass/q4": 0.1 + 0.01 * i})
              for i, r in enumerate(rewards)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if final is not None:
        (run / "final_metrics.json").write_text(json.dumps({"step": len(rewards), **final}))
    if collapse is not None:
        (run / "collapse.json").write_text(json.dumps({"bins": len(collapse), "layers": [-2, -1],
                                                       "splits": {"counter_prior": {"audio_mass": collapse}}}))
    return run


@pytest.fixture
def study(tmp_path):
    """Three GRPO seeds, two MAPO seeds, one unfinished MAPO run, one run of another experiment."""
    root = tmp_path / "runs"
    for i, (cp, test) in enumerate([(0.5, 0.9), (0.6, 0.9), (0.7, 0.9)]):
        make_run(root, f"{i}", algorithm="grpo", seed=i, rewards=[float(v) for v in range(30)],
                 final={"test/audio/accuracy": test, "counter_prior/audio/accuracy": cp},
                 collapse=[0.4, 0.3, 0.2, 0.1 * (i + 1)])
    for i, cp in enumerate([0.8, 0.9]):
        make_run(root, f"{3 + i}", algorithm="mapo", seed=i, rewards=[0.5, 0.7],
                 final={"test/audio/accuracy": 0.95, "counter_prior/audio/accuracy": cp})
    make_run(root, "5", algorithm="mapo", seed=2, rewards=[0.1])  # interrupted: no final metrics
    make_run(root, "6", experiment="study_y", algorithm="attn_only", final={"counter_prior/audio/accuracy": 0.25})
    return root


def test_mean_std_is_the_sample_statistic():
    assert mean_std([0.5, 0.6, 0.7]) == pytest.approx((0.6, 0.1, 3))
    mean, std, n = mean_std([0.8, 0.9])
    assert (mean, std, n) == pytest.approx((0.85, math.sqrt(0.005), 2))  # ((0.05² · 2) / 1) ** 0.5
    mean, std, n = mean_std([0.3])
    assert (mean, n) == (0.3, 1) and math.isnan(std)
    mean, std, n = mean_std([float("nan"), None, 2.0, 4.0])  # non-finite values are left out
    assert (mean, n) == (3.0, 2) and std == pytest.approx(math.sqrt(2))
    assert math.isnan(mean_std([])[0]) and mean_std([])[2] == 0


def test_algorithm_label_from_the_config():
    assert [algorithm_label({"algo": a}) for a in ALGOS.values()] == list(ALGOS)
    assert algorithm_label({"algo": algo("sft", False, 0.0)}) == "sft"
    assert algorithm_label({"algo": algo("mapo", False, 0.0)}) == "grpo"
    assert config_value({"algo": ALGOS["attn_only"]}, "algo.attn.eta") == 0.05
    with pytest.raises(KeyError, match="algo.attn.kappa"):
        config_value({"algo": ALGOS["mapo"]}, "algo.attn.kappa")


def test_run_metrics_derive_gap_tail_and_collapse(study):
    run = read_run(study / "0")
    m = run_metrics(run, tail=20)
    assert m["gap/test_minus_counter_prior"] == pytest.approx(0.4)
    assert m["train/reward/mean"] == pytest.approx(sum(range(10, 30)) / 20)  # the last 20 of 0..29
    assert m["train/audio_mass/q4"] == pytest.approx(0.1 + 0.01 * sum(range(10, 30)) / 20)
    assert m["collapse/counter_prior/q1"] == 0.4 and m["collapse/counter_prior/q4"] == pytest.approx(0.1)
    assert m["collapse/counter_prior/late_minus_early"] == pytest.approx(-0.3)
    assert run_metrics(run, tail=5)["train/reward/mean"] == pytest.approx(27.0)  # 25..29


def test_groups_over_seeds_give_mean_and_std(study):
    runs = [read_run(p) for p in find_runs([study])]
    assert len(runs) == 7
    assert find_runs([study, study / "0"]) == find_runs([study])  # reached twice, listed once
    finished = [r for r in runs if r.finished]
    groups = group_runs(finished, ["experiment_name", "algorithm"])
    assert [(g.key, len(g.runs)) for g in groups] == [
        (("study_x", "grpo"), 3), (("study_x", "mapo"), 2), (("study_y", "attn_only"), 1)]
    metrics = ["counter_prior/audio/accuracy", "gap/test_minus_counter_prior", "collapse/counter_prior/q4"]
    rows = summary_rows(groups, ["experiment_name", "algorithm"], metrics)
    assert rows[0]["runs"] == 3
    assert rows[0]["counter_prior/audio/accuracy"] == pytest.approx((0.6, 0.1, 3))
    assert rows[0]["gap/test_minus_counter_prior"] == pytest.approx((0.3, 0.1, 3))  # 0.4, 0.3, 0.2
    assert rows[0]["collapse/counter_prior/q4"] == pytest.approx((0.2, 0.1, 3))  # 0.1, 0.2, 0.3
    assert rows[1]["gap/test_minus_counter_prior"] == pytest.approx((0.1, math.sqrt(0.005), 2))  # 0.15, 0.05
    assert rows[1]["collapse/counter_prior/q4"][2] == 0  # no collapse.json in the MAPO runs
    assert rows[2]["counter_prior/audio/accuracy"][:1] == (0.25,) and rows[2]["counter_prior/audio/accuracy"][2] == 1
    text = to_markdown(rows, ["experiment_name", "algorithm"], metrics, labels={"counter_prior/audio/accuracy": "cp"})
    lines = text.splitlines()
    assert lines[0] == "| experiment_name | algorithm | runs | cp | gap/test_minus_counter_prior | collapse/counter_prior/q4 |"
    assert lines[2] == "| study_x | grpo | 3 | 0.600 ± 0.100 | 0.300 ± 0.100 | 0.200 ± 0.100 |"
    assert lines[3] == "| study_x | mapo | 2 | 0.850 ± 0.071 | 0.100 ± 0.071 |  |"
    assert lines[4].startswith("| study_y | attn_only | 1 | 0.250 (n=1) |")
    assert format_mean_std((0.5, float("nan"), 0)) == ""


def test_summarize_writes_tables_and_leaves_out_unfinished_runs(study, tmp_path, capsys):
    out = tmp_path / "summary"
    groups, rows = summarize([study], metrics=["counter_prior/audio/accuracy"], out_dir=out)
    assert sum(len(g.runs) for g in groups) == 6
    assert "5 has no final_metrics.json; left out" in capsys.readouterr().err
    with open(out / "summary.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [(r["algorithm"], r["runs"]) for r in table] == [("grpo", "3"), ("mapo", "2"), ("attn_only", "1")]
    assert float(table[0]["counter_prior/audio/accuracy_mean"]) == pytest.approx(0.6)
    assert float(table[0]["counter_prior/audio/accuracy_std"]) == pytest.approx(0.1)
    assert table[2]["counter_prior/audio/accuracy_std"] == "" and table[2]["counter_prior/audio/accuracy_n"] == "1"
    assert "| study_x | grpo | 3 | 0.600 ± 0.100 |" in (out / "summary.md").read_text()
    with pytest.raises(FileNotFoundError, match="no finished run"):
        summarize([study / "5"])


def test_broken_run_files_name_the_file(tmp_path):
    run = make_run(tmp_path, "r", final={"x": 1.0})
    (run / "final_metrics.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"final_metrics.json: not valid JSON \(line 1"):
        read_run(run)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        read_run(tmp_path)


def test_moving_average_hand_worked():
    assert moving_average([1.0, 2.0, 3.0, 4.0], 2).tolist() == [1.0, 1.5, 2.5, 3.5]
    assert moving_average([1.0, 2.0, 3.0, 4.0], 3).tolist() == [1.0, 1.5, 2.0, 3.0]
    assert moving_average([5.0], 1).tolist() == [5.0]


def test_plots_are_written_with_the_group_statistics(study, tmp_path):
    groups = group_runs([r for r in map(read_run, find_runs([study])) if r.finished], ["algorithm"])
    bars = accuracy_bars(groups, {"counter_prior/audio/accuracy": "cp"}, tmp_path / "acc.png")
    assert bars["grpo"] == [pytest.approx((0.6, 0.1, 3))] and bars["mapo"][0][0] == pytest.approx(0.85)
    curves = collapse_curves(groups, tmp_path / "collapse.png")
    assert list(curves) == ["grpo"]  # only the GRPO runs carry collapse.json
    means, stds = curves["grpo"]
    assert means == pytest.approx([0.4, 0.3, 0.2, 0.2]) and stds == pytest.approx([0.0, 0.0, 0.0, 0.1])
    train = collapse_curves(groups, tmp_path / "collapse_train.png", source="train", tail=2)
    assert train["mapo"][0] == pytest.approx([0.4, 0.105])  # q1 and q4 of steps 1, 2: 0.10, 0.11
    rewards = step_curves(groups, "reward/mean", tmp_path / "reward.png", window=1)
    steps, mean, std = rewards["mapo"]
    assert steps == [1, 2] and mean == pytest.approx([0.5, 0.7]) and std == pytest.approx([0.0, 0.0])
    assert rewards["grpo"][1][:3] == pytest.approx([0.0, 1.0, 2.0])
    for name in ("acc", "collapse", "collapse_train", "reward"):
        assert (tmp_path / f"{name}.png").read_bytes().startswith(PNG_MAGIC)
    written = write_group_plots(groups, tmp_path / "plots")
    assert sorted(written) == ["accuracy", "collapse_counter_prior", "collapse_train", "reward"]
    assert all(Path(p).read_bytes().startswith(PNG_MAGIC) for p in written.values())


def test_cli_prints_the_table_and_writes_plots(study, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(study), "--by", "algorithm", "--metrics", "counter_prior/audio/accuracy", "--out", str(out), "--plots"]) == 0
    printed = capsys.readouterr().out
    assert "| grpo | 3 | 0.600 ± 0.100 |" in printed
    assert (out / "summary.md").is_file() and (out / "plots" / "accuracy.png").is_file()
    assert main([str(tmp_path / "missing")]) == 2


def _finished_run(tiny_env, run_dir: Path) -> Path:
    """A run folder whose final_model is the tiny model, with the config keys collapse_of_run reads."""
    import shutil

    shutil.copytree(tiny_env["model"], run_dir / "final_model")
    config = {"data": {"dir": str(tiny_env["data"]), "train": "train.jsonl", "eval_max_items": 6,
                       "eval_splits": {"test": "test.jsonl", "counter_prior": "counter_prior.jsonl"}},
              "rollout": {"eval_batch_size": 4, "max_new_tokens": 8, "temperature": 1.0},
              "algo": {"attn": {"layers": [-2, -1]}}}
    (run_dir / "config.json").write_text(json.dumps({"config": config}))
    return run_dir


def _reference_mass(model_dir: Path, data_dir: Path, split: str, layers) -> tuple[float, int]:
    """Mean audio mass over every greedy completion token of the split's 6 items, computed directly."""
    from mapo.assets import load_split
    from mapo.capture import capture_audio_attention, completion_mass
    from mapo.config import DataConfig
    from mapo.data.collate import Collator, FeatureCache
    from mapo.evaluate import evenly_by_task, generation_tokens
    from mapo.models.loader import load_model_and_processor
    from mapo.rollout import generate_rollout
    from mapo.scoring import score_tokens

    model, processor = load_model_and_processor(model_dir)
    records = evenly_by_task(load_split(DataConfig(dir=str(data_dir)), f"{split}.jsonl"), 6)
    collator = Collator(processor, feature_cache=FeatureCache())
    tokens = generation_tokens(processor)
    total, count = 0.0, 0
    for start in range(0, len(records), 4):
        rollout = generate_rollout(model, collator.prompts(records[start : start + 4]), group_size=1, max_new_tokens=8,
                                   do_sample=False, **tokens)
        with torch.no_grad(), capture_audio_attention(model, rollout.audio_mask, layers=tuple(layers)) as cap:
            score_tokens(model, rollout, audio="cached")
            mass = completion_mass(cap.mass, rollout.prompt_len, rollout.completion_ids.shape[1])
        mask = rollout.completion_mask.bool()
        total += float(mass[mask].sum())
        count += int(mask.sum())
    return total / count, count


def test_collapse_curve_of_a_run_pools_the_captured_mass(tiny_env, tmp_path):
    from mapo.collapse_curve import collapse_of_run, main as collapse_main

    run = _finished_run(tiny_env, tmp_path / "run")
    assert collapse_main([str(run), "--threads", "1"]) == 0
    written = json.loads((run / "collapse.json").read_text())
    assert written["bins"] == 4 and written["layers"] == [-2, -1] and set(written["splits"]) == {"test", "counter_prior"}
    curve = written["splits"]["counter_prior"]
    assert curve["completions"] == 6 and sum(curve["tokens"]) == pytest.approx(6 * curve["mean_length"])
    assert all(0.0 <= v <= 1.0 for v in curve["audio_mass"]) and all(v >= 0.0 for v in curve["abs_delta_h"])
    # the token-weighted mean of the bins is the mean over all tokens, as computed directly
    pooled = sum(m * n for m, n in zip(curve["audio_mass"], curve["tokens"])) / sum(curve["tokens"])
    expected, count = _reference_mass(run / "final_model", tiny_env["data"], "counter_prior", [-2, -1])
    assert sum(curve["tokens"]) == count and pooled == pytest.approx(expected, rel=1e-5)
    # --layers takes effect
    last = collapse_of_run(run, layers=[-1], splits=["counter_prior"])["splits"]["counter_prior"]
    pooled_last = sum(m * n for m, n in zip(last["audio_mass"], last["tokens"])) / sum(last["tokens"])
    assert pooled_last == pytest.approx(_reference_mass(run / "final_model", tiny_env["data"], "counter_prior", [-1])[0], rel=1e-5)
    assert abs(pooled_last - pooled) > 1e-4  # far beyond the 1e-5 agreement above: the layer choice is used
    assert collapse_main([str(tmp_path / "missing")]) == 1
