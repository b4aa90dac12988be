"""Initialisation of the audio path of a randomly built audio LM, so that training can use the audio.

Why: transformers initialises every Linear/Conv1d with N(0, 0.02²) and the encoder's frozen position
table (`embed_positions`, `requires_grad=False`) with N(0, 0.02²) too. The residual stream entering the
encoder layers is then ~0.02 rms, the same size as what each random layer adds, and the frozen table
carries no smooth notion of order. Measured here (transformers 5.24, d_model 64, 2 layers, 3 s window,
AdamW lr 3e-3, batch 32, classifying "low tone then high" vs "high then low"): with the stock init the
classifier stayed at chance (0.51) for 120 steps; with this init it reached 1.00 by step 60. Either half of
the fix alone also learned, which points at the scale of the residual stream, not at one weight.

Note: at init the stock tower's *outputs* do differ between clips (its final LayerNorm rescales the
small stream); the failure is in how trainable that path is, not in a zero signal.

What this does, deterministically from `seed` (own generator; the global RNG is untouched):
- every convolution of the audio tower, in module order (Qwen2-Audio / Qwen2.5-Omni: conv1, conv2 over
  time; Qwen3-Omni: conv2d1..3 over mel × time): Kaiming-normal weights (std = sqrt(2 / fan_in), fan_in =
  in_channels · kernel size), zero bias, so the log-mel input (~0.5 rms) reaches the encoder layers at
  ~0.4 rms instead of ~0.02;
- a learned position table (Qwen2-Audio's `embed_positions`): the standard sinusoidal table (sin on the
  first half of the channels, cos on the second, timescales from 1 to 10 000), amplitude ~0.7 rms,
  smooth in position. The Omni towers already compute that table as a fixed buffer.
The encoder layers keep their small init, so at init each layer changes the stream by a few percent and
the tower passes conv features plus an ordered position code through to the projector.
"""

from __future__ import annotations

import math

import torch
from torch import nn

#: Largest timescale of the sinusoidal table (the usual Transformer / Whisper value).
MAX_TIMESCALE = 10_000.0


def sinusoidal_positions(length: int, channels: int, max_timescale: float = MAX_TIMESCALE) -> torch.Tensor:
    """Sinusoidal position table, shape [length, channels]: [sin(p·f_0..f_{C/2-1}), cos(p·f_0..f_{C/2-1})].

    f_i = max_timescale^(-i / (C/2 - 1)), so f_0 = 1 (period 2π positions) and f_{C/2-1} = 1/max_timescale.
    """
    if channels % 2 != 0 or channels < 4:
        raise ValueError(f"sinusoidal positions need an even channel count >= 4, got {channels}")
    half = channels // 2
    log_increment = math.log(max_timescale) / (half - 1)
    inv_timescales = torch.exp(-log_increment * torch.arange(half, dtype=torch.float64))  # [C/2]
    angles = torch.arange(length, dtype=torch.float64)[:, None] * inv_timescales[None, :]  # [L, C/2]
    return torch.cat([angles.sin(), angles.cos()], dim=1).to(torch.float32)  # [L, C]


def _kaiming_conv_(conv: nn.Conv1d | nn.Conv2d, generator: torch.Generator) -> None:
    """Kaiming-normal (fan_in, gain sqrt(2)) weight [out, in, *kernel] and zero bias, in place."""
    fan_in = conv.in_channels * math.prod(conv.kernel_size)
    std = math.sqrt(2.0 / fan_in)
    weight = torch.randn(conv.weight.shape, generator=generator, dtype=torch.float32) * std
    conv.weight.copy_(weight.to(conv.weight.dtype))
    if conv.bias is not None:
        conv.bias.zero_()


@torch.no_grad()
def init_audio_path(model: nn.Module, seed: int) -> None:
    """Re-initialise the audio tower's convolutions (and learned position table) in place.

    model: a model of a supported family (its adapter names the tower), or a bare model with the tower at
           `.model.audio_tower` / `.audio_tower`. Same seed, same weights.
    """
    from mapo.models.adapter import get_adapter, has_adapter

    if has_adapter(model):
        tower = get_adapter(model).audio_tower(model)
    else:
        tower = getattr(getattr(model, "model", model), "audio_tower", None)
    if tower is None:
        raise TypeError(f"{type(model).__name__} has no audio_tower; expected an audio LM")
    convs = [m for m in tower.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]
    if not convs:
        raise TypeError(f"{type(tower).__name__} has no convolution to initialise")
    generator = torch.Generator().manual_seed(seed)
    for conv in convs:
        _kaiming_conv_(conv, generator)
    positions = getattr(tower, "embed_positions", None)
    if isinstance(positions, nn.Embedding):
        length, channels = positions.weight.shape
        positions.weight.copy_(sinusoidal_positions(length, channels).to(positions.weight.dtype))
