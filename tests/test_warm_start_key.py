"""The warm-start cache key follows the contents of the model folder and the training manifest, not only
the settings: a model rebuilt differently at the same path must not reuse stale warm-start weights."""

from __future__ import annotations

from mapo.config import AlgoConfig, DataConfig, LoggerConfig, MapoConfig, ModelConfig, RewardConfig, RolloutConfig, TrainerConfig
from mapo.warm_start import FINGERPRINT_BYTES, file_fingerprint, warm_start_key


def config(tmp_path) -> MapoConfig:
    return MapoConfig(model=ModelConfig(path=str(tmp_path / "model")), data=DataConfig(dir=str(tmp_path / "data")),
                      rollout=RolloutConfig(), algo=AlgoConfig(), reward=RewardConfig(), trainer=TrainerConfig(),
                      logger=LoggerConfig())


def test_key_changes_with_weights_config_and_manifest(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "data").mkdir()
    weights, cfg_file, manifest = tmp_path / "model/model.safetensors", tmp_path / "model/config.json", tmp_path / "data/train.jsonl"
    weights.write_bytes(b"\x01" * 4096)
    cfg_file.write_text('{"model_type": "qwen2_audio"}')
    manifest.write_text('{"id": "a"}\n')
    cfg = config(tmp_path)
    key = warm_start_key(cfg)
    assert warm_start_key(cfg) == key  # deterministic
    weights.write_bytes(b"\x02" + b"\x01" * 4095)  # same size and name, other weights
    assert warm_start_key(cfg) != key
    key = warm_start_key(cfg)
    cfg_file.write_text('{"model_type": "qwen2_audio", "x": 1}')
    assert warm_start_key(cfg) != key
    key = warm_start_key(cfg)
    manifest.write_text('{"id": "b"}\n')
    assert warm_start_key(cfg) != key
    key = warm_start_key(cfg)
    cfg.trainer.warm_start.cache_dir = str(tmp_path / "elsewhere")  # where the cache lives does not matter
    assert warm_start_key(cfg) == key


def test_fingerprint_reads_both_ends_of_a_large_file(tmp_path):
    big = tmp_path / "shard.safetensors"
    middle = bytearray(3 * FINGERPRINT_BYTES)
    big.write_bytes(bytes(middle))
    base = file_fingerprint(big)
    middle[-1] = 7  # the tail changes
    big.write_bytes(bytes(middle))
    assert file_fingerprint(big) != base
    middle[-1] = 0
    middle[FINGERPRINT_BYTES + 5] = 7  # only the unread middle changes: by design not seen (cheap on 15 GB)
    big.write_bytes(bytes(middle))
    assert file_fingerprint(big) == base
