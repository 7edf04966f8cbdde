# Everything a new user runs. `make demo` and `make test` set themselves up first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of torch; on a GPU machine install the torch you want first (see README).
TORCH_SPEC ?= torch==2.13.0
# Test processes (pytest-xdist): every test runs torch on one thread (tests/conftest.py), so one
# process per core. TEST_WORKERS=0 runs the suite in this process.
TEST_WORKERS ?= 2

.PHONY: setup demo test lint bench clean browser-deps world world-report

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev,serve]"
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/uniportrait demo --preset world --out outputs/demo

test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --durations=15

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: setup
	$(BIN)/python benchmarks/bench.py --out outputs/bench

# The identity world (docs/world.md): render its data and train its models on this machine's
# CPUs (resumable: run it again after an interruption), then measure them. The trained weights
# ship in src/uniportrait/assets/world/, so nobody needs to run this to use them.
world: setup
	$(BIN)/uniportrait world build --work runs/world

world-report: setup
	$(BIN)/uniportrait world report --work runs/world --out outputs/world-report

# Debian's Chromium for the web UI's browser test (Playwright drives it; it never downloads a browser).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser-deps:
	@test -x /usr/bin/chromium || { $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core; }

clean:
	rm -rf outputs .pytest_cache
