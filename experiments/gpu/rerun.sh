#!/usr/bin/env bash
# The GPU checks still open (issue 10), one short run. First the 7B-width suite: the decode step against its
# bound in 3 rounds per setting (64 rows met it on 2026-11-28 at 1.96; 32 and 128 rows read 2.28 and 2.20),
# with the kernel profile, and the update MFU (4 x 1024 read 39.3 %). Then the CUDA tests, then the
# torch.compile decode experiment (experiments/gpu/decode_compile.py: 1.82x the bound at 64 rows, twice).
# About 4 minutes; its sections' limits add up to ~7.5: give it timeout_s 480.
ONLY="bench7b cuda_tests compile" exec bash "$(dirname "$0")/../gpu_check.sh"
