"""The model adapter: lookup by model_type, the parts it names, and clear errors for unknown families."""

from __future__ import annotations

import json

import pytest
import torch
from toy_model import tiny_model

from mapo.models.adapter import Qwen2AudioAdapter, adapter_for_folder, get_adapter, has_adapter


def test_qwen2_audio_parts_are_the_models_own():
    model = tiny_model()
    adapter = get_adapter(model)
    assert isinstance(adapter, Qwen2AudioAdapter)
    assert adapter.text_model(model) is model.model.language_model
    assert adapter.decoder_layers(model) is model.model.language_model.layers
    assert adapter.audio_tower(model) is model.model.audio_tower
    assert adapter.audio_projector(model) is model.model.multi_modal_projector
    assert adapter.lm_head(model) is model.lm_head
    assert adapter.vocab_size(model) == model.lm_head.out_features
    units = adapter.fsdp_units(model)
    assert units == [*model.model.language_model.layers, *model.model.audio_tower.layers]
    assert [p is model.model.audio_tower.embed_positions.weight for p in adapter.fixed_parameters(model)] == [True]


def test_run_text_model_equals_the_models_forward():
    model = tiny_model().eval()
    ids = torch.tensor([[10, 11, 12, 13], [0, 20, 21, 22]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    adapter = get_adapter(model)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden = adapter.run_text_model(model, adapter.embed_tokens(model)(ids), mask, positions)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    torch.testing.assert_close(adapter.lm_head(model)(hidden)[mask.bool()], logits[mask.bool()], rtol=0, atol=1e-5)


def test_unknown_family_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "whisper"}))
    with pytest.raises(ValueError, match=r"model_type 'whisper' has no mapo adapter; supported: .*qwen2_audio"):
        adapter_for_folder(tmp_path)
    plain = torch.nn.Linear(2, 2)
    assert not has_adapter(plain)
    with pytest.raises(ValueError, match="Linear: model_type None has no mapo adapter"):
        get_adapter(plain)


def test_min_target_samples_is_the_strictest_families_shortest_clip():
    """The manifest check's model-free minimum: one audio position in every registered family (Whisper
    features, ceil(n / 160) valid frames), and one sample fewer gives none in the strictest family."""
    import math

    import mapo.models.omni  # noqa: F401 — registers the Omni families
    from mapo.data.audio import MIN_TARGET_SAMPLES
    from mapo.models.adapter import adapter_for_config, registered_model_types

    adapters = {adapter_for_config({"model_type": t}).family: adapter_for_config({"model_type": t})
                for t in registered_model_types()}
    assert set(adapters) == {"qwen2_audio", "qwen2_5_omni", "qwen3_omni_moe"}

    def positions(adapter, n_samples):
        return adapter.num_audio_tokens(None, math.ceil(n_samples / 160))  # None: the processor's defaults

    shortest = {family: next(n for n in range(1, 1000) if positions(a, n) >= 1) for family, a in adapters.items()}
    assert shortest == {"qwen2_audio": 321, "qwen2_5_omni": 321, "qwen3_omni_moe": 1}
    assert MIN_TARGET_SAMPLES == max(shortest.values())
