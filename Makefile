# bigtrain: `make smoke` trains the smoke config; `make test` runs the whole suite (what .ci/run calls);
# `make test-fast` the tests without the `launches` mark: none starts a training process or a launcher
# (tests/conftest.py fails an unmarked test that does), everything runs in the pytest process or in short non-training
# commands; under 3 minutes on a 2-core CPU. Both print the 25 slowest tests (--durations). All set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# CPU build of torch; GPU users install their CUDA build first (see README), which this leaves alone.
TORCH_SPEC ?= torch==2.13.0
# train.precision=fp8 (docs/fp8.md): installed before the package so that its pin, not pip's choice, is what runs.
TORCHAO_SPEC ?= torchao>=0.18,<0.19

.PHONY: setup smoke test test-fast lint clean

define PREBUILD_SHM_OP
from deepspeed.accelerator import get_accelerator
builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
if get_accelerator().device_name() == "cpu" and builder is not None:
    builder.load()
endef
export PREBUILD_SHM_OP

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PY) -c "import deepspeed" 2>/dev/null || DS_BUILD_OPS=0 $(PIP) install --no-build-isolation "deepspeed>=0.19,<0.20"
	$(PY) -c "import torchao" 2>/dev/null || $(PIP) install "$(TORCHAO_SPEC)"
	$(PIP) install -e ".[dev,mpi,fairscale]"
	$(PY) -c "from mpi4py import MPI" 2>/dev/null || $(PIP) install mpich  # MPICH from PyPI where no MPI is found
	@# DeepSpeed JIT-builds its CPU shared-memory all-reduce op on the first multi-rank CPU run (~1 min, cached
	@# in ~/.cache/torch_extensions): build it once here rather than inside whichever run comes first.
	$(PY) -c "$$PREBUILD_SHM_OP" 2>&1 | grep -v WARNING || true
	touch $@

smoke: setup
	$(PY) launch/train.py --config configs/smoke.yaml $(ARGS)

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q --durations=25 $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q -m "not launches" --durations=25 $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
