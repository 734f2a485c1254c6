"""The SparseLearn training-time pieces: the variance-preserving noise gate and the denoiser.

Training path (see ``docs`` in the README):

    alpha = soft_topk(scores, k, tau)                      # sum(alpha) = k, alpha in [0, 1]
    x~_i  = sqrt(alpha_i) * norm(x_i) + sqrt(1 - alpha_i) * eps_i,   eps ~ N(0, I)
    x^    = DiagonalDenoiser(x~)

Neither piece is used at inference, where Hard Top-K gathers the clean tokens instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array


def _safe_sqrt(a: Array) -> Array:
    # sqrt has an infinite derivative at 0; alpha is exactly 0 on padding and underflows for
    # dropped tokens. The double-where keeps that gradient at 0 instead of inf * 0 = NaN.
    positive = a > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, a, 1.0)), 0.0)


def vp_noise(x: Array, alpha: Array, noise: Array) -> Array:
    """Variance-preserving mix: sqrt(alpha) * x + sqrt(1 - alpha) * noise.

    x, noise: [..., N, D]; alpha: [..., N] in [0, 1]. For unit-variance x and noise the output has
    unit variance for every alpha.
    """
    alpha = jnp.clip(alpha.astype(jnp.float32), 0.0, 1.0)[..., None]
    out = _safe_sqrt(alpha) * x.astype(jnp.float32) + _safe_sqrt(1.0 - alpha) * noise.astype(jnp.float32)
    return out.astype(x.dtype)


def standardize_tokens(x: Array, eps: float = 1e-6) -> Array:
    """Parameter-free per-token standardisation over the feature axis: [..., D] -> mean 0, var 1."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, -1, keepdims=True)
    var = jnp.var(xf, -1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def standardize_bag(x: Array, mask: Array | None = None, eps: float = 1e-6) -> Array:
    """Per-feature standardisation over a bag's valid tokens: x [..., N, D], mask [..., N] -> [..., N, D].

    Each feature column gets zero mean and unit variance across the bag (padding -> 0). Use it for
    encoders whose patch features share a large common component (e.g. a random-weight ViT whose
    CLS output barely depends on the patch): per-token standardisation would keep them identical.
    """
    xf = x.astype(jnp.float32)
    if mask is None:
        mask = jnp.ones(x.shape[:-1], bool)
    m = mask.astype(jnp.float32)[..., None]
    n = jnp.maximum(jnp.sum(m, -2, keepdims=True), 1.0)
    mean = jnp.sum(xf * m, -2, keepdims=True) / n
    var = jnp.sum(jnp.square(xf - mean) * m, -2, keepdims=True) / n
    return (((xf - mean) * jax.lax.rsqrt(var + eps)) * m).astype(x.dtype)


def _masked_median(x: Array, mask: Array) -> Array:
    """Median over axis -2 of the valid rows: x [..., N, D] float32, mask [..., N] bool -> [..., 1, D]."""
    big = jnp.finfo(x.dtype).max
    xs = jnp.sort(jnp.where(mask[..., None], x, big), axis=-2)  # padding sorts last
    n = jnp.sum(mask, -1).astype(jnp.int32)[..., None, None]  # [..., 1, 1]
    lo = jnp.maximum((n - 1) // 2, 0)
    hi = jnp.maximum(n // 2, 0)
    idx_shape = xs.shape[:-2] + (1, xs.shape[-1])
    a = jnp.take_along_axis(xs, jnp.broadcast_to(lo, idx_shape), axis=-2)
    b = jnp.take_along_axis(xs, jnp.broadcast_to(hi, idx_shape), axis=-2)
    return jnp.where(n > 0, 0.5 * (a + b), 0.0)


def standardize_bag_robust(x: Array, mask: Array | None = None, eps: float = 1e-6) -> Array:
    """Per-feature robust standardisation over a bag's valid tokens: (x - median) / (1.4826 * MAD).

    Like :func:`standardize_bag`, but the centre and scale ignore the few extreme tokens a bag may
    hold, so a short bag that is mostly evidence (a region crop) and the whole slide it came from
    put the same token at nearly the same place: the mean and standard deviation of 32 tokens of
    which 3 are evidence outliers are pulled towards them, the median and MAD are not.
    Shapes as :func:`standardize_bag`; padding -> 0. Sorting costs O(N log N) per feature.
    """
    xf = x.astype(jnp.float32)
    if mask is None:
        mask = jnp.ones(x.shape[:-1], bool)
    mask = mask.astype(bool)
    med = _masked_median(xf, mask)
    mad = _masked_median(jnp.abs(xf - med), mask)
    scale = 1.4826 * mad + eps  # MAD of a normal sample = 0.6745 sigma
    return jnp.where(mask[..., None], (xf - med) / scale, 0.0).astype(x.dtype)


def interleave_noise_slots(x: Array, alpha: Array, mask: Array, num_noise: int,
                           key: Array) -> tuple[Array, Array, Array]:
    """Insert ``num_noise`` pure-noise slots (gate mask 0) among a bag's tokens, at random places.

    A reader trained on short bags whose every token passes the gate (N <= k) never meets the
    hundreds of noise tokens the Soft Top-K leaves in a whole slide; these slots stand in for them. Real
    tokens keep their order; padding stays padding; the new slots are valid tokens whose features
    are 0 (the gate replaces them by noise whatever they hold).

    Args:
      x: [B, N, D] features; alpha: [B, N] gate mask; mask: [B, N] validity; key: PRNG key.
    Returns:
      (x [B, N + P, D], alpha [B, N + P], mask [B, N + P]) with P = ``num_noise``.
    """
    b, n = alpha.shape
    slots = n + num_noise
    order = jnp.argsort(jax.random.uniform(key, (b, slots)), axis=1)
    rows = jnp.arange(b)[:, None]
    is_real = jnp.zeros((b, slots), bool).at[rows, order[:, :n]].set(True)
    src = jnp.clip(jnp.cumsum(is_real, axis=1) - 1, 0, n - 1)  # the real token each real slot holds
    x_out = jnp.where(is_real[..., None], jnp.take_along_axis(x, src[..., None], axis=1), 0).astype(x.dtype)
    alpha_out = jnp.where(is_real, jnp.take_along_axis(alpha, src, axis=1), 0.0).astype(alpha.dtype)
    mask_out = jnp.where(is_real, jnp.take_along_axis(mask, src, axis=1), True)
    return x_out, alpha_out, mask_out


class VPNoiseGate(nnx.Module):
    """Replaces dropped tokens by isotropic noise while preserving feature variance.

    Features are standardised per token first (``normalize=True``) so that the noise is on the same
    scale as the signal. The noise comes from the key passed in (training code derives it from the
    step), so the gate is deterministic given that key.
    """

    def __init__(self, normalize: bool = True, eps: float = 1e-6):
        self.normalize = normalize
        self.eps = eps

    def __call__(self, x: Array, alpha: Array, key: Array) -> Array:
        """x [B, N, D], alpha [B, N] (the soft mask), key: a PRNG key -> [B, N, D]."""
        if self.normalize:
            x = standardize_tokens(x, self.eps)
        noise = jax.random.normal(key, x.shape, jnp.float32)
        return vp_noise(x, alpha, noise)


class DiagonalDenoiser(nnx.Module):
    """One pre-norm transformer block whose attention mask is the identity.

    With only the diagonal allowed, each softmax row is exactly 1 on the token itself, so attention
    reduces to out_proj(value_proj(x_i)): no N x N matrix is ever formed and no token can copy content
    from another (noisy tokens cannot be restored from clean neighbours). Query/key projections would
    have no effect on the output, so the block has none.
    """

    def __init__(self, dim: int, mlp_ratio: float = 4.0, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.ln1 = nnx.LayerNorm(dim, param_dtype=param_dtype, rngs=rngs)
        self.value = nnx.Linear(dim, dim, param_dtype=param_dtype, rngs=rngs)
        self.out = nnx.Linear(dim, dim, param_dtype=param_dtype, rngs=rngs)
        self.ln2 = nnx.LayerNorm(dim, param_dtype=param_dtype, rngs=rngs)
        hidden = int(dim * mlp_ratio)
        self.fc1 = nnx.Linear(dim, hidden, param_dtype=param_dtype, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, dim, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: Array, noise_level: Array | None = None) -> Array:
        """x [..., N, D] -> [..., N, D]; every output token depends on its own input token only.

        ``noise_level`` [..., N] (the gate's ``1 - alpha``) scales both residual branches, so a clean
        token (alpha = 1) passes unchanged. Inference skips the denoiser and feeds clean tokens to the
        projector; without the scaling the projector and LLM would be trained on denoiser outputs
        they never see at inference (measured on the demo: an LLM trained on clean oracle tokens
        through an unscaled denoiser read them at 46% on held-out slides, without it at 73%).
        """
        g = 1.0 if noise_level is None else noise_level[..., None].astype(x.dtype)
        x = x + g * self.out(self.value(self.ln1(x)))
        return x + g * self.fc2(jax.nn.gelu(self.fc1(self.ln2(x)), approximate=False))
