"""margin_jax.eval as a package: exports, lazy optional imports, docstring examples."""

import doctest
import importlib
import subprocess
import sys

import pytest

import margin_jax.eval

_MODULES = [
    "bin_io",
    "classification",
    "clustering",
    "knn",
    "plots",
    "retrieval",
    "verification",
]

_PUBLIC_NAMES = [
    "verification_accuracy",
    "tar_at_far",
    "recall_at_k",
    "retrieval_metrics",
    "nmi",
    "macro_accuracy",
    "load_bin",
]


def test_spec_names_are_exported():
    for name in _PUBLIC_NAMES:
        assert callable(getattr(margin_jax.eval, name)), name
    assert set(margin_jax.eval.__all__) == {
        n for n in dir(margin_jax.eval) if not n.startswith("_") and n not in _MODULES
    }


def test_optional_dependencies_are_imported_lazily():
    code = (
        "import sys, margin_jax; before = set(sys.modules); import margin_jax.eval; "
        "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
        "print(sorted(new & {'sklearn', 'matplotlib', 'PIL', 'torch', 'tqdm'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("module", _MODULES)
def test_docstring_examples_run(module):
    mod = importlib.import_module(f"margin_jax.eval.{module}")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
