"""SparseLearn operators: Soft Top-K (OT), Hard Top-K, scorer, VP noise gate, diagonal denoiser."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from scipy import optimize, special

from sparsewsi.selection import (
    DiagonalDenoiser,
    Scorer,
    VPNoiseGate,
    cosine_temperature,
    gather_tokens,
    hard_topk,
    soft_topk,
    vp_noise,
)
from sparsewsi.selection.hard_topk import topk_to_mask

# ---------------------------------------------------------------------------------------------
# float64 references


def sinkhorn_topk_mask(x, k, tau, mask=None, tol=1e-12, max_iter=1_000_000):
    """Plain float64 log-domain Sinkhorn on the Xie et al. OT problem (anchors 0 and 1, squared cost).

    Potentials are kept in units of eps. Returns N * P[:, selected] on the valid tokens (0 on padding).
    """
    x = np.asarray(x, np.float64)
    valid = np.ones(x.shape, bool) if mask is None else np.asarray(mask, bool)
    xv = x[valid]
    n = xv.size
    eps = 2.0 * tau
    cost_dropped, cost_selected = xv**2 / eps, (xv - 1.0) ** 2 / eps
    log_a = -np.log(n)
    log_b_dropped, log_b_selected = np.log((n - k) / n), np.log(k / n)
    g_dropped = g_selected = 0.0
    for it in range(max_iter):
        f = log_a - np.logaddexp(g_dropped - cost_dropped, g_selected - cost_selected)
        g_dropped = log_b_dropped - special.logsumexp(f - cost_dropped)
        g_selected = log_b_selected - special.logsumexp(f - cost_selected)
        if it % 10 == 0:
            row = np.exp(f + g_dropped - cost_dropped) + np.exp(f + g_selected - cost_selected)
            if np.abs(row * n - 1.0).max() < tol:
                break
    else:
        raise AssertionError("reference Sinkhorn did not converge")
    out = np.zeros(x.shape)
    out[valid] = n * np.exp(f + g_selected - cost_selected)
    return out


def float64_topk_mask(x, k, tau):
    """High-precision closed form (sigmoid with a bracketed root for the threshold)."""
    x = np.asarray(x, np.float64)

    def excess(t):
        return special.expit((x - t) / tau).sum() - k

    t = optimize.brentq(excess, x.min() - 50 * tau - 1, x.max() + 50 * tau + 1, xtol=1e-15, rtol=1e-15, maxiter=500)
    return special.expit((x - t) / tau)


def score_batch(kind, n, seed):
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        return rng.standard_normal(n)
    if kind == "heavy_tailed":
        return rng.standard_t(df=2, size=n)
    if kind == "near_ties":
        return np.round(rng.standard_normal(n), 1) + 1e-5 * rng.standard_normal(n)
    raise ValueError(kind)


# ---------------------------------------------------------------------------------------------
# Soft Top-K forward


@pytest.mark.parametrize("kind", ["gaussian", "heavy_tailed", "near_ties"])
@pytest.mark.parametrize("n,k,tau", [(9, 3, 0.5), (257, 16, 0.2), (1000, 32, 1.0), (1000, 100, 0.1)])
def test_soft_topk_equals_float64_sinkhorn(kind, n, k, tau):
    x = score_batch(kind, n, seed=n + k)
    ref = sinkhorn_topk_mask(x, k, tau)
    ours = np.asarray(soft_topk(jnp.asarray(x, jnp.float32), k, tau))
    assert np.abs(ours - ref).max() <= 1e-5
    assert abs(ref.sum() - k) < 1e-9


def test_soft_topk_padded_bags_equal_sinkhorn_on_valid_tokens():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 300))
    mask = np.zeros((3, 300), bool)
    mask[0, :300] = True
    mask[1, :123] = True
    mask[2, rng.permutation(300)[:40]] = True
    ours = np.asarray(soft_topk(jnp.asarray(x, jnp.float32), 8, 0.3, jnp.asarray(mask)))
    for b in range(3):
        ref = sinkhorn_topk_mask(x[b], 8, 0.3, mask[b])
        assert np.abs(ours[b] - ref).max() <= 1e-5
        assert np.all(ours[b][~mask[b]] == 0)


@pytest.mark.parametrize("n", [1024, 4096, 65536])
@pytest.mark.parametrize("tau", [0.01, 0.1, 2.0])
def test_soft_topk_mass_is_k(n, tau):
    x = jax.random.normal(jax.random.key(n), (2, n)) * 3.0
    m = soft_topk(x, 32, tau)
    assert m.dtype == jnp.float32
    rel = np.abs(np.asarray(m.sum(-1), np.float64) - 32) / 32
    assert rel.max() <= 1e-4
    assert float(m.min()) >= 0 and float(m.max()) <= 1


def test_soft_topk_bfloat16_input_solves_in_float32():
    x = jax.random.normal(jax.random.key(1), (2, 4096))
    m16 = soft_topk(x.astype(jnp.bfloat16), 32, 0.2)
    assert m16.dtype == jnp.bfloat16
    m32 = soft_topk(x.astype(jnp.bfloat16).astype(jnp.float32), 32, 0.2)
    np.testing.assert_allclose(np.asarray(m16, np.float32), np.asarray(m32), atol=4e-3)
    assert abs(float(m32.sum(-1)[0]) - 32) / 32 <= 1e-4


def test_few_valid_tokens_get_full_mass_and_empty_bags_none():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 64)), jnp.float32)
    mask = np.zeros((3, 64), bool)
    mask[0, :5] = True  # fewer valid tokens than k
    mask[1, :8] = True  # exactly k
    m = soft_topk(x, 8, 0.1, jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(m), mask.astype(np.float32))
    grads = jax.grad(lambda s: jnp.sum(soft_topk(s, 8, 0.1, jnp.asarray(mask)) * jnp.arange(64.0)))(x)
    assert np.all(np.asarray(grads) == 0)


def test_extreme_scores_stay_finite():
    cases = [
        jnp.concatenate([jnp.full((50,), 1e4), jnp.full((50,), -1e4)]),
        jnp.zeros((100,)),
        jnp.linspace(-1e4, 1e4, 100),
        jnp.asarray(np.random.default_rng(0).choice([-1e4, 1e4, 0.0], 100), jnp.float32),
    ]
    for x in cases:
        for tau in (1e-3, 0.1, 10.0):
            m, vjp = jax.vjp(lambda s, t: soft_topk(s, 10, t), x, jnp.float32(tau))
            gx, gtau = vjp(jnp.linspace(-1, 1, 100))
            assert np.all(np.isfinite(np.asarray(m)))
            assert np.all(np.isfinite(np.asarray(gx))) and np.isfinite(float(gtau))
            assert abs(float(m.sum()) - 10) <= 1e-3
    equal = soft_topk(jnp.zeros((100,)), 10, 0.1)
    np.testing.assert_allclose(np.asarray(equal), 0.1, atol=1e-6)


def test_invalid_budgets_raise_clear_errors():
    x = jnp.zeros((4, 16))
    with pytest.raises(ValueError, match="k must be >= 1"):
        soft_topk(x, 0, 0.1)
    with pytest.raises(ValueError, match="larger than the bag length"):
        soft_topk(x, 17, 0.1)
    with pytest.raises(TypeError, match="Python int"):
        soft_topk(x, 2.5, 0.1)
    with pytest.raises(ValueError, match="k must be >= 1"):
        hard_topk(x, -1)
    with pytest.raises(ValueError, match="larger than the bag length"):
        hard_topk(x, 17)


# ---------------------------------------------------------------------------------------------
# Soft Top-K gradients


@pytest.mark.parametrize("kind", ["gaussian", "heavy_tailed", "near_ties"])
@pytest.mark.parametrize("n,k,tau", [(20, 5, 0.3), (200, 16, 1.0), (200, 16, 0.1)])
def test_gradient_matches_float64_finite_differences(kind, n, k, tau):
    x = score_batch(kind, n, seed=7 * n + k)
    w = np.random.default_rng(1).standard_normal(n)

    def loss64(xs, t):
        return float(np.dot(w, float64_topk_mask(xs, k, t)))

    gx, gtau = jax.grad(lambda s, t: jnp.dot(jnp.asarray(w, jnp.float32), soft_topk(s, k, t)), argnums=(0, 1))(
        jnp.asarray(x, jnp.float32), jnp.float32(tau)
    )
    h = 1e-6
    fd_x = np.array([(loss64(x + h * e, tau) - loss64(x - h * e, tau)) / (2 * h) for e in np.eye(n)])
    fd_tau = (loss64(x, tau + h) - loss64(x, tau - h)) / (2 * h)
    rel = np.linalg.norm(np.asarray(gx, np.float64) - fd_x) / np.linalg.norm(fd_x)
    assert rel <= 1e-4
    assert abs(float(gtau) - fd_tau) <= 1e-4 * max(abs(fd_tau), 1e-3)


def test_check_grads_float64():
    from jax.test_util import check_grads

    with jax.enable_x64(True):
        x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 50)), jnp.float64)
        mask = jnp.arange(50)[None, :] < jnp.array([[50], [31]])
        w = jnp.asarray(np.random.default_rng(4).standard_normal((2, 50)))

        def f(s, t):
            return jnp.sum(w * soft_topk(s, 6, t, mask))

        check_grads(f, (x, jnp.float64(0.4)), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)
        check_grads(lambda s: soft_topk(s, 6, 0.4, mask), (x,), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_vmap_and_jit_agree_with_batched_call():
    x = jax.random.normal(jax.random.key(5), (4, 512))
    batched = soft_topk(x, 32, 0.5)
    mapped = jax.jit(jax.vmap(lambda s: soft_topk(s, 32, 0.5)))(x)
    np.testing.assert_allclose(np.asarray(batched), np.asarray(mapped), atol=1e-6)
    g1 = jax.grad(lambda s: jnp.sum(soft_topk(s, 32, 0.5) ** 2))(x)
    g2 = jax.vmap(jax.grad(lambda s: jnp.sum(soft_topk(s, 32, 0.5) ** 2)))(x)
    np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), atol=1e-6)


def test_per_bag_temperatures():
    x = jax.random.normal(jax.random.key(6), (3, 200))
    taus = jnp.array([0.1, 0.5, 2.0])
    m = soft_topk(x, 10, taus)
    for b in range(3):
        np.testing.assert_allclose(np.asarray(m[b]), np.asarray(soft_topk(x[b], 10, float(taus[b]))), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Hard Top-K


def test_hard_topk_matches_numpy_in_slide_order():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 1000)).astype(np.float32)
    sel = jax.jit(lambda s: hard_topk(s, 32))(jnp.asarray(x))
    for b in range(5):
        expected = np.sort(np.argsort(-x[b])[:32])
        np.testing.assert_array_equal(np.asarray(sel.indices[b]), expected)
    assert bool(sel.valid.all())


def test_hard_topk_never_picks_padding_first():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 100)).astype(np.float32)
    x[:, 90:] = 100.0  # padded tokens with huge scores
    mask = np.ones((2, 100), bool)
    mask[:, 90:] = False
    mask[1, 5:90] = False  # only 5 valid tokens in the second bag
    sel = hard_topk(jnp.asarray(x), 8, jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(sel.indices[0]), np.sort(np.argsort(-x[0, :90])[:8]))
    assert bool(sel.valid[0].all())
    np.testing.assert_array_equal(np.asarray(sel.valid[1]), [True] * 5 + [False] * 3)
    np.testing.assert_array_equal(np.asarray(sel.indices[1, :5]), np.arange(5))
    assert np.all(~mask[1][np.asarray(sel.indices[1, 5:])])


def test_gather_and_mask_helpers():
    tokens = jnp.arange(2 * 10 * 3, dtype=jnp.float32).reshape(2, 10, 3)
    idx = jnp.array([[0, 4, 9], [1, 2, 3]])
    out = gather_tokens(tokens, idx)
    assert out.shape == (2, 3, 3)
    np.testing.assert_array_equal(np.asarray(out[0, 1]), np.asarray(tokens[0, 4]))
    sel = hard_topk(jnp.arange(10.0)[None], 3)
    np.testing.assert_array_equal(np.asarray(topk_to_mask(sel, 10))[0], [0] * 7 + [1] * 3)


def test_low_temperature_soft_mask_selects_what_hard_topk_selects():
    rng = np.random.default_rng(2)
    for n, k in [(100, 5), (4096, 32)]:
        x = rng.permutation(n).astype(np.float32) / n * 10  # distinct, no ties at the boundary
        mask_soft = np.asarray(soft_topk(jnp.asarray(x), k, 2e-5))
        hard = np.asarray(topk_to_mask(hard_topk(jnp.asarray(x[None]), k), n))[0]
        np.testing.assert_array_equal(mask_soft > 0.5, hard > 0.5)
        np.testing.assert_allclose(mask_soft, hard, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Modules


def test_diagonal_denoiser_leaks_nothing_between_tokens():
    model = DiagonalDenoiser(16, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 12, 16))
    base = model(x)
    for j in (0, 5, 11):
        changed = model(x.at[:, j].add(jax.random.normal(jax.random.key(j + 1), (2, 16)) * 5))
        others = np.delete(np.arange(12), j)
        np.testing.assert_array_equal(np.asarray(changed[:, others]), np.asarray(base[:, others]))
        assert not np.allclose(np.asarray(changed[:, j]), np.asarray(base[:, j]))
    # Identity-masked attention equals an explicit masked softmax attention with V/O projections.
    h = model.ln1(x)
    scores = jnp.einsum("bnd,bmd->bnm", h, h)
    eye = jnp.eye(12, dtype=bool)
    attn = jax.nn.softmax(jnp.where(eye, scores, -jnp.inf), axis=-1)
    explicit = x + model.out(jnp.einsum("bnm,bmd->bnd", attn, model.value(h)))
    explicit = explicit + model.fc2(jax.nn.gelu(model.fc1(model.ln2(explicit)), approximate=False))
    np.testing.assert_allclose(np.asarray(base), np.asarray(explicit), atol=1e-5)


def test_diagonal_denoiser_noise_level_keeps_clean_tokens_unchanged():
    """Residuals scaled by the noise level: alpha = 1 (as every selected token at inference) -> identity."""
    model = DiagonalDenoiser(16, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 12, 16))
    alpha = jnp.concatenate([jnp.ones((2, 4)), jnp.full((2, 4), 0.5), jnp.zeros((2, 4))], axis=1)
    out = model(x, 1.0 - alpha)
    np.testing.assert_array_equal(np.asarray(out[:, :4]), np.asarray(x[:, :4]))
    np.testing.assert_allclose(np.asarray(out[:, 8:]), np.asarray(model(x)[:, 8:]), atol=1e-6)  # pure noise: full block
    half = x[:, 4:8] + 0.5 * model.out(model.value(model.ln1(x[:, 4:8])))
    half = half + 0.5 * model.fc2(jax.nn.gelu(model.fc1(model.ln2(half)), approximate=False))
    np.testing.assert_allclose(np.asarray(out[:, 4:8]), np.asarray(half), atol=1e-5)
    grads = jax.grad(lambda m: jnp.sum(m(x, 1.0 - alpha)[:, 4:] ** 2))(model)
    assert float(jnp.abs(grads.fc2.kernel[...]).sum()) > 0  # noisy tokens still train it


def test_standardize_bag_robust_matches_numpy_and_ignores_outliers():
    from sparsewsi.selection.sparselearn import standardize_bag, standardize_bag_robust

    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 41, 8)).astype(np.float32) * 3 + 5
    mask = np.ones((3, 41), bool)
    mask[1, 30:] = False  # even count
    mask[2, 1:] = False   # a single token: centred to 0
    got = np.asarray(standardize_bag_robust(jnp.asarray(x), jnp.asarray(mask)))
    for b in range(3):
        v = x[b][mask[b]].astype(np.float64)
        med = np.median(v, 0)
        mad = np.median(np.abs(v - med), 0)
        np.testing.assert_allclose(got[b][mask[b]], (v - med) / (1.4826 * mad + 1e-6), rtol=1e-5, atol=1e-5)
        assert np.all(got[b][~mask[b]] == 0)
    # A 32-token crop holding 3 strong outliers ("evidence") of a 400-token bag: robust statistics
    # place the outliers where the whole bag does; mean / std shrink them.
    bag = rng.normal(size=(1, 400, 8)).astype(np.float32)
    bag[0, :3] += 8.0
    crop = np.concatenate([bag[:, :3], bag[:, 3 + rng.choice(397, 29, replace=False)]], axis=1)
    for fn, tol in ((standardize_bag_robust, 1.5), (standardize_bag, None)):
        whole = np.asarray(fn(jnp.asarray(bag)))[0, :3]
        part = np.asarray(fn(jnp.asarray(crop)))[0, :3]
        gap = np.abs(whole - part).mean()
        if tol is not None:
            assert gap < tol, gap
        else:
            assert gap > 3.0, gap  # the non-robust version moves them a lot


def test_vp_noise_gate_limits_and_variance():
    key = jax.random.key(0)
    x = jax.random.normal(jax.random.key(1), (4, 2048, 64))
    gate = VPNoiseGate(normalize=False)
    ones = jnp.ones((4, 2048))
    np.testing.assert_array_equal(np.asarray(gate(x, ones, key)), np.asarray(x))
    pure_noise = gate(x, jnp.zeros((4, 2048)), key)
    assert abs(float(jnp.var(pure_noise)) - 1.0) < 0.02
    assert abs(float(jnp.mean(pure_noise))) < 0.01
    assert abs(float(jnp.mean(pure_noise * x))) < 0.01  # independent of the input
    for a in (0.1, 0.5, 0.9):
        mixed = gate(x, jnp.full((4, 2048), a), key)
        assert abs(float(jnp.var(mixed)) - 1.0) < 0.02
        corr = float(jnp.mean(mixed * x))
        assert abs(corr - np.sqrt(a)) < 0.02
    # deterministic for a key, fresh for another key
    np.testing.assert_array_equal(np.asarray(gate(x, 0.5 * ones, key)), np.asarray(gate(x, 0.5 * ones, key)))
    assert not np.allclose(np.asarray(gate(x, 0.5 * ones, key)), np.asarray(gate(x, 0.5 * ones, jax.random.key(9))))
    # normalising gate: badly scaled features come out standardised before mixing
    scaled = VPNoiseGate(normalize=True)(x * 50 + 3, ones, key)
    np.testing.assert_allclose(np.asarray(scaled), np.asarray(x - x.mean(-1, keepdims=True)) / np.asarray(x.std(-1, keepdims=True)), atol=1e-3)


def test_noise_gate_gradient_is_finite_through_soft_topk():
    x = jax.random.normal(jax.random.key(2), (2, 256, 8))
    scores = jax.random.normal(jax.random.key(3), (2, 256)) * 20  # many exactly-saturated masks
    noise = jax.random.normal(jax.random.key(4), x.shape)

    def loss(s):
        return jnp.sum(vp_noise(x, soft_topk(s, 4, 0.05), noise) ** 2)

    g = jax.grad(loss)(scores)
    assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_scorer_is_mask_aware_and_standardised(kind):
    model = Scorer(24, kind=kind, hidden=32, depth=1, num_heads=4, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 40, 24))
    mask = jnp.arange(40)[None, :] < jnp.array([[40], [25]])
    s = model(x, mask)
    assert s.shape == (2, 40) and s.dtype == jnp.float32
    s1 = np.asarray(s[1, :25])
    assert abs(s1.mean()) < 1e-5 and abs(s1.std() - 1) < 1e-3
    assert np.all(np.asarray(s[1, 25:]) == 0)
    # Changing padded tokens changes no valid score.
    x2 = x.at[1, 25:].set(1e3)
    np.testing.assert_allclose(np.asarray(model(x2, mask)[1, :25]), s1, atol=1e-5)


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_scorer_squares_by_hand(kind):
    """``squares``: the backbone also sees log1p(x^2) of its raw input (not of the LayerNorm output)."""
    model = Scorer(6, kind=kind, hidden=8, depth=1, num_heads=2, squares=True, standardize=False, rngs=nnx.Rngs(1))
    x = 3.0 * jax.random.normal(jax.random.key(2), (1, 10, 6))
    b = model.backbone
    if kind == "mlp":
        assert b.fc1.kernel[...].shape == (12, 8)
        h = jnp.concatenate([b.norm(x), jnp.log1p(x * x)], -1)
        want = b.fc2(jax.nn.gelu(b.fc1(h), approximate=False))[..., 0]
        np.testing.assert_allclose(np.asarray(model(x)), np.asarray(want), rtol=1e-5, atol=1e-6)
        # With the weights on LayerNorm(x) zeroed only the squares remain: a patch and its mirror
        # image across the slide's typical value (x -> -x) score alike.
        b.fc1.kernel[...] = b.fc1.kernel[...].at[:6].set(0.0)
        np.testing.assert_allclose(np.asarray(model(x)), np.asarray(model(-x)), rtol=1e-5, atol=1e-6)
    else:
        assert b.proj.kernel[...].shape == (12, 8)
        plain = Scorer(6, kind=kind, hidden=8, depth=1, num_heads=2, standardize=False, rngs=nnx.Rngs(1))
        plain.backbone.blocks = b.blocks
        plain.backbone.norm, plain.backbone.head = b.norm, b.head
        # The same network on the widened input: its projection of concat(x, log1p(x^2)).
        plain.backbone.proj = nnx.Linear(12, 8, rngs=nnx.Rngs(0))
        plain.backbone.proj.kernel[...], plain.backbone.proj.bias[...] = b.proj.kernel[...], b.proj.bias[...]
        xs = jnp.concatenate([x, jnp.log1p(x * x)], -1)
        np.testing.assert_allclose(np.asarray(model(x)), np.asarray(plain.backbone(xs)), rtol=1e-5, atol=1e-6)


def test_cosine_temperature_schedule():
    assert float(cosine_temperature(0)) == pytest.approx(2.0)
    assert float(cosine_temperature(1000)) == pytest.approx(1.05)
    assert float(cosine_temperature(2000)) == pytest.approx(0.1)
    assert float(cosine_temperature(10_000)) == pytest.approx(0.1)
    steps = np.arange(0, 2001, 50)
    values = np.asarray(jax.vmap(cosine_temperature)(jnp.asarray(steps)))
    assert np.all(np.diff(values) < 0)
    assert float(cosine_temperature(5, start=1.0, end=0.5, num_steps=10)) == pytest.approx(0.75)


# ---------------------------------------------------------------------------------------------
# Sharding


def test_operators_sharded_over_8_devices_match_single_device():
    assert jax.device_count() == 8, "conftest should simulate 8 CPU devices"
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    batch = NamedSharding(mesh, P("data"))
    x = jax.random.normal(jax.random.key(0), (8, 2048))
    mask = jnp.arange(2048)[None, :] < (jnp.arange(8)[:, None] * 200 + 600)
    w = jax.random.normal(jax.random.key(1), (8, 2048))

    def fwd_bwd(s, m):
        value, grad = jax.value_and_grad(lambda s: jnp.sum(w * soft_topk(s, 32, 0.2, m)))(s)
        return soft_topk(s, 32, 0.2, m), grad, hard_topk(s, 32, m).indices

    single = jax.jit(fwd_bwd)(x, mask)
    sharded_fn = jax.jit(fwd_bwd, in_shardings=(batch, batch), out_shardings=(batch, batch, batch))
    sharded = sharded_fn(jax.device_put(x, batch), jax.device_put(mask, batch))
    assert sharded[0].sharding.spec == P("data")
    for a, b in zip(single, sharded):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_hard_topk_compiles_without_a_full_sort():
    """Only the k winners are sorted (slide order); the N-long axis goes through a partial top-k."""
    import re

    n = 65536
    hlo = jax.jit(lambda s: hard_topk(s, 32)).lower(jnp.zeros((2, n))).compile().as_text()
    sorts = [line for line in hlo.splitlines() if re.search(r"=\s*\S*\[[^\]]*\]\S*\s+sort\(", line)]
    assert sorts, "expected the small slide-order sort of the k picks"
    assert not any(str(n) in line.split("sort(")[0] for line in sorts), sorts


def test_interleave_noise_slots_keeps_the_bag_in_order():
    from sparsewsi.selection.sparselearn import interleave_noise_slots

    b, n, d, p = 3, 5, 2, 4
    x = jnp.arange(1.0, 1.0 + b * n * d).reshape(b, n, d)
    alpha = jnp.linspace(0.1, 1.0, b * n).reshape(b, n)
    mask = jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], bool)
    key = jax.random.key(0)
    xo, ao, mo = interleave_noise_slots(x, alpha, mask, p, key)
    assert xo.shape == (b, n + p, d) and ao.shape == mo.shape == (b, n + p)
    for r in range(b):
        real = np.asarray(jnp.any(xo[r] != 0, -1))
        assert real.sum() == n
        np.testing.assert_array_equal(xo[r][real], x[r])  # every token once, in bag order
        np.testing.assert_array_equal(ao[r][real], alpha[r])
        np.testing.assert_array_equal(mo[r][real], mask[r])
        assert (np.asarray(ao[r])[~real] == 0).all() and np.asarray(mo[r])[~real].all()  # valid noise slots
    # places differ between rows and keys; the same key gives the same places
    again = interleave_noise_slots(x, alpha, mask, p, key)[0]
    np.testing.assert_array_equal(xo, again)
    other = interleave_noise_slots(x, alpha, mask, p, jax.random.key(1))[0]
    assert not np.array_equal(np.asarray(xo != 0), np.asarray(other != 0))
