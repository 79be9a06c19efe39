# Two commands for a fresh machine (see README):
#   make demo   builds the environment, indexes a demo collection and answers a query
#   make test   builds the environment and runs the tests (what CI runs; they start and stop
#               a local Milvus server themselves)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean chromium

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test,deep,ray,milvus,milvus-server,serve]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/cbir demo

# The page's end-to-end tests drive Debian's chromium (Playwright downloads no browser).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium; }

test: $(STAMP) chromium
	$(BIN)/ruff check src tests benchmarks
	CBIR_E2E=required $(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) .cbir-demo demo-images
