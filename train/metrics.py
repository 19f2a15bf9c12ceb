"""The training log: metrics.jsonl (and TensorBoard), one record per step logged."""

from __future__ import annotations

import json
import os

from train import parallel


class MetricWriter:
    """Appends metrics to DIR/metrics.jsonl (and TensorBoard if available).

    On resume the records after the checkpoint are dropped (they are redone),
    so the log holds every step once. ``records`` are the records kept. Only
    the writing process (process 0 of a multi-host run) touches the files.
    """

    def __init__(
        self, workdir: str, *, resume_step: int, tensorboard: bool, write: bool = True
    ):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.write_files = write
        self.records = []
        lines = []
        if os.path.exists(self.path):
            with open(self.path) as f:
                lines = [r for r in f if json.loads(r)["step"] <= resume_step]
            self.records = [json.loads(r) for r in lines]
        # Every process has read the file before process 0 rewrites it.
        parallel.sync_processes("margin_jax_metrics_read")
        if write and lines:
            with open(self.path, "w") as f:
                f.writelines(lines)
        self._tb = None
        if tensorboard and write:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                pass
            else:
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self.records.append(record)
        if not self.write_files:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step":
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
