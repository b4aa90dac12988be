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

.PHONY: install test tiny data check train sweep bench eval study clean help

help:
	@echo "make train [EXP=tiny_mapo] [NPROC=1] [ARGS='key=value ...']   train (default: tiny model, CPU, minutes)"
	@echo "make test                                                  run the test suite (CPU)"
	@echo "make tiny | make data                                      build the tiny model / the synthetic benchmark"
	@echo "make check DATA=path/to/manifest                           validate a manifest (JSONL, MMAU JSON, AVQA JSONL)"
	@echo "make sweep EXP=tiny_mapo SWEEP='algo.eta=0,0.05'           Hydra multirun + summary table"
	@echo "make eval EXP=qwen2audio_mapo ARGS='model.path=...'          accuracy tables (with / without / shuffled audio) only"
	@echo "make bench                                                 speed/memory ratios of the fast paths"
	@echo "make study [ARGS='--settings prior90 --seeds 0']              the collapse study (experiments/collapse_study)"

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@if [ -z "$$VIRTUAL_ENV$$CONDA_PREFIX" ] && [ ! -x $(VENV)/bin/python ]; then \
	  echo "[mapo] creating $(VENV)"; $(PYTHON) -m venv --system-site-packages $(VENV); fi
	@if $(PY) -c "import torch" 2>/dev/null; then \
	  echo "[mapo] keeping installed torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	else echo "[mapo] installing $(TORCH_SPEC)"; $(PY) -m pip install -q $(TORCH_SPEC); fi
	$(PY) -m pip install -q -e ".[test]"
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

eval: install
	$(PY) -m mapo.train experiment=$(EXP) trainer.steps=0 trainer.warm_start.enabled=false trainer.eval_on_start=false $(ARGS)

bench: install
	$(PY) -m mapo.bench $(ARGS)

# every setting x algorithm x seed from one warm start per setting (two settings side by side, one
# thread each); tables and plots land in experiments/collapse_study
study: install
	$(PY) -m mapo.study --jobs 2 --publish experiments/collapse_study $(ARGS)

clean:
	rm -rf artifacts outputs multirun wandb
