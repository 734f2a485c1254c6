"""Baseline token selectors at the same budget k, for fair comparisons with the learned scorer.

These run on the host, one bag at a time (numpy): they are evaluation baselines, not trained, and
some (spatial) depend on data-dependent grids. Every selector returns the chosen token indices of one
bag in ascending (slide) order; ``pad_selections`` turns a list of them into the ``[B, k]`` indices +
validity arrays that the jitted model path consumes, exactly like ``hard_topk``'s output.

Selectors (``SELECTORS``):
  learned   top-k by the scorer's scores (the host twin of ``hard_topk``)
  random    k valid tokens uniformly at random (seeded)
  uniform   k evenly spaced valid tokens in bag order (SlideChat's sub-sampling rule)
  spatial   spatial downsampling: the coarsest square grid over the tissue with at least k occupied
            cells, k cells taken evenly in raster order, the token nearest each cell centre
  all       every valid token, evenly sub-sampled to ``cap`` when given (all-token baseline)
  oracle    ground-truth evidence tokens first (evenly spaced if more than k), then random fill
"""

from __future__ import annotations

import numpy as np

SELECTORS = ("learned", "random", "uniform", "spatial", "all", "oracle")


def _valid_indices(num_tokens: int, mask) -> np.ndarray:
    if mask is None:
        return np.arange(num_tokens)
    mask = np.asarray(mask, bool)
    if mask.shape != (num_tokens,):
        raise ValueError(f"mask has shape {mask.shape}, expected ({num_tokens},)")
    return np.flatnonzero(mask)


def evenly_spaced(indices: np.ndarray, count: int) -> np.ndarray:
    """``count`` evenly spaced entries of ``indices`` (all of them when there are not more)."""
    if count >= len(indices):
        return np.asarray(indices)
    positions = np.linspace(0, len(indices) - 1, count).astype(np.int64)  # distinct: spacing >= 1
    return np.asarray(indices)[positions]


def spatial_downsample(coords: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    """Indices (from ``candidates``) of k tokens spread over the slide on a regular grid.

    Args:
      coords: [N, 2] level-0 (x, y) of every token.
      candidates: valid token indices.
    """
    if len(candidates) <= k:
        return np.sort(candidates)
    xy = np.asarray(coords, np.float64)[candidates]
    lo, hi = xy.min(0), xy.max(0)
    extent = max(float((hi - lo).max()), 1.0)

    def occupied(cell):
        cells = np.floor((xy - lo) / cell).astype(np.int64)
        keys = cells[:, 1] * (int(extent / cell) + 2) + cells[:, 0]
        return cells, keys, np.unique(keys)

    # Largest cell size (coarsest grid) with >= k occupied cells, by bisection on the cell size.
    small, large = extent / (2 * len(candidates) + 2), extent * 2
    for _ in range(40):
        mid = np.sqrt(small * large)
        if len(occupied(mid)[2]) >= k:
            small = mid
        else:
            large = mid
    cells, keys, unique_keys = occupied(small)
    chosen_cells = evenly_spaced(unique_keys, k)  # unique keys are in raster order
    centres = (cells + 0.5) * small + lo
    dist = np.square(xy - centres).sum(1)
    picked = []
    for key in chosen_cells:
        members = np.flatnonzero(keys == key)
        picked.append(candidates[members[np.argmin(dist[members])]])
    picked = np.asarray(picked, np.int64)
    if len(picked) < k:  # duplicate coordinates: fewer distinct cells than k, fill evenly
        rest = np.setdiff1d(candidates, picked)
        picked = np.concatenate([picked, evenly_spaced(rest, k - len(picked))])
    return np.sort(picked)


def select_indices(
    method: str,
    num_tokens: int,
    k: int,
    *,
    mask=None,
    scores=None,
    coords=None,
    evidence=None,
    seed: int = 0,
    cap: int | None = None,
) -> np.ndarray:
    """Selects tokens of one bag with a named selector.

    Args:
      method: one of ``SELECTORS``.
      num_tokens: N, the bag length (padded length if a mask is given).
      k: the budget (ignored by ``all``, which uses ``cap``).
      mask: optional [N] bool validity.
      scores: [N] scores, for ``learned``.
      coords: [N, 2] level-0 (x, y), for ``spatial``.
      evidence: [N] bool ground-truth evidence, for ``oracle``.
      seed: RNG seed for ``random`` and the ``oracle`` fill (use e.g. a hash of the question id).
      cap: maximum tokens for ``all``.
    Returns:
      int64 indices in ascending order; min(k, valid tokens) of them (``all``: min(cap, valid)).
    """
    if method not in SELECTORS:
        raise ValueError(f"unknown selector {method!r}; choose from {', '.join(SELECTORS)}")
    if method != "all" and k < 1:
        raise ValueError(f"selector {method!r}: k must be >= 1, got {k}")
    valid = _valid_indices(num_tokens, mask)
    if method == "all":
        return evenly_spaced(valid, cap) if cap is not None else valid
    if method == "uniform":
        return evenly_spaced(valid, k)
    if method == "random":
        rng = np.random.default_rng(seed)
        return np.sort(rng.choice(valid, size=min(k, len(valid)), replace=False))
    if method == "learned":
        if scores is None:
            raise ValueError("selector 'learned' needs the scorer's scores")
        s = np.asarray(scores, np.float64)[valid]
        if len(valid) <= k:
            return valid
        top = np.argpartition(-s, k - 1)[:k]
        return np.sort(valid[top])
    if method == "spatial":
        if coords is None:
            raise ValueError("selector 'spatial' needs token coordinates (coords [N, 2]); this bag has none")
        return spatial_downsample(coords, valid, k)
    # oracle
    if evidence is None:
        raise ValueError("selector 'oracle' needs ground-truth evidence labels (only synthetic data has them)")
    evidence = np.asarray(evidence, bool)[valid]
    chosen = evenly_spaced(valid[evidence], k)
    rest = k - len(chosen)
    if rest > 0:
        others = valid[~evidence]
        rng = np.random.default_rng(seed)
        chosen = np.concatenate([chosen, rng.choice(others, size=min(rest, len(others)), replace=False)])
    return np.sort(chosen)


def pad_selections(selections: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Stacks per-bag selections into ``indices [B, k]`` int32 and ``valid [B, k]`` bool (padding: index 0)."""
    indices = np.zeros((len(selections), k), np.int32)
    valid = np.zeros((len(selections), k), bool)
    for b, sel in enumerate(selections):
        if len(sel) > k:
            raise ValueError(f"bag {b}: {len(sel)} selected tokens exceed the budget k={k}")
        indices[b, : len(sel)] = sel
        valid[b, : len(sel)] = True
    return indices, valid
