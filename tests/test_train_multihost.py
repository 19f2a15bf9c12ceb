"""Two processes on localhost (jax.distributed, CPU collectives) equal one process."""

import json
import os
import socket
import subprocess

import jax
import numpy as np
import pytest

from tests import helpers
from train import input_pipeline, train
from train.configs import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _two_processes(workdir: str, flags: list[str]) -> list[str]:
    """Runs train.main as 2 processes x 4 fake CPU devices; their outputs."""
    xla = [
        f
        for f in os.environ.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    port = _free_port()
    procs = []
    for i in range(2):
        env = {
            **os.environ,
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": " ".join([*xla, "--xla_force_host_platform_device_count=4"]),
            "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
            "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": str(i),
        }
        command = helpers.train_main_command(workdir, *flags)
        procs.append(
            subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=600)[0])
    finally:
        for proc in procs:
            proc.kill()
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out[-3000:]
    return outputs


def test_two_processes_equal_one_process(tmp_path):
    data_dir = str(tmp_path / "tfds")
    records, labels = input_pipeline.open_source("margin_jax_digits", data_dir)
    held = np.flatnonzero(labels >= 7)[:100]
    lfw = helpers.pairs_bin(
        tmp_path / "lfw.bin", records.read(held), labels[held], 40, seed=0
    )
    overrides = {
        "num_train_steps": 3,
        "checkpoint_every_steps": 3,
        "val_every_steps": 2,
        "random_flip": True,
    }
    config = tiny.get_config()
    config.update(data_dir=data_dir, val_targets=(lfw,), **overrides)
    one = str(tmp_path / "one")
    expected = train.train_and_evaluate(config, one)  # 1 process x 8 devices

    # 2 processes x 4 devices: the same 8-way global batch.
    two = str(tmp_path / "two")
    flags = [f"--config.{k}={v}" for k, v in overrides.items()]
    flags += [f"--config.data_dir={data_dir}", f"--config.val_targets=('{lfw}',)"]
    outputs = _two_processes(two, flags)
    # Process 0 alone prints the summary and writes the log, once per step.
    assert "Held-out identities" in outputs[0]
    assert "Held-out verification accuracy" not in outputs[1]
    records_two = helpers.metrics_records(two)
    assert [r["step"] for r in records_two] == [1, 2, 2, 3, 3]

    (step_a, state_a), (step_b, state_b) = (
        helpers.final_state(one, config),
        helpers.final_state(two, config),
    )
    assert step_a == step_b == 3

    # Same batches, same collectives: equal up to the order of the sums
    # (gloo across processes, XLA within one), which Adam's normalised steps
    # carry into the last digits.
    def close(a, b):
        scale = max(1.0, float(np.max(np.abs(b)))) if np.size(b) else 1.0
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)

    jax.tree.map(close, state_a, state_b)
    for a, b in zip(helpers.metrics_records(one), records_two, strict=True):
        assert a.keys() == b.keys() and a["step"] == b["step"]
        if "loss" in a:
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
            assert a["accuracy"] == b["accuracy"]
    results = json.loads(open(os.path.join(two, "eval.json")).read())
    assert results["verification_accuracy"] == pytest.approx(
        expected["verification_accuracy"], abs=1e-2
    )
    best = json.loads(open(os.path.join(two, "best", "best.json")).read())
    assert best["step"] == results["best_step"] in (2, 3)

    # Run again: both processes restore the final checkpoint, read the log
    # before process 0 rewrites it, and evaluate without training.
    _two_processes(two, flags)
    assert helpers.metrics_records(two) == records_two
    assert json.loads(open(os.path.join(two, "eval.json")).read()) == results
