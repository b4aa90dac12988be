#!/usr/bin/env bash
# The GPU checks still open (issue 10), one short run: the 7B-width suite, then the CUDA tests. The suite times
# the decode step against its bound in 3 rounds per setting (on 2026-11-28, 64 rows met it at 1.96; 32 and 128
# rows read 2.28 and 2.20), with the kernel profile, and the same three decodes with `rollout.compile`, new
# that day: experiments/gpu/decode_compile.py had measured the compiled decoder at 1.82x the bound at 64 rows,
# twice. It also times the update MFU (4 x 1024 read 39.3 %). About 4 minutes; its sections' limits add up to
# ~5: give it timeout_s 330.
ONLY="bench7b cuda_tests" exec bash "$(dirname "$0")/../gpu_check.sh"
