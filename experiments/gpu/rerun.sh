#!/usr/bin/env bash
# The GPU checks still open (issue 10), one short run: the 7B-width suite (decode step vs its bound with the
# per-category kernel profile and the matmul decode-attention experiment; the scoring after the vocabulary-sliced
# backward; the fused capture's overhead on one 7B layer, S = 4096), the CUDA tests (among them the fused capture,
# the default since 2026-11-28, against output_attentions in fp32 and bf16), then the tiny Qwen3-Omni thinker on
# CUDA (not rerun since its transformers-5.17 layout fix), then the torch.compile decode experiment
# (experiments/gpu/decode_compile.py). About 8 minutes; its sections' limits add up to ~9.7: allow 10.
ONLY="bench7b cuda_tests omni compile" exec bash "$(dirname "$0")/../gpu_check.sh"
