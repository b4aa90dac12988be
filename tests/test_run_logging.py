"""Run logger: local files, W&B offline run folder, online/offline decision, git commit helper."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import wandb
import yaml

from mapo.run_logging import (
    RunLogger,
    decide_wandb_mode,
    git_commit,
    has_wandb_api_key,
    make_logger,
    redact_secrets,
    scrub_hydra_files,
    to_number,
)

torch.set_num_threads(1)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """Keep W&B quiet and away from the user's home: its config/cache/data folders go to tmp_path."""
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for var, sub in (("WANDB_CONFIG_DIR", "cfg"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / sub))
    return tmp_path


# --- logger "none": local files ---------------------------------------------------------------


def test_none_logger_writes_metrics_samples_images_and_config(tmp_path):
    run_dir = tmp_path / "run"
    png = tmp_path / "curve.png"
    png.write_bytes(b"\x89PNG fake")
    config = {"algo": {"eta": 0.05, "mask": {"tau_base": 1.0}}, "out": Path("/x/y")}
    with make_logger("none", run_dir, config, total_steps=4) as logger:
        # 0-d tensor and numpy scalar must become plain floats; ints stay ints.
        logger.log(1, {"reward/mean": torch.tensor(0.25), "loss/attn": np.float32(1.5), "tokens": 12})
        logger.progress(1, {"reward/mean": 0.25, "loss/attn": 1.5})
        logger.log(2, {"reward/mean": 0.75})
        logger.log_samples(2, [{"prompt": "p0", "completion": "a", "reward": 1.0},
                               {"prompt": "p1", "completion": "b"}])
        logger.log_images(2, {"collapse_curve": png})
        with pytest.raises(FileNotFoundError, match="'missing'.*nope.png"):
            logger.log_images(2, {"missing": tmp_path / "nope.png"})

    assert read_jsonl(run_dir / "metrics.jsonl") == [
        {"step": 1, "reward/mean": 0.25, "loss/attn": 1.5, "tokens": 12},
        {"step": 2, "reward/mean": 0.75},
    ]
    assert isinstance(read_jsonl(run_dir / "metrics.jsonl")[0]["tokens"], int)
    assert read_jsonl(run_dir / "samples.jsonl") == [
        {"step": 2, "prompt": "p0", "completion": "a", "reward": 1.0},
        {"step": 2, "prompt": "p1", "completion": "b"},
    ]
    assert read_jsonl(run_dir / "images.jsonl") == [{"step": 2, "collapse_curve": str(png)}]
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["config"] == {"algo": {"eta": 0.05, "mask": {"tau_base": 1.0}}, "out": "/x/y"}
    assert set(saved) == {"config", "git"}
    assert not list(run_dir.glob(".config.json.*"))  # the atomic write left no temp file
    assert not (run_dir / "wandb").exists()


def test_metrics_line_is_flushed_before_finish(tmp_path):
    logger = make_logger("none", tmp_path, {}, total_steps=2)
    logger.log(3, {"kl": 0.125})
    # Read while the logger is still open: a crash after this point must not lose the line.
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 3, "kl": 0.125}]
    logger.finish()
    logger.finish()  # idempotent
    with pytest.raises(RuntimeError, match="after finish"):
        logger.log(4, {"kl": 0.0})


def test_progress_bar_shows_step_and_chosen_metrics(tmp_path):
    logger = make_logger("none", tmp_path, {}, total_steps=10)
    logger.progress(3, {"reward/mean": 0.123456, "reward/accuracy": 0.5, "mapo/omega_mean": 1.0,
                        "loss/attn": 2.0, "other": 9.0})
    bar = logger._bar
    assert (bar.n, bar.total) == (3, 10)
    # 3 significant digits; keys not in progress_keys ("other") are not shown.
    assert bar.postfix == "reward=0.123, acc=0.5, ω̃=1, L_attn=2"
    logger.finish()


def test_disabled_logger_writes_nothing(tmp_path):
    logger = make_logger("wandb", tmp_path / "rank1", {"a": 1}, enabled=False)
    logger.log(1, {"x": 1.0})
    logger.log_samples(1, [{"c": "x"}])
    logger.progress(1, {"x": 1.0})
    logger.finish()
    assert not (tmp_path / "rank1").exists()


def test_bad_metric_values_name_the_key():
    with pytest.raises(TypeError, match="'loss'.*shape \\(2,\\)"):
        to_number("loss", torch.zeros(2))
    with pytest.raises(TypeError, match="'acc'.*text"):
        to_number("acc", "0.5")
    assert to_number("x", torch.tensor(3.0, dtype=torch.float64)) == 3.0
    assert to_number("flag", True) == 1


def test_reserved_step_metric_rejected(tmp_path):
    with make_logger("none", tmp_path, {}) as logger, pytest.raises(ValueError, match="reserved"):
        logger.log(1, {"step": 5})


def test_unknown_kind_lists_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown logger 'tensorboard'; valid: wandb, none"):
        make_logger("tensorboard", tmp_path, {})


# --- online / offline decision ----------------------------------------------------------------


def test_decide_mode_order(tmp_path):
    no_netrc = tmp_path / "absent"
    assert decide_wandb_mode(env={}, netrc_path=no_netrc) == "offline"
    assert decide_wandb_mode(env={"WANDB_API_KEY": "k" * 40}, netrc_path=no_netrc) == "online"
    # WANDB_MODE wins over a configured key; the explicit argument wins over WANDB_MODE.
    assert decide_wandb_mode(env={"WANDB_API_KEY": "k", "WANDB_MODE": "offline"}, netrc_path=no_netrc) == "offline"
    assert decide_wandb_mode("disabled", env={"WANDB_MODE": "online"}, netrc_path=no_netrc) == "disabled"
    assert decide_wandb_mode(env={"WANDB_API_KEY": "  "}, netrc_path=no_netrc) == "offline"  # blank key
    with pytest.raises(ValueError, match="WANDB_MODE='sometimes'.*valid: online, offline"):
        decide_wandb_mode(env={"WANDB_MODE": "sometimes"}, netrc_path=no_netrc)


def test_decide_mode_from_netrc(tmp_path, monkeypatch):
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text("machine github.com login me password x\n")
    assert not has_wandb_api_key({}, netrc_file)  # an entry for another host does not count
    netrc_file.write_text("machine github.com login me password x\nmachine api.wandb.ai login user password abc123\n")
    assert decide_wandb_mode(env={}, netrc_path=netrc_file) == "online"
    # A self-hosted server: the entry must match WANDB_BASE_URL's host.
    assert decide_wandb_mode(env={"WANDB_BASE_URL": "https://wandb.lab.org"}, netrc_path=netrc_file) == "offline"
    # Default location: $NETRC, else ~/.netrc.
    monkeypatch.setenv("HOME", str(tmp_path))
    assert has_wandb_api_key({"NETRC": str(netrc_file)})
    (tmp_path / ".netrc").write_text("machine api.wandb.ai login user password k\n")
    assert has_wandb_api_key({})


def test_malformed_netrc_means_offline_with_warning(tmp_path):
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text("garbage here\n")  # not a netrc token: NetrcParseError
    with pytest.warns(UserWarning, match="unreadable netrc"):
        assert decide_wandb_mode(env={}, netrc_path=netrc_file) == "offline"


# --- git --------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_git_commit_and_dirty_flag(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "code.py").write_text("x = 1\n")

    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo,
                              check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    assert git_commit(repo) is None  # a repository without commits has no HEAD
    git("add", "code.py")
    git("commit", "-q", "-m", "first")
    sha = git("rev-parse", "HEAD")
    assert git_commit(repo) == {"commit": sha, "dirty": False}
    (repo / "scratch.txt").write_text("untracked files do not make a run dirty")
    assert git_commit(repo / "code.py") == {"commit": sha, "dirty": False}
    (repo / "code.py").write_text("x = 2\n")
    assert git_commit(repo) == {"commit": sha, "dirty": True}

    outside = tmp_path / "plain"
    outside.mkdir()
    assert git_commit(outside) is None
    assert git_commit(tmp_path / "does-not-exist") is None


# --- W&B --------------------------------------------------------------------------------------


def _wandb_file_bytes(run_dir: Path) -> tuple[Path, bytes]:
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    (record_file,) = runs[0].glob("run-*.wandb")
    return runs[0], record_file.read_bytes()


def test_wandb_offline_run_under_run_dir(wandb_env, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = wandb_env / "run"
    logger = make_logger("wandb", run_dir, {"algo": {"eta": 0.05}}, run_name="t", total_steps=2)
    assert logger.wandb_run.settings.mode == "offline"
    logger.log(1, {"reward/mean": torch.tensor(0.8125), "loss/attn": 3})
    logger.log_samples(1, [{"completion": "<answer>high</answer>", "reward": 1.0}])
    logger.finish()
    # run.finish() can return before the W&B service has flushed the offline record file;
    # teardown waits for the service to exit (what the atexit hook does at the end of a real run).
    wandb.teardown()

    assert read_jsonl(run_dir / "metrics.jsonl") == [{"step": 1, "reward/mean": 0.8125, "loss/attn": 3}]
    offline_run, records = _wandb_file_bytes(run_dir)
    # The offline record file holds the history item and the config (JSON-encoded values in protobuf).
    assert re.search(rb"reward/mean.{1,4}0\.8125", records, re.S)
    assert b'{"eta":0.05}' in records
    (table,) = (offline_run / "files" / "media" / "table").glob("samples_1_*.table.json")
    assert json.loads(table.read_text()) == {"columns": ["step", "completion", "reward"],
                                             "data": [[1, "<answer>high</answer>", 1.0]]}


def test_failed_online_start_falls_back_to_offline(wandb_env, monkeypatch, capsys):
    # A key is configured, so the decision is "online", but the server is a closed local port.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    assert decide_wandb_mode() == "online"
    run_dir = wandb_env / "run"
    logger = make_logger("wandb", run_dir, {}, init_timeout=2)
    assert logger.wandb_run.settings.mode == "offline"
    logger.log(1, {"kl": 0.5})
    logger.finish()
    assert "W&B online start failed" in capsys.readouterr().err
    assert read_jsonl(run_dir / "metrics.jsonl") == [{"step": 1, "kl": 0.5}]
    assert list((run_dir / "wandb").glob("offline-run-*"))


def test_runlogger_without_wandb_run_is_usable_directly(tmp_path):
    logger = RunLogger(tmp_path, {"a": 1}, total_steps=None)
    logger.log(0, {"x": 2.5})
    logger.finish()
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 0, "x": 2.5}]


# --- Hydra's files: structural redaction -------------------------------------------------------


def _hydra_run(tmp_path, files: dict[str, str]) -> Path:
    (tmp_path / ".hydra").mkdir()
    for name, text in files.items():
        (tmp_path / ".hydra" / name).write_text(text, encoding="utf-8")
    return tmp_path / ".hydra"


def test_short_secret_value_does_not_touch_other_numbers(tmp_path, monkeypatch):
    """`extra.hf_token: 1` once turned `lr: 0.1` into `lr: 0.<redacted>` (text search, no minimum length)."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    hydra = _hydra_run(tmp_path, {"config.yaml": "optim:\n  lr: 0.1\n  steps: 100\nextra:\n  hf_token: 1\n  note: ü 1\n"})
    make_logger("none", tmp_path, {"optim": {"lr": 0.1, "steps": 100}, "extra": {"hf_token": 1, "note": "ü 1"}}).finish()
    text = (hydra / "config.yaml").read_text(encoding="utf-8")
    assert yaml.safe_load(text) == {"optim": {"lr": 0.1, "steps": 100}, "extra": {"hf_token": "<redacted>", "note": "ü 1"}}
    assert json.loads((tmp_path / "config.json").read_text())["config"]["optim"] == {"lr": 0.1, "steps": 100}


def test_nested_credential_block_is_hidden_in_hydra_config_as_in_config_json(tmp_path):
    config = {"credentials": {"user": "bob", "pw": "hunter2222"}, "rollout": {"max_new_tokens": 48}}
    assert redact_secrets(config, env={}) == {"credentials": "<redacted>", "rollout": {"max_new_tokens": 48}}
    hydra = _hydra_run(tmp_path, {"config.yaml": "credentials:\n  user: bob\n  pw: hunter2222\nrollout:\n  max_new_tokens: 48\n"})
    assert scrub_hydra_files(tmp_path, env={}) == [hydra / "config.yaml"]
    text = (hydra / "config.yaml").read_text(encoding="utf-8")
    assert "hunter2222" not in text and "bob" not in text
    assert yaml.safe_load(text) == {"credentials": "<redacted>", "rollout": {"max_new_tokens": 48}}


def test_overrides_are_redacted_by_key_and_env_credentials_by_text(tmp_path):
    env = {"HF_TOKEN": "hf_abcdefghijkl"}
    hydra = _hydra_run(tmp_path, {
        "overrides.yaml": "- +extra.wandb_api_key=abcdefgh12\n- extra.credentials.pw=x\n- optim.lr=0.1\n"
                          "- extra.note=hf_abcdefghijkl\n- rollout.max_new_tokens=48\n",
        "hydra.yaml": "hydra:\n  overrides:\n    task:\n    - +extra.wandb_api_key=abcdefgh12\n    - optim.lr=0.1\n",
    })
    assert scrub_hydra_files(tmp_path, env=env) == [hydra / "hydra.yaml", hydra / "overrides.yaml"]
    assert yaml.safe_load((hydra / "overrides.yaml").read_text(encoding="utf-8")) == [
        "+extra.wandb_api_key=<redacted>", "extra.credentials.pw=<redacted>", "optim.lr=0.1",
        "extra.note=<redacted>", "rollout.max_new_tokens=48"]
    assert yaml.safe_load((hydra / "hydra.yaml").read_text(encoding="utf-8")) == {
        "hydra": {"overrides": {"task": ["+extra.wandb_api_key=<redacted>", "optim.lr=0.1"]}}}


def test_disabled_logger_does_not_scrub(tmp_path):
    hydra = _hydra_run(tmp_path, {"overrides.yaml": "- +extra.wandb_api_key=abcdefgh12\n"})
    make_logger("none", tmp_path, {}, enabled=False).finish()
    assert (hydra / "overrides.yaml").read_text() == "- +extra.wandb_api_key=abcdefgh12\n"
