"""The training program: configs compose, short runs end to end, resume equality, torchrun, sweeps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mapo.config import register_configs
from mapo.config import check_override_keys
from mapo.optim import lr_multiplier

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ("model", "data", "rollout", "algo", "reward", "trainer", "logger")
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
register_configs()


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose("config", overrides=overrides)


@pytest.mark.parametrize("group", GROUPS)
def test_every_config_file_composes(group):
    options = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
    assert options, f"conf/{group} has no options"
    for option in options:
        cfg = compose_cfg([f"{group}={option}"])
        assert cfg[group] is not None


def test_experiments_resolve_to_expected_values():
    assert set(EXPERIMENTS) >= {"tiny_sft", "tiny_grpo", "tiny_mapo", "qwen2audio_grpo", "qwen2audio_mapo"}
    mapo = compose_cfg(["experiment=tiny_mapo"])
    assert (mapo.algo.name, mapo.algo.attn.eta, mapo.algo.beta, mapo.algo.mask.enabled) == ("mapo", 0.05, 0.02, True)
    assert mapo.trainer.warm_start.enabled and mapo.model.build_tiny_if_missing
    grpo = compose_cfg(["experiment=tiny_grpo"])
    assert (grpo.algo.name, grpo.algo.attn.eta, grpo.algo.mask.enabled) == ("grpo", 0.0, False)
    sft = compose_cfg(["experiment=tiny_sft"])
    assert sft.algo.name == "sft" and not sft.trainer.warm_start.enabled
    for name in ("qwen2audio_mapo", "qwen2audio_grpo"):
        q = compose_cfg([f"experiment={name}"])
        assert (q.model.master_dtype, q.model.compute_dtype, q.model.frozen_dtype) == ("float32", "auto", "auto") and q.model.gradient_checkpointing and q.model.freeze_audio_tower
        assert q.model.path == "" and not q.model.build_tiny_if_missing
        assert q.data.name == "avqa_mmau" and list(q.data.eval_splits) == ["mmau_test_mini"]  # real data, splits replaced
        assert q.rollout.group_size == 8 and q.algo.beta == 0.02
    q = compose_cfg(["experiment=qwen2audio_mapo"])
    assert (q.algo.attn.eta, q.algo.attn.kappa, q.algo.mask.tau_base, q.algo.mask.cap) == (0.05, 1.0, 1.0, 5.0)
    assert list(q.algo.attn.layers) == [-3, -2, -1]


def test_release_experiment_has_the_release_settings():
    c = compose_cfg(["experiment=qwen3omni_mapo_release"])
    assert (c.trainer.lr, list(c.trainer.betas), c.trainer.weight_decay, c.trainer.grad_clip) == (1e-6, [0.9, 0.95], 0.1, 1.0)
    # 800 optimizer steps = 200 rollouts × 4 mini-batches; warm-up 5 % of them; cosine
    assert (c.trainer.steps * c.algo.mini_batches * c.algo.updates_per_rollout, c.trainer.schedule) == (800, "cosine")
    assert c.trainer.warmup_steps / c.trainer.steps == 0.05
    # G = 8; 24 prompts per optimizer step, 4 optimizer steps per generation
    assert (c.rollout.group_size, c.rollout.prompts_per_step // c.algo.mini_batches, c.algo.mini_batches) == (8, 24, 4)
    assert (c.rollout.max_new_tokens, c.rollout.temperature, c.rollout.top_p, c.algo.overlong_filter) == (1200, 1.0, 0.99, True)
    a = c.algo
    assert (a.name, a.beta, a.attn.eta, a.mask.tau_base, a.attn.tau_base, a.mask.cap, a.attn.cap) == ("mapo", 0.02, 0.05, 1.0, 1.0, 5.0, 5.0)
    assert (a.attn.kappa, list(a.attn.layers), a.attn.adv_eps, a.attn.fail_floor, a.attn.gate_cap) == (1.0, [-3, -2, -1], 0.02, 0.1, 3.0)
    assert (a.reference.model, a.reference.ablation, a.attn.token_gate) == ("frozen", "drop_features", "content")
    assert (list(c.reward.functions), list(c.reward.weights)) == (["accuracy", "format"], [2.0, 1.0])


def test_release_experiment_model_lora_and_sampler():
    """LoRA, and the keys other branches add (top_k / repetition penalty, the Qwen3-Omni model config)."""
    c = compose_cfg(["experiment=qwen3omni_mapo_release"])
    lora = c.model.lora
    assert (lora.rank, lora.alpha, lora.targets, c.model.freeze_audio_tower) == (128, 512, "all-linear", True)
    assert (c.rollout.top_k, c.rollout.repetition_penalty) == (50, 1.2)
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        choices = compose("config", overrides=["experiment=qwen3omni_mapo_release"], return_hydra_config=True).hydra.runtime.choices
    assert choices["model"] == "qwen3omni"


def test_overrides_reach_the_config():
    cfg = compose_cfg(["experiment=tiny_mapo", "algo.attn.eta=0.1", "algo.mask.kind=topk"])
    assert cfg.algo.attn.eta == 0.1 and cfg.algo.mask.kind == "topk"


@pytest.mark.parametrize(
    "arg, expected",
    [
        ("algo.etaa=1", "algo has no 'etaa'; valid: name, adv_scale"),
        ("algo.attn.kapa=2", "algo.attn has no 'kapa'; valid: eta, layers"),
        ("algorithm.eta=1", "unknown config group 'algorithm'"),
        ("trainer.lr.x=1", "trainer.lr is a value, not a group"),
    ],
)
def test_misspelt_keys_fail_with_the_valid_ones(arg, expected):
    with pytest.raises(SystemExit) as err:
        check_override_keys([arg])
    assert expected in str(err.value)


def test_valid_keys_pass_the_check():
    check_override_keys(["algo.attn.eta=0.1", "data.eval_splits.mmau=x.json", "experiment=tiny_grpo", "logger=none"])


def test_unknown_group_option_lists_choices():
    with pytest.raises(Exception) as err:
        compose_cfg(["algo=foo"])
    assert "grpo" in str(err.value) and "mapo" in str(err.value)


def test_missing_model_path_fails_with_what_is_expected(tmp_path):
    from mapo.assets import ensure_model
    from mapo.config import DataConfig, ModelConfig

    with pytest.raises(ValueError, match="model.path is empty.*Qwen2-Audio-7B-Instruct"):
        ensure_model(ModelConfig(path=""), DataConfig())
    with pytest.raises(FileNotFoundError, match="no config.json; expected a local folder"):
        ensure_model(ModelConfig(path=str(tmp_path)), DataConfig())
    from mapo.models.loader import load_model_and_processor

    with pytest.raises(FileNotFoundError, match="model folder not found; expected a local folder with config.json"):
        load_model_and_processor(tmp_path / "nope")


# ----------------------------------------------------------------------------- end-to-end (subprocess)
def train_cmd(env, run_dir, experiment, *extra):
    return [
        sys.executable, "-m", "mapo.train", f"experiment={experiment}", "logger=none",
        f"model.path={env['model']}", f"data.dir={env['data']}", f"trainer.run_dir={run_dir}",
        f"trainer.warm_start.cache_dir={env['root'] / 'warm'}", "trainer.warm_start.steps=3",
        "trainer.warm_start.batch_size=8", "trainer.steps=2", "trainer.num_threads=1", "data.eval_max_items=6",
        "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=12", "trainer.micro_batch_size=4",
        *extra,
    ]


def run_ok(cmd, **kw):
    env = dict(os.environ, WANDB_MODE="offline", HYDRA_FULL_ERROR="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, **kw)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def metrics_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("experiment", ["tiny_grpo", "tiny_mapo"])
def test_two_step_run_end_to_end(tiny_env, tmp_path, experiment):
    run_dir = tmp_path / experiment
    proc = run_ok(train_cmd(tiny_env, run_dir, experiment, "trainer.export_every=1"))
    train_rows = [r for r in metrics_lines(run_dir) if "reward/mean" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    for row in train_rows:
        assert 0.0 <= row["reward/accuracy"] <= 1.0 and "loss/pg" in row and "loss/kl" in row
        assert ("loss/attn" in row) == (experiment == "tiny_mapo")
        assert ("mapo/abs_delta_h" in row) == (experiment == "tiny_mapo")
        # DESIGN §3's metrics: ω̃ and ν̃ mean/max, Δh, L_attn, audio mass by position, clips, KL, entropy, rewards, lengths
        mapo_keys = {"mapo/nu_mean", "mapo/nu_max", "mapo/delta_h", "mapo/ablated_entropy", "audio_mass/q4"}
        assert mapo_keys <= row.keys() if experiment == "tiny_mapo" else not mapo_keys & row.keys()
        assert {"mapo/omega_mean", "mapo/omega_max", "clip/high", "clip/low", "kl/mean", "policy/entropy", "reward/format",
                "completion/length", "completion/length_max", "completion/truncated"} <= row.keys()
        # where the step's time goes (mapo.timing): every phase timed, tokens/s, memory
        assert all(row[f"time/{p}_s"] > 0 for p in ("rollout", "scoring", "update"))
        assert row["throughput/rollout_tok_s"] > 0 and row["throughput/update_tok_s"] > 0 and row["memory/rss_gib"] > 0
    eval_rows = [r for r in metrics_lines(run_dir) if "eval/test/audio/accuracy" in r]
    assert len(eval_rows) == 2 and all(r["time/eval_s"] > 0 and r["throughput/eval_tok_s"] > 0 for r in eval_rows)
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["step"] == 2 and 0.0 <= final["test/audio/accuracy"] <= 1.0
    assert "| counter_prior | with audio |" in proc.stdout and str(run_dir) in proc.stdout
    assert (run_dir / "checkpoints").is_dir() and (run_dir / "plots" / "reward.png").is_file()
    # the exported policy loads through the common loader and differs from the initial tiny model
    from mapo.models.loader import load_model_and_processor

    exported, _ = load_model_and_processor(run_dir / "final_model")
    initial, _ = load_model_and_processor(tiny_env["model"])
    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert exported.state_dict().keys() == initial.state_dict().keys()
    assert not torch.equal(exported.state_dict()[name], initial.state_dict()[name])
    # exports: float32 (the master weights), one folder per step (trainer.export_every=1), the last one
    # equal to the final model; the warm-start cache keeps float32 too
    assert json.loads((run_dir / "final_model" / "config.json").read_text())["dtype"] == "float32"
    assert {v.dtype for v in exported.state_dict().values() if v.is_floating_point()} == {torch.float32}
    assert sorted(p.name for p in (run_dir / "exports").iterdir()) == ["step_000001", "step_000002"]
    at_step_1, _ = load_model_and_processor(run_dir / "exports" / "step_000001")
    at_step_2, _ = load_model_and_processor(run_dir / "exports" / "step_000002")
    assert at_step_1.state_dict().keys() == exported.state_dict().keys()
    assert all(torch.equal(v, exported.state_dict()[k]) for k, v in at_step_2.state_dict().items())
    # make export of the last checkpoint: the same weights as the live export; plain transformers reads it
    from transformers import Qwen2AudioForConditionalGeneration

    from mapo.export import main as export_main

    export_main([f"checkpoint={run_dir / 'checkpoints' / 'step_000002'}", f"out={tmp_path / 'exported'}"])
    ours, _ = load_model_and_processor(tmp_path / "exported")
    plain = Qwen2AudioForConditionalGeneration.from_pretrained(tmp_path / "exported")  # default dtype: config's
    for key, tensor in exported.state_dict().items():
        assert torch.equal(ours.state_dict()[key], tensor) and torch.equal(plain.state_dict()[key], tensor), key
    with pytest.raises(FileExistsError, match="not empty"):
        export_main([f"checkpoint={run_dir / 'checkpoints' / 'step_000002'}", f"out={tmp_path / 'exported'}"])
    from safetensors import safe_open

    caches = list((tiny_env["root"] / "warm").glob("*/model.safetensors"))
    assert caches
    for warm in caches:
        with safe_open(str(warm), "pt") as handle:
            assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"F32"}


def test_sft_experiment_lowers_its_loss_and_honours_stop_after(tiny_env, tmp_path):
    run_dir = tmp_path / "sft"
    common = ("trainer.eval_on_start=false", "trainer.micro_batch_size=8", "trainer.warmup_steps=1", "trainer.steps=6")
    run_ok(train_cmd(tiny_env, run_dir, "tiny_sft", *common, "trainer.stop_after=3"))
    assert [r["step"] for r in metrics_lines(run_dir)] == [1, 2, 3]
    run_ok(train_cmd(tiny_env, run_dir, "tiny_sft", *common))
    rows = [r for r in metrics_lines(run_dir) if "loss/nll" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[-1]["loss/nll"] < rows[0]["loss/nll"] - 0.1  # random init: about 6.2 nats per token at step 1
    assert json.loads((run_dir / "final_metrics.json").read_text())["step"] == 6


def test_batches_may_mix_items_with_and_without_audio(tiny_env, tmp_path):
    run_dir = tmp_path / "mixed"
    run_ok(train_cmd(tiny_env, run_dir, "tiny_mapo", "data.text_only_fraction=0.5", "trainer.eval_on_start=false"))
    rows = [r for r in metrics_lines(run_dir) if "reward/mean" in r]
    assert len(rows) == 2 and all(0 < r["loss/attn"] < 20 for r in rows)


def test_resumed_run_reproduces_uninterrupted_metrics(tiny_env, tmp_path):
    # PPO mini-batches (shuffled per step) and a cosine schedule that advances per optimizer step
    # (4 steps × 2 mini-batches) must resume exactly.
    common = (
        "trainer.steps=4", "trainer.checkpoint_every=2", "trainer.eval_on_start=false", "algo.mini_batches=2",
        "trainer.schedule=cosine", "trainer.warmup_steps=1",
    )
    full = tmp_path / "full"
    run_ok(train_cmd(tiny_env, full, "tiny_mapo", *common))
    part = tmp_path / "part"
    run_ok(train_cmd(tiny_env, part, "tiny_mapo", *common, "trainer.stop_after=2"))
    assert [r["step"] for r in metrics_lines(part) if "reward/mean" in r] == [1, 2]
    run_ok(train_cmd(tiny_env, part, "tiny_mapo", *common, "trainer.resume=auto"))
    want = {r["step"]: r for r in metrics_lines(full) if "reward/mean" in r}
    got = {r["step"]: r for r in metrics_lines(part) if "reward/mean" in r and r["step"] > 2}
    assert sorted(got) == [3, 4]
    assert all(want[step]["loss/total"] != 0 and want[step]["grad_norm"] > 0 for step in (3, 4))
    for step in (3, 4):
        for key in ("loss/total", "loss/pg", "reward/mean", "mapo/abs_delta_h", "grad_norm", "lr", "clip/low_u2", "ratio/dev_u2_max"):
            assert got[step][key] == pytest.approx(want[step][key], abs=1e-6), (step, key)
    # the schedule counts optimizer steps: after RL step s, 2·s of the 8 have run (1 RL step = 2 of warm-up)
    lr = float(compose_cfg(["experiment=tiny_mapo"]).trainer.lr)
    for step in (1, 2, 3, 4):
        assert want[step]["lr"] == pytest.approx(lr * lr_multiplier(2 * step, 2, 8, "cosine"), rel=1e-9)
    assert all(want[s]["completion/overlong_filtered"] == 0 and want[s]["ratio/dev_u1_max"] <= 1e-6 for s in want)
    # another number of mini-batches would misplace the schedule: refused, naming the setting
    other = [a.replace("algo.mini_batches=2", "algo.mini_batches=1") for a in common]
    proc = subprocess.run(train_cmd(tiny_env, part, "tiny_mapo", *other, "trainer.steps=6", "trainer.resume=auto"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "optimizer_steps_per_step=2" in proc.stderr, proc.stderr[-3000:]


def test_torchrun_two_processes_match_one_process(tiny_env, tmp_path):
    # A 60-step warm start makes some completions well-formed, so rewards differ inside groups and the
    # gradients are not zero (with identical rewards every loss would be 0 and the test could not fail).
    base = (
        "trainer.eval_on_start=false", "data.eval_max_items=2", "trainer.micro_batch_size=8",
        f"trainer.warm_start.cache_dir={tmp_path / 'warm'}", "trainer.warm_start.steps=60",
        "trainer.warm_start.batch_size=16", "rollout.max_new_tokens=24",
    )
    single = tmp_path / "single"
    run_ok(train_cmd(tiny_env, single, "tiny_grpo", *base))
    double = tmp_path / "double"
    cmd = train_cmd(tiny_env, double, "tiny_grpo", *base)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *cmd[1:]]
    run_ok(cmd)
    one = [r for r in metrics_lines(single) if "reward/mean" in r]
    two = [r for r in metrics_lines(double) if "reward/mean" in r]
    assert len(one) == len(two) == 2
    assert all(r["grad_norm"] > 0 for r in one) and one[1]["loss/kl"] > 0
    for a, b in zip(one, two):
        assert b["reward/mean"] == pytest.approx(a["reward/mean"], abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        for key in ("loss/total", "loss/pg", "loss/kl"):
            assert b[key] == pytest.approx(a[key], abs=1e-4), key


def test_sweep_summary_lists_every_run(tiny_env, tmp_path):
    sweep_dir = tmp_path / "sweep"
    cmd = train_cmd(tiny_env, "unused", "tiny_grpo", "trainer.steps=1", "trainer.eval_on_start=false", "data.eval_max_items=2")
    cmd = [a for a in cmd if not a.startswith("trainer.run_dir=")]
    cmd = [sys.executable, "-m", "mapo.sweep", *cmd[3:], "algo.eps_high=0.2,0.28", f"hydra.sweep.dir={sweep_dir}"]
    run_ok(cmd)
    md = (sweep_dir / "summary.md").read_text()
    csv = (sweep_dir / "summary.csv").read_text().splitlines()
    assert len(csv) == 3 and "algo.eps_high" in csv[0]
    assert "0.28" in md and "0.2" in md and md.count("| ok ") == 2


def test_reward_config_needs_accuracy_and_matching_weights():
    from omegaconf import OmegaConf

    from mapo.preflight import ConfigError, check_config

    cfg = OmegaConf.to_object(compose_cfg(["experiment=tiny_mapo", "reward.functions=[format]", "reward.weights=[1.0]"]))
    with pytest.raises(ConfigError, match="must include 'accuracy'"):
        check_config(cfg)
    cfg = OmegaConf.to_object(compose_cfg(["experiment=tiny_mapo", "reward.weights=[1.0]"]))
    with pytest.raises(ConfigError, match="same length"):
        check_config(cfg)
    check_config(OmegaConf.to_object(compose_cfg(["experiment=tiny_mapo"])))



def test_mini_batches_must_divide_each_ranks_rows():
    from mapo.preflight import ConfigError, check_config

    cfg = OmegaConf.to_object(compose_cfg(["experiment=tiny_mapo", "algo.mini_batches=3"]))  # 8 prompts × 8 rows
    with pytest.raises(ConfigError, match=r"algo.mini_batches=3: each optimizer step takes 1/k of the 32 rows a rank gets"):
        check_config(cfg, world_size=2)
    cfg.algo.mini_batches = 4
    check_config(cfg, world_size=2)  # 32 rows per rank, 8 per optimizer step
    cfg.algo.mini_batches = 0
    with pytest.raises(ConfigError, match=r"algo.mini_batches=0: too small; valid: ≥ 1"):
        check_config(cfg, world_size=1)


# ----------------------------------------------------------------------------- several machines, clusters
def make_dry_run(*args: str) -> str:
    env = dict(os.environ, VIRTUAL_ENV=os.environ.get("VIRTUAL_ENV", sys.prefix))
    proc = subprocess.run(["make", "-n", *args], cwd=CONF.parent, capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_make_train_spans_nodes_through_torchrun_rendezvous():
    out = make_dry_run("train", "EXP=qwen2audio_mapo", "NPROC=8", "NNODES=2", "NODE_RANK=1", "MASTER_ADDR=10.1.2.3", "ARGS=model.path=/m")
    assert ("-m torch.distributed.run --nnodes=2 --node_rank=1 --nproc_per_node=8 --master_addr=10.1.2.3 --master_port=29500 "
            "-m mapo.train experiment=qwen2audio_mapo model.path=/m") in out
    assert "--standalone --nproc_per_node=2 -m mapo.train experiment=tiny_mapo" in make_dry_run("train", "NPROC=2")
    assert "python -m mapo.train experiment=tiny_mapo" in make_dry_run("train")
    assert "-m mapo.plan experiment=qwen2audio_mapo --nproc=$(( 8 * 2 )) --gpu-gib=80" in make_dry_run("plan", "EXP=qwen2audio_mapo", "NPROC=8", "NNODES=2")


def test_sweeps_go_to_a_cluster_through_the_submitit_launcher():
    out = make_dry_run("sweep", "LAUNCHER=submitit_slurm", "SWEEP=algo.attn.eta=0,0.05")
    assert "-m mapo.sweep experiment=tiny_mapo hydra/launcher=submitit_slurm algo.attn.eta=0,0.05" in out
    assert "hydra/launcher" not in make_dry_run("sweep", "SWEEP=algo.attn.eta=0,0.05")
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the optional `cluster` extra is not installed")
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("config", overrides=["experiment=qwen2audio_mapo", "hydra/launcher=submitit_slurm",
                                           "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=8",
                                           "hydra.launcher.tasks_per_node=8"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 8, 8)
    check_override_keys(["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu"])


def test_a_multi_task_submitit_job_gets_torchruns_variables(monkeypatch):
    submitit = pytest.importorskip("submitit")
    from mapo.cluster import export_job_environment

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SUBMITIT_EXECUTOR"):
        # set then delete, so that monkeypatch records each one and removes what export_job_environment
        # writes below (a bare delenv of an absent key records nothing, and RANK/WORLD_SIZE leaked into
        # the later in-process runs, which then waited for a second rank forever)
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    assert export_job_environment() is False  # not inside a job
    job = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "42", "SLURM_NTASKS": "16", "SLURM_PROCID": "9",
           "SLURM_LOCALID": "1", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    for key, value in job.items():
        monkeypatch.setenv(key, value)
    assert submitit.JobEnvironment().num_tasks == 16
    assert export_job_environment() is True
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"], os.environ["MASTER_ADDR"]) == ("9", "16", "1", "gpu07")
    assert export_job_environment() is False  # torchrun's variables are there now: left alone


def test_an_evaluation_only_run_builds_no_reference(tiny_env, tmp_path, monkeypatch):
    """`make eval EXP=…` (trainer.steps=0) never copies the model into a reference; a training run does."""
    import mapo.train as train

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # one process, whatever ran before
        monkeypatch.delenv(key, raising=False)
    copies: list[int] = []
    real_copy = train.frozen_copy
    monkeypatch.setattr(train, "frozen_copy", lambda *a, **k: copies.append(1) or real_copy(*a, **k))
    base = train_cmd(tiny_env, tmp_path / "x", "tiny_mapo")[3:]  # the overrides after `python -m mapo.train`
    for steps, expected in ((0, 0), (1, 1)):
        overrides = [o for o in base if not o.startswith(("trainer.steps=", "trainer.run_dir="))]
        overrides += [f"trainer.steps={steps}", f"trainer.run_dir={tmp_path / f'steps{steps}'}",
                      "trainer.warm_start.enabled=false", "trainer.eval_on_start=false"]
        copies.clear()
        train.run(OmegaConf.to_object(compose_cfg(overrides)))
        assert len(copies) == expected, (steps, copies)


def test_every_rollout_of_a_run_gets_the_configured_cuda_graph(tiny_env, tmp_path, monkeypatch):
    """`rollout.cuda_graph` and `rollout.compile` reach the training rollouts and the evaluations (at start and
    at the end) through the run's generation keywords: each rollout receives the configured values, none the
    defaults. (The spy then decodes uncompiled: Inductor would compile for minutes on this CPU; the compiled
    decode itself is tested in test_rollout.)"""
    from mapo import evaluate, rl, train

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # one process, whatever ran before
        monkeypatch.delenv(key, raising=False)
    received: list[tuple[str, object]] = []
    for caller, module in (("rl", rl), ("eval", evaluate)):
        real = module.generate_rollout

        def spy(*args, caller=caller, real=real, **kwargs):
            received.append((caller, (kwargs.get("cuda_graph"), kwargs.get("compile_decoder"))))
            return real(*args, **{**kwargs, "compile_decoder": False})

        monkeypatch.setattr(module, "generate_rollout", spy)
    overrides = [o for o in train_cmd(tiny_env, tmp_path / "run", "tiny_mapo")[3:] if not o.startswith("trainer.steps=")]
    overrides += ["trainer.steps=1", "trainer.warm_start.enabled=false", "rollout.cuda_graph=off", "rollout.compile=true"]
    train.run(OmegaConf.to_object(compose_cfg(overrides)))
    assert {caller for caller, _ in received} == {"rl", "eval"}
    assert {value for _, value in received} == {("off", True)}, received
