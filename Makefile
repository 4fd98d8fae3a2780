# Two commands for a fresh machine: `make demo` and `make test` (both create .venv first).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU wheel of torch; any other torch spec pulls GBs of CUDA wheels.
TORCH_CPU := torch==2.13.0
NPROC ?= 2

.PHONY: .venv demo test test-gpu bench-gpu clean

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_CPU)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

.venv: $(VENV)/.installed

demo: .venv
	$(BIN)/python -m megatron_dvpo.demo --nproc $(NPROC)

test: .venv
	$(BIN)/python -m pytest -q tests

test-gpu: .venv
	$(BIN)/python -m pytest -q -s tests/gpu

bench-gpu: .venv
	$(BIN)/python tools/bench_gpu.py --out bench_gpu.json

clean:
	rm -rf $(VENV) runs .pytest_cache
