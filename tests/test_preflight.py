"""Start-time checks (mapo.preflight): every bad value fails before any model loads, naming the key and the
valid range; the training program runs them first."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mapo.config import register_configs
from mapo.preflight import ConfigError, check_config

CONF = Path(__file__).resolve().parents[1] / "conf"
REAL_CONFIG = json.loads((Path(__file__).resolve().parents[1] / "src/mapo/models/configs/Qwen2-Audio-7B-Instruct.json").read_text())
register_configs()


@functools.lru_cache(maxsize=None)
def _composed(experiment: str):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose("config", overrides=[experiment] if experiment else [])


def cfg_of(*overrides: str):
    """The run config of `experiment=…` (composed once by Hydra) with `key=value` overrides merged in."""
    experiment = next((o for o in overrides if o.startswith("experiment=")), "")
    rest = [o for o in overrides if not o.startswith("experiment=")]
    return OmegaConf.to_object(OmegaConf.merge(_composed(experiment), OmegaConf.from_dotlist(rest)))


def problems(*overrides: str, world_size: int = 1, model_config: dict | None = None, preprocessor: dict | None = None) -> list[str]:
    try:
        check_config(cfg_of(*overrides), model_config, world_size, preprocessor)
    except ConfigError as err:
        assert str(err).startswith("invalid config (nothing was loaded):")
        return err.problems
    return []


def test_the_shipped_experiments_pass():
    for name in ("tiny_mapo", "tiny_grpo", "tiny_sft"):
        assert problems(f"experiment={name}") == []
    for name in ("qwen2audio_mapo", "qwen2audio_grpo"):
        assert problems(f"experiment={name}", "data.dir=/data", world_size=8, model_config=REAL_CONFIG) == []


@pytest.mark.parametrize("overrides, world, expected", [
    (["rollout.group_size=1"], 1, "rollout.group_size=1: advantages are relative to the group (R − group mean, algo.adv_scale=group), "
                                  "so a group of one gives every completion advantage 0; valid: ≥ 2 (paper: 8)"),
    (["rollout.prompts_per_step=6"], 4, "rollout.prompts_per_step=6: each of the 4 ranks takes an equal share of the prompts; valid: a multiple of the world size 4"),
    (["rollout.max_new_tokens=0"], 1, "rollout.max_new_tokens=0: a completion needs at least one token; valid: ≥ 1"),
    (["algo.attn.eta=-0.1"], 1, "algo.attn.eta=-0.1: η weighs the attention loss; negative pushes attention away from the audio; valid: ≥ 0 (0 = off)"),
    (["algo.mask.cap=0"], 1, "algo.mask.cap=0.0: C_mask caps ω̃; a cap ≤ 0 zeroes the policy gradient; valid: > 0"),
    (["algo.attn.cap=-1"], 1, "algo.attn.cap=-1.0: C_mask caps ν̃; a cap ≤ 0 zeroes the attention loss; valid: > 0"),
    (["algo.attn.gate_cap=0"], 1, "algo.attn.gate_cap=0.0: C_pref caps the sequence gate; valid: > 0"),
    (["algo.attn.layers=[]"], 1, "algo.attn.layers=[]: the capture needs at least one decoder layer; valid: a non-empty list of layer indices"),
    (["algo.attn.layers=[-1,-1]"], 1, "algo.attn.layers=[-1, -1]: a layer is listed twice; valid: distinct indices"),
    (["model.attn_implementation=flash_attention_2"], 1, "model.attn_implementation='flash_attention_2': the audio-attention capture "
                                                        "(algo.attn.eta=0.05 > 0) needs the text decoder's attention function and mask format; "
                                                        "valid: sdpa, eager (or set algo.attn.eta=0)"),
    (["rollout.temperature=0"], 1, "rollout.temperature=0.0: sampling divides the logits by it; valid: > 0"),
    (["rollout.top_p=0"], 1, "rollout.top_p=0.0: nucleus mass out of range; valid: (0, 1] (1 = off)"),
    (["rollout.top_k=-1"], 1, "rollout.top_k=-1: keeps the k most likely tokens; valid: an integer ≥ 0 (0 = off)"),
    (["rollout.repetition_penalty=0"], 1, "rollout.repetition_penalty=0.0: divides/multiplies the logits of seen tokens; valid: > 0"),
    (["rollout.cuda_graph=sometimes"], 1, "rollout.cuda_graph='sometimes': unknown choice; valid: auto, on, off"),
    (["rollout.shared_prompt_cache=true", "algo.attn.eta=0", "model.attn_implementation=flash_attention_2"], 1,
     ("model.attn_implementation='flash_attention_2': rollout.shared_prompt_cache decodes through the text decoder's "
      "attention function and a prepared mask; valid: sdpa, eager (or rollout.shared_prompt_cache=false)")),
    (["algo.beta=-0.5"], 1, "algo.beta=-0.5: the KL weight cannot be negative; valid: ≥ 0"),
    (["algo.mask.kind=soft2"], 1, "algo.mask.kind='soft2': unknown choice; valid: soft, threshold, topk, quantile"),
    (["algo.attn.schedule=cubic"], 1, "algo.attn.schedule='cubic': unknown choice; valid: power, exp, step, constant"),
    (["algo.reference.ablation=mute"], 1, "algo.reference.ablation='mute': unknown choice; valid: drop_features, mask_audio_keys, silence, noise"),
    (["algo.eps_low=1.0"], 1, "algo.eps_low=1.0: out of range; valid: [0, 1)"),
    (["trainer.micro_batch_size=0"], 1, "trainer.micro_batch_size=0: too small; valid: ≥ 1"),
    (["trainer.lr=0"], 1, "trainer.lr=0.0: must be positive; valid: > 0"),
    (["trainer.betas=[0.9]"], 1, "trainer.betas=[0.9]: AdamW takes two decay rates; valid: two values in [0, 1)"),
    (["trainer.schedule=step"], 1, "trainer.schedule='step': unknown choice; valid: constant, cosine, linear"),
    (["trainer.warm_start.batch_size=30"], 4, "trainer.warm_start.batch_size=30: each of the 4 ranks takes an equal share; valid: a multiple of the world size 4"),
    (["trainer.memory_check=maybe"], 1, "trainer.memory_check='maybe': unknown choice; valid: refuse, warn, off"),
    (["data.text_only_fraction=1.5"], 1, "data.text_only_fraction=1.5: out of range; valid: [0, 1]"),
    (["data.layout=csv"], 1, "data.layout='csv': unknown choice; valid: auto, "),
    (["reward.functions=[format]", "reward.weights=[1.0]"], 1, "must include 'accuracy' (the MAPO gate uses it"),
    (["reward.weights=[1.0]"], 1, "reward.weights=[1.0]: reward.functions ['accuracy', 'format'] and reward.weights must have the same length; valid: 2 weights"),
    (["reward.functions=[accuracy,speed]", "reward.weights=[1,1]"], 1, "reward.functions=['accuracy', 'speed']: ['speed'] are not registered; valid: "),
    (["model.lora.rank=8", "model.lora.targets=qkv"], 1, "model.lora.targets='qkv': a list of module names (e.g. [q_proj, v_proj]) or 'all-linear'"),
    (["model.compute_dtype=float8"], 1, "model.compute_dtype='float8': unknown dtype 'float8'; valid: float32"),
    (["model.master_dtype=bfloat16"], 1, "model.master_dtype='bfloat16': trainable weights and optimizer state must be float32"),
])
def test_each_bad_value_is_named_with_its_valid_range(overrides, world, expected):
    found = problems("experiment=tiny_mapo", *overrides, world_size=world)
    assert any(expected in p for p in found), found


def test_all_problems_are_listed_at_once():
    found = problems("experiment=tiny_mapo", "rollout.group_size=1", "algo.attn.eta=-1", "rollout.max_new_tokens=0")
    assert [p.split("=")[0] for p in found] == ["rollout.max_new_tokens", "rollout.group_size", "algo.attn.eta"]


def test_group_size_one_is_fine_where_no_advantage_is_used():
    assert problems("experiment=tiny_sft", "rollout.group_size=1") == []
    assert problems("experiment=tiny_mapo", "rollout.group_size=1", "trainer.steps=0") == []  # make eval


def test_the_capture_checks_follow_eta():
    assert problems("experiment=tiny_grpo", "model.attn_implementation=flash_attention_2", "algo.attn.layers=[]") == []
    assert problems("experiment=tiny_mapo", "model.attn_implementation=eager") == []


def test_checks_against_the_models_config_json():
    tiny = {**REAL_CONFIG, "text_config": {**REAL_CONFIG["text_config"], "hidden_size": 32, "num_hidden_layers": 2,
                                           "num_attention_heads": 2, "intermediate_size": 64}}
    found = problems("experiment=tiny_mapo", "algo.attn.layers=[-3,-2,-1]", model_config=tiny)
    assert found == ["algo.attn.layers=[-3, -2, -1]: [-3] do not exist: the text decoder has 2 layers (config.json); "
                     "valid: indices in [-2, 1] (negative count from the top)"]
    assert problems("experiment=tiny_mapo", "algo.attn.layers=[0,-2]", model_config=tiny) == [
        "algo.attn.layers=[0, -2]: two indices name the same layer of 2; valid: distinct layers"]
    assert problems("experiment=tiny_mapo", "algo.attn.layers=[31]", model_config=REAL_CONFIG) == []  # 32 by Qwen2Config's default
    # a full 30 s window is 750 audio tokens; 8192 positions leave at most 7442 for the completion
    assert problems("experiment=qwen2audio_mapo", "data.dir=/d", "rollout.max_new_tokens=7442", model_config=REAL_CONFIG) == []
    found = problems("experiment=qwen2audio_mapo", "data.dir=/d", "rollout.max_new_tokens=7500", model_config=REAL_CONFIG)
    assert found == ["rollout.max_new_tokens=7500: a full audio window gives 750 audio tokens, and with the completion that exceeds "
                     "the text model's 8192 positions (config.json max_position_embeddings); valid: ≤ 7442 minus the prompt's text"]
    ten_seconds = {"chunk_length": 10, "sampling_rate": 16000, "hop_length": 160, "nb_max_frames": 1000}
    found = problems("experiment=qwen2audio_mapo", "data.dir=/d", model_config=REAL_CONFIG, preprocessor=ten_seconds)
    assert found == ["preprocessor_config.json nb_max_frames=1000: the audio encoder takes exactly 3000 mel frames "
                     "(2 × max_source_positions in config.json); this window gives 1000; valid: 3000 (chunk_length 30 s)"]
    found = problems("experiment=qwen2audio_mapo", "data.dir=/d", "model.lora.rank=8", "model.lora.targets=[q_proj,qkv]", model_config=REAL_CONFIG)
    assert len(found) == 1 and found[0].startswith("model.lora.targets=['q_proj', 'qkv']: ['qkv'] name no linear layer of the language model; valid: ")
    # an audio-tower linear is a linear of the model, but add_lora adapts the language model only
    found = problems("experiment=qwen2audio_mapo", "data.dir=/d", "model.lora.rank=8", "model.lora.targets=[q_proj,fc1]", model_config=REAL_CONFIG)
    assert len(found) == 1 and "['fc1'] name no linear layer of the language model" in found[0]


def test_real_experiments_use_real_data_and_stop_without_data_dir():
    q = cfg_of("experiment=qwen2audio_mapo")
    assert q.data.name == "avqa_mmau" and q.data.eval_splits == {"mmau_test_mini": "mmau-test-mini.json"}  # replaced, not merged
    assert cfg_of("experiment=tiny_mapo").data.eval_splits == {"test": "test.jsonl", "counter_prior": "counter_prior.jsonl"}
    assert problems("experiment=qwen2audio_grpo") == [
        "data.dir='': data=avqa_mmau reads avqa_train.jsonl (train), mmau-test-mini.json (eval split mmau_test_mini) from it; "
        "valid: a folder holding those files (set data.dir=/path/to/folder)"]


def test_training_stops_before_loading_any_model(tmp_path, monkeypatch):
    """The program's own order: config checks, then config.json checks, and only then data and weights."""
    import mapo.train as train

    loaded = []
    monkeypatch.setattr(train, "load_model_and_processor", lambda *a, **k: loaded.append("model"))
    monkeypatch.setattr(train, "ensure_data", lambda *a, **k: loaded.append("data"))
    with pytest.raises(ConfigError, match="rollout.group_size=1"):
        train.run(cfg_of("experiment=tiny_mapo", "rollout.group_size=1", f"trainer.run_dir={tmp_path}"))
    folder = tmp_path / "model"
    folder.mkdir()
    tiny = {**REAL_CONFIG, "text_config": {**REAL_CONFIG["text_config"], "hidden_size": 32, "num_hidden_layers": 2,
                                           "num_attention_heads": 2, "intermediate_size": 64}}
    (folder / "config.json").write_text(json.dumps(tiny))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "preprocessor_config.json").write_text(json.dumps({"nb_max_frames": 3000}))
    with pytest.raises(ConfigError, match=r"algo.attn.layers=\[-3, -2, -1\]: \[-3\] do not exist"):
        train.run(cfg_of("experiment=qwen2audio_mapo", f"model.path={folder}", "data.dir=/nowhere", f"trainer.run_dir={tmp_path}"))
    with pytest.raises(ConfigError, match="data.dir='': data=avqa_mmau reads avqa_train.jsonl"):
        train.run(cfg_of("experiment=qwen2audio_mapo", f"model.path={folder}", f"trainer.run_dir={tmp_path}"))
    assert loaded == []
