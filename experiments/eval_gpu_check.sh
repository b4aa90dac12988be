#!/usr/bin/env bash
# Benchmark evaluation on a CUDA machine (run from the repo root, after or instead of gpu_check.sh; same
# .whl/ handling). The tiny model on the MMAU fixture in bfloat16: all three conditions with the collapse
# diagnostics, one process then two ranks if there are two GPUs. Logs to ${OUT:-/tmp/eval_gpu_check}.
set -uo pipefail
OUT=${OUT:-/tmp/eval_gpu_check}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
export PYTHONUNBUFFERED=1 MAPO_ARTIFACTS=${MAPO_ARTIFACTS:-/tmp/mapo_artifacts}
TINY=$MAPO_ARTIFACTS/models/tiny-qwen2-audio
if [ ! -f "$TINY/config.json" ]; then
  python3 -m mapo.data.synthetic out_dir=$MAPO_ARTIFACTS/data/synthetic n_train=120 n_test=20 n_counter_prior=20 > /dev/null
  python3 -m mapo.models.tiny out_dir=$TINY corpus=$MAPO_ARTIFACTS/data/synthetic/train.jsonl 2>&1 | grep tiny
fi
echo "== mapo.eval on cuda (bf16), MMAU fixture, all conditions, --collapse"
timeout 150 python3 -m mapo.eval --model "$TINY" --data tests/fixtures/mmau/mmau-test-mini.json --out "$OUT/one" \
  --conditions all --collapse --max-new-tokens 32 --device cuda --no-progress 2>&1 | tail -12 | tee "$OUT/eval.txt"
python3 -c "import json; s=json.load(open('$OUT/one/summary.json')); c=json.load(open('$OUT/one/collapse.json')); \
print('dtype', s['options']['dtype'], 'flip', s['flip_rate'], 'mass deciles', [None if v is None else round(v, 3) for v in c['audio']['audio_mass']])" \
  | tee -a "$OUT/eval.txt"
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  echo "== the same on 2 ranks (torchrun): predictions must equal the single-process ones"
  timeout 150 python3 -m torch.distributed.run --standalone --nproc_per_node=2 -m mapo.eval --model "$TINY" \
    --data tests/fixtures/mmau/mmau-test-mini.json --out "$OUT/two" --conditions all --collapse --max-new-tokens 32 \
    --device cuda --no-progress 2>&1 | tail -3
  python3 -c "import json; r=lambda p: [json.loads(l)['model_output'] for l in open(p)]; \
print('two ranks equal one:', r('$OUT/one/predictions.jsonl') == r('$OUT/two/predictions.jsonl'))" | tee -a "$OUT/eval.txt"
fi
