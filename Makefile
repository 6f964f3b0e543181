# bigjax: `make train` and `make test` install what they need into .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Two installs, each with its stamp: what training needs (matplotlib besides, for the plot it ends with), and
# everything the tests and lint need on top (TensorFlow, a Cloud Storage emulator, Jupyter, ruff). So `make test`
# after `make train` upgrades the venv, and `make train` after `make test` installs nothing.
RUNTIME_STAMP := $(VENV)/.installed-runtime
DEV_STAMP := $(VENV)/.installed-dev

CONFIG ?= experiments/shakespeare_char.py
WORKDIR ?= runs/shakespeare_char
PROMPT ?= ROMEO:
BENCH_CONFIG ?= experiments/gpt2_124m.py
BENCH_JSON ?= runs/bench/$(notdir $(basename $(BENCH_CONFIG))).json
BENCH_ARGS ?=

.PHONY: install install-dev train eval generate test test-slurm bench bench-data lint clean-venv

install: $(RUNTIME_STAMP)

install-dev: $(DEV_STAMP)

# uv installs the packages: it fetches and unpacks wheels in parallel (the [dev] install took 20 s instead of pip's
# 73 s, both with empty caches, on 2 cores) and, like `pip --no-compile`, writes no bytecode (the first process to
# import a module writes it: tests/conftest.py).
UV := $(BIN)/uv
UV_INSTALL := $(UV) pip install --quiet --python $(BIN)/python

# The venv, with uv in it (both installs need it first; order-only below, so its date never asks for an install).
$(UV):
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet 'uv>=0.13,<0.14'

$(RUNTIME_STAMP): pyproject.toml | $(UV)
	$(UV_INSTALL) -e '.[plot]'
	touch $@

# [dev] includes [plot]: the runtime install is then up to date too.
$(DEV_STAMP): pyproject.toml | $(UV)
	# torch first, with pip: its CPU build (192 MB) where this machine has it (pip's configuration points at it, and uv
	# does not read that), elsewhere what PyPI's `torch` resolves to. uv then keeps it, since it satisfies [dev].
	# --no-compile: pip would write the bytecode of every module of torch (the tests write what they import, once).
	$(BIN)/pip install --quiet --no-compile 'torch==2.13.0' || $(BIN)/pip install --quiet --no-compile torch
	$(UV_INSTALL) -e '.[dev]'
	touch $@ $(RUNTIME_STAMP)

# Train the default experiment on the bundled Shakespeare corpus, then run the separate eval job on the
# checkpoints the trainer wrote, then sample from the newest one, then plot the curves (WORKDIR/plot.png).
train: install
	$(BIN)/bigjax train --config $(CONFIG) --workdir $(WORKDIR)
	$(BIN)/bigjax eval --config $(CONFIG) --workdir $(WORKDIR)
	$(BIN)/bigjax generate --workdir $(WORKDIR) --prompt "$(PROMPT)" --max-new-tokens 300
	$(BIN)/bigjax plot --workdir $(WORKDIR)

eval: install
	$(BIN)/bigjax eval --config $(CONFIG) --workdir $(WORKDIR)

generate: install
	$(BIN)/bigjax generate --workdir $(WORKDIR) --prompt "$(PROMPT)"

# Three workers on the two cores, each taking whole files: while one waits (on the processes a test starts, a lock's
# lease, an eval job's poll) the other two keep both cores busy. Measured on 2 cores, the same code, empty
# compilation caches: 619 s of tests with two workers, 590 s with three (benchmarks/test_costs.md).
test: install-dev
	$(BIN)/python -m pytest -n 3 --dist loadfile tests

# launch/slurm.sbatch for real, on a one-node SLURM cluster this starts on the machine (installs slurm-wlm and
# munge with apt; needs root or sudo). Not part of `make test`: see docs/launching.md, "SLURM".
test-slurm: install-dev
	launch/slurm/test_local_slurm.sh

# The train step's speed on synthetic data: tokens/s, MFU (PaLM and causal), step time, compile time, peak memory.
# Meant for a GPU or TPU (GPT-2 124M takes minutes per step on a CPU). Extra flags: BENCH_ARGS="--steps 200
# --config.model.remat=dots". See benchmarks/NOTES.md for the measurements planned.
bench: install
	$(BIN)/bigjax bench --config $(BENCH_CONFIG) --json $(BENCH_JSON) $(BENCH_ARGS)

# Tokens/s (or images/s) of every input pipeline on this CPU; the pre-tokenized LM path must reach 3 M tokens/s.
bench-data: install-dev  # its TFDS pipeline needs the [tfds] extra, which [dev] has
	$(BIN)/python -m bigjax.data.throughput

lint: install-dev
	$(BIN)/ruff check bigjax tests experiments benchmarks
	$(BIN)/ruff format --check bigjax tests experiments benchmarks
	for script in launch/*.sh launch/slurm.sbatch launch/slurm/*.sh benchmarks/*.sh; do bash -n $$script || exit 1; done

clean-venv:
	rm -rf $(VENV)
