"""Tiny Qwen Omni thinkers for tests and CPU runs: real architecture, random weights, small widths.

`python -m mapo.models.tiny family=qwen2_5_omni` (or `qwen3_omni_moe`) writes, next to the weights of
`Qwen2_5OmniThinkerForConditionalGeneration` / `Qwen3OmniMoeThinkerForConditionalGeneration`, the
family's processor (`Qwen2_5OmniProcessor` / `Qwen3OmniMoeProcessor`: Whisper feature extractor with a
short window, a Qwen2-VL image processor, `NoVideoProcessor` in the video slot, the tokenizer) and a chat
template laid out like the released one:

- Qwen2.5-Omni: the same ChatML as Qwen2-Audio with the default system turn "You are a helpful
  assistant." when the conversation has none, and each clip as `<|audio_bos|><|AUDIO|><|audio_eos|>`
  (no "Audio k:" prefix). Its speech system prompt ("You are Qwen, a virtual human …") is needed only for
  the talker's spoken output, which mapo does not use.
- Qwen3-Omni: ChatML without a default system turn, each clip as `<|audio_start|><|audio_pad|><|audio_end|>`.

Special tokens (ids 0..9): <|endoftext|>, <|im_start|>, <|im_end|>, then the family's audio start /
placeholder / end and vision start / image / video / end markers. The vision tower is as small as its
config allows (one block, width 16); mapo never runs it. Qwen3-Omni's decoder layers are all MoE layers
(`text_experts` experts, `text_experts_per_token` routed per token); its audio tower keeps the released
n_window = 50 (100-frame chunks, 13 positions per chunk), the only one transformers' tower supports.
"""

from __future__ import annotations

from functools import partial

import torch
from transformers import GenerationConfig, Qwen2VLImageProcessorPil

from mapo.models.adapter import get_adapter
from mapo.models.init import init_audio_path
from mapo.models.omni_processor import NoVideoProcessor, build_omni_processor
from mapo.models.tiny import (
    ENDOFTEXT,
    IM_END,
    IM_START,
    N_MELS,
    TinyModelConfig,
    build_tokenizer,
    whisper_features,
)

#: Per family: its special tokens in id order, and the tokenizer attributes its processor reads.
QWEN25_OMNI_TOKENS = {
    "audio_bos_token": "<|audio_bos|>",
    "audio_token": "<|AUDIO|>",
    "audio_eos_token": "<|audio_eos|>",
    "vision_bos_token": "<|vision_bos|>",
    "image_token": "<|IMAGE|>",
    "video_token": "<|VIDEO|>",
    "vision_eos_token": "<|vision_eos|>",
}
QWEN3_OMNI_TOKENS = {
    "audio_bos_token": "<|audio_start|>",
    "audio_token": "<|audio_pad|>",
    "audio_eos_token": "<|audio_end|>",
    "vision_bos_token": "<|vision_start|>",
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_eos_token": "<|vision_end|>",
}


def _chat_template(default_system: str | None, audio_span: str) -> str:
    """ChatML with audio items rendered as `audio_span`, an optional default system turn, and the
    assistant generation prompt. Text items render as is; a string content renders as is."""
    system = (
        "{% if loop.first and message['role'] != 'system' %}"
        f"<|im_start|>system\n{default_system}<|im_end|>\n"
        "{% endif %}"
        if default_system is not None
        else ""
    )
    return (
        "{% for message in messages %}"
        + system
        + "<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}"
        "{{ message['content'] }}"
        "{% else %}"
        "{% for content in message['content'] %}"
        "{% if content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
        + audio_span
        + "{% elif 'text' in content %}"
        "{{ content['text'] }}"
        "{% endif %}"
        "{% endfor %}"
        "{% endif %}"
        "<|im_end|>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


QWEN25_OMNI_CHAT_TEMPLATE = _chat_template("You are a helpful assistant.", "<|audio_bos|><|AUDIO|><|audio_eos|>")
QWEN3_OMNI_CHAT_TEMPLATE = _chat_template(None, "<|audio_start|><|audio_pad|><|audio_end|>")


def _special_tokens(named: dict[str, str]) -> tuple[str, ...]:
    return (ENDOFTEXT, IM_START, IM_END, *named.values())


def _token_ids(tokenizer, named: dict[str, str]) -> dict[str, int]:
    return dict(zip(named, tokenizer.convert_tokens_to_ids(list(named.values()))))


def _text_config(cfg: TinyModelConfig, tokenizer, head_dim: int) -> dict:
    pad_id, eos_id = tokenizer.convert_tokens_to_ids([ENDOFTEXT, IM_END])
    half = head_dim // 2  # rotary frequencies, split over the (temporal, height, width) axes
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_intermediate,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_kv_heads,
        max_position_embeddings=cfg.max_position,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [half - 2 * (half // 4), half // 4, half // 4]},
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )


def _finish(model, cfg: TinyModelConfig, tokenizer):
    pad_id, eos_id = tokenizer.convert_tokens_to_ids([ENDOFTEXT, IM_END])
    init_audio_path(model, seed=cfg.seed)
    model.generation_config = GenerationConfig(eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=None)
    return model.eval()


def build_omni_tokenizer(texts: list[str], vocab_size: int, seed: int = 0, *, named: dict[str, str], chat_template: str):
    """The family's tokenizer: its special tokens (ids 0..9), the named token attributes, its chat template."""
    return build_tokenizer(
        texts, vocab_size, seed, special_tokens=_special_tokens(named), named_tokens=named, chat_template=chat_template,
    )


def build_omni_processor_for(tokenizer, window_seconds: int, *, processor_class: str, patch_size: int, chat_template: str):
    """The family's processor: Whisper features of a `window_seconds` window, a Qwen2-VL image processor,
    `NoVideoProcessor` in the video slot. Qwen2.5-Omni pads each clip to the window (input_features
    [C, 128, 100·window]); Qwen3-Omni's processor does not (it pads to the longest clip of a call only)."""
    import transformers

    vision = dict(patch_size=patch_size, merge_size=2, temporal_patch_size=2)
    return build_omni_processor(
        getattr(transformers, processor_class),
        image_processor=Qwen2VLImageProcessorPil(**vision),
        video_processor=NoVideoProcessor(**vision),
        feature_extractor=whisper_features(window_seconds),
        tokenizer=tokenizer,
        chat_template=chat_template,
    )


# --------------------------------------------------------------------------------------- Qwen2.5-Omni
def build_qwen25_omni_model(cfg: TinyModelConfig, tokenizer):
    """A randomly initialised small `Qwen2_5OmniThinkerForConditionalGeneration`, identical for one seed."""
    from transformers import (
        Qwen2_5OmniThinkerConfig,
        Qwen2_5OmniThinkerForConditionalGeneration,
    )

    ids = _token_ids(tokenizer, QWEN25_OMNI_TOKENS)
    config = Qwen2_5OmniThinkerConfig(
        audio_config=dict(
            num_mel_bins=N_MELS, d_model=cfg.audio_d_model, encoder_layers=cfg.audio_layers,
            encoder_attention_heads=cfg.audio_heads, encoder_ffn_dim=cfg.audio_ffn, output_dim=cfg.text_hidden,
            n_window=100, max_source_positions=100,  # 200-frame attention chunks → ≤ 100 positions each
        ),
        vision_config=dict(
            depth=1, hidden_size=16, intermediate_size=16, num_heads=1, out_hidden_size=cfg.text_hidden,
            fullatt_block_indexes=[0], window_size=28, patch_size=14,
        ),
        text_config=_text_config(cfg, tokenizer, cfg.text_hidden // cfg.text_heads),
        audio_token_index=ids["audio_token"],
        image_token_index=ids["image_token"],
        video_token_index=ids["video_token"],
        audio_start_token_id=ids["audio_bos_token"],
        audio_end_token_id=ids["audio_eos_token"],
        vision_start_token_id=ids["vision_bos_token"],  # read by the model's get_rope_index
        vision_end_token_id=ids["vision_eos_token"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = Qwen2_5OmniThinkerForConditionalGeneration(config)
    return _finish(model, cfg, tokenizer)


# ----------------------------------------------------------------------------------------- Qwen3-Omni
def build_qwen3_omni_model(cfg: TinyModelConfig, tokenizer):
    """A randomly initialised small `Qwen3OmniMoeThinkerForConditionalGeneration` (every layer MoE)."""
    from transformers import (
        Qwen3OmniMoeThinkerConfig,
        Qwen3OmniMoeThinkerForConditionalGeneration,
    )

    ids = _token_ids(tokenizer, QWEN3_OMNI_TOKENS)
    head_dim = cfg.text_hidden // cfg.text_heads
    text = _text_config(cfg, tokenizer, head_dim)
    text["rope_parameters"]["interleaved"] = True  # as released (Qwen3-VL style interleaved axes)
    text.pop("tie_word_embeddings")  # a thinker-level field for this family
    text.update(
        head_dim=head_dim, num_experts=cfg.text_experts, num_experts_per_tok=cfg.text_experts_per_token,
        moe_intermediate_size=cfg.text_moe_intermediate, decoder_sparse_step=1,
    )
    config = Qwen3OmniMoeThinkerConfig(
        audio_config=dict(
            num_mel_bins=N_MELS, d_model=cfg.audio_d_model, encoder_layers=cfg.audio_layers,
            encoder_attention_heads=cfg.audio_heads, encoder_ffn_dim=cfg.audio_ffn, output_dim=cfg.text_hidden,
            n_window=50, n_window_infer=800, max_source_positions=100, downsample_hidden_size=8,
        ),
        vision_config=dict(
            depth=1, hidden_size=16, intermediate_size=16, num_heads=1, out_hidden_size=cfg.text_hidden,
            deepstack_visual_indexes=[], patch_size=16, num_position_embeddings=16,
        ),
        text_config=text,
        audio_token_id=ids["audio_token"],
        image_token_id=ids["image_token"],
        video_token_id=ids["video_token"],
        audio_start_token_id=ids["audio_bos_token"],
        vision_start_token_id=ids["vision_bos_token"],  # read by the model's get_rope_index
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = Qwen3OmniMoeThinkerForConditionalGeneration(config)
    model = _finish(model, cfg, tokenizer)
    _kaiming_conv_out_(get_adapter(model).audio_tower(model).conv_out, cfg.seed)
    return model


@torch.no_grad()
def _kaiming_conv_out_(linear: torch.nn.Linear, seed: int) -> None:
    """Qwen3-Omni's tower flattens its conv features (channels × mel) through `conv_out` before adding the
    sinusoidal position code (~0.7 rms). With the stock N(0, 0.02²) init the audio reaches the encoder
    layers at ~0.05 rms (measured on this tiny model), under a tenth of the position code, and the warm
    start barely learned to use it; a Kaiming-normal init (std sqrt(2 / fan_in)) brings it to the level
    of the position code, as `init_audio_path` does for the convolutions."""
    generator = torch.Generator().manual_seed(seed + 1)
    std = (2.0 / linear.in_features) ** 0.5
    linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * std)


_BUILDERS = {
    "qwen2_5_omni": (
        QWEN25_OMNI_CHAT_TEMPLATE,
        partial(build_omni_tokenizer, named=QWEN25_OMNI_TOKENS, chat_template=QWEN25_OMNI_CHAT_TEMPLATE),
        partial(build_omni_processor_for, processor_class="Qwen2_5OmniProcessor", patch_size=14, chat_template=QWEN25_OMNI_CHAT_TEMPLATE),
        build_qwen25_omni_model,
    ),
    "qwen3_omni_moe": (
        QWEN3_OMNI_CHAT_TEMPLATE,
        partial(build_omni_tokenizer, named=QWEN3_OMNI_TOKENS, chat_template=QWEN3_OMNI_CHAT_TEMPLATE),
        partial(build_omni_processor_for, processor_class="Qwen3OmniMoeProcessor", patch_size=16, chat_template=QWEN3_OMNI_CHAT_TEMPLATE),
        build_qwen3_omni_model,
    ),
}


def builder(family: str):
    """(chat template, tokenizer builder, processor builder, model builder) of an Omni family."""
    if family not in _BUILDERS:
        raise ValueError(f"unknown Omni family {family!r}; valid: {', '.join(_BUILDERS)}")
    return _BUILDERS[family]
