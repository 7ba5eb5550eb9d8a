# Two commands do all the set-up (see README.md):
#   make course   create .venv if needed, then open the course in JupyterLab on notebooks/
#   make test     create .venv if needed, then run every test (ruff, pytest, every notebook)
# The virtual environment is rebuilt whenever requirements.lock or pyproject.toml changes.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU torch first, pinned: a loose torch requirement would pull a multi-GB CUDA build.
TORCH_PIN := $(shell grep -E '^torch==' requirements.lock)
PYTEST_ARGS ?=
# Test processes in parallel, one thread each (2 cores: two one-thread workers beat one two-thread
# worker for the many small tensors of the tests and notebooks). loadfile keeps a notebook's cells
# together in one kernel.
JOBS ?= 2

.PHONY: course test lint lock exercises clean

$(STAMP): requirements.lock pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "Python >= 3.10 is needed, found " + sys.version'
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q --no-deps -r requirements.lock  # the lock is the full closure
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Jupyter refuses to run as root unless told; containers and CI machines often are root.
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root)

course: $(STAMP)
	$(BIN)/jupyter lab $(ALLOW_ROOT) --ServerApp.root_dir="$(CURDIR)" --LabApp.default_url=/lab/tree/notebooks

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(JOBS) --dist loadfile --nbval-lax -p no:cacheprovider \
		tests notebooks solutions exercises $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

exercises: $(STAMP)
	$(BIN)/python scripts/make_exercises.py

lock:
	bash scripts/lock.sh

clean:
	rm -rf $(VENV)
