"""Baseline selectors at the same budget: random, uniform, spatial, all (capped), oracle, learned."""

import numpy as np
import pytest

from sparsewsi.selection import SELECTORS, hard_topk, pad_selections, select_indices


def grid_coords(rows, cols, step=224):
    ys, xs = np.mgrid[0:rows, 0:cols]
    return np.stack([xs.ravel() * step, ys.ravel() * step], 1)


def test_every_selector_returns_k_distinct_valid_tokens_in_slide_order():
    n, k = 500, 32
    rng = np.random.default_rng(0)
    mask = rng.random(n) < 0.8
    coords = grid_coords(20, 25)
    evidence = np.zeros(n, bool)
    evidence[[3, 50, 51, 400]] = True
    for method in SELECTORS:
        sel = select_indices(method, n, k, mask=mask, scores=rng.standard_normal(n), coords=coords,
                             evidence=evidence & mask, seed=1, cap=100)
        expected = 100 if method == "all" else k
        assert len(sel) == expected, method
        assert np.all(np.diff(sel) > 0), method
        assert np.all(mask[sel]), method


def test_learned_equals_hard_topk_and_uniform_is_evenly_spaced():
    rng = np.random.default_rng(1)
    scores = rng.standard_normal(1000)
    sel = select_indices("learned", 1000, 32, scores=scores)
    np.testing.assert_array_equal(sel, np.asarray(hard_topk(scores[None].astype(np.float32), 32).indices[0]))
    np.testing.assert_array_equal(select_indices("uniform", 10, 4), [0, 3, 6, 9])
    assert len(select_indices("all", 50, 4)) == 50


def test_random_is_seeded():
    a = select_indices("random", 1000, 32, seed=3)
    np.testing.assert_array_equal(a, select_indices("random", 1000, 32, seed=3))
    assert not np.array_equal(a, select_indices("random", 1000, 32, seed=4))


def test_spatial_covers_the_tissue():
    coords = grid_coords(40, 40)
    sel = select_indices("spatial", 1600, 16, coords=coords)
    xy = coords[sel] / 224
    # 16 tokens from a 40 x 40 grid: every quadrant of the slide gets some.
    quadrants = {(int(x >= 20), int(y >= 20)) for x, y in xy}
    assert quadrants == {(0, 0), (0, 1), (1, 0), (1, 1)}
    # nearest-neighbour spacing is far above the patch pitch (not a clump)
    d = np.sqrt(((xy[:, None] - xy[None]) ** 2).sum(-1)) + np.eye(16) * 1e9
    assert d.min(1).mean() > 5
    dup = np.zeros((100, 2))  # all coordinates equal: falls back to evenly spaced tokens
    assert len(select_indices("spatial", 100, 8, coords=dup)) == 8


def test_oracle_takes_evidence_first():
    evidence = np.zeros(300, bool)
    evidence[[10, 20, 290]] = True
    sel = select_indices("oracle", 300, 8, evidence=evidence, seed=0)
    assert set([10, 20, 290]) <= set(sel.tolist()) and len(sel) == 8
    many = np.zeros(300, bool)
    many[::3] = True
    assert np.all(many[select_indices("oracle", 300, 8, evidence=many)])


def test_errors_and_padding():
    with pytest.raises(ValueError, match="unknown selector"):
        select_indices("best", 10, 2)
    with pytest.raises(ValueError, match="needs token coordinates"):
        select_indices("spatial", 10, 2)
    with pytest.raises(ValueError, match="needs the scorer"):
        select_indices("learned", 10, 2)
    with pytest.raises(ValueError, match="evidence"):
        select_indices("oracle", 10, 2)
    idx, valid = pad_selections([np.array([1, 5]), np.array([0, 2, 3])], 3)
    np.testing.assert_array_equal(idx, [[1, 5, 0], [0, 2, 3]])
    np.testing.assert_array_equal(valid, [[True, True, False], [True, True, True]])
    with pytest.raises(ValueError, match="exceed the budget"):
        pad_selections([np.arange(4)], 3)
