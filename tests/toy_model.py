"""A toy Qwen2-Audio and a hand-made left-padded batch, shared by the rollout and scoring tests.

Not a test module (no `test_` prefix): the test files import it as `from toy_model import ...`, which
works because pytest (default "prepend" import mode, no `tests/__init__.py`) puts tests/ on sys.path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

PAD, EOS, AUDIO = 0, 1, 5
VOCAB = 100
TEXT_HIDDEN = 64
FEATURE_FRAMES = 100  # the audio window in mel frames (max_source_positions 50 after the stride-2 conv)
NUM_MELS = 128

# Prompts: 100 valid mel frames -> 25 audio tokens, 60 -> 15 ((L-1)//2+1 = 50 / 30, then (x-2)//2+1).
PROMPTS = [
    [10, 11, 2] + [AUDIO] * 25 + [3, 12, 13, 14],  # clip 0
    [10, 20, 21, 22, 23],  # text only
    [10, 2] + [AUDIO] * 15 + [3, 15, 16],  # clip 1
]
CLIP_FRAMES = [100, 60]
CLIP_OF_PROMPT = {0: 0, 2: 1}  # prompt index -> clip index; prompt 1 has none


def tiny_model(
    seed: int = 0, *, eos_bias: float = 0.0, projector_gain: float = 1.0
) -> Qwen2AudioForConditionalGeneration:
    """Qwen2-Audio architecture: text hidden 64, 2 layers; audio d_model 32, 1 layer, 100-frame window.

    eos_bias > 0 gives the LM head a bias on EOS so that sampled completions end at varied lengths.
    projector_gain scales the audio projector's weight: random init makes the audio path nearly silent
    (FIELD-NOTES), so a gain of e.g. 50 makes the audio change the outputs clearly.
    The weights depend only on `seed` (the EOS head copies the drawn lm_head weight).
    """
    torch.manual_seed(seed)
    config = Qwen2AudioConfig(
        audio_config=dict(
            model_type="qwen2_audio_encoder", d_model=32, encoder_layers=1, encoder_attention_heads=2,
            encoder_ffn_dim=64, num_mel_bins=NUM_MELS, max_source_positions=FEATURE_FRAMES // 2,
        ),
        text_config=dict(
            model_type="qwen2", hidden_size=TEXT_HIDDEN, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=256,
            pad_token_id=PAD,
        ),
        audio_token_index=AUDIO,
    )
    model = Qwen2AudioForConditionalGeneration(config).eval()
    if eos_bias:
        head = nn.Linear(TEXT_HIDDEN, VOCAB, bias=True)
        with torch.no_grad():
            head.weight.copy_(model.lm_head.weight)
            head.bias.zero_()
            head.bias[EOS] = eos_bias
        model.lm_head = head
    if projector_gain != 1.0:
        with torch.no_grad():
            model.model.multi_modal_projector.linear.weight.mul_(projector_gain)
    return model


def make_batch(prompt_rows: Sequence[int] = (0, 1, 2), feature_seed: int = 0) -> dict[str, torch.Tensor]:
    """Left-padded processor-like batch of the chosen PROMPTS with their clips.

    Returns input_ids / attention_mask [B, S] (B = len(prompt_rows)) and, when a chosen prompt has a clip,
    input_features [C, 128, 100] / feature_attention_mask [C, 100], zero past each clip's valid frames.
    Clip c's features are the same for every prompt_rows (both clips are drawn, then the needed ones kept).
    """
    prompts = [PROMPTS[i] for i in prompt_rows]
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), PAD)
    attention_mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        input_ids[row, width - len(p):] = torch.tensor(p)
        attention_mask[row, width - len(p):] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    clips = [CLIP_OF_PROMPT[i] for i in prompt_rows if i in CLIP_OF_PROMPT]
    if clips:
        gen = torch.Generator().manual_seed(feature_seed)
        all_features = torch.randn(len(CLIP_FRAMES), NUM_MELS, FEATURE_FRAMES, generator=gen)
        features = all_features[clips]
        mask = torch.zeros(len(clips), FEATURE_FRAMES, dtype=torch.long)
        for k, c in enumerate(clips):
            mask[k, : CLIP_FRAMES[c]] = 1
            features[k, :, CLIP_FRAMES[c]:] = 0.0
        batch.update(input_features=features, feature_attention_mask=mask)
    return batch
