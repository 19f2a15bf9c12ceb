# One command each for the main job, the tests and the benchmarks; each creates
# .venv if needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

WORKDIR ?= runs/digits

.PHONY: run test lint benchmark clean

# The tests cover the training pipeline too, so they install its extra.
$(VENV)/.installed-test: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[train,test]'
	touch $@

# The main job: train on the embedded digits data set, then the evaluation report.
run: $(VENV)/.installed-test
	$(BIN)/python -m train.main --config train/configs/default.py --workdir $(WORKDIR)

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
