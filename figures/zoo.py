"""Figures of notebooks/loss_zoo.ipynb: what each margin does to the logits.

All curves come from the margin_jax stage functions themselves (the target
stages of `margin_jax.targets`, the non-target stages of `margin_jax.non_targets`),
evaluated on a grid of angles; nothing is re-implemented here except the
paper formula cos(θ + m) *without* ArcFace's fallback, drawn to show why the
library has one. The hyperparameters drawn are the defaults of the registry's
factories (`margin_jax.NAMED_STAGES`), read from their signatures, so the
figures show what ``NAMED_STAGES[name]()`` trains with.
"""

from __future__ import annotations

import functools
import inspect

import jax.numpy as jnp
import numpy as np

import margin_jax as mj
from figures import _plot


def _default(name: str, parameter: str):
    """The default of ``parameter`` of the factory ``NAMED_STAGES[name]``."""
    return inspect.signature(mj.NAMED_STAGES[name]).parameters[parameter].default


THETA = np.linspace(0.0, np.pi, 721)
ARCFACE_M = _default("arcface", "margin")
COSFACE_M = _default("cosface", "margin")
# insightface's combined setting
COMBINED = {m: _default("combined", m) for m in ("m1", "m2", "m3")}
EQM = {t: _default("eqm", t) for t in ("t1", "t2")}
SV_T = _default("sv_softmax", "t")
MV_T = _default("mv_softmax", "t")


def _np(x) -> np.ndarray:
    return np.asarray(x, np.float64)


def target_curves(theta=THETA) -> dict[str, np.ndarray]:
    """f(cos θ) of the additive target stages on ``theta`` (radians)."""
    c = jnp.cos(jnp.asarray(theta, jnp.float32))
    m = ARCFACE_M
    return {
        "Softmax / NormFace: cos θ": _np(mj.normface_target(c)),
        f"CosFace: cos θ − {COSFACE_M}": _np(mj.cosface_target(c, margin=COSFACE_M)),
        f"ArcFace: cos(θ + {m})": _np(mj.arcface_target(c, margin=m)),
        f"ArcFace, easy margin (m = {m})": _np(
            mj.arcface_target(c, margin=m, easy_margin=True)
        ),
        f"cos(θ + {m}) without the fallback": np.cos(np.asarray(theta) + m),
        "Combined: cos(m1·θ + m2) − m3, (1, 0.3, 0.2)": _np(
            mj.combined_target(c, **COMBINED)
        ),
    }


def sphereface_curves(theta=THETA, lambdas=(0.0, 5.0)) -> dict[str, np.ndarray]:
    """SphereFace's (λ·cos θ + ψ(θ)) / (1 + λ) for m = 2, 3, 4 and each λ."""
    c = jnp.cos(jnp.asarray(theta, jnp.float32))
    return {
        f"m = {m}, λ = {lam:g}": _np(mj.sphereface_target(c, margin=m, lambda_=lam))
        for lam in lambdas
        for m in (2, 3, 4)
    }


def plot_target_curves(theta=THETA):
    """Three panels: additive margins, SphereFace ψ with λ, EqM's two hinges."""
    fig = _plot.new_figure((15, 4.4))
    a, b, e = fig.subplots(1, 3)
    deg = _plot.degrees(theta)
    styles = ["k-", "C0-", "C1-", "C1:", "C3--", "C2-"]
    for (name, f), style in zip(target_curves(theta).items(), styles, strict=True):
        a.plot(deg, f, style, label=name, lw=1.6)
    a.axvline(np.degrees(np.pi - ARCFACE_M), color="0.6", lw=0.8)
    a.annotate(
        "θ = π − m: ArcFace falls back\nto cos θ − m·sin m",
        (np.degrees(np.pi - ARCFACE_M), -0.2),
        xytext=(8, -1.25),
        fontsize=8,
        arrowprops={"arrowstyle": "->", "color": "0.5"},
    )
    a.set(
        xlabel="θ between feature and its class centre (degrees)",
        ylabel="target logit f(cos θ) (before the scale s)",
        title="Additive margins",
        xlim=(0, 180),
    )
    a.legend(fontsize=7.5, loc="upper right")

    b.plot(deg, np.cos(theta), "k-", lw=1.2, label="cos θ")
    for i, (name, f) in enumerate(sphereface_curves(theta).items()):
        b.plot(deg, f, f"C{i % 3}", ls="-" if i < 3 else "--", label=name)
    b.set(
        xlabel="θ (degrees)",
        ylabel="target logit",
        title="SphereFace: (λ·cos θ + ψ(θ)) / (1 + λ)",
        xlim=(0, 180),
    )
    b.legend(fontsize=7.5, ncol=2, loc="lower left")

    c = jnp.cos(jnp.asarray(theta, jnp.float32))
    t1, t2 = EQM["t1"], EQM["t2"]
    e.plot(deg, _np(mj.eqm_target(c, t1=t1)), "C0", label="target: −(t1 − cos θ)₊")
    e.plot(
        deg,
        _np(mj.eqm_non_target(c[None, :], None, t2=t2))[0],
        "C3",
        label="non-target: (cos θ − t2)₊",
    )
    e.axvline(np.degrees(np.arccos(t1)), color="C0", lw=0.8, ls=":")
    e.axvline(np.degrees(np.arccos(t2)), color="C3", lw=0.8, ls=":")
    e.set(
        xlabel="θ (degrees)",
        ylabel="stage output",
        title=f"EqM (t1 = {t1}, t2 = {t2}): flat = no gradient",
        xlim=(0, 180),
    )
    e.legend(fontsize=8, loc="lower left")
    return fig


def non_target_stages(*, target: float) -> dict[str, functools.partial]:
    """The non-target stages drawn, with the registry's default hyperparameters.

    CurricularFace's t is state (an EMA of the target cosine, from 0), drawn at
    t = 0.3, a value it reaches in training.
    """
    del target  # every stage takes the target as an argument
    return {
        f"SV-Softmax, t = {SV_T}": functools.partial(mj.sv_non_target, t=SV_T),
        f"MV-Softmax fixed, t = {MV_T}": functools.partial(
            mj.mv_non_target, t=MV_T, mode="fixed"
        ),
        f"MV-Softmax adaptive, t = {MV_T} (= SV, t = {MV_T + 1:g})": (
            functools.partial(mj.mv_non_target, t=MV_T, mode="adaptive")
        ),
        "CurricularFace, t = 0.3": functools.partial(mj.curricular_non_target, t=0.3),
    }


def plot_non_target_reweighting(*, target_cos: float = 0.6, scale: float = 32.0):
    """How SV / MV / CurricularFace move the non-target logits.

    Left: the non-target logit z_k against c_k for a sample whose target
    cosine is ``target_cos`` (ArcFace m = 0.5 gives the margined target f);
    only c_k > f (the support vectors) move. Middle: the factor
    exp(s·(z_k − c_k)) on that class's term of the softmax denominator. Right:
    SV-Softmax's factor over every (θ_y, θ_k), with the boundary c_k = f(c_y).
    """
    f = float(mj.arcface_target(jnp.float32(target_cos), margin=ARCFACE_M))
    ck = np.linspace(-1.0, 1.0, 801)
    cos = jnp.asarray(ck, jnp.float32)[None, :]
    tgt = jnp.full((1, 1), f, jnp.float32)
    fig = _plot.new_figure((15, 4.4))
    a, b, h = fig.subplots(1, 3)
    a.plot(ck, ck, "k-", lw=1.2, label="softmax / margin base: z = c")
    for i, (name, stage) in enumerate(non_target_stages(target=f).items()):
        z = _np(stage(cos, tgt))[0]
        style = {"color": f"C{i}", "ls": "--" if i == 2 else "-"}
        a.plot(ck, z, label=name, **style)
        b.semilogy(ck, np.exp(scale * (z - ck)), label=name, **style)
    for ax in (a, b):
        ax.axvline(f, color="0.4", ls="--", lw=0.9)
        ax.axvspan(f, 1.0, color="C3", alpha=0.07)
        ax.set_xlim(-1, 1)
    a.text(f + 0.02, -0.9, f"support vectors\nc_k > f(c_y) = {f:.3f}", fontsize=8)
    a.set(
        xlabel="non-target cosine c_k",
        ylabel="non-target logit z_k",
        title=f"Non-target stages, target cos = {target_cos} (ArcFace m = 0.5)",
    )
    a.legend(fontsize=7.5, loc="upper left")
    b.set(
        xlabel="non-target cosine c_k",
        ylabel="factor on exp(s·c_k)",
        title=f"Reweighting of the softmax term, s = {scale:g}",
    )

    ty = np.linspace(0.0, np.pi, 181)
    tk = np.linspace(0.0, np.pi, 181)
    fy = _np(mj.arcface_target(jnp.cos(jnp.asarray(ty, jnp.float32)), margin=0.5))
    cos_k = jnp.cos(jnp.asarray(tk, jnp.float32))[None, :].repeat(len(ty), axis=0)
    z = _np(mj.sv_non_target(cos_k, jnp.asarray(fy, jnp.float32)[:, None], t=1.2))
    log_factor = scale * (z - _np(cos_k)) / np.log(10.0)
    mesh = h.pcolormesh(
        _plot.degrees(tk), _plot.degrees(ty), log_factor, cmap="magma", shading="auto"
    )
    fig.colorbar(mesh, ax=h, label="log10 factor (SV-Softmax, t = 1.2)")
    valid = np.abs(fy) <= 1
    h.plot(
        _plot.degrees(np.arccos(fy[valid])),
        _plot.degrees(ty[valid]),
        "c--",
        lw=1.2,
        label="c_k = f(c_y)",
    )
    h.set(
        xlabel="non-target angle θ_k (degrees)",
        ylabel="target angle θ_y (degrees)",
        title="SV-Arc-Softmax: which non-targets are reweighted",
    )
    h.legend(fontsize=8, loc="lower right")
    return fig


def decision_targets() -> dict[str, functools.partial]:
    """The target stages of the decision-margin figure (binary case)."""
    return {
        "Softmax / NormFace": mj.normface_target,
        "SphereFace, m = 4 (λ = 0)": functools.partial(mj.sphereface_target, margin=4),
        f"CosFace, m = {COSFACE_M}": functools.partial(
            mj.cosface_target, margin=COSFACE_M
        ),
        f"ArcFace, m = {ARCFACE_M}": functools.partial(
            mj.arcface_target, margin=ARCFACE_M
        ),
        "Combined ({m1:g}, {m2:g}, {m3:g})".format(**COMBINED): functools.partial(
            mj.combined_target, **COMBINED
        ),
    }


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[lo, hi) index ranges of the runs of True in a 1-D bool array."""
    edges = np.flatnonzero(np.diff(np.r_[0, mask.astype(np.int8), 0]))
    return list(zip(edges[::2], edges[1::2], strict=True))


def _regions(target_fn, theta1, theta2):
    """(class 1 wins with its margin, class 2 wins with its margin) masks."""
    c1 = jnp.cos(jnp.asarray(theta1, jnp.float32))
    c2 = jnp.cos(jnp.asarray(theta2, jnp.float32))
    one = _np(target_fn(c1)) > _np(c2)
    two = _np(target_fn(c2)) > _np(c1)
    return one, two


def plot_decision_margins(*, half_angle_deg: float = 40.0):
    """Two classes: the margin regions on the circle and in the (θ1, θ2) plane.

    Top: class centres W1, W2 ``2·half_angle_deg`` apart on the unit circle; a
    feature at angle φ is class 1 with margin where f(cos θ1) > cos θ2 (blue),
    class 2 where f(cos θ2) > cos θ1 (orange); the grey sector between is the
    margin no training feature should be in (SphereFace Fig. 2, ArcFace Fig. 5).
    Bottom: the same boundaries in the (θ1, θ2) plane.
    """
    targets = decision_targets()
    fig = _plot.new_figure((3.2 * len(targets), 6.6))
    axes = fig.subplots(2, len(targets))
    alpha = np.radians(half_angle_deg)
    phi = np.linspace(-np.pi, np.pi, 2881)
    theta1 = np.abs(np.angle(np.exp(1j * (phi + alpha))))
    theta2 = np.abs(np.angle(np.exp(1j * (phi - alpha))))
    grid = np.linspace(0.0, np.pi / 2, 301)
    t1, t2 = np.meshgrid(grid, grid)
    for (name, fn), top, bottom in zip(targets.items(), *axes, strict=True):
        one, two = _regions(fn, theta1, theta2)
        for mask, color in ((one, "C0"), (two, "C1"), (~one & ~two, "0.5")):
            for lo, hi in _runs(mask):
                arc = phi[lo:hi]
                top.fill(
                    np.r_[0, np.cos(arc)], np.r_[0, np.sin(arc)], color=color, alpha=0.3
                )
        top.plot(np.cos(phi), np.sin(phi), "k-", lw=0.6)
        for sign, color, label in ((-1, "C0", "W1"), (1, "C1", "W2")):
            top.annotate(
                "",
                (np.cos(sign * alpha), np.sin(sign * alpha)),
                (0, 0),
                arrowprops={"arrowstyle": "->", "color": color, "lw": 1.5},
            )
            top.text(
                1.12 * np.cos(sign * alpha),
                1.12 * np.sin(sign * alpha),
                label,
                color=color,
                ha="center",
                va="center",
            )
        between = np.abs(phi) < alpha  # the arc from W1 to W2
        width = np.degrees(np.mean((~one & ~two)[between]) * 2 * alpha)
        top.set_title(f"{name}\nmargin between W1 and W2: {width:.0f}°", fontsize=9)
        top.set_aspect("equal")
        top.set_xlim(-1.25, 1.25)
        top.set_ylim(-1.25, 1.25)
        top.axis("off")

        g_one, g_two = _regions(fn, t1, t2)
        bottom.contourf(
            _plot.degrees(grid),
            _plot.degrees(grid),
            np.where(g_one, 0, np.where(g_two, 1, 2)),
            levels=[-0.5, 0.5, 1.5, 2.5],
            colors=["C0", "C1", "0.55"],
            alpha=0.35,
        )
        bottom.plot([0, 90], [0, 90], "k:", lw=0.8)
        bottom.set(xlabel="θ1 (degrees)", ylabel="θ2 (degrees)", aspect="equal")
    from matplotlib.patches import Patch

    fig.legend(
        handles=[
            Patch(color="C0", alpha=0.4, label="class 1 wins with margin"),
            Patch(color="C1", alpha=0.4, label="class 2 wins with margin"),
            Patch(color="0.5", alpha=0.4, label="neither: the margin"),
        ],
        loc="outside lower center",
        ncol=3,
    )
    return fig


def target_table(degrees=(0, 30, 60, 90, 120, 150, 170)) -> str:
    """Markdown: f(cos θ) of every additive target stage at a few angles."""
    theta = np.radians(np.asarray(degrees, np.float64))
    curves = target_curves(theta)
    header = ["θ (degrees)", *(f"{d:g}" for d in degrees)]
    rows = [
        [name, *(f"{np.round(v, 3) + 0.0:+.3f}" for v in f)]
        for name, f in curves.items()
    ]
    return _plot.markdown_table(header, rows)
