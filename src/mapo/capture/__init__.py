"""Differentiable capture of the attention mass generated tokens put on the audio span.

Public API:
    capture_audio_attention(model, audio_key_mask, layers, head_reduce, layer_reduce, method)
        -> AudioAttentionCapture (context manager; `.mass` [B, S], `.head_mass` [B, L, Hq, S])
    audio_key_mask_from_ids(input_ids, audio_token_id, attention_mask) -> [B, S] bool
    completion_mass(mass [B, S], prompt_width, completion_len) -> [B, T]
    predicting_positions(prompt_width, completion_len) -> [T] long
    audio_mass_sdpa / audio_mass_eager(query, key, audio_keys, attention_mask, scaling, is_causal)
        -> [B, Hq, Q] (the per-layer kernels)
The micro-benchmark lives in `mapo.capture.bench` (imported on demand).
"""

from mapo.capture.alignment import completion_mass, predicting_positions
from mapo.capture.attention import (
    AudioAttentionCapture,
    audio_key_mask_from_ids,
    capture_audio_attention,
    text_decoder_layers,
)
from mapo.capture.kernels import audio_mass_eager, audio_mass_sdpa

__all__ = [
    "AudioAttentionCapture",
    "audio_key_mask_from_ids",
    "audio_mass_eager",
    "audio_mass_sdpa",
    "capture_audio_attention",
    "completion_mass",
    "predicting_positions",
    "text_decoder_layers",
]
