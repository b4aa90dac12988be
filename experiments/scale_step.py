"""One MAPO RL step at Qwen2-Audio-7B's layer shapes (random weights, fewer layers), on a GPU.

No real weights are needed: the model has Qwen2-Audio-7B-Instruct's widths (text 4096 / 32 heads /
vocab 156032, audio encoder 1280 / 20 heads, 30 s window = 750 audio tokens) but only a few layers, so
the timings and memory of rollout, scoring and the update — and of the attention capture, SDPA
indicator against eager — can be measured on one card. Numbers are per phase of one step.

    python experiments/scale_step.py [--text-layers 4] [--audio-layers 4] [--prompts 4] [--group 8] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import Qwen2AudioForConditionalGeneration

from mapo.bench_gpu import device_timer, random_qwen2_audio
from mapo.config import AlgoConfig
from mapo.models.loader import enable_activation_checkpointing
from mapo.rollout import generate_rollout
from mapo.step import Normalisers, mapo_step, plain_call, prepare_batch

AUDIO_TOKEN = 151646


def build(text_layers: int, audio_layers: int, device) -> Qwen2AudioForConditionalGeneration:
    """Qwen2-Audio-7B's widths with `text_layers` / `audio_layers` layers, random bf16 weights made on `device`."""
    return random_qwen2_audio(dict(
        audio_config=dict(d_model=1280, encoder_layers=audio_layers, encoder_attention_heads=20,
                          encoder_ffn_dim=5120, num_mel_bins=128, max_source_positions=1500),
        text_config=dict(hidden_size=4096, num_hidden_layers=text_layers, num_attention_heads=32,
                         num_key_value_heads=32, intermediate_size=11008, vocab_size=156032,
                         max_position_embeddings=8192),
        audio_token_index=AUDIO_TOKEN,
    ), device, torch.bfloat16)


def timed(fn):
    """(fn(), seconds, peak GiB) on the current CUDA device."""
    torch.cuda.reset_peak_memory_stats()
    with device_timer(torch.device("cuda")) as timer:
        out = fn()
    return out, timer.seconds, torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--text-layers", type=int, default=4)
    ap.add_argument("--audio-layers", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--micro", type=int, default=8)
    args = ap.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build(args.text_layers, args.audio_layers, device)
    B, text_len, audio_len = args.prompts, 60, 750
    ids = torch.randint(1000, 150000, (B, text_len + audio_len + 2), device=device)
    ids[:, 10 : 10 + audio_len] = AUDIO_TOKEN
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "input_features": torch.randn(B, 128, 3000, device=device, dtype=torch.bfloat16),
        "feature_attention_mask": torch.ones(B, 3000, dtype=torch.long, device=device),
    }
    rollout, t_roll, m_roll = timed(lambda: generate_rollout(
        model, batch, group_size=args.group, max_new_tokens=args.new_tokens, eos_token_id=2, pad_token_id=0,
        seeds=list(range(B))))
    n = rollout.completion_ids.shape[0]
    algo = AlgoConfig()
    algo.attn.layers = [-3, -2, -1] if args.text_layers >= 3 else [-1]
    call = plain_call(model)
    adv = torch.randn(n, device=device)
    acc = (torch.rand(n, device=device) > 0.5).float()
    content = torch.ones(model.lm_head.out_features, dtype=torch.bool, device=device)
    prepared, t_prep, m_prep = timed(lambda: prepare_batch(
        call, rollout, adv, acc, algo, frozen_reference=call, feature_extractor=None,
        content_vocab_mask=content, temperature=1.0))
    norms = Normalisers(num_tokens=rollout.completion_mask.sum().float(), num_seqs=n, max_len=args.new_tokens)
    model.train()
    enable_activation_checkpointing(model)
    report = {"device": torch.cuda.get_device_name(0), "rows": n, "seq_len": rollout.attention_mask.shape[1],
              "rollout_s": t_roll, "rollout_peak_gib": m_roll, "scoring_s": t_prep, "scoring_peak_gib": m_prep}
    for method in ("fused", "sdpa", "eager"):
        algo.attn.method = method

        def update():
            for rows in torch.arange(n, device=device).split(args.micro):
                mapo_step(model, rollout, rows, prepared, algo, norms, temperature=1.0, backward_scale=1.0)
            model.zero_grad(set_to_none=True)

        try:
            update()  # warm-up: kernel selection and allocator growth, not timed
            _, t_upd, m_upd = timed(update)
            report[f"update_{method}_s"], report[f"update_{method}_peak_gib"] = t_upd, m_upd
        except torch.OutOfMemoryError:
            report[f"update_{method}_s"] = "out of memory"
            torch.cuda.empty_cache()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
