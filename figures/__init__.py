"""The figures of the notebooks and of the README gallery.

Each notebook in notebooks/ calls these functions and defines no logic of its
own; ``python -m figures --out docs/gallery`` (``make gallery``) writes
the README's PNG files with the same functions. Every function returns a
matplotlib `Figure` built on an Agg canvas (no pyplot state, no display
needed), or plain data (dicts, markdown tables).

Modules, one per notebook:

* `zoo`: target-logit curves, non-target reweighting, decision margins
  (loss_zoo.ipynb);
* `hypersphere`: 2-D and 3-D embeddings trained through train/
  (hypersphere.ipynb);
* `support_vectors`: the SV mask during training, SV vs focal vs hard mining
  (support_vectors.ipynb);
* `gradients`: jax.grad against finite differences, cos = ±1, exact vs
  straight-through ArcFace, checking a composed loss (grad_check.ipynb).

Set the environment variable ``MARGIN_JAX_QUICK=1`` (the test command does) to
run the notebooks with a few training steps; `steps` picks the count.
``MARGIN_JAX_RUNS`` moves the cached runs (`hypersphere.runs_dir`) and
``MARGIN_JAX_DATA_DIR`` the tfds data (default: the config's).
"""

from __future__ import annotations

import os

QUICK_ENV = "MARGIN_JAX_QUICK"
DATA_ENV = "MARGIN_JAX_DATA_DIR"


def quick() -> bool:
    """True when ``MARGIN_JAX_QUICK`` is set to a non-empty value other than 0."""
    return os.environ.get(QUICK_ENV, "") not in ("", "0")


def data_dir() -> str | None:
    """$MARGIN_JAX_DATA_DIR, the tfds data_dir of the runs (None: the config's)."""
    return os.environ.get(DATA_ENV) or None


def steps(full: int, quick_steps: int) -> int:
    """``full`` training steps, or ``quick_steps`` under ``MARGIN_JAX_QUICK``."""
    return quick_steps if quick() else full


def short_config(method: str, *, steps: int, every: int, seed: int = 0):
    """A `train.compare` method config on the digits for a short figure run.

    ``steps`` training steps, a checkpoint every ``every`` steps (all kept),
    the data in `data_dir`, warm-up and logging scaled to the run's length.
    """
    from train import compare

    config = compare.method_config(
        method, seed=seed, steps=steps, data_dir=data_dir(), base="digits"
    )
    config.checkpoint_every_steps = every
    config.keep_checkpoints = steps // every + 1
    config.log_every_steps = max(1, min(config.log_every_steps, every))
    config.warmup_steps = min(config.warmup_steps, max(1, steps // 10))
    return config
