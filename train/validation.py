"""Verification sets during training, as insightface's ``CallBackVerification``.

``config.val_targets`` names insightface ``.bin`` files (lfw.bin, cfp_fp.bin,
agedb_30.bin, or any file written by `margin_jax.eval.write_bin`). They are
loaded once when training starts (a missing or unreadable file stops the run
before the first step) and scored every ``config.val_every_steps`` steps and
at the end with flip-fused embeddings and the 10-fold protocol
(`margin_jax.eval.evaluate_pairs`, the in-memory half of
`margin_jax.eval.evaluate_bin`). ``<name>`` below is the file name without
``.bin``.

Each evaluation gives, per target, ``val/<name>/accuracy``,
``val/<name>/accuracy_std``, ``val/<name>/xnorm`` (insightface's mean
feature norm) and ``val/<name>/best`` (the highest accuracy so far), plus
``val/mean_accuracy`` over the targets; `BestTracker` keeps the checkpoint of
the best mean accuracy in ``<workdir>/best/``.

The model sees the images as it sees training images: uint8 RGB mapped to
[-1, 1] (`train.input_pipeline.preprocess`); a one-channel model gets the
mean of the three channels. The images must have the model's height and
width.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence

import numpy as np

from margin_jax import eval as mj_eval


def target_name(path: str) -> str:
    """'data/lfw.bin' -> 'lfw'."""
    name = os.path.basename(os.fspath(path))
    return name[: -len(".bin")] if name.endswith(".bin") else name


BEST_JSON = "best.json"


class TargetNotFoundError(FileNotFoundError):
    """A ``config.val_targets`` file does not exist."""


def check_files(paths: Sequence[str]) -> None:
    """Raises TargetNotFoundError, with what to do, for a missing target file."""
    for path in (paths,) if isinstance(paths, str) else paths:
        path = os.path.expanduser(os.fspath(path))
        if not os.path.isfile(path):
            raise TargetNotFoundError(
                f"config.val_targets: no file {path!r}. Give the paths of "
                "insightface verification sets (lfw.bin, cfp_fp.bin, "
                "agedb_30.bin ship in the training set's folder) or files "
                "written by margin_jax.eval.write_bin, e.g. "
                "--config.val_targets=\"('data/lfw.bin',)\"."
            )


class VerificationTargets:
    """The loaded ``config.val_targets``: (name, images, issame) per file."""

    def __init__(self, paths: Sequence[str], image_shape: tuple[int, int, int]):
        if isinstance(paths, str):
            paths = (paths,)
        self.targets = []
        names = [target_name(p) for p in paths]
        if len(set(names)) != len(names):
            raise ValueError(
                f"config.val_targets: two files share a name ({names}); each "
                "target is reported as val/<file name without .bin>/..."
            )
        height, width, _ = image_shape
        check_files(paths)
        for path, name in zip(paths, names, strict=True):
            images, issame = mj_eval.load_bin(os.path.expanduser(os.fspath(path)))
            if images.shape[1:3] != (height, width):
                raise ValueError(
                    f"config.val_targets: {path!r} holds {images.shape[1]}x"
                    f"{images.shape[2]} images but the model takes {height}x"
                    f"{width} (the training images); write the set at that size."
                )
            self.targets.append((name, images, issame))

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.targets]

    def __bool__(self) -> bool:
        return bool(self.targets)

    def evaluate(self, embed_fn: Callable, *, batch_size: int = 256) -> dict:
        """{name: {"accuracy", "accuracy_std", "xnorm"}} for every target."""
        results = {}
        for name, images, issame in self.targets:
            out = mj_eval.evaluate_pairs(
                images, issame, embed_fn, batch_size=min(batch_size, len(images))
            )
            results[name] = {
                "accuracy": float(out["mean"]),
                "accuracy_std": float(out["std"]),
                "xnorm": float(out["xnorm"]),
            }
        return results


def as_model_input(images: np.ndarray, channels: int) -> np.ndarray:
    """uint8 RGB [b, H, W, 3] -> the model's channels (grey = channel mean)."""
    if channels == 1:
        return np.round(images.mean(axis=-1, keepdims=True)).astype(np.uint8)
    return images


class BestTracker:
    """The best mean accuracy over the targets so far, and its checkpoint.

    ``<workdir>/best/`` holds one orbax checkpoint (the train state of the best
    step) and ``best.json`` (its step and accuracies). Every process of a
    multi-host run calls `update` with the same (process 0's) results and
    `save` (orbax's saves are collective); only process 0 writes best.json.
    On resume the best is recomputed from the metrics records kept, so a step
    redone after a kill is judged exactly as in an uninterrupted run.
    """

    def __init__(self, workdir: str, records: list[dict], names: Sequence[str]):
        self.directory = os.path.join(workdir, "best")
        self.names = list(names)
        self.best = {name: -np.inf for name in self.names}
        self.best_mean, self.best_step = -np.inf, None
        for record in records:
            if "val/mean_accuracy" not in record:
                continue
            for name in self.names:
                key = f"val/{name}/accuracy"
                if key in record:
                    self.best[name] = max(self.best[name], record[key])
            if record["val/mean_accuracy"] > self.best_mean:
                self.best_mean = record["val/mean_accuracy"]
                self.best_step = record["step"]

    def update(self, step: int, results: dict) -> tuple[dict, bool]:
        """(the metrics record of this evaluation, is it the best so far)."""
        record = {}
        for name in self.names:
            values = results[name]
            self.best[name] = max(self.best[name], values["accuracy"])
            for key in ("accuracy", "accuracy_std", "xnorm"):
                record[f"val/{name}/{key}"] = values[key]
            record[f"val/{name}/best"] = self.best[name]
        mean = float(np.mean([results[name]["accuracy"] for name in self.names]))
        record["val/mean_accuracy"] = mean
        improved = mean > self.best_mean
        if improved:
            self.best_mean, self.best_step = mean, step
        return record, improved

    def save(self, step: int, state, results: dict, *, write: bool) -> None:
        """Makes ``state`` at ``step`` the checkpoint in best/.

        The new step is written before the old one is deleted, and best.json
        is replaced atomically, so a kill at any point leaves an intact best/.
        A step already there is the same state (a resumed run redoes steps
        bit for bit) and is kept.
        """
        from train import checkpoint

        ckpt = checkpoint.Checkpointer(self.directory, every=1, keep=None)
        try:
            if step not in ckpt.all_steps():
                ckpt.save(step, state, force=True)
                ckpt.wait()
            for old in ckpt.all_steps():
                if old != step:
                    ckpt.delete(old)
        finally:
            ckpt.close()
        if write:
            path = os.path.join(self.directory, BEST_JSON)
            with open(path + ".tmp", "w") as f:
                json.dump(
                    {"step": step, "mean_accuracy": self.best_mean, "targets": results},
                    f,
                    indent=2,
                )
            os.replace(path + ".tmp", path)
