"""Level-0 patch coordinates at a target resolution, kept by tissue fraction.

Two sizing modes:

* ``"exact"`` (default): a patch covers exactly ``patch_size * target_mpp`` microns; its level-0
  side is ``patch_size * target_mpp / mpp0`` (a float, e.g. 443.3 px at 0.2527 um/px).
* ``"nominal"``: TRIDENT/CLAM-compatible. The slide's mpp is rounded to a nominal magnification
  (0.265 um/px -> 40x) and the level-0 side is the integer ``patch_size * mag0 / target_mag``
  (448 px for 224 px at 20x on a "40x" slide), whatever the true physical size.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sparsewsi.slides.tissue import TissueMask
from sparsewsi.slides.wsi import LevelChoice, Slide, SlideError, choose_level

NOMINAL_MAGNIFICATIONS = (2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 80.0, 100.0)


def nominal_magnification(mpp: float) -> float:
    """The standard objective magnification closest (in log scale) to 10 / mpp."""
    mag = 10.0 / mpp
    return min(NOMINAL_MAGNIFICATIONS, key=lambda m: abs(np.log(m / mag)))


@dataclasses.dataclass(frozen=True)
class PatchGrid:
    """Kept patches of one slide.

    Attributes:
      coords: (N, 2) int64 level-0 top-left (x, y).
      tissue_fraction: (N,) float32 fraction of each patch on tissue.
      patch_size: output patch side in pixels (e.g. 224).
      patch_size_level0: patch side in level-0 pixels (float in exact mode).
      stride_level0: grid step in level-0 pixels.
      target_mpp: um/px of the output patches (nominal mode: 10 / target magnification).
      level: the pyramid level to read and its remaining resampling factor.
      mode: "exact" or "nominal".
    """

    coords: np.ndarray
    tissue_fraction: np.ndarray
    patch_size: int
    patch_size_level0: float
    stride_level0: float
    target_mpp: float
    level: LevelChoice
    mode: str
    level0_magnification: float
    target_magnification: float
    overlap: int

    def __len__(self) -> int:
        return int(self.coords.shape[0])


def _box_fraction(mask: np.ndarray, x0: np.ndarray, y0: np.ndarray, size: float) -> np.ndarray:
    """Mean of ``mask`` over square boxes [x0, x0+size) x [y0, y0+size) (mask pixel units),
    via an integral image; boxes are snapped outward/inward to whole pixels by rounding."""
    h, w = mask.shape
    ii = np.zeros((h + 1, w + 1), np.int64)
    ii[1:, 1:] = np.cumsum(np.cumsum(mask, 0, dtype=np.int64), 1)
    xa = np.clip(np.round(x0).astype(np.int64), 0, w)
    ya = np.clip(np.round(y0).astype(np.int64), 0, h)
    xb = np.clip(np.round(x0 + size).astype(np.int64), 0, w)
    yb = np.clip(np.round(y0 + size).astype(np.int64), 0, h)
    xb = np.maximum(xb, np.minimum(xa + 1, w))  # at least one mask pixel where the image has one
    yb = np.maximum(yb, np.minimum(ya + 1, h))
    inside = ii[yb, xb] - ii[ya, xb] - ii[yb, xa] + ii[ya, xa]
    full = max(size, 1.0) ** 2  # out-of-image area counts as background
    return (inside / full).astype(np.float32)


def patch_grid(slide: Slide, tissue: TissueMask | None, *, patch_size: int = 224, target_mpp: float = 0.5,
               stride: int | None = None, min_tissue: float = 0.25, mode: str = "exact",
               target_magnification: float | None = None) -> PatchGrid:
    """Grid of level-0 patch coordinates kept where the tissue fraction is >= ``min_tissue``.

    Args:
      slide: an open slide (its mpp and level geometry are used).
      tissue: a mask from :func:`detect_tissue`; None keeps every patch fully inside the slide.
      patch_size: output patch side in pixels.
      target_mpp: output resolution (exact mode).
      stride: grid step in output pixels (default: ``patch_size``, no overlap).
      mode: "exact" or "nominal" (see the module docstring).
      target_magnification: nominal mode only (default 10 / target_mpp, i.e. 20x for 0.5).

    Raises:
      SlideError: the slide is smaller than one patch.
    """
    stride = patch_size if stride is None else int(stride)
    if stride <= 0 or patch_size <= 0:
        raise ValueError(f"patch_size ({patch_size}) and stride ({stride}) must be positive")
    mpp0 = slide.mpp
    if mode == "exact":
        ps0 = patch_size * target_mpp / mpp0
        st0 = stride * target_mpp / mpp0
        mag0 = 10.0 / mpp0
        tmag = 10.0 / target_mpp
    elif mode == "nominal":
        mag0 = nominal_magnification(mpp0)
        tmag = float(target_magnification or round(10.0 / target_mpp, 6))
        ps0 = float(int(round(patch_size * mag0 / tmag)))
        st0 = float(int(round(stride * mag0 / tmag)))
        target_mpp = 10.0 / tmag
    else:
        raise ValueError(f"unknown grid mode {mode!r}; use 'exact' or 'nominal'")
    # In nominal mode the level is chosen on the nominal mpp, as the tools it mimics do.
    eff_mpp0 = mpp0 if mode == "exact" else 10.0 / mag0
    level = choose_level(slide.level_downsamples, eff_mpp0, target_mpp)
    W, H = slide.dimensions
    nx = int(np.floor((W - ps0) / st0)) + 1 if W >= ps0 else 0
    ny = int(np.floor((H - ps0) / st0)) + 1 if H >= ps0 else 0
    if nx <= 0 or ny <= 0:
        raise SlideError(f"{slide.path}: slide {W}x{H} px is smaller than one patch ({ps0:.0f} level-0 px)")
    gx = np.round(np.arange(nx) * st0).astype(np.int64)
    gy = np.round(np.arange(ny) * st0).astype(np.int64)
    xx, yy = np.meshgrid(gx, gy)  # row-major: rows of patches top to bottom
    coords = np.stack([xx.ravel(), yy.ravel()], 1)
    if tissue is None:
        frac = np.ones(len(coords), np.float32)
    else:
        s = tissue.scale
        frac = _box_fraction(tissue.mask, coords[:, 0] / s, coords[:, 1] / s, ps0 / s)
    keep = frac >= min_tissue
    overlap = max(patch_size - stride, 0)
    return PatchGrid(coords=coords[keep], tissue_fraction=frac[keep], patch_size=patch_size,
                     patch_size_level0=float(ps0), stride_level0=float(st0), target_mpp=float(target_mpp),
                     level=level, mode=mode, level0_magnification=float(mag0), target_magnification=float(tmag),
                     overlap=overlap)
