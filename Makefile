# Flowformer reproduction suite. `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
RUNS_DIR ?= experiments/runs
LAUNCHER ?= basic
DRY ?=
SEEDS ?=
EXTRA ?=
VARIANT ?=
SOURCE ?=
WANDB_PROJECT ?=
ARGS ?=
DEVICE ?= cuda

.DEFAULT_GOAL := help
# every table with a manifest (experiments/manifests/<table>.yaml) has a reproduce-<table> target
TABLES := $(basename $(notdir $(wildcard experiments/manifests/*.yaml)))
REPRODUCE := $(addprefix reproduce-,$(TABLES))
.PHONY: help install lock test test-all test-distributed demo tables bench bench-gpu gpu-check train-speed clean data-uea data-lra data-wikitext103 data-d4rl data-imagenet listops $(REPRODUCE)

help: ## list the targets
	@grep -hE '^[^#[:space:]].*:.*## ' $(MAKEFILE_LIST) | sed 's/^$$(REPRODUCE): reproduce-%:/reproduce-<table>:/' \
		| awk 'BEGIN {FS = ":.*## "}; {printf "  %-20s %s\n", $$1, $$2}'

install: ## create .venv and install the suite (editable) with dev extras, at the versions in constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --constraint constraints.txt --editable ".[dev]"

lock: ## re-resolve the newest allowed versions in a fresh environment and rewrite constraints.txt (then commit it): only what the suite needs is pinned
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --upgrade pip
	.lock-venv/bin/python -m pip install --quiet --editable ".[dev]"
	.lock-venv/bin/python -m pip freeze --exclude-editable | grep -v '^-e ' > constraints.txt
	rm -rf .lock-venv

test: ## lint (ruff), then the fast CPU test suite (slow, gpu and data tests are skipped with their reason)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -n 2

test-distributed: ## the tests that start real processes: every domain under DDP (2 CPU processes, gloo), a SIGKILLed and a preempted run resuming (CI runs it after make test)
	$(PY) -m pytest -n 2 --distributed -m distributed

test-all: ## every test, including the slow and distributed ones (gpu/data tests still skip when their needs are absent)
	$(PY) -m pytest -n 2 --runslow --distributed

demo: ## Flowformer on the bundled UEA JapaneseVowels (paper recipe, seed 0), printed beside the paper's 98.9; its table goes to $(RUNS_DIR)/tables
	$(PY) -m experiments.train experiment=uea/JapaneseVowels seed=0 $(ARGS)
	$(PY) -m results.aggregate --runs $(RUNS_DIR) --out $(RUNS_DIR)/tables --no-figures --tables uea --show JapaneseVowels

$(REPRODUCE): reproduce-%: ## run a table's manifest (one target per experiments/manifests/*.yaml); resumable. DRY=1 plans only; LAUNCHER=basic|joblib|submitit; SEEDS='0 1'; EXTRA='trainer=gpu'; VARIANT=<a manifest variant>
	$(PY) -m experiments.reproduce $* --launcher $(LAUNCHER) --runs-dir $(RUNS_DIR) $(if $(filter 1 yes true,$(DRY)),--dry-run,) $(if $(SEEDS),--seeds $(SEEDS),) $(if $(EXTRA),--extra $(EXTRA),) $(if $(VARIANT),--variant $(VARIANT),) $(ARGS)

tables: ## rebuild every paper table (Markdown, LaTeX, CSV), figures and results/README.md from the committed records (results/runs) plus local runs; SOURCE=wandb WANDB_PROJECT=... pulls W&B runs
	$(PY) -m results.aggregate --runs results/runs $(RUNS_DIR) --out results/tables --figures results/figures --readme results/README.md $(if $(SOURCE),--source $(SOURCE),) $(if $(WANDB_PROJECT),--wandb-project $(WANDB_PROJECT),) $(ARGS)

bench: ## the attention efficiency benchmark (JSON, Markdown table and figure in results/)
	$(PY) -m experiments.bench $(ARGS)

bench-gpu: ## on a CUDA GPU: the gpu tests, then the benchmark in bf16 and in fp32 (both flow backends, FlashAttention)
	$(PY) -m pytest -m gpu tests
	$(PY) -m experiments.bench --device cuda --dtypes bfloat16 --tag efficiency_cuda_bf16 $(ARGS)
	$(PY) -m experiments.bench --device cuda --dtypes float32 --tag efficiency_cuda_fp32 $(ARGS)

gpu-check: ## on one GPU, at most 8 minutes: the gpu tests, the attention benchmark (bf16, fp32, 1K-64K), train_speed of every domain in bf16 (eager, compiled); writes results/bench/gpu_check.md. DEVICE=cpu: a small version on the CPU, into experiments/runs/gpu_check (the test suite runs it)
	$(PY) -m experiments.gpu_check --device $(DEVICE) $(ARGS)

train-speed: ## steps/s and peak memory of each domain's paper model, eager and compiled, flow and softmax (results/bench/train_speed.md); ARGS=--quick fits a few minutes on a CPU
	$(PY) -m experiments.train_speed $(ARGS)

data-uea: ## download and check the paper's 10 UEA datasets into DATA_DIR/uea (bundled ones are copied from aeon)
	$(PY) -m tasks.uea.download $(ARGS)

data-lra: ## download, unpack and check the LRA data (lra_release, aclImdb, CIFAR-10) into DATA_DIR/lra; ARGS='--check' only validates
	$(PY) -m tasks.lra.download $(ARGS)

data-wikitext103: ## fetch WikiText-103 into DATA_DIR/wikitext-103 (zip, else the HF files into their cache) and tokenise it once (checks its sizes); ARGS='--dataset wikitext-2' or '--check'
	$(PY) -m tasks.wikitext103.download $(ARGS)

data-d4rl: ## download the paper's nine D4RL datasets (v2 HDF5) into DATA_DIR/d4rl and check their keys and sizes; ARGS='--check' only checks (no network: python -m tasks.d4rl.collect)
	$(PY) -m tasks.d4rl.download $(ARGS)

data-imagenet: ## how to obtain ImageNet (an account is needed); unpacks the archives in DATA_DIR/imagenet, sorts a flat val into class folders from the devkit, checks it
	$(PY) -m tasks.imagenet.prepare $(ARGS)

listops: ## generate ListOps 96k/2k/2k (seeded, official distribution and format) into DATA_DIR/lra/listops-1000; SEED=0
	$(PY) -m tasks.lra.listops --seed $(or $(SEED),0) --num-train 96000 --num-val 2000 --num-test 2000 --out $(or $(DATA_DIR),data)/lra/listops-1000 $(ARGS)

clean: ## remove caches and debug runs (keeps experiments/runs and data/)
	rm -rf .pytest_cache $(RUNS_DIR)/debug outputs multirun
	find . -name __pycache__ -type d -not -path "./$(VENV)/*" -prune -exec rm -rf {} +
