# One command each for the main job, the tests and the benchmarks; each creates
# .venv if needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

WORKDIR ?= runs/glyphs

.PHONY: run test lint benchmark gallery notebooks clean

# The tests cover the training pipeline too, so they install its extra.
$(VENV)/.installed-test: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[train,test]'
	touch $@

# The main job: train on the embedded glyph data set, then the evaluation report.
run: $(VENV)/.installed-test
	$(BIN)/python -m train.main --config train/configs/default.py --workdir $(WORKDIR)

$(VENV)/.installed-benchmark: $(VENV)/.installed-test
	$(BIN)/pip install --quiet -e '.[test,benchmark]'
	touch $@

lint: $(VENV)/.installed-test
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

# Unit tests, doctests and every notebook (a few training steps each: the root
# conftest.py sets MARGIN_JAX_QUICK for the notebook kernels).
test: lint
	$(BIN)/pytest -n 2 --doctest-modules margin_jax tests --nbmake notebooks --nbmake-timeout=900

benchmark: $(VENV)/.installed-benchmark
	$(BIN)/python benchmarks/losses.py

$(VENV)/.installed-notebooks: $(VENV)/.installed-test
	$(BIN)/pip install --quiet -e '.[train,test,notebooks]'
	touch $@

# The README gallery (docs/gallery/*.png), trained and drawn by figures/ (not
# installed: run from the repository root).
gallery: $(VENV)/.installed-test
	$(BIN)/python -m figures --out docs/gallery

# Re-executes the notebooks in place with the full step counts (the committed
# outputs).
notebooks: $(VENV)/.installed-notebooks
	$(BIN)/jupyter nbconvert --to notebook --execute --inplace \
		--ExecutePreprocessor.timeout=3600 notebooks/*.ipynb

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
