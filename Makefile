# `make test` and `make bench` go from a fresh clone to results: they create .venv, install the
# pinned dependencies, build sparse_attn._C (incrementally, with ninja) and run.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP_DEPS    := $(VENV)/.deps-installed
STAMP_EDITABLE := $(VENV)/.editable-installed

.PHONY: test test-all bench build gpu-check clean

# The fast tier: every op and backend (forward, gradients, opcheck, compile) and model parity;
# tests marked `slow` (more coverage of what the fast tier already covers) run in test-all.
test: build
	$(PY) -m pytest tests -q -m "not slow"

test-all: build
	$(PY) -m pytest tests -q

bench: build
	$(PY) -m benchmarks

# On a machine with a CUDA device: build, every GPU test file and the GPU benchmark rows of every
# op and network in at most 8 minutes, one short report (tools/gpu_check.py). Without a device it
# says so and exits 2.
gpu-check: $(STAMP_EDITABLE)
	$(PY) tools/gpu_check.py

build: $(STAMP_EDITABLE)
	$(PY) setup.py -q build_ext --inplace

$(STAMP_DEPS): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# The editable install only registers the package paths (kernels/ -> sparse_attn.kernels,
# models/ -> sparse_attn.models); the extension itself is built in place by `build`.
$(STAMP_EDITABLE): $(STAMP_DEPS) setup.py pyproject.toml
	SPARSE_ATTN_SKIP_EXTENSION=1 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

clean:
	rm -rf build sparse_attn/_C*.so *.egg-info
