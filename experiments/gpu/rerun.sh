#!/usr/bin/env bash
# The GPU checks still open (issue 10), one short run: the 7B-width suite (decode step vs its bound with the
# per-category kernel profile and the matmul decode-attention experiment; the scoring after the vocabulary-sliced
# backward), then the tiny Qwen3-Omni thinker on CUDA (not rerun since its transformers-5.17 layout fix), then
# the torch.compile decode experiment (experiments/gpu/decode_compile.py). About 7 minutes; allow 9.
ONLY="bench7b omni compile" exec bash "$(dirname "$0")/../gpu_check.sh"
