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

ifeq ($(NPROC),1)
  LAUNCH := $(PY)
else
  LAUNCH := $(PY) -m torch.distributed.run --standalone --nproc_per_node=$(NPROC)
endif

.PHONY: install test tiny data check train sweep bench eval score prep clean help

help:
	@echo "make train [EXP=tiny_mapo] [NPROC=1] [ARGS='key=value ...']   train (default: tiny model, CPU, minutes)"
	@echo "make test                                                  run the test suite (CPU)"
	@echo "make tiny | make data                                      build the tiny model / the synthetic benchmark"
	@echo "make check DATA=path/to/manifest                           validate a manifest (ours, MMAU, MMAR, MMSU, AVQA)"
	@echo "make sweep EXP=tiny_mapo SWEEP='algo.eta=0,0.05'           Hydra multirun + summary table"
	@echo "make eval MODEL=folder DATA=manifest [OUT=dir] [NPROC=n] [ARGS='--conditions all --collapse']  benchmark evaluation"
	@echo "make eval RUN=run_dir DATA=manifest [OUT=dir]              every exported checkpoint of a run: accuracy vs step"
	@echo "make eval EXP=tiny_mapo [ARGS='model.path=...']            the training config's eval splits only (before/after table)"
	@echo "make score PRED=predictions DATA=manifest [OUT=dir]        rescore predictions without a model"
	@echo "make prep BENCH=avqa|mmsu SRC=release OUT=dir              benchmark release -> manifest + audio files"
	@echo "make bench                                                 speed/memory ratios of the fast paths"

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@if [ -z "$$VIRTUAL_ENV$$CONDA_PREFIX" ] && [ ! -x $(VENV)/bin/python ]; then \
	  echo "[mapo] creating $(VENV)"; $(PYTHON) -m venv --system-site-packages $(VENV); fi
	@if $(PY) -c "import torch" 2>/dev/null; then \
	  echo "[mapo] keeping installed torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	else echo "[mapo] installing $(TORCH_SPEC)"; $(PY) -m pip install -q $(TORCH_SPEC); fi
	$(PY) -m pip install -q -e ".[test,parquet,video]"
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
ifeq ($(NPROC),1)
	$(PY) -m mapo.train experiment=$(EXP) $(ARGS)
else
	$(PY) -m torch.distributed.run --standalone --nproc_per_node=$(NPROC) -m mapo.train experiment=$(EXP) $(ARGS)
endif

sweep: install
	$(PY) -m mapo.sweep experiment=$(EXP) $(SWEEP) $(ARGS)

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

clean:
	rm -rf artifacts outputs multirun wandb
