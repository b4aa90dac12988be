#!/usr/bin/env bash
# The GPU checks still open (issue 10), one short run: the 7B-width suite (decode step vs its bound with the
# per-category kernel profile and the matmul decode-attention experiment; the scoring after the vocabulary-sliced
# backward), then the tiny Qwen3-Omni thinker on CUDA (not rerun since its transformers-5.17 layout fix), then
# the torch.compile decode experiment (experiments/gpu/decode_compile.py). Run with timeout_s ≥ 540.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
PIP="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site"
$PIP .whl/*.whl || for w in .whl/*.whl; do $PIP "$w" || echo "could not install $w"; done
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 WANDB_MODE=disabled MAPO_ARTIFACTS=/tmp/mapo_artifacts
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 150 python3 -m mapo.bench --suite gpu7b --budget-s 110 --out /tmp/bench 2>&1 | grep -v "it/s" | tail -22 | tee "$OUT/bench.txt"
cp /tmp/bench/*-gpu7b.json "$OUT/" 2>/dev/null
python3 -m mapo.data.synthetic out_dir=$MAPO_ARTIFACTS/data/synthetic n_train=120 n_test=20 n_counter_prior=20 > /dev/null
timeout 75 python3 -m mapo.train experiment=tiny_qwen3omni_mapo logger=none trainer.device=cuda \
  model.path=$MAPO_ARTIFACTS/models/tiny-qwen3-omni data.dir=$MAPO_ARTIFACTS/data/synthetic \
  trainer.warm_start.cache_dir=$MAPO_ARTIFACTS/warm trainer.warm_start.steps=30 trainer.steps=3 trainer.eval_on_start=false \
  data.eval_max_items=6 trainer.run_dir=$MAPO_ARTIFACTS/run_omni 2>&1 | grep -v "it/s\]" | tail -12 | tee "$OUT/omni.txt"
# Last, and only if time is left: does compiling the decoder close the decode gap? (compiles for minutes)
timeout 240 python3 experiments/gpu/decode_compile.py 2>&1 | grep -v "it/s" | tail -3 | tee "$OUT/decode_compile.txt"
