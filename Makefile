# labkit: the commands the README documents.
#   make notebooks   run every numbered notebook (quick mode, CPU) into build/
#   make test        lint + the whole test suite (what CI runs)
#   make lab         JupyterLab on notebooks/ with the labkit kernel
#   make gpu-check   the prepared GPU check (benchmarks/gpu_check.py) -> build/gpu_check/
# Each creates .venv and installs the pinned dependencies first when they are missing.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.labkit-installed
NOTEBOOK_ARGS ?=
PYTEST_ARGS ?=

.PHONY: notebooks test test-fast lab venv data clean gpu-check

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name labkit --display-name "Python (labkit)"
	@touch $(STAMP)

notebooks: $(STAMP)
	$(VENV)/bin/labkit notebooks run $(NOTEBOOK_ARGS)

test: $(STAMP)
	$(VENV)/bin/ruff check labkit tests benchmarks
	LABKIT_HEADLESS=1 $(PY) -m pytest tests notebooks --nbval-lax --nbval-current-env --nbval-cell-timeout=600 $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest tests -m "not slow" $(PYTEST_ARGS)

# No install step: a GPU machine may have its own Python with torch and triton but no venv.
GPU_CHECK_PY := $(if $(wildcard $(PY)),$(PY),python3)
GPU_CHECK_ARGS ?=

gpu-check:
	PYTHONPATH=. $(GPU_CHECK_PY) -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

data: $(STAMP)
	$(VENV)/bin/labkit data shapes

clean:
	rm -rf build .pytest_cache
