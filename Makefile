# Two commands for a fresh machine: `make demo` and `make test` (both create .venv first).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU wheel of torch; any other torch spec pulls GBs of CUDA wheels.
TORCH_CPU := torch==2.13.0
NPROC ?= 2
# The compatibility job (README, "Supported versions"): the newest megatron-core release's
# pure-Python files, from its Python 3.12 wheel, on this Python 3.11 venv, with the triton its
# pipeline schedules import. Nothing of it enters .venv.
MCORE_NEWEST := 0.19.2
TRITON := triton==3.6.0
COMPAT := .compat

.PHONY: .venv demo test test-compat test-gpu bench-gpu clean

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_CPU)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

.venv: $(VENV)/.installed

demo: .venv
	$(BIN)/python -m megatron_dvpo.demo --nproc $(NPROC)

# Two workers: most launches run one process on one thread (OMP_NUM_THREADS=1, also for the
# workers' own tensors), so the two cores stay busy. Each test file runs on one worker, so that
# its module-scoped fixtures (a launch, a built model) are built once; the files start in
# tests/conftest.py's order (slowest first), and the slowest tests are listed at the end.
PYTEST := OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile \
    --no-loadscope-reorder --durations=25

test: .venv
	$(PYTEST) tests

$(COMPAT)/.installed: $(VENV)/.installed
	rm -rf $(COMPAT) && mkdir -p $(COMPAT)/wheels
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
	    --implementation cp --platform manylinux_2_28_x86_64 -d $(COMPAT)/wheels \
	    megatron-core==$(MCORE_NEWEST)
	$(BIN)/python -m zipfile -e $(COMPAT)/wheels/megatron_core-$(MCORE_NEWEST)-*.whl $(COMPAT)/site
	$(BIN)/python -m pip install --quiet --no-deps --target $(COMPAT)/site $(TRITON)
	touch $@

test-compat: $(COMPAT)/.installed
	MEGATRON_DVPO_EXPECT_MCORE=$(MCORE_NEWEST) PYTHONPATH=$(COMPAT)/site \
	    $(PYTEST) -m compat tests

# GPU targets run in the environment they are called from (an NGC container: its CUDA torch,
# Transformer Engine and megatron-core), after `pip install -e .` there; they build no venv.
test-gpu:
	$(PYTHON) -m pytest -q -s tests/gpu

bench-gpu:
	$(PYTHON) tools/bench_gpu.py --out bench_gpu.json

clean:
	rm -rf $(VENV) $(COMPAT) runs .pytest_cache
