"""The study runner (mapo.study): its settings read and cross-checked from the experiment files, the
commands it runs, the benchmark guard, and the summary of hand-made run folders."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from mapo import study
from mapo.study import Setting, ensure_benchmark, read_setting, rl_multirun_command, summarize_study, warm_command


def test_every_study_setting_reads_and_is_consistent():
    names = study.all_settings()
    assert "prior90" in names
    for name in names:
        setting = read_setting(name)
        assert setting.name == name and setting.data_dir == Path(f"artifacts/data/study_{name}")
    prior90 = read_setting("prior90")
    assert prior90.synthetic == {"prior_strength": 0.9}
    rl = study.compose_experiment("study_prior90")
    assert (rl.algo.name, rl.trainer.warm_start.enabled, rl.trainer.eval_on_start) == ("grpo", False, False)
    assert rl.model.path == "artifacts/study/prior90/warm_start/final_model"  # the default OUT's warm start
    assert study.compose_experiment("study_prior90_warm").trainer.run_dir == "artifacts/study/prior90/warm_start"
    with pytest.raises(ValueError, match="study_nope_warm.yaml: not found; settings with both files"):
        read_setting("nope")


def test_a_warm_start_evaluated_differently_is_refused(monkeypatch):
    real = study.compose_experiment

    def composed(name, overrides=()):
        cfg = real(name, overrides)
        if name.endswith("_warm"):
            cfg.rollout.max_new_tokens = 7
        return cfg

    monkeypatch.setattr(study, "compose_experiment", composed)
    with pytest.raises(ValueError, match=r"study_prior90.yaml: rollout.max_new_tokens 40 differs from the warm start's 7"):
        read_setting("prior90")


def test_commands_share_one_warm_start():
    setting = Setting("prior90", Path("artifacts/data/study_prior90"), {"prior_strength": 0.9})
    out = Path("runs/s")
    warm = warm_command(setting, out, threads=1, warm_extra=["trainer.steps=5"])
    assert warm[:3] == [sys.executable, "-m", "mapo.train"]
    assert warm[3:] == ["experiment=study_prior90_warm", "trainer.num_threads=1", "logger=none", "trainer.steps=5",
                        "trainer.run_dir=runs/s/prior90/warm_start"]
    rl = rl_multirun_command(setting, ["grpo", "mapo"], [0, 1, 2], out, threads=2, extra=["trainer.steps=20"])
    assert rl[3:] == ["--multirun", "experiment=study_prior90", "algo=grpo,mapo", "trainer.seed=0,1,2",
                      "trainer.num_threads=2", "logger=none", "trainer.steps=20",
                      "model.path=runs/s/prior90/warm_start/final_model", "hydra.sweep.dir=runs/s/prior90/runs",
                      "hydra.sweep.subdir=${hydra.runtime.choices.algo}_seed${trainer.seed}"]


def test_missing_runs_are_the_unfinished_ones(tmp_path):
    for name in ("grpo_seed0", "grpo_seed1", "mapo_seed1"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "final_metrics.json").write_text("{}")
    (tmp_path / "mapo_seed0").mkdir()  # started, not finished
    assert study.missing_runs(tmp_path, ["grpo", "mapo"], [0, 1]) == {"mapo": [0]}
    assert study.missing_runs(tmp_path, ["grpo", "mapo"], [0, 1, 2]) == {"grpo": [2], "mapo": [0, 2]}
    assert study.missing_runs(tmp_path, ["grpo"], [0, 1]) == {}


def test_benchmark_is_written_once_and_a_foreign_folder_is_refused(tmp_path):
    small = {"n_train": 1, "n_test": 1, "n_counter_prior": 1, "tasks": ["pitch_compare"], "prior_strength": 0.9}
    setting = Setting("x", tmp_path / "data", small)
    ensure_benchmark(setting)
    written = json.loads((tmp_path / "data" / "benchmark.json").read_text())
    assert written["prior_strength"] == 0.9 and written["n_train"] == 1
    stamp = (tmp_path / "data" / "train.jsonl").stat().st_mtime_ns
    ensure_benchmark(setting)  # same options: nothing is rewritten
    assert (tmp_path / "data" / "train.jsonl").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match=r"made with other options .*'prior_strength': \(0.9, 0.75\)"):
        ensure_benchmark(Setting("x", tmp_path / "data", {**small, "prior_strength": 0.75}))
    with pytest.raises(ValueError, match=r"extra.synthetic has unknown fields \['prior'\]"):
        ensure_benchmark(Setting("x", tmp_path / "other", {"prior": 0.9}))
    (tmp_path / "data" / "benchmark.json").unlink()
    with pytest.raises(ValueError, match="holds a benchmark without benchmark.json"):
        ensure_benchmark(setting)


def _run(folder: Path, experiment: str, algo: dict, cp: float, seed: int = 0) -> None:
    folder.mkdir(parents=True)
    config = {"experiment_name": experiment, "algo": algo, "trainer": {"seed": seed}, "extra": {"study_setting": "prior90"}}
    (folder / "config.json").write_text(json.dumps({"config": config}))
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward/mean": 0.5}) + "\n")
    (folder / "final_metrics.json").write_text(json.dumps({"test/audio/accuracy": 0.9, "counter_prior/audio/accuracy": cp}))


def test_summary_has_a_before_rl_row_and_publishes(tmp_path):
    setting = Setting("prior90", Path("unused"), {})
    out = tmp_path / "study"
    sft = {"name": "sft", "mask": {"enabled": False}, "attn": {"eta": 0.0}}
    grpo = {"name": "grpo", "mask": {"enabled": False}, "attn": {"eta": 0.0}}
    _run(setting.warm_dir(out), "study_prior90_warm", sft, 0.5)
    for seed, cp in enumerate([0.6, 0.7, 0.8]):
        _run(setting.runs_dir(out) / f"grpo_seed{seed}", "study_prior90", grpo, cp, seed)
    mask_only = {"name": "mapo", "mask": {"enabled": True}, "attn": {"eta": 0.0}}
    mapo = {"name": "mapo", "mask": {"enabled": True}, "attn": {"eta": 0.05}}
    _run(setting.runs_dir(out) / "mapo_mask_only_seed0", "study_prior90", mask_only, 0.9)  # sorts before mapo_seed0
    _run(setting.runs_dir(out) / "mapo_seed0", "study_prior90", mapo, 0.9)
    table = summarize_study([setting], out, publish=tmp_path / "pub")
    lines = table.splitlines()
    assert lines[0].startswith("| setting | algorithm | runs | test | test, no audio |")
    assert lines[2].startswith("| prior90 | before RL | 1 | 0.900 (n=1) |")
    assert lines[3].startswith("| prior90 | grpo | 3 | 0.900 ± 0.000 |")
    assert "| 0.700 ± 0.100 |" in lines[3]  # counter_prior over the three seeds
    assert [line.split(" | ")[1] for line in lines[2:]] == ["before RL", "grpo", "mapo", "mask_only"]
    assert (tmp_path / "pub" / "summary.md").read_text() == table
    assert (tmp_path / "pub" / "plots" / "prior90_accuracy.png").is_file()
    assert (tmp_path / "pub" / "plots" / "prior90_reward.png").is_file()


def test_cli_refuses_a_data_dir_override(capsys):
    assert study.main(["--settings", "prior90", "--", "data.dir=/elsewhere"]) == 2
    assert "data.dir belongs to the setting" in capsys.readouterr().err


def test_a_worker_gets_its_setting_and_the_rest_of_the_arguments():
    cmd = study.worker_command("filler90", ["--settings", "prior90,filler90", "--jobs=2", "--seeds", "0", "--publish", "x",
                                            "--warm", "trainer.steps=5"], ["trainer.steps=3"])
    assert cmd[1:] == ["-m", "mapo.study", "--settings", "filler90", "--no-summary", "--seeds", "0", "--warm", "trainer.steps=5",
                       "--", "trainer.steps=3"]


def test_a_variant_links_the_finished_warm_start(tmp_path):
    setting = Setting("prior90", Path("unused"), {})
    base, variant = tmp_path / "study", tmp_path / "eta"
    with pytest.raises(SystemExit, match="holds no finished warm start"):
        study.link_warm_start(setting, variant, base)
    (setting.warm_dir(base) / "final_model").mkdir(parents=True)
    (setting.warm_dir(base) / "final_model" / "config.json").write_text("{}")
    study.link_warm_start(setting, variant, base)
    study.link_warm_start(setting, variant, base)  # linked already: nothing to do
    assert setting.warm_dir(variant).resolve() == setting.warm_dir(base).resolve()
    with pytest.raises(SystemExit, match="exists already"):
        study.link_warm_start(setting, base, variant)
