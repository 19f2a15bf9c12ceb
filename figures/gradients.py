"""Figures and checks of notebooks/grad_check.ipynb.

`check_loss` is the whole recipe for a loss of one's own: jax.grad against
central finite differences in float64 (through `margin_jax.cosine_logits`, so
the embeddings and the class centres both get checked), finite gradients at
cos = ±1 in float32 and bf16, and loss >= 0. `gradient_check_table` runs it
on every named loss of margin_jax.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np

import margin_jax as mj
from figures import _plot
from margin_jax.composer import dense_form


def hold_statistics(stages: mj.Stages, cos, labels) -> mj.Stages:
    """``stages`` with the batch statistics of (cos, labels) bound as constants.

    A stateful loss (dynamic AdaCos's scale, CurricularFace's t) computes its
    statistics from the batch without a gradient, so jax.grad treats them as
    constants while finite differences see them move with every perturbed
    input. Held at one batch's values they are exactly the constants jax.grad
    sees there, and the stages become stateless.

    Args:
      stages: a `margin_jax.Stages` (returned as is when it has no statistics).
      cos: [B, C] cosines of the batch the statistics are taken on.
      labels: [B] integer labels.

    Returns:
      The `margin_jax.Stages` of that step, with ``statistics`` and ``state``
      None.
    """
    if stages.statistics is None:
        return stages
    form = dense_form(jnp.asarray(cos), jnp.asarray(labels))
    batch = mj.Batch(
        target_cos=form.target_cos,
        where=None,
        axis_name=None,
        num_classes=form.num_classes,
        feature_norm=None,
        non_target_logsumexp=lambda s: form.non_target_logsumexp(
            jnp.broadcast_to(s, form.target_cos.shape)
        ),
    )
    return stages.statistics(stages, batch)._replace(statistics=None, state=None)


def _label(name: str, factory, kwargs: dict, held: bool) -> str:
    """'arcface (margin=0.5)': the entry and the hyperparameters it was built with.

    The common scale, the state and switches left off are not repeated.
    """
    params = inspect.signature(factory).parameters
    values = {k: kwargs.get(k, p.default) for k, p in params.items()}
    shown = [
        f"{k}={v}" if isinstance(v, str) else f"{k}={v!r}"
        for k, v in values.items()
        if k not in ("scale", "state") and v is not False
    ]
    if held:
        shown.append("batch statistics held")
    return f"{name} ({', '.join(shown)})" if shown else name


def cosine_losses(scale: float = 16.0, *, seed: int = 0) -> dict:
    """name -> loss(cos [B, C], labels [B]) -> [B]: every entry of the registry.

    Plain softmax on s·cos, then each `margin_jax.NAMED_STAGES` entry built with
    its factory's defaults and the common ``scale`` (where the factory takes
    one; SphereFace with λ = 5, the end of its annealing), run through
    `margin_jax.margin_softmax_loss`. The stateful entries (dynamic AdaCos,
    CurricularFace) hold their batch statistics at the values of the
    `check_loss` batch of ``seed`` (`hold_statistics`): the gradient checked is
    then the one the loss computes there, with the statistics as constants.
    """
    x, w, labels = _inputs(seed)
    cos = mj.cosine_logits(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
    losses = {"softmax (on s·cos)": lambda c, y: mj.softmax_loss(scale * c, y)}
    for name, factory in mj.NAMED_STAGES.items():
        kwargs = (
            {"scale": scale} if "scale" in inspect.signature(factory).parameters else {}
        )
        if name == "sphereface":
            kwargs["lambda_"] = 5.0
        stages = factory(**kwargs)
        held = stages.statistics is not None and stages.state is not None
        if held:
            stages = hold_statistics(stages, cos, jnp.asarray(labels))
        label = _label(name, factory, kwargs, held)
        losses[label] = functools.partial(mj.margin_softmax_loss, stages=stages)
    return losses


def embedding_losses() -> dict:
    """name -> loss(embeddings [B, D], labels [B]) of the pair and centre losses."""
    return {
        "triplet, semi-hard": lambda x, y: mj.triplet_loss(x, y, mining="semi_hard"),
        "triplet, batch-hard": lambda x, y: mj.triplet_loss(x, y, mining="batch_hard"),
        "triplet, batch-all": lambda x, y: mj.triplet_loss(x, y, mining="batch_all"),
        "contrastive": lambda x, y: mj.contrastive_loss(x, y),
        # Rows 0-2 are the anchors of rows 3-5 (three distinct classes).
        "n-pair": lambda x, y: mj.npair_loss(x[:3], x[3:]),
        "center loss": lambda x, y: mj.center_loss(
            x, y, mj.CenterState(centers=jnp.full((4, x.shape[1]), 0.1, x.dtype))
        ),
    }


@dataclasses.dataclass
class Check:
    """The result of `check_loss` for one loss."""

    name: str
    max_abs_error: float  # max |jax.grad - finite difference|, float64
    max_grad: float
    finite_at_boundary: bool  # cos = ±1 in float32 and bf16
    non_negative: bool

    @property
    def ok(self) -> bool:
        return (
            self.max_abs_error <= 1e-6 * max(1.0, self.max_grad)
            and self.finite_at_boundary
            and self.non_negative
        )


def _central_differences(f, args, eps):
    """∂f/∂args by central differences, all elements at once under vmap."""
    grads = []
    for k, a in enumerate(args):
        n = a.size
        steps = (eps * jnp.eye(n, dtype=a.dtype)).reshape(n, *a.shape)

        def at(v, k=k):
            return f(*(v if j == k else b for j, b in enumerate(args)))

        values = jax.vmap(at)(jnp.concatenate([a + steps, a - steps]))
        grads.append(((values[:n] - values[n:]) / (2 * eps)).reshape(a.shape))
    return grads


def _value_grad_fd(f, eps):
    """One compiled program: f, jax.grad of f and its finite differences."""

    def run(*args):
        exact = jax.grad(f, argnums=tuple(range(len(args))))(*args)
        return f(*args), exact, _central_differences(f, args, eps)

    return jax.jit(run)


def _inputs(seed: int, batch: int = 6, num_classes: int = 4, dim: int = 5):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, dim))
    w = rng.normal(size=(num_classes, dim))
    labels = np.arange(batch) % num_classes  # every class twice or more
    return x, w, labels


def _boundary_cosines(labels, num_classes, dtype):
    """cos exactly ±1 on the target and/or the non-targets (four patterns)."""
    onehot = np.eye(num_classes, dtype=bool)[labels]
    return [
        jnp.asarray(np.where(onehot, t, o), dtype)
        for t, o in ((1.0, -1.0), (-1.0, 1.0), (1.0, 1.0), (-1.0, -1.0))
    ]


def _boundary_embeddings(x, dtype):
    """Coincident embeddings (distance 0, cos = 1): each row equal to row 0."""
    same = np.broadcast_to(x[:1], x.shape)
    pairs = x.copy()
    pairs[1::2] = x[0::2][: len(pairs[1::2])]  # rows 2k and 2k + 1 coincide
    return [jnp.asarray(v, dtype) for v in (x, same, pairs)]


def check_loss(
    loss_fn, name: str = "loss", *, on: str = "cosines", seed: int = 0, eps=1e-6
) -> Check:
    """Checks a loss's gradients: float64 finite differences, the boundary, bf16.

    The boundary is cos = ±1 (target and non-targets, four patterns) for a
    loss of cosines, and coincident embeddings (distance 0) for a loss of
    embeddings, each in float32 and bfloat16.

    Args:
      loss_fn: ``loss_fn(cos [B, C], labels [B])`` (``on="cosines"``, checked
        through `margin_jax.cosine_logits` with respect to the embeddings and
        the class centres) or ``loss_fn(embeddings [B, D], labels [B])``
        (``on="embeddings"``); per-example [B] or a scalar.
      name: the name in the result.
      on: "cosines" or "embeddings".
      seed: of the random inputs.
      eps: the finite-difference step.

    Returns:
      A `Check`; ``check.ok`` when the gradient matches to 1e-6 (relative to
      its largest entry), is finite at the boundary and every per-example
      loss is >= 0.
    """
    if on not in ("cosines", "embeddings"):
        raise ValueError(
            f"check_loss: `on` must be 'cosines' or 'embeddings', got {on!r}."
        )
    x, w, labels = _inputs(seed)
    labels = jnp.asarray(labels)
    with jax.enable_x64(True):
        if on == "cosines":
            args = (jnp.asarray(x), jnp.asarray(w))
            per_example = lambda x, w: loss_fn(mj.cosine_logits(x, w), labels)  # noqa: E731
        else:
            args = (jnp.asarray(x),)
            per_example = lambda x: loss_fn(x, labels)  # noqa: E731
        f = lambda *a: jnp.sum(per_example(*a))  # noqa: E731
        _, exact, numeric = _value_grad_fd(f, eps)(*args)
        values = np.asarray(jax.jit(per_example)(*args))
        exact, numeric = jax.tree.map(np.asarray, (exact, numeric))
        err = max(
            float(np.max(np.abs(e - n))) for e, n in zip(exact, numeric, strict=True)
        )
        biggest = max(float(np.max(np.abs(e))) for e in exact)
        non_negative = bool(np.all(values >= -1e-12))
    if on == "cosines":
        cases = [
            jnp.stack(_boundary_cosines(np.asarray(labels), w.shape[0], dtype))
            for dtype in (jnp.float32, jnp.bfloat16)
        ]
    else:
        cases = [
            jnp.stack(_boundary_embeddings(x, dtype))
            for dtype in (jnp.float32, jnp.bfloat16)
        ]
    grad = jax.grad(lambda v: jnp.sum(loss_fn(v, labels)).astype(jnp.float32))
    grads = jax.jit(lambda cases: [jax.vmap(grad)(c) for c in cases])(cases)
    finite = all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    return Check(name, err, biggest, finite, non_negative)


def gradient_check_table(seed: int = 0) -> list[Check]:
    """`check_loss` of every loss of `cosine_losses` and `embedding_losses`."""
    losses = cosine_losses(seed=seed)
    checks = [check_loss(fn, n, seed=seed) for n, fn in losses.items()]
    checks += [
        check_loss(fn, n, on="embeddings", seed=seed)
        for n, fn in embedding_losses().items()
    ]
    return checks


def checks_markdown(checks: list[Check]) -> str:
    """The checks as a markdown table."""
    rows = [
        (
            f"`{c.name}`",
            f"{c.max_abs_error:.1e}",
            f"{c.max_grad:.2f}",
            "yes" if c.finite_at_boundary else "**no**",
            "yes" if c.non_negative else "**no**",
            "ok" if c.ok else "**FAIL**",
        )
        for c in checks
    ]
    header = (
        "Loss",
        "max abs error vs finite differences (float64)",
        "max abs gradient",
        "finite at the boundary*, f32 and bf16",
        "loss ≥ 0",
        "",
    )
    note = (
        "\n\\* cos = ±1 on the target and the non-targets for the losses of "
        "cosines; coincident embeddings (distance 0) for those of embeddings.\n"
    )
    return _plot.markdown_table(header, rows) + note


def arcface_target_gradients(theta, *, margin: float = 0.5) -> dict[str, np.ndarray]:
    """d f / d cos θ of ArcFace's target, exact and straight-through, on ``theta``."""
    c = jnp.cos(jnp.asarray(theta, jnp.float32))
    exact = functools.partial(mj.arcface_target, margin=margin)
    st = mj.straight_through(exact)
    return {
        "exact: d cos(θ + m) / d cos θ": np.asarray(jax.vmap(jax.grad(exact))(c)),
        "straight-through (insightface)": np.asarray(jax.vmap(jax.grad(st))(c)),
    }


def arcface_loss_gradients(
    theta, *, margin: float = 0.5, scale: float = 16.0, num_classes: int = 10
) -> dict[str, np.ndarray]:
    """∂ℓ/∂cos θ_y of the ArcFace loss, the non-targets at cos = 0."""
    c = jnp.cos(jnp.asarray(theta, jnp.float32))
    cos = jnp.zeros((len(c), num_classes), jnp.float32).at[:, 0].set(c)
    labels = jnp.zeros(len(c), jnp.int32)
    out = {}
    for name, st in (("exact", False), ("straight-through", True)):

        def loss(cos, st=st):
            return jnp.sum(
                mj.arcface_loss(
                    cos, labels, scale=scale, margin=margin, straight_through=st
                )
            )

        out[name] = np.asarray(jax.grad(loss)(cos)[:, 0])
    return out


def plot_arcface_gradients(*, margin: float = 0.5, scale: float = 16.0):
    """Exact vs straight-through ArcFace: the target stage's and the loss's gradient.

    Left: d f/d cos θ. The exact derivative of cos(θ + m) is
    cos m + sin m·cos θ / sin θ, which grows without bound as θ → 0 (it is
    finite *at* θ = 0, where `margin_jax.safe_sin` gives sin θ a zero
    derivative); beyond θ = π − m the fallback has slope 1. The straight-through
    form is 1 everywhere. Right: what reaches the target cosine through the
    loss, −s·(1 − p_y)·f′, for a sample with 9 non-targets at cos = 0.
    """
    theta = np.linspace(0.0, np.pi, 1441)
    deg = _plot.degrees(theta)
    fig = _plot.new_figure((12, 4.2))
    panels = (
        (
            {
                k: np.abs(v)
                for k, v in arcface_target_gradients(theta, margin=margin).items()
            },
            "log",
            "|d f / d cos θ|",
            f"ArcFace target stage, m = {margin}",
        ),
        (
            arcface_loss_gradients(theta, margin=margin, scale=scale),
            "linear",
            "∂ℓ / ∂cos θ_y",
            f"ArcFace loss, s = {scale:g}, 9 non-targets at cos = 0",
        ),
    )
    for ax, (curves, yscale, ylabel, title) in zip(
        fig.subplots(1, 2), panels, strict=True
    ):
        for (name, g), style in zip(curves.items(), ("C0-", "C3--"), strict=True):
            ax.plot(deg, g, style, label=name)
        ax.axvline(np.degrees(np.pi - margin), color="0.6", lw=0.8)
        ax.set(xlabel="θ_y (degrees)", ylabel=ylabel, title=title, xlim=(0, 180))
        ax.set_yscale(yscale)
        ax.legend(fontsize=8)
    return fig
