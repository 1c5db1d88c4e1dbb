# Two commands do everything on a fresh machine with Python 3.11 and make:
#   make demo   the main job on embedded defaults    make test   the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export DO_NOT_TRACK := true
export RAY_USAGE_STATS_ENABLED := 0
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PYTHONUNBUFFERED := 1

.PHONY: demo test lint venv bench stack-up stack-down clean

# The lock pins every package; --no-deps skips pip's resolver (it backtracks for minutes on boto3).
$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-deps -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/msa demo

# ruff (pyproject.toml [tool.ruff]) and the import contracts of the three floors ([tool.importlinter]).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest tests -q

bench: $(STAMP)
	$(BIN)/python -m msa.bench

stack-up: $(STAMP)
	$(BIN)/python -m infra.stack up

stack-down: $(STAMP)
	$(BIN)/python -m infra.stack down

clean:
	rm -rf .msa .stack .stack.env
