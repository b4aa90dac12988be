#!/usr/bin/env bash
# GPU check: every GPU measurement of the project in one prepared run of about 9 minutes (run on a CUDA
# machine from the repo root). Sections run in order of importance, each under its own time limit, and
# write their logs to ${OUT:-/tmp/gpu_check} as they go, so a run cut short keeps what it measured.
# Uses the machine's python3 + torch; the packages it lacks come as wheels in .whl/ (experiments/README.md).
# ONLY="bench7b omni compile" runs just those sections (names below); the default is every section but
# `compile` (the torch.compile decode experiment, minutes of compiling). experiments/gpu/rerun.sh is one such list.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  PIP="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site"
  $PIP .whl/*.whl || for w in .whl/*.whl; do $PIP "$w" || echo "[gpu_check] could not install $w"; done
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled MAPO_ARTIFACTS=/tmp/mapo_artifacts
START=$(date +%s)
section() { echo; echo "== [$(( $(date +%s) - START )) s] $*"; }
ONLY=${ONLY:-"full_step bench7b cuda_tests tiny_ratios train_lora eval omni"}
want() { [[ " $ONLY " == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

want full_step && section "issue 7: one MAPO step, full-depth Qwen2-Audio-7B widths, 4 prompts x G=8 x 512 new tokens, 30 s clips, plan vs measured"
want full_step && timeout 150 python3 experiments/gpu/full_step.py 2>&1 | tail -45 | tee "$OUT/full_step.txt"

if want bench7b; then
section "issue 10: 7B-width suite (decode vs the bandwidth bound and its kernel profile, eager and compiled, update MFU, scoring, capture)"
timeout 230 python3 -m mapo.bench --suite gpu7b --budget-s 170 --out "$OUT/bench" 2>&1 | grep -v "it/s" | tail -40 | tee "$OUT/bench.txt"
fi

if want cuda_tests; then
section "CUDA tests (capture kernels, fp32 masters under autocast, CUDA-graph decode = eager, sampler)"
timeout 45 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_capture.py tests/test_precision.py tests/test_rollout.py 2>&1 | tail -4 | tee "$OUT/pytest.txt"
timeout 25 python3 -m pytest -q -p no:cacheprovider -k "cuda or gpu" tests/test_capture.py tests/test_sampling.py tests/test_scoring.py 2>&1 | tail -3 | tee -a "$OUT/pytest.txt"
fi

if want tiny_ratios || want train_lora || want eval || want omni; then
section "tiny model and data"
python3 -m mapo.data.synthetic out_dir=$MAPO_ARTIFACTS/data/synthetic n_train=120 n_test=20 n_counter_prior=20 > /dev/null
python3 -m mapo.models.tiny out_dir=$MAPO_ARTIFACTS/models/tiny-qwen2-audio corpus=$MAPO_ARTIFACTS/data/synthetic/train.jsonl 2>&1 | grep tiny
fi

want tiny_ratios && section "issue 10: the tiny-model ratios on the GPU (rollout vs generate, MAPO vs GRPO step, scoring, capture)"
want tiny_ratios && timeout 60 python3 -m mapo.bench --device cuda --quick --no-trl --out "$OUT/bench" \
  --model-dir $MAPO_ARTIFACTS/models/tiny-qwen2-audio --data-dir $MAPO_ARTIFACTS/data/synthetic 2>&1 | grep -v "it/s" | tail -16 | tee "$OUT/bench_tiny.txt"

if want train_lora; then
section "training on cuda: tiny_mapo with LoRA (reference = adapters off), 2 PPO mini-batches, overlong filter"
timeout 60 python3 -m mapo.train experiment=tiny_mapo logger=none trainer.device=cuda \
  model.path=$MAPO_ARTIFACTS/models/tiny-qwen2-audio data.dir=$MAPO_ARTIFACTS/data/synthetic \
  trainer.warm_start.cache_dir=$MAPO_ARTIFACTS/warm trainer.warm_start.steps=60 trainer.steps=6 trainer.eval_on_start=false \
  model.lora.rank=8 algo.mini_batches=2 algo.overlong_filter=true trainer.export_every=3 \
  data.eval_max_items=12 trainer.run_dir=$MAPO_ARTIFACTS/run_lora 2>&1 | grep -v "it/s\]" | tail -14 | tee "$OUT/train.txt"
python3 - <<EOF 2>&1 | tee -a "$OUT/train.txt"
import json
rows = [json.loads(l) for l in open("$MAPO_ARTIFACTS/run_lora/metrics.jsonl") if '"reward/mean"' in l]
for r in rows:
    print({k: round(r[k], 5) for k in ("step", "reward/mean", "loss/kl", "loss/pg", "grad_norm", "time/rollout_s", "time/update_s", "memory/peak_gib") if k in r})
EOF
fi

if want eval; then
section "mapo.eval on cuda (bf16): MMAU fixture, all conditions, collapse diagnostics"
timeout 40 python3 -m mapo.eval --model $MAPO_ARTIFACTS/models/tiny-qwen2-audio --data tests/fixtures/mmau/mmau-test-mini.json \
  --out "$OUT/eval" --conditions all --collapse --max-new-tokens 32 --device cuda --no-progress 2>&1 | tail -4 | tee "$OUT/eval.txt"
python3 -c "import json; s=json.load(open('$OUT/eval/summary.json')); c=json.load(open('$OUT/eval/collapse.json')); \
print('dtype', s['options']['dtype'], 'flip', s['flip_rate'], 'audio mass by decile', [None if v is None else round(v, 3) for v in c['audio']['audio_mass']])" \
  | tee -a "$OUT/eval.txt"
fi

if want omni; then
section "tiny Qwen3-Omni thinker on cuda (short)"
timeout 75 python3 -m mapo.train experiment=tiny_qwen3omni_mapo logger=none trainer.device=cuda \
  model.path=$MAPO_ARTIFACTS/models/tiny-qwen3-omni data.dir=$MAPO_ARTIFACTS/data/synthetic \
  trainer.warm_start.cache_dir=$MAPO_ARTIFACTS/warm trainer.warm_start.steps=30 trainer.steps=3 trainer.eval_on_start=false \
  data.eval_max_items=6 trainer.run_dir=$MAPO_ARTIFACTS/run_omni 2>&1 | grep -v "it/s\]" | tail -8 | tee "$OUT/omni.txt"
fi

if want compile; then
section "issue 10: decode step with the decoder under torch.compile vs uncompiled (compiles for minutes)"
timeout 240 python3 experiments/gpu/decode_compile.py 2>&1 | grep -v "it/s" | tail -3 | tee "$OUT/decode_compile.txt"
fi
section "done"
