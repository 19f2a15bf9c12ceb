# One command each for the tests and the benchmarks; each creates .venv if needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: test lint benchmark clean

$(VENV)/.installed-test: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

$(VENV)/.installed-benchmark: $(VENV)/.installed-test
	$(BIN)/pip install --quiet -e '.[test,benchmark]'
	touch $@

lint: $(VENV)/.installed-test
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

test: lint
	$(BIN)/pytest -n 2 --doctest-modules margin_jax tests

benchmark: $(VENV)/.installed-benchmark
	$(BIN)/python benchmarks/losses.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
