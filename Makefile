# Two commands on a fresh machine with nothing but Python 3:
#   make test   creates .venv, installs, builds the extension, runs the test suite
#   make demo   the same set-up, then the tutorial's experiment end to end (pyibp reproduce --quick)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# torch/torchvision for this project's own environment (users bring theirs: setup.py says torch>=2.4).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
SOURCES := setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/math/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)
export MAX_JOBS ?= 2
# One architecture keeps this environment's builds short (the lent GPUs are Hopper); setup.py's own
# default, for everyone else, is every architecture the installed torch supports.
export TORCH_CUDA_ARCH_LIST ?= 9.0

.PHONY: install test demo bench gpu-check clean

install: $(VENV)/.installed

$(VENV)/.deps: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q $(TORCH_PINS) -r requirements-dev.txt
	touch $@

# Editable install: builds pyibp._C (C++ always, CUDA kernels when nvcc is found) into pyibp/.
$(VENV)/.installed: $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

test: install
	$(PY) -m pytest -q tests

demo: install
	$(VENV)/bin/pyibp reproduce --quick --device cpu --out runs/reproduce-quick --overwrite

bench: install
	$(PY) benchmarks/bench_bounds.py

# On a machine with an NVIDIA GPU, with its own Python and torch (no virtual environment): build for
# that GPU, the whole suite, compute-sanitizer, the TF32 and half/bf16 checks, CUDA benchmarks; one
# report in $$GPU_CHECK_OUT (else $$OUT, else gpu-check-report/). Without a GPU: says so, exits 1.
gpu-check:
	$(PYTHON) tools/gpu_check.py

clean:
	rm -rf build $(VENV) *.egg-info pyibp/_C*.so
