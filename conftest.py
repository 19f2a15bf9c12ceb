"""Root pytest configuration: eight fake CPU devices, set before JAX is imported.

It lives at the root so that both tests/ and the doctests of margin_jax/ see the
same devices.
"""

import os

# Eight fake devices share 2 cores (and two xdist workers share those): XLA's
# default 40 s limit for every device thread to reach a collective can pass on
# a loaded machine and abort the process, so the limits are raised for tests.
_FLAGS = (
    "--xla_force_host_platform_device_count=8",
    "--xla_cpu_collective_call_terminate_timeout_seconds=900",
    "--xla_cpu_collective_timeout_seconds=900",
)
for _flag in _FLAGS:
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " " + _flag
        ).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Notebooks (executed by nbmake in their own kernels, which inherit this
# environment): a few training steps (figures.quick), and their runs and
# data set in a temporary directory, never in the user's cache.
_NOTEBOOK_ENV = {"MARGIN_JAX_QUICK": "1"}
_saved_env: dict = {}


def _is_notebook(item) -> bool:
    return str(getattr(item, "path", "")).endswith(".ipynb")


def pytest_runtest_setup(item):
    """A notebook's kernel sees one CPU device, as a user's would."""
    if not _is_notebook(item):
        return
    import tempfile

    env = dict(_NOTEBOOK_ENV)
    env["MARGIN_JAX_RUNS"] = tempfile.mkdtemp(prefix="margin_jax_notebook_runs_")
    env["MARGIN_JAX_DATA_DIR"] = os.path.join(env["MARGIN_JAX_RUNS"], "tfds")
    env["XLA_FLAGS"] = " ".join(
        f
        for f in os.environ.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    )
    for key, value in env.items():
        _saved_env[key] = os.environ.get(key)
        os.environ[key] = value


def pytest_runtest_teardown(item):
    if not _is_notebook(item):
        return
    import shutil

    shutil.rmtree(os.environ["MARGIN_JAX_RUNS"], ignore_errors=True)
    for key, value in _saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _saved_env.clear()


# The longest items (notebooks, multi-process and IResNet runs) start first, so
# the two xdist workers end together instead of one finishing a long tail.
_LONG_FIRST = (
    ".ipynb",
    "test_train_multihost.py",
    "test_face112_small_variant",
    "test_kill_and_resume_equals_uninterrupted",
    "test_sharded_head_is_checkpointed_and_resumes",
)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: not any(k in item.nodeid for k in _LONG_FIRST))
