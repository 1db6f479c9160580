# Two commands do everything on a fresh machine with Python 3.11 and pip:
#   make demo   set up .venv and run the main job on the embedded default
#   make test   set up (or reuse) .venv and run the linters and the tests
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch/torchvision are pinned here (not in pyproject) so a plain `pip install vitkit`
# keeps working with whatever torch a user already has.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test test-slow lint format clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[dev]' $(TORCH_SPEC)
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/vitkit quickstart

lint: setup
	$(BIN)/ruff check vitkit tests benchmarks
	$(BIN)/ruff format --check vitkit tests benchmarks

test: lint
	$(BIN)/python -m pytest -q --durations=15

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

format: setup
	$(BIN)/ruff check --fix vitkit tests
	$(BIN)/ruff format vitkit tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
