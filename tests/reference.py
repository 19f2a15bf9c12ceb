"""Plain-loop float64 NumPy references for the margin-softmax losses.

Written from the formulas and conventions of docs/losses.md (conventions,
the margin-softmax pipeline, public names) and those agreed for the tests,
independently of the implementation in margin_jax/. Everything here is
deliberately slow and explicit: Python loops over rows and columns, scalar math
from the `math` module, and gradients written analytically (derivatives of the
target transform f and the non-target transform g, softmax minus one-hot), never
by automatic differentiation.

Conventions implemented (c = cos θ, y the label, s the scale):

* CE(z, y) = logsumexp_j z_j - z_y, with z_y = s·f(c_y) and
  z_j = s·g(c_j, f(c_y)) for j != y (g is the identity unless stated).
* sin θ = sqrt(1 - c²), taken as exactly 0 when 1 - c² <= 1e-12; θ = arccos c.
* Masks (support vectors, hard negatives) carry no gradient.
* Padded rows (`where` False) give exactly 0 loss and 0 gradient and do not
  enter batch statistics.

Scalar transforms return ``(value, derivative)``. Where the derivative of a
non-linear target transform is not defined by the contract (exactly c = ±1,
where sin θ = 0), the derivative is NaN: tests then only require the
implementation's gradient to be finite.
"""

from __future__ import annotations

import math

import numpy as np

SIN_EPS = 1e-12


# ---------------------------------------------------------------------------
# Scalar helpers.


def sin_theta(c: float) -> float:
    """sin θ = sqrt(1 - c²), exactly 0 when 1 - c² <= 1e-12."""
    s2 = 1.0 - c * c
    return 0.0 if s2 <= SIN_EPS else math.sqrt(s2)


def theta(c: float) -> float:
    """θ = arccos(c) for c in [-1, 1]."""
    return math.acos(min(1.0, max(-1.0, c)))


# ---------------------------------------------------------------------------
# Target transforms f(c_y): each returns (f, df/dc).


def normface_target(c: float) -> tuple[float, float]:
    return c, 1.0


def cosface_target(c: float, *, margin: float = 0.35) -> tuple[float, float]:
    return c - margin, 1.0


def arcface_target(
    c: float,
    *,
    margin: float = 0.5,
    easy_margin: bool = False,
    straight_through: bool = False,
) -> tuple[float, float]:
    """cos(θ + m) for θ <= π - m, else c - m·sin m (easy_margin: c when c <= 0)."""
    m = margin
    st = sin_theta(c)
    if easy_margin:
        use_arc = c > 0.0
        fallback = (c, 1.0)
    else:
        use_arc = theta(c) <= math.pi - m
        fallback = (c - m * math.sin(m), 1.0)
    if use_arc:
        value = c * math.cos(m) - st * math.sin(m)
        deriv = math.cos(m) + math.sin(m) * c / st if st > 0.0 else math.nan
    else:
        value, deriv = fallback
    if straight_through:
        deriv = 1.0
    return value, deriv


def combined_target(
    c: float, *, m1: float = 1.0, m2: float = 0.3, m3: float = 0.2
) -> tuple[float, float]:
    """cos(m1·θ + m2) - m3 while m1·θ + m2 <= π, else c - K - m3.

    K = max(m2·sin m2, 1 + cos((π - m2)/m1)) keeps the fallback monotone and
    below the main branch at the switch.
    """
    th = theta(c)
    st = sin_theta(c)
    arg = m1 * th + m2
    if arg <= math.pi:
        value = math.cos(arg) - m3
        deriv = m1 * math.sin(arg) / st if st > 0.0 else math.nan
    else:
        k = max(m2 * math.sin(m2), 1.0 + math.cos((math.pi - m2) / m1))
        value = c - k - m3
        deriv = 1.0
    return value, deriv


def sphereface_psi(c: float, *, margin: int = 4) -> tuple[float, float]:
    """ψ(θ) = (-1)^k cos(mθ) - 2k, k = floor(mθ/π) clipped to [0, m - 1].

    cos(mθ) and its derivative m·sin(mθ)/sin θ are computed from θ directly
    (not from Chebyshev polynomials) so the reference is independent of the
    implementation's form. k carries no derivative.
    """
    m = margin
    th = theta(c)
    st = sin_theta(c)
    k = min(max(math.floor(m * th / math.pi), 0), m - 1)
    sign = -1.0 if k % 2 else 1.0
    value = sign * math.cos(m * th) - 2.0 * k
    if m == 1:
        deriv = 1.0  # ψ = c exactly.
    elif st > 0.0:
        deriv = sign * m * math.sin(m * th) / st
    else:
        deriv = math.nan
    return value, deriv


def sphereface_target(
    c: float, *, margin: int = 4, lambda_: float = 0.0
) -> tuple[float, float]:
    """(λ·c + ψ(θ)) / (1 + λ)."""
    psi, dpsi = sphereface_psi(c, margin=margin)
    return (lambda_ * c + psi) / (1.0 + lambda_), (lambda_ + dpsi) / (1.0 + lambda_)


def sphereface_lambda(
    step: float,
    *,
    base: float = 1000.0,
    gamma: float = 0.12,
    power: float = 1.0,
    lambda_min: float = 5.0,
) -> float:
    return max(lambda_min, base * (1.0 + gamma * step) ** (-power))


def eqm_target(c: float, *, t1: float) -> tuple[float, float]:
    """-(t1 - c)_+."""
    return (-(t1 - c), 1.0) if c < t1 else (0.0, 0.0)


# ---------------------------------------------------------------------------
# Non-target transforms g(c_k, T), T = f(c_y): each returns (g, dg/dc_k).
# The mask never carries gradient and none of them depends smoothly on T.


def identity_non_target(c: float, target: float) -> tuple[float, float]:
    return c, 1.0


def sv_non_target(c: float, target: float, *, t: float = 1.2) -> tuple[float, float]:
    """Support vectors (c > T) become t·c + t - 1."""
    return (t * c + t - 1.0, t) if c > target else (c, 1.0)


def mv_non_target(
    c: float, target: float, *, t: float = 0.2, mode: str = "adaptive"
) -> tuple[float, float]:
    """Support vectors become c + t ('fixed') or (t + 1)·c + t ('adaptive')."""
    if not c > target:
        return c, 1.0
    if mode == "fixed":
        return c + t, 1.0
    if mode == "adaptive":
        return (t + 1.0) * c + t, t + 1.0
    raise ValueError(mode)


def curricular_non_target(c: float, target: float, *, t: float) -> tuple[float, float]:
    """Hard negatives (c > T) become c·(t + c); t carries no gradient."""
    return (c * (t + c), t + 2.0 * c) if c > target else (c, 1.0)


def eqm_non_target(c: float, target: float, *, t2: float) -> tuple[float, float]:
    """(c - t2)_+."""
    return (c - t2, 1.0) if c > t2 else (0.0, 0.0)


def support_vector_mask(cos, labels, target) -> np.ndarray:
    """I_ik = [c_ik > T_i] and k != y_i."""
    b, n_cls = np.shape(cos)
    out = np.zeros((b, n_cls), dtype=bool)
    for i in range(b):
        for k in range(n_cls):
            out[i, k] = k != labels[i] and float(cos[i, k]) > float(target[i])
    return out


# ---------------------------------------------------------------------------
# Row-level pieces.


def _valid(where, b: int) -> list[bool]:
    return [True] * b if where is None else [bool(w) for w in where]


def ce_value_row(z: list[float], y: int) -> float:
    """CE(z, y) = logsumexp(z) - z_y, accurate also when it is tiny.

    With gaps d_j = z_j - z_y and top = max(0, max_{j≠y} d_j):
    CE = top + log(e^{-top} + Σ_{j≠y} e^{d_j - top}), and log1p when top = 0.
    """
    d = [z[j] - z[y] for j in range(len(z)) if j != y]
    top = max([0.0, *d])
    rest = sum(math.exp(dj - top) for dj in d)
    if top == 0.0:
        return math.log1p(rest)
    return top + math.log(math.exp(-top) + rest)


def softmax_ce_row(z: list[float], y: int) -> tuple[float, list[float]]:
    """CE(z, y) = logsumexp(z) - z_y and its gradient softmax(z) - onehot(y)."""
    zmax = max(z)
    total = sum(math.exp(zj - zmax) for zj in z)
    lse = zmax + math.log(total)
    p = [math.exp(zj - lse) for zj in z]
    # p_y - 1 from the other probabilities, accurate when p_y is close to 1.
    p_y_minus_1 = -sum(p[j] for j in range(len(z)) if j != y)
    grad = [p_y_minus_1 if j == y else p[j] for j in range(len(z))]
    return ce_value_row(z, y), grad


def margin_logits_row(cos_row, y, *, target_fn, non_target_fn, scale):
    """Scaled logits z_j and their (diagonal) derivatives dz_j/dc_j."""
    c_row = [float(v) for v in cos_row]
    target, dtarget = target_fn(c_row[y])
    z, dz = [], []
    for k, ck in enumerate(c_row):
        if k == y:
            value, deriv = target, dtarget
        elif non_target_fn is None:
            value, deriv = ck, 1.0
        else:
            value, deriv = non_target_fn(ck, target)
        z.append(scale * value)
        dz.append(scale * deriv)
    return z, dz


def margin_logits(cos, labels, *, target_fn, non_target_fn=None, scale):
    """[B, C] scaled margin logits and their elementwise derivatives."""
    b, n_cls = np.shape(cos)
    scales = np.broadcast_to(np.asarray(scale, dtype=np.float64), (b,))
    z = np.zeros((b, n_cls))
    dz = np.zeros((b, n_cls))
    for i in range(b):
        zi, dzi = margin_logits_row(
            cos[i],
            int(labels[i]),
            target_fn=target_fn,
            non_target_fn=non_target_fn,
            scale=float(scales[i]),
        )
        z[i], dz[i] = zi, dzi
    return z, dz


def margin_softmax_loss(
    cos, labels, *, target_fn, non_target_fn=None, scale, where=None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-example margin-softmax CE [B] and its gradient w.r.t. cos [B, C].

    `scale` may be a scalar or a per-example array [B] (SphereFace original).
    """
    b, n_cls = np.shape(cos)
    z, dz = margin_logits(
        cos, labels, target_fn=target_fn, non_target_fn=non_target_fn, scale=scale
    )
    loss = np.zeros(b)
    grad = np.zeros((b, n_cls))
    for i, ok in enumerate(_valid(where, b)):
        if not ok:
            continue
        li, gz = softmax_ce_row(list(z[i]), int(labels[i]))
        loss[i] = li
        for j in range(n_cls):
            grad[i, j] = gz[j] * dz[i, j] if gz[j] != 0.0 else 0.0
    return loss, grad


def softmax_loss(logits, labels, *, where=None):
    """Plain CE on logits [B, C]; gradient w.r.t. logits."""
    b, n_cls = np.shape(logits)
    loss = np.zeros(b)
    grad = np.zeros((b, n_cls))
    for i, ok in enumerate(_valid(where, b)):
        if ok:
            loss[i], grad[i] = softmax_ce_row(
                [float(v) for v in logits[i]], int(labels[i])
            )
    return loss, grad


# ---------------------------------------------------------------------------
# Named losses: each returns (loss [B], dloss/dcos [B, C]).


def _partial(fn, **kwargs):
    return lambda *args: fn(*args, **kwargs)


def normface_loss(cos, labels, *, scale=64.0, where=None):
    return margin_softmax_loss(
        cos, labels, target_fn=normface_target, scale=scale, where=where
    )


def cosface_loss(cos, labels, *, scale=64.0, margin=0.35, where=None):
    return margin_softmax_loss(
        cos,
        labels,
        target_fn=_partial(cosface_target, margin=margin),
        scale=scale,
        where=where,
    )


def arcface_loss(
    cos,
    labels,
    *,
    scale=64.0,
    margin=0.5,
    easy_margin=False,
    straight_through=False,
    where=None,
):
    target = _partial(
        arcface_target,
        margin=margin,
        easy_margin=easy_margin,
        straight_through=straight_through,
    )
    return margin_softmax_loss(cos, labels, target_fn=target, scale=scale, where=where)


def combined_margin_loss(
    cos, labels, *, scale=64.0, m1=1.0, m2=0.3, m3=0.2, where=None
):
    target = _partial(combined_target, m1=m1, m2=m2, m3=m3)
    return margin_softmax_loss(cos, labels, target_fn=target, scale=scale, where=where)


def sphereface_loss(
    cos, labels, *, margin=4, lambda_=0.0, feature_norm=None, scale=None, where=None
):
    """Normalised form (scale, default 64) or original form (feature_norm [B]).

    Returns (loss, dloss/dcos) and, for the original form, also
    dloss/dfeature_norm [B] as a third element.
    """
    target = _partial(sphereface_target, margin=margin, lambda_=lambda_)
    if feature_norm is None:
        s = 64.0 if scale is None else scale
        return margin_softmax_loss(cos, labels, target_fn=target, scale=s, where=where)
    norms = np.asarray(feature_norm, dtype=np.float64)
    loss, grad = margin_softmax_loss(
        cos, labels, target_fn=target, scale=norms, where=where
    )
    # z_ij = n_i·u_ij, so dℓ/dn_i = Σ_j (p_ij - δ_jy)·u_ij.
    b = len(norms)
    u, _ = margin_logits(cos, labels, target_fn=target, scale=1.0)
    dnorm = np.zeros(b)
    for i, ok in enumerate(_valid(where, b)):
        if ok:
            _, gz = softmax_ce_row(list(norms[i] * u[i]), int(labels[i]))
            dnorm[i] = sum(gz[j] * u[i, j] for j in range(len(gz)))
    return loss, grad, dnorm


def adacos_fixed_scale(num_classes: int) -> float:
    return math.sqrt(2.0) * math.log(num_classes - 1)


def adacos_dynamic_scale(cos, labels, prev_scale, *, where=None) -> float:
    """s_new = ln(B_avg) / cos(min(π/4, θ_med)) over the valid rows.

    B_avg = mean_i Σ_{k != y_i} exp(s_prev·c_ik); θ_med is the lower median
    (sorted index (n - 1) // 2) of the target angles.
    """
    b, n_cls = np.shape(cos)
    sums, angles = [], []
    for i, ok in enumerate(_valid(where, b)):
        if not ok:
            continue
        y = int(labels[i])
        sums.append(
            sum(math.exp(prev_scale * float(cos[i, k])) for k in range(n_cls) if k != y)
        )
        angles.append(theta(float(cos[i, y])))
    b_avg = sum(sums) / len(sums)
    angles.sort()
    med = angles[(len(angles) - 1) // 2]
    return math.log(b_avg) / math.cos(min(math.pi / 4.0, med))


def adacos_loss(cos, labels, *, scale, where=None):
    """NormFace with the given scale, no gradient through the scale."""
    return normface_loss(cos, labels, scale=float(scale), where=where)


def sv_softmax_loss(
    cos, labels, *, scale=32.0, t=1.2, margin_type="none", margin=0.0, where=None
):
    target = _margin_type_target(margin_type, margin)
    return margin_softmax_loss(
        cos,
        labels,
        target_fn=target,
        non_target_fn=_partial(sv_non_target, t=t),
        scale=scale,
        where=where,
    )


def mv_softmax_loss(
    cos,
    labels,
    *,
    scale=32.0,
    t=0.2,
    margin_type="cosface",
    margin=0.35,
    mode="adaptive",
    where=None,
):
    target = _margin_type_target(margin_type, margin)
    return margin_softmax_loss(
        cos,
        labels,
        target_fn=target,
        non_target_fn=_partial(mv_non_target, t=t, mode=mode),
        scale=scale,
        where=where,
    )


def _margin_type_target(margin_type, margin):
    if margin_type == "none":
        return normface_target
    if margin_type == "cosface":
        return _partial(cosface_target, margin=margin)
    if margin_type == "arcface":
        return _partial(arcface_target, margin=margin)
    raise ValueError(margin_type)


def eqm_loss(cos, labels, *, scale, t1, t2, where=None):
    """ℓ = log(1 + Σ_{j≠y} exp(s·[(c_j - t2)_+ + (t1 - c_y)_+])), written directly.

    With u_j = s·[(c_j - t2)_+ + a], a = (t1 - c_y)_+ and q_j = e^{u_j}/(1 + Σ e^u):
    dℓ/dc_j = s·[c_j > t2]·q_j and dℓ/dc_y = -s·[c_y < t1]·Σ_j q_j.
    """
    b, n_cls = np.shape(cos)
    loss = np.zeros(b)
    grad = np.zeros((b, n_cls))
    for i, ok in enumerate(_valid(where, b)):
        if not ok:
            continue
        y = int(labels[i])
        cy = float(cos[i, y])
        a = max(t1 - cy, 0.0)
        others = [k for k in range(n_cls) if k != y]
        u = {k: scale * (max(float(cos[i, k]) - t2, 0.0) + a) for k in others}
        umax = max(max(u.values()), 0.0)
        denom = math.exp(-umax) + sum(math.exp(u[k] - umax) for k in others)
        loss[i] = umax + math.log(denom)
        q = {k: math.exp(u[k] - umax) / denom for k in others}
        for k in others:
            grad[i, k] = scale * q[k] if float(cos[i, k]) > t2 else 0.0
        grad[i, y] = -scale * sum(q.values()) if cy < t1 else 0.0
    return loss, grad


def curricularface_loss(cos, labels, t_old, *, scale=64.0, margin=0.5, where=None):
    """Returns (loss [B], dloss/dcos [B, C], t_new).

    t_new = 0.01·mean_i(c_{y_i}) + 0.99·t_old over valid rows, used in this same
    step without gradient. Target: ArcFace f with fallback; hard negatives
    (c_k > f(c_y), k != y) become c_k·(t_new + c_k).
    """
    b = np.shape(cos)[0]
    valid = _valid(where, b)
    targets = [float(cos[i, int(labels[i])]) for i in range(b) if valid[i]]
    t_new = 0.01 * (sum(targets) / len(targets)) + 0.99 * float(t_old)
    loss, grad = margin_softmax_loss(
        cos,
        labels,
        target_fn=_partial(arcface_target, margin=margin),
        non_target_fn=_partial(curricular_non_target, t=t_new),
        scale=scale,
        where=where,
    )
    return loss, grad, t_new


# ---------------------------------------------------------------------------
# Mining on logits: each returns (loss [B], dloss/dlogits [B, C]).


def focal_row(z: list[float], y: int, gamma: float) -> tuple[float, list[float]]:
    """ℓ = -(1 - p_y)^γ·log p_y with p = softmax(z), gradient through the weight.

    With q = p_y, L = -log q: dℓ/dz_j = [-γ(1-q)^{γ-1}·L·q - (1-q)^γ]·(δ_jy - p_j).
    1 - q is summed from the other probabilities for accuracy.
    """
    zmax = max(z)
    lse = zmax + math.log(sum(math.exp(zj - zmax) for zj in z))
    p = [math.exp(zj - lse) for zj in z]
    q = p[y]
    one_minus_q = sum(p[j] for j in range(len(z)) if j != y)
    big_l = ce_value_row(z, y)
    loss = one_minus_q**gamma * big_l
    first = 0.0 if gamma == 0 else -gamma * one_minus_q ** (gamma - 1.0) * big_l * q
    coef = first - one_minus_q**gamma
    grad = [coef * ((1.0 if j == y else 0.0) - p[j]) for j in range(len(z))]
    return loss, grad


def focal_loss(logits, labels, *, gamma=2.0, where=None):
    b, n_cls = np.shape(logits)
    loss = np.zeros(b)
    grad = np.zeros((b, n_cls))
    for i, ok in enumerate(_valid(where, b)):
        if ok:
            loss[i], grad[i] = focal_row(
                [float(v) for v in logits[i]], int(labels[i]), gamma
            )
    return loss, grad


def focal_weight(logits, labels, *, gamma=2.0) -> np.ndarray:
    """(1 - p_y)^γ per example."""
    b, n_cls = np.shape(logits)
    out = np.zeros(b)
    for i in range(b):
        z = [float(v) for v in logits[i]]
        zmax = max(z)
        lse = zmax + math.log(sum(math.exp(zj - zmax) for zj in z))
        y = int(labels[i])
        out[i] = sum(math.exp(z[j] - lse) for j in range(n_cls) if j != y) ** gamma
    return out


def hard_mining_mask(per_example, *, keep_ratio=0.9, where=None) -> np.ndarray:
    """Keep floor(r·n) valid examples with the largest loss, ties to lower index."""
    b = len(per_example)
    valid = [i for i, ok in enumerate(_valid(where, b)) if ok]
    n_keep = math.floor(keep_ratio * len(valid))
    order = sorted(valid, key=lambda i: (-float(per_example[i]), i))
    keep = np.zeros(b, dtype=bool)
    for i in order[:n_keep]:
        keep[i] = True
    return keep


def hard_mining_loss(logits, labels, *, keep_ratio=0.9, where=None):
    """Per-example CE on kept examples, exactly 0 elsewhere."""
    ce, grad = softmax_loss(logits, labels, where=where)
    keep = hard_mining_mask(ce, keep_ratio=keep_ratio, where=where)
    for i in range(len(ce)):
        if not keep[i]:
            ce[i] = 0.0
            grad[i] = 0.0
    return ce, grad


def chain_through_logits(dloss_dz, dz_dc) -> np.ndarray:
    """dℓ/dc from dℓ/dz for elementwise (diagonal) logit maps."""
    b, n_cls = np.shape(dloss_dz)
    out = np.zeros((b, n_cls))
    for i in range(b):
        for j in range(n_cls):
            out[i, j] = dloss_dz[i, j] * dz_dc[i, j] if dloss_dz[i, j] != 0.0 else 0.0
    return out


# ---------------------------------------------------------------------------
# Cosine logits and their backward pass.


def l2_normalize(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros_like(x)
    for i in range(x.shape[0]):
        norm = math.sqrt(sum(float(v) * float(v) for v in x[i]))
        out[i] = x[i] / norm
    return out


def cosine_logits(embeddings, weights) -> np.ndarray:
    """c_ij = x̂_i · ŵ_j clipped to [-1, 1]."""
    xh = l2_normalize(embeddings)
    wh = l2_normalize(weights)
    b, n_cls = xh.shape[0], wh.shape[0]
    out = np.zeros((b, n_cls))
    for i in range(b):
        for j in range(n_cls):
            dot = sum(float(xh[i, d]) * float(wh[j, d]) for d in range(xh.shape[1]))
            out[i, j] = min(1.0, max(-1.0, dot))
    return out


def cosine_logits_backward(embeddings, weights, dloss_dcos):
    """Chain rule: dc_ij/dx_i = (ŵ_j - c_ij·x̂_i)/||x_i||,
    dc_ij/dw_j = (x̂_i - c_ij·ŵ_j)/||w_j||."""
    x = np.asarray(embeddings, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    xh, wh = l2_normalize(x), l2_normalize(w)
    cos = cosine_logits(x, w)
    b, n_cls = cos.shape
    dx = np.zeros_like(x)
    dw = np.zeros_like(w)
    for i in range(b):
        nx = math.sqrt(float(x[i] @ x[i]))
        for j in range(n_cls):
            nw = math.sqrt(float(w[j] @ w[j]))
            g = float(dloss_dcos[i, j])
            dx[i] += g * (wh[j] - cos[i, j] * xh[i]) / nx
            dw[j] += g * (xh[i] - cos[i, j] * wh[j]) / nw
    return dx, dw
