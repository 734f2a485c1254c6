"""Tissue detection on a low-resolution image at a fixed physical resolution.

Recipe (all sizes are physical, so the result does not depend on the scanner's magnification):

1. read the coarsest level that is still at least as fine as ``mask_mpp`` (default 8 um/px) and
   area-downsample it to ``mask_mpp`` (strip by strip, so a slide without low levels never needs
   its full level 0 in memory);
2. HSV saturation, median-filtered; Otsu threshold with a floor (``min_saturation``) so faint
   tissue on an all-white slide does not drive the threshold into background noise;
3. background rules: near-black pixels (scanner padding, converted slides) and pen-like colours
   (strongly blue or green, unlike H&E or most IHC) are removed before morphology;
4. morphological closing with a disk of ``close_um``; objects smaller than ``min_tissue_area_um2``
   removed; holes smaller than ``max_hole_area_um2`` filled.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from sparsewsi.atomic import atomic_path
from scipy import ndimage

from sparsewsi.slides.wsi import Slide, SlideError


@dataclasses.dataclass(frozen=True)
class TissueParams:
    """Parameters of :func:`detect_tissue` (recorded with every feature file)."""

    mask_mpp: float = 8.0
    min_saturation: int = 15  # floor on the Otsu threshold, 0-255
    median_um: float = 56.0  # median filter width
    black_value: int = 40  # max(R,G,B) below this is padding / black, not tissue
    pen_margin: int = 30  # blue/green exceeds red by this much -> pen
    close_um: float = 48.0
    min_tissue_area_um2: float = 40_000.0  # 0.04 mm^2
    max_hole_area_um2: float = 20_000.0


@dataclasses.dataclass(frozen=True)
class TissueMask:
    """A tissue mask (H, W) bool at ``mpp`` um/px; pixel (i, j) covers level-0 box of
    ``scale`` = mpp / level0_mpp pixels starting at (j * scale, i * scale)."""

    mask: np.ndarray
    mpp: float
    scale: float
    threshold: int
    params: TissueParams
    thumbnail: np.ndarray  # (H, W, 3) uint8 RGB image the mask was computed on

    @property
    def tissue_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0


def _otsu(values: np.ndarray) -> int:
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0
    omega = np.cumsum(hist) / total
    mu = np.cumsum(hist * np.arange(256)) / total
    between = (mu[-1] * omega - mu) ** 2 / np.maximum(omega * (1 - omega), 1e-12)
    return int(np.argmax(between))


def _disk(radius: int) -> np.ndarray:
    r = max(int(radius), 0)
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return xx * xx + yy * yy <= r * r


def low_resolution_image(slide: Slide, mpp: float, strip_rows: int = 2048) -> tuple[np.ndarray, float]:
    """The whole slide area-downsampled to about ``mpp`` um/px.

    Returns:
      image: (H, W, 3) uint8.
      scale: level-0 pixels per output pixel (exact, used to map mask pixels to level 0).
    """
    from PIL import Image

    want = mpp / slide.mpp
    # Coarsest level not coarser than wanted (1% tolerance for inexact stored downsamples).
    level = max((i for i, d in enumerate(slide.level_downsamples) if d <= want * 1.01),
                key=lambda i: slide.level_downsamples[i], default=0)
    ds = slide.level_downsamples[level]
    factor = max(1, int(round(want / ds)))  # integer factor -> exact pixel bookkeeping
    arr = slide.level_array(level)
    H, W = arr.shape[:2]
    oh, ow = max(H // factor, 1), max(W // factor, 1)
    out = np.empty((oh, ow, 3), np.uint8)
    rows = max(factor, (strip_rows // factor) * factor)
    for y in range(0, oh * factor, rows):
        y1 = min(y + rows, oh * factor)
        try:
            strip = np.asarray(arr[y:y1, : ow * factor])[..., :3]
        except Exception as err:
            raise SlideError(f"{slide.path}: cannot read level {level} rows {y}..{y1} for tissue detection "
                             f"({type(err).__name__}: {err})") from err
        if factor > 1:
            strip = np.asarray(Image.fromarray(strip).resize((ow, (y1 - y) // factor), Image.BOX))
        out[y // factor: y1 // factor] = strip
    return out, ds * factor


def tissue_from_rgb(rgb: np.ndarray, pixel_um: float, params: TissueParams = TissueParams()) -> tuple[np.ndarray, int]:
    """Tissue mask of an RGB image (H, W, 3) uint8 whose pixels are ``pixel_um`` wide.

    Returns (mask (H, W) bool, saturation threshold used).
    """
    rgb = rgb.astype(np.int16)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx = rgb.max(-1)
    mn = rgb.min(-1)
    sat = np.where(mx > 0, (mx - mn) * 255 // np.maximum(mx, 1), 0).astype(np.uint8)
    k = max(1, int(round(params.median_um / pixel_um)) | 1)
    if k > 1:
        sat = ndimage.median_filter(sat, size=k)
    dark = mx < params.black_value
    pen = ((b - r > params.pen_margin) & (b > g)) | ((g - r > params.pen_margin) & (g > b))
    valid = ~dark & ~pen
    thr = max(_otsu(sat[valid]) if valid.any() else 255, params.min_saturation)
    mask = (sat > thr) & valid
    rad = int(round(params.close_um / pixel_um / 2))
    if rad > 0:
        # Pad before closing so objects touching the border are not eroded by the implicit zero edge.
        mask = ndimage.binary_closing(np.pad(mask, rad), structure=_disk(rad))[rad:-rad, rad:-rad]
    mask &= valid  # closing must not bridge tissue across a pen stroke or padding
    px_area = pixel_um * pixel_um
    hole_px = params.max_hole_area_um2 / px_area
    if hole_px > 0:
        holes = ndimage.binary_fill_holes(mask) & ~mask
        lab, n = ndimage.label(holes)
        if n:
            sizes = np.bincount(lab.ravel())
            small = sizes < hole_px
            small[0] = False
            mask = mask | small[lab]
    lab, n = ndimage.label(mask)
    if n:
        sizes = np.bincount(lab.ravel())
        keep = sizes >= params.min_tissue_area_um2 / px_area
        keep[0] = False
        mask = keep[lab]
    return mask.astype(bool), int(thr)


def detect_tissue(slide: Slide, params: TissueParams = TissueParams()) -> TissueMask:
    """Detect tissue on ``slide`` at ``params.mask_mpp``; see the module docstring."""
    img, scale = low_resolution_image(slide, params.mask_mpp)
    pixel_um = slide.mpp * scale
    mask, thr = tissue_from_rgb(img, pixel_um, params)
    return TissueMask(mask=mask, mpp=pixel_um, scale=scale, threshold=thr, params=params, thumbnail=img)


def save_thumbnail(path: str | os.PathLike, tissue: TissueMask, coords: np.ndarray | None = None,
                   patch_size_level0: float | None = None, max_side: int = 2048) -> None:
    """PNG of the low-resolution image with the tissue outline (green) and patch boxes (blue).

    Args:
      coords: (N, 2) level-0 top-left (x, y) of kept patches, drawn as rectangles.
      patch_size_level0: patch side in level-0 pixels (needed with ``coords``).
    Written atomically (temporary file + rename).
    """
    from PIL import Image, ImageDraw

    img = Image.fromarray(tissue.thumbnail)
    up = 1.0
    if max(img.size) < 512:  # tiny slides: enlarge so the grid is visible
        up = 512 / max(img.size)
    elif max(img.size) > max_side:
        up = max_side / max(img.size)
    if up != 1.0:
        img = img.resize((max(1, round(img.width * up)), max(1, round(img.height * up))), Image.BILINEAR)
    m = Image.fromarray((tissue.mask * 255).astype(np.uint8)).resize(img.size, Image.NEAREST)
    edge = np.asarray(m) > 0
    edge = edge & ~ndimage.binary_erosion(edge, iterations=2)
    arr = np.asarray(img).copy()
    arr[edge] = (0, 200, 0)
    img = Image.fromarray(arr)
    if coords is not None and len(coords):
        if patch_size_level0 is None:
            raise ValueError("save_thumbnail: patch_size_level0 is required with coords")
        draw = ImageDraw.Draw(img)
        f = up / tissue.scale
        s = patch_size_level0 * f
        for x, y in np.asarray(coords):
            draw.rectangle([x * f, y * f, x * f + s, y * f + s], outline=(30, 60, 220))
    with atomic_path(path, suffix=".png") as tmp:
        img.save(tmp, format="PNG")
