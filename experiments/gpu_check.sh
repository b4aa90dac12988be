#!/usr/bin/env bash
# GPU check (run on a CUDA machine from the repo root). Uses the machine's python3 + torch; the few
# packages it lacks come as wheels in .whl/ (see experiments/README.md). Writes logs to ${OUT:-/tmp/gpu_check}.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled MAPO_ARTIFACTS=/tmp/mapo_artifacts
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
echo "== unit tests on the GPU machine"
timeout 100 python3 -m pytest -q -x -p no:cacheprovider tests/test_capture.py tests/test_scoring.py tests/test_rollout.py tests/test_sampling.py 2>&1 | tail -4 | tee "$OUT/pytest.txt"
echo "== benchmark"
python3 -m mapo.data.synthetic out_dir=$MAPO_ARTIFACTS/data/synthetic n_train=120 n_test=20 n_counter_prior=20 > /dev/null
python3 -m mapo.models.tiny out_dir=$MAPO_ARTIFACTS/models/tiny-qwen2-audio corpus=$MAPO_ARTIFACTS/data/synthetic/train.jsonl 2>&1 | grep tiny
timeout 240 python3 -m mapo.bench --suite gpu7b --out "$OUT/bench" 2>&1 | grep -v "it/s" | tee "$OUT/bench.txt"
echo "== MAPO step at Qwen2-Audio-7B widths (4+4 layers, 30 s audio, 4 prompts x G=8, 128 new tokens)"
timeout 150 python3 experiments/scale_step.py 2>&1 | tail -25 | tee "$OUT/scale_step.txt"
echo "== one MAPO step, full-depth Qwen2-Audio-7B widths, 4 prompts x G=8 x 512 new tokens, 30 s clips, plan vs measured"
timeout 240 python3 experiments/gpu/full_step.py 2>&1 | tail -40 | tee "$OUT/full_step.txt"
echo "== tiny_mapo on cuda (short)"
timeout 120 python3 -m mapo.train experiment=tiny_mapo logger=none trainer.device=cuda \
  model.path=$MAPO_ARTIFACTS/models/tiny-qwen2-audio data.dir=$MAPO_ARTIFACTS/data/synthetic \
  trainer.warm_start.cache_dir=$MAPO_ARTIFACTS/warm trainer.warm_start.steps=60 trainer.steps=10 \
  data.eval_max_items=24 trainer.run_dir=$MAPO_ARTIFACTS/run 2>&1 | grep -v "it/s\]" | tail -15 | tee "$OUT/train.txt"
echo "== mapo.eval on cuda (bf16): MMAU fixture, all conditions, collapse diagnostics"
timeout 120 python3 -m mapo.eval --model $MAPO_ARTIFACTS/models/tiny-qwen2-audio --data tests/fixtures/mmau/mmau-test-mini.json \
  --out "$OUT/eval" --conditions all --collapse --max-new-tokens 32 --device cuda --no-progress 2>&1 | tail -4 | tee "$OUT/eval.txt"
python3 -c "import json; s=json.load(open('$OUT/eval/summary.json')); c=json.load(open('$OUT/eval/collapse.json')); \
print('dtype', s['options']['dtype'], 'flip', s['flip_rate'], 'audio mass by decile', [None if v is None else round(v, 3) for v in c['audio']['audio_mass']])" \
  | tee -a "$OUT/eval.txt"
