"""Soft Top-K as entropic optimal transport, solved exactly through its scalar dual.

The problem (Xie et al., NeurIPS 2020): N scores x_i, each of mass 1/N, are transported to two
anchors, "dropped" (y = 0, mass (N - k)/N) and "selected" (y = 1, mass k/N), with squared cost and
entropic regularisation eps. The soft mask is N times the mass each score sends to "selected".

With two anchors the optimal coupling is closed-form up to one scalar: the cost difference between
the anchors is (x - 0)^2 - (x - 1)^2 = 2x - 1, so every row splits its unit mass as

    m_i = sigmoid((x_i - t) / tau),   tau = eps / 2,

with the threshold t (a combination of the two column duals) fixed by the column marginal
sum_i m_i = k. Sinkhorn iterations on this problem are a slowly converging fixed-point iteration
for t; here t is found by a safeguarded Newton solve of the monotone scalar equation
f(t) = sum_i m_i(t) - k = 0 in a handful of O(N) passes. The result is the same optimum (checked in
``tests/test_soft_topk.py`` against a float64 log-domain Sinkhorn solve).

The gradient is closed-form: with s_i = m_i (1 - m_i) (implicit differentiation of the constraint),

    d L / d x   = (1 / tau) * (s * v - s * sum(s * v) / sum(s))
    d L / d tau = -(1 / tau) * sum_i v_i s_i (z_i - zbar),  z = (x - t) / tau,  zbar = sum(s z) / sum(s)

where v is the cotangent of the mask. No N x N matrix, no stored iterates: the backward pass is
O(N) and keeps only the mask.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def check_budget(k: Any, num_tokens: int, op: str) -> int:
    """Validates a static token budget ``k`` against the padded bag length ``num_tokens``."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"{op}: k must be a Python int (a static budget), got {k!r} of type {type(k).__name__}")
    k = int(k)
    if k <= 0:
        raise ValueError(f"{op}: k must be >= 1, got k={k}")
    if k > num_tokens:
        raise ValueError(
            f"{op}: k={k} is larger than the bag length N={num_tokens}; pad the bag to at least k tokens "
            "(padded tokens are never selected) or lower k"
        )
    return k


def _compute_dtype(dtype) -> Any:
    # Solve in float32 for float32/bfloat16/float16 inputs; keep float64 when the caller asked for it.
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def _initial_threshold(x, maskf, n_valid, k, lo, hi):
    """A cheap first guess for t: the Gaussian quantile of the masked score distribution."""
    mean = jnp.sum(x * maskf, -1, keepdims=True) / jnp.maximum(n_valid, 1)
    var = jnp.sum(jnp.square(x - mean) * maskf, -1, keepdims=True) / jnp.maximum(n_valid, 1)
    frac = jnp.clip(k / jnp.maximum(n_valid, 1), 1e-6, 1 - 1e-6)
    # Upper (1 - k/n) quantile of N(mean, var).
    z = jnp.sqrt(2.0).astype(x.dtype) * jax.scipy.special.erfinv(1 - 2 * frac)
    t0 = mean + jnp.sqrt(var) * z
    return jnp.clip(t0, lo, hi)


def _solve_threshold(x: Array, tau: Array, mask: Array, k: int, max_iter: int) -> Array:
    """Finds t with sum_i mask_i * sigmoid((x_i - t) / tau) = k, row-wise over the last axis.

    Args:
      x: [..., N] scores in the compute dtype.
      tau: [..., 1] positive temperatures.
      mask: [..., N] bool validity.
    Returns:
      (t, center): [..., 1] each; the threshold is center + t, and the mask is
      sigmoid(((x - center) - t) / tau). Both are arbitrary but finite in rows with <= k valid tokens.
    """
    dtype = x.dtype
    maskf = mask.astype(dtype)
    n_valid = jnp.sum(maskf, -1, keepdims=True)
    solvable = n_valid > k
    big = jnp.asarray(jnp.finfo(dtype).max, dtype)
    xmin = jnp.min(jnp.where(mask, x, big), -1, keepdims=True)
    xmax = jnp.max(jnp.where(mask, x, -big), -1, keepdims=True)
    xmin = jnp.where(solvable, xmin, 0)
    xmax = jnp.where(solvable, xmax, 0)
    # Bracket: at t <= xmin - tau*logit(k/n) every token has mass >= k/n (f >= 0), at
    # t >= xmax - tau*logit(k/n) every token has mass <= k/n (f <= 0).
    frac = jnp.where(solvable, k / jnp.maximum(n_valid, 1), 0.5)
    shift = tau * (jnp.log(frac) - jnp.log1p(-frac))
    lo = xmin - shift
    hi = xmax - shift
    t = _initial_threshold(x, maskf, n_valid, k, lo, hi)
    # Solve for the threshold relative to the first guess: with |x| ~ 1e4 a float32 threshold has
    # a resolution of ~1e-3, too coarse for a small tau; shifted scores near the boundary are
    # represented (and subtracted) exactly.
    center = t
    x = x - center
    lo, hi, t = lo - center, hi - center, jnp.zeros_like(t)

    eps = jnp.finfo(dtype).eps
    ftol = jnp.asarray(k * (1e-7 if dtype == jnp.float64 else 2e-6), dtype)

    def evaluate(t):
        m = jax.nn.sigmoid((x - t) / tau) * maskf
        f = jnp.sum(m, -1, keepdims=True) - k
        fprime = -jnp.sum(m * (1 - m), -1, keepdims=True) / tau
        return f, fprime

    def not_done(t, lo, hi, f):
        width_ok = (hi - lo) <= 4 * eps * jnp.maximum(jnp.abs(t), tau)
        return solvable & ~((jnp.abs(f) <= ftol) | width_ok)

    def cond(state):
        it, t, lo, hi, f, _ = state
        return (it < max_iter) & jnp.any(not_done(t, lo, hi, f))

    def body(state):
        it, t, lo, hi, f, fprime = state
        active = not_done(t, lo, hi, f)
        # f is decreasing in t: f > 0 means the root lies to the right of t.
        lo_new = jnp.where(f > 0, t, lo)
        hi_new = jnp.where(f > 0, hi, t)
        # Newton on the log of the mass on the side that is short: log(sum m) - log(k) when t is
        # too high, log(sum(1 - m)) - log(N - k) when too low. In the tails these are nearly
        # linear in t (log-sum-exp like), where plain Newton on f crawls; the safeguard remains.
        mass = f + k
        rest = n_valid - mass
        curvature = -fprime * tau  # sum m (1 - m) >= 0
        ok = (curvature > 0) & (mass > 0) & (rest > 0)
        safe_curv = jnp.where(ok, curvature, 1.0)
        # log1p of the relative excess: log(mass) - log(k) would cancel catastrophically near the root.
        step_low_mass = jnp.log1p(jnp.where(ok, f / k, 0.0)) * tau * mass / safe_curv
        step_high_mass = -jnp.log1p(jnp.where(ok, -f / (n_valid - k), 0.0)) * tau * rest / safe_curv
        newton = t + jnp.where(f < 0, step_low_mass, step_high_mass)
        use_newton = ok & (newton > lo_new) & (newton < hi_new)
        t_new = jnp.where(use_newton, newton, 0.5 * (lo_new + hi_new))
        t_new = jnp.where(active, t_new, t)
        lo_new = jnp.where(active, lo_new, lo)
        hi_new = jnp.where(active, hi_new, hi)
        f_new, fprime_new = evaluate(t_new)
        return it + 1, t_new, lo_new, hi_new, f_new, fprime_new

    f0, fp0 = evaluate(t)
    state = (jnp.asarray(0, jnp.int32), t, lo, hi, f0, fp0)
    _, t, *_ = jax.lax.while_loop(cond, body, state)
    return t, center


def _mask_from_threshold(x, t, center, tau, mask, k):
    maskf = mask.astype(x.dtype)
    n_valid = jnp.sum(maskf, -1, keepdims=True)
    m = jax.nn.sigmoid(((x - center) - t) / tau) * maskf
    # With <= k valid tokens the budget covers them all: every valid token is selected outright.
    return jnp.where(n_valid > k, m, maskf)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _soft_topk(k: int, max_iter: int, x: Array, tau: Array, mask: Array) -> Array:
    t, center = _solve_threshold(x, tau, mask, k, max_iter)
    return _mask_from_threshold(x, t, center, tau, mask, k)


def _soft_topk_fwd(k, max_iter, x, tau, mask):
    t, center = _solve_threshold(x, tau, mask, k, max_iter)
    m = _mask_from_threshold(x, t, center, tau, mask, k)
    return m, (m, x, t, center, tau, mask)


def _soft_topk_bwd(k, max_iter, residuals, v):
    del max_iter
    m, x, t, center, tau, mask = residuals
    maskf = mask.astype(x.dtype)
    n_valid = jnp.sum(maskf, -1, keepdims=True)
    s = m * (1 - m) * maskf * (n_valid > k)
    s_sum = jnp.sum(s, -1, keepdims=True)
    safe_sum = jnp.where(s_sum > 0, s_sum, 1)
    sv = jnp.sum(s * v, -1, keepdims=True)
    grad_x = (s * v - jnp.where(s_sum > 0, s * sv / safe_sum, 0)) / tau
    z = jnp.where(mask, ((x - center) - t) / tau, 0)
    zbar = jnp.where(s_sum > 0, jnp.sum(s * z, -1, keepdims=True) / safe_sum, 0)
    grad_tau = -jnp.sum(v * s * (z - zbar), -1, keepdims=True) / tau
    return grad_x, grad_tau, None


_soft_topk.defvjp(_soft_topk_fwd, _soft_topk_bwd)


def soft_topk(
    scores: Array,
    k: int,
    tau: float | Array,
    mask: Array | None = None,
    *,
    max_iter: int = 100,
) -> Array:
    """Differentiable top-k mask: the entropic-OT relaxation, solved exactly.

    Args:
      scores: [..., N] token scores (float32, bfloat16, float16 or float64). tau is in score units,
        so give scores a known scale first (e.g. ``standardize_scores``).
      k: the budget, a static Python int with 1 <= k <= N.
      tau: temperature (= eps / 2 of the OT problem), a positive scalar or an array broadcastable
        to ``scores.shape[:-1]``. Differentiable.
      mask: optional [..., N] validity mask (True = real token) for ragged bags padded to N.
      max_iter: cap on safeguarded-Newton iterations (convergence normally takes 3-15).

    Returns:
      [..., N] mask in the dtype of ``scores`` with values in [0, 1] and ``sum = k`` over valid
      tokens. Padded tokens get 0; in a row with at most k valid tokens every valid token gets 1.
      The solve runs in float32 (float64 for float64 inputs).
    """
    scores = jnp.asarray(scores)
    if scores.ndim < 1:
        raise ValueError(f"soft_topk: scores must have a token axis, got shape {scores.shape}")
    k = check_budget(k, scores.shape[-1], "soft_topk")
    dtype = _compute_dtype(scores.dtype)
    if mask is None:
        mask = jnp.ones(scores.shape, bool)
    else:
        mask = jnp.broadcast_to(jnp.asarray(mask).astype(bool), scores.shape)
    tau = jnp.asarray(tau, dtype)
    batch_shape = scores.shape[:-1]
    if tau.ndim == len(batch_shape) + 1 and tau.shape[-1] == 1:
        tau = jnp.broadcast_to(tau, batch_shape + (1,))
    else:
        tau = jnp.broadcast_to(tau, batch_shape)[..., None]
    out = _soft_topk(k, int(max_iter), scores.astype(dtype), tau, mask)
    return out.astype(scores.dtype)
