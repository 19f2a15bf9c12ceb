"""Regenerates the README gallery: python -m figures --out docs/gallery.

Writes one PNG per figure with the functions the notebooks call, training the
hypersphere and support-vector runs through train/ first (runs are cached in
$MARGIN_JAX_RUNS or ~/.cache/margin_jax/runs, so a second call only redraws).
About 6 minutes on 2 CPU cores with the default step counts; ``--quick``
(or MARGIN_JAX_QUICK=1) uses a few steps per run, for a smoke test.
"""

from __future__ import annotations

import argparse
import os

FIGURES = (
    "glyphs",
    "target_logits",
    "non_target_reweighting",
    "decision_margins",
    "hypersphere",
    "support_vectors",
    "sv_focal_hard_mining",
    "arcface_gradients",
)
# Steps of the runs behind the figures: (full, --quick).
HYPERSPHERE_STEPS = (600, 4)
SV_STEPS, SV_EVERY = (100, 6), (5, 2)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m figures", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", default="docs/gallery", help="PNG directory.")
    parser.add_argument(
        "--only",
        default=",".join(FIGURES),
        help=f"Comma-separated subset of: {', '.join(FIGURES)}.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="A few training steps per run."
    )
    parser.add_argument("--dpi", type=int, default=110, help="PNG resolution.")
    return parser


def _figures(names, quick: bool):
    """Yields (name, Figure) for each requested figure, training as needed."""
    from figures import glyphs, gradients, hypersphere, support_vectors, zoo

    pick = 1 if quick else 0
    if "glyphs" in names:
        yield "glyphs", glyphs.plot_glyph_samples()
    if "target_logits" in names:
        yield "target_logits", zoo.plot_target_curves()
    if "non_target_reweighting" in names:
        yield "non_target_reweighting", zoo.plot_non_target_reweighting()
    if "decision_margins" in names:
        yield "decision_margins", zoo.plot_decision_margins()
    if "hypersphere" in names:
        runs = hypersphere.train_all(steps=HYPERSPHERE_STEPS[pick])
        yield "hypersphere", hypersphere.plot_hypersphere(runs)
    if {"support_vectors", "sv_focal_hard_mining"} & set(names):
        snapshots, loss = support_vectors.train_snapshots(
            steps=SV_STEPS[pick], every=SV_EVERY[pick]
        )
        hyper = {"margin": loss["margin"]}
        if "support_vectors" in names:
            yield (
                "support_vectors",
                support_vectors.plot_support_vectors(snapshots, **hyper),
            )
        if "sv_focal_hard_mining" in names:
            yield (
                "sv_focal_hard_mining",
                support_vectors.plot_reweighting(
                    support_vectors.with_support_vectors(snapshots),
                    scale=loss["scale"],
                    **hyper,
                ),
            )
    if "arcface_gradients" in names:
        yield "arcface_gradients", gradients.plot_arcface_gradients()


def main(argv=None):
    import figures

    parser = _parser()
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(FIGURES))
    if unknown:
        parser.error(
            f"unknown figure(s) {unknown}; valid choices for --only: "
            f"{', '.join(FIGURES)}"
        )
    os.makedirs(args.out, exist_ok=True)
    for name, fig in _figures(names, args.quick or figures.quick()):
        path = os.path.join(args.out, f"{name}.png")
        fig.savefig(path, dpi=args.dpi)
        print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
