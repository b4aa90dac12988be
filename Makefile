# mapo — every target works from a fresh clone with nothing but Python 3.10+ installed.
#
# Environment: an active virtualenv/conda env is used as it is; otherwise a `.venv` is made here.
# The venv sees the base interpreter's packages (--system-site-packages) so a CUDA torch that is
# already installed there is kept. torch is installed only when none is importable, from TORCH_SPEC
# (on the project's CPU machines `torch==2.13.0` is a local CPU wheel; on a GPU box override it,
# e.g. `make install TORCH_SPEC=torch`). A stamp makes a second call install nothing.

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
EXP         ?= tiny_mapo
NPROC       ?= 1
ARGS        ?=
SWEEP       ?=
MODEL       ?=
DATA        ?=
RUN         ?=
OUT         ?=
PRED        ?=
BENCH       ?=
SRC         ?=
# Several machines: torchrun's static rendezvous (every node runs the same `make train` with its NODE_RANK).
NNODES      ?= 1
NODE_RANK   ?= 0
MASTER_ADDR ?=
MASTER_PORT ?= 29500
# `make plan`: the memory per GPU it plans against.
GPU_GIB     ?= 80
# `make sweep LAUNCHER=submitit_slurm`: Hydra's launcher plugin (pip install -e ".[cluster]").
LAUNCHER    ?=

ifdef VIRTUAL_ENV
  PY    := python
  STAMP := artifacts/.installed-$(notdir $(VIRTUAL_ENV))
else ifdef CONDA_PREFIX
  PY    := python
  STAMP := artifacts/.installed-conda-$(notdir $(CONDA_PREFIX))
else
  PY    := $(VENV)/bin/python
  STAMP := $(VENV)/.mapo-installed
endif

TINY_DIR := artifacts/models/tiny-qwen2-audio
DATA_DIR := artifacts/data/synthetic

# The launcher: plain python, torchrun on one machine, or torchrun's rendezvous over NNODES machines.
ifneq ($(NNODES),1)
  LAUNCH := $(PY) -m torch.distributed.run --nnodes=$(NNODES) --node_rank=$(NODE_RANK) --nproc_per_node=$(NPROC) \
            --master_addr=$(MASTER_ADDR) --master_port=$(MASTER_PORT)
else ifneq ($(NPROC),1)
  LAUNCH := $(PY) -m torch.distributed.run --standalone --nproc_per_node=$(NPROC)
else
  LAUNCH := $(PY)
endif

.PHONY: install test tiny data check train plan sweep bench bench-gpu eval score prep export study clean help

help:
	@echo "make train [EXP=tiny_mapo] [NPROC=1] [ARGS='key=value ...']   train (default: tiny model, CPU, minutes)"
	@echo "make test                                                  run the test suite (CPU)"
	@echo "make tiny | make data                                      build the tiny model / the synthetic benchmark"
	@echo "make check DATA=path/to/manifest                           validate a manifest (ours, MMAU, MMAR, MMSU, AVQA)"
	@echo "make train ... NNODES=2 NODE_RANK=0|1 MASTER_ADDR=host [MASTER_PORT=29500]   one command per node (torchrun rendezvous)"
	@echo "make plan EXP=qwen2audio_mapo NPROC=8 [GPU_GIB=80] [ARGS=...]  memory per GPU from config.json + run config (no weights)"
	@echo "make sweep EXP=tiny_mapo SWEEP='algo.eta=0,0.05' [LAUNCHER=submitit_slurm]   Hydra multirun + summary table"
	@echo "make eval MODEL=folder DATA=manifest [OUT=dir] [NPROC=n] [ARGS='--conditions all --collapse']  benchmark evaluation"
	@echo "make eval RUN=run_dir DATA=manifest [OUT=dir]              every exported checkpoint of a run: accuracy vs step"
	@echo "make eval EXP=tiny_mapo [ARGS='model.path=...']            the training config's eval splits only (before/after table)"
	@echo "make score PRED=predictions DATA=manifest [OUT=dir]        rescore predictions without a model"
	@echo "make prep BENCH=avqa|mmsu SRC=release OUT=dir              benchmark release -> manifest + audio files"
	@echo "make bench                                                 speed/memory ratios of the fast paths (CPU, 1 thread; TRL when installed)"
	@echo "make bench-gpu                                             the GPU suite at Qwen2-Audio-7B widths (decode vs bandwidth bound, update MFU)"
	@echo "make study [ARGS='--settings prior90 --seeds 0']              the collapse study (experiments/collapse_study)"
	@echo "make export CKPT=<run>/checkpoints/step_000100 OUT=<dir>    a training checkpoint as a Hugging Face folder"

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml Makefile
	@if [ -z "$$VIRTUAL_ENV$$CONDA_PREFIX" ] && [ ! -x $(VENV)/bin/python ]; then \
	  echo "[mapo] creating $(VENV)"; $(PYTHON) -m venv --system-site-packages $(VENV); fi
	@if $(PY) -c "import torch" 2>/dev/null; then \
	  echo "[mapo] keeping installed torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	else echo "[mapo] installing $(TORCH_SPEC)"; $(PY) -m pip install -q $(TORCH_SPEC); fi
	$(PY) -m pip install -q -e ".[test,parquet,video,cluster]"
	@mkdir -p $(dir $(STAMP)) && touch $(STAMP)

test: install
	$(PY) -m pytest -q tests

data: install
	$(PY) -m mapo.data.synthetic out_dir=$(DATA_DIR) $(ARGS)

$(DATA_DIR)/train.jsonl: | $(STAMP)
	$(PY) -m mapo.data.synthetic out_dir=$(DATA_DIR)

tiny: install $(DATA_DIR)/train.jsonl
	$(PY) -m mapo.models.tiny out_dir=$(TINY_DIR) corpus=$(DATA_DIR)/train.jsonl $(ARGS)

check: install
	@if [ -z "$(DATA)" ]; then echo "usage: make check DATA=path/to/manifest [ARGS=--skip-bad]"; exit 2; fi
	$(PY) -m mapo.data.check $(DATA) $(ARGS)

train: install
	@if [ "$(NNODES)" != "1" ] && [ -z "$(MASTER_ADDR)" ]; then \
	  echo "make train NNODES=$(NNODES) needs MASTER_ADDR=<address of the node with NODE_RANK=0>"; exit 2; fi
	$(LAUNCH) -m mapo.train experiment=$(EXP) $(ARGS)

plan: install
	$(PY) -m mapo.plan experiment=$(EXP) --nproc=$$(( $(NPROC) * $(NNODES) )) --gpu-gib=$(GPU_GIB) $(ARGS)

sweep: install
	$(PY) -m mapo.sweep experiment=$(EXP) $(if $(LAUNCHER),hydra/launcher=$(LAUNCHER)) $(SWEEP) $(ARGS)

# MODEL/RUN + DATA: the standalone evaluation (mapo.eval); neither: the training config's eval splits.
eval: install
ifneq ($(RUN),)
	@if [ -z "$(DATA)" ]; then echo "usage: make eval RUN=run_dir DATA=manifest [OUT=dir] [ARGS=...]"; exit 2; fi
	$(LAUNCH) -m mapo.eval --run-dir $(RUN) --data $(DATA) $(if $(OUT),--out $(OUT)) $(ARGS)
else ifneq ($(MODEL)$(DATA),)
	@if [ -z "$(MODEL)" ] || [ -z "$(DATA)" ]; then echo "usage: make eval MODEL=folder DATA=manifest [OUT=dir] [ARGS=...]"; exit 2; fi
	$(LAUNCH) -m mapo.eval --model $(MODEL) --data $(DATA) $(if $(OUT),--out $(OUT)) $(ARGS)
else
	$(PY) -m mapo.train experiment=$(EXP) trainer.steps=0 trainer.warm_start.enabled=false trainer.eval_on_start=false $(ARGS)
endif

score: install
	@if [ -z "$(PRED)" ] || [ -z "$(DATA)" ]; then echo "usage: make score PRED=predictions DATA=manifest [OUT=dir]"; exit 2; fi
	$(PY) -m mapo.eval.score $(PRED) --data $(DATA) $(if $(OUT),--out $(OUT)) $(ARGS)

prep: install
	@if [ -z "$(BENCH)" ] || [ -z "$(SRC)" ] || [ -z "$(OUT)" ]; then echo "usage: make prep BENCH=avqa|mmsu SRC=annotations-or-parquet OUT=dir [ARGS='--videos dir']"; exit 2; fi
	$(PY) -m mapo.data.prep $(BENCH) $(SRC) --out $(OUT) $(ARGS)

bench: install
	$(PY) -m mapo.bench $(ARGS)

bench-gpu: install
	$(PY) -m mapo.bench --suite gpu7b $(ARGS)

export: install
	@if [ -z "$(CKPT)" ] || [ -z "$(OUT)" ]; then echo "usage: make export CKPT=<run_dir>/checkpoints/step_XXXXXX OUT=<folder>"; exit 2; fi
	$(PY) -m mapo.export checkpoint=$(CKPT) out=$(OUT)

# every setting x algorithm x seed from one warm start per setting (two settings side by side, one
# thread each); tables and plots land in experiments/collapse_study
study: install
	$(PY) -m mapo.study --jobs 2 --publish experiments/collapse_study $(ARGS)

clean:
	rm -rf artifacts outputs multirun wandb
