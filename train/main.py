"""Command line: python -m train.main --config train/configs/default.py --workdir DIR.

Any config field can be overridden, e.g. ``--config.loss.name=cosface`` or
``--config.loss.arcface.margin=0.4`` (each loss's hyperparameters sit under
its name, see `train.losses_table.config_loss`). A family config takes the
base after a colon: ``--config train/configs/cosface.py:digits``.

Several hosts: start the same command on every host with
``JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i`` (or
``--multihost`` on a cluster that jax.distributed detects by itself, e.g.
SLURM or Cloud TPU); each process then reads its own slice of every global
batch and pmap's collectives span the devices of all processes.
"""

import importlib.util
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and report.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost",
    False,
    "Call jax.distributed.initialize() first (implied by JAX_COORDINATOR_ADDRESS).",
)
_CONFIG = config_flags.DEFINE_config_file(
    "config", "train/configs/default.py", "Training configuration file."
)


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    import os

    import jax

    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        # Collectives across CPU processes (tests, hosts without accelerators);
        # no effect on GPU/TPU devices.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    elif _MULTIHOST.value:
        jax.distributed.initialize()
    from train import train

    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO.

    from train import input_pipeline, validation

    try:
        results = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (
        input_pipeline.DatasetNotPreparedError,
        validation.TargetNotFoundError,
    ) as e:
        # What to prepare or which file is missing: the message says it all.
        sys.exit(f"train.main: {e}")
    if jax.process_index() == 0:
        print(summary(results, _WORKDIR.value))


def summary(results: dict, workdir: str) -> str:
    """The console lines of a finished run's results."""
    lines = []
    if "verification_accuracy" in results:
        from train import report

        baselines = results.get("baselines", {})
        rows = [("model", results)] + [
            (title, baselines[k])
            for k, title in report.BASELINE_TITLES.items()
            if k in baselines
        ]
        width = max(len(title) for title, _ in rows)
        lines.append(
            f"Held-out identities ({len(results['held_out_classes'])} classes, "
            f"{results['num_pairs']} pairs):"
        )
        for title, r in rows:
            lines.append(
                f"  {title:<{width}}  verification "
                f"{r['verification_accuracy']:.4f} ± "
                f"{r['verification_accuracy_std']:.4f}, Recall@1 "
                f"{r['recall_at_k']['recall@1']:.4f}, NMI {r['nmi']:.4f}"
            )
    for name, v in results.get("val_targets", {}).items():
        lines.append(
            f"{name}: accuracy {v['accuracy']:.4f} ± {v['accuracy_std']:.4f} "
            f"(best {v['best']:.4f}), xnorm {v['xnorm']:.2f}"
        )
    if "best_step" in results:
        lines.append(
            f"Best mean verification at step {results['best_step']} ({workdir}/best)"
        )
    lines.append(f"Report: {workdir}/report.md")
    return "\n".join(lines)


def _check_overrides(argv: list[str]) -> None:
    """Exits with the valid field names if a --config.a.b=... names no field.

    config_flags itself only reports a bare AttributeError.
    """
    path = "train/configs/default.py"
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
    path, _, argument = path.partition(":")
    prefix = "--config."
    overrides = [a[len(prefix) :].split("=")[0] for a in argv if a.startswith(prefix)]
    if not overrides:
        return
    spec = importlib.util.spec_from_file_location("_margin_jax_config", path)
    if spec is None:
        return  # config_flags reports the missing file.
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(argument) if argument else module.get_config()
    for dotted in overrides:
        node = config
        for i, key in enumerate(dotted.split(".")):
            if not hasattr(node, "keys") or key not in node:
                where = ".".join(["config", *dotted.split(".")[:i]])
                valid = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else ""
                hint = ""
                if where == "config.loss" and "name" in node:
                    hint = (
                        " The hyperparameters of each loss are under its name: "
                        f"--config.loss.{node['name']}.{key}=..."
                    )
                sys.exit(
                    f"Unknown config override --config.{dotted}: {where} has no "
                    f"field {key!r}; valid choices: {valid or '(none)'}.{hint}"
                )
            node = node[key]


def main():
    flags.mark_flag_as_required("workdir")
    _check_overrides(sys.argv[1:])
    app.run(_main)


if __name__ == "__main__":
    main()
