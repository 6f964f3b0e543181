# bigjax: `make train` and `make test` install what they need into .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

CONFIG ?= experiments/shakespeare_char.py
WORKDIR ?= runs/shakespeare_char
PROMPT ?= ROMEO:
BENCH_CONFIG ?= experiments/gpt2_124m.py
BENCH_JSON ?= runs/bench/$(notdir $(basename $(BENCH_CONFIG))).json
BENCH_ARGS ?=

.PHONY: install train eval generate test test-slurm bench bench-data lint clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Train the default experiment on the bundled Shakespeare corpus, then run the separate eval job on the
# checkpoints the trainer wrote, then sample from the newest one.
train: install
	$(BIN)/bigjax train --config $(CONFIG) --workdir $(WORKDIR)
	$(BIN)/bigjax eval --config $(CONFIG) --workdir $(WORKDIR)
	$(BIN)/bigjax generate --workdir $(WORKDIR) --prompt "$(PROMPT)" --max-new-tokens 300

eval: install
	$(BIN)/bigjax eval --config $(CONFIG) --workdir $(WORKDIR)

generate: install
	$(BIN)/bigjax generate --workdir $(WORKDIR) --prompt "$(PROMPT)"

test: install
	$(BIN)/python -m pytest -n 2 --dist loadfile tests

# launch/slurm.sbatch for real, on a one-node SLURM cluster this starts on the machine (installs slurm-wlm and
# munge with apt; needs root or sudo). Not part of `make test`: see README, "SLURM".
test-slurm: install
	launch/slurm/test_local_slurm.sh

# The train step's speed on synthetic data: tokens/s, MFU (PaLM and causal), step time, compile time, peak memory.
# Meant for a GPU or TPU (GPT-2 124M takes minutes per step on a CPU). Extra flags: BENCH_ARGS="--steps 200
# --config.model.remat=dots". See benchmarks/NOTES.md for the measurements planned.
bench: install
	$(BIN)/bigjax bench --config $(BENCH_CONFIG) --json $(BENCH_JSON) $(BENCH_ARGS)

# Tokens/s (or images/s) of every input pipeline on this CPU; the pre-tokenized LM path must reach 3 M tokens/s.
bench-data: install
	$(BIN)/python -m bigjax.data.throughput

lint: install
	$(BIN)/ruff check bigjax tests experiments benchmarks
	$(BIN)/ruff format --check bigjax tests experiments benchmarks
	for script in launch/*.sh launch/slurm.sbatch launch/slurm/*.sh benchmarks/*.sh; do bash -n $$script || exit 1; done

clean-venv:
	rm -rf $(VENV)
