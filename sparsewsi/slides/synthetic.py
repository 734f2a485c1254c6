"""Synthetic whole-slide images written with tifffile, for tests, benchmarks and demos.

Two on-disk layouts that tiffslide reads the way it reads real scanner output:

* :func:`write_pyramidal_tiff`: a generic pyramidal TIFF (level 0 with the lower levels in its
  SubIFDs, ``subfiletype=1``), resolution tags in pixels per centimetre (so mpp is recoverable).
* :func:`write_aperio_svs`: an Aperio-style SVS (level 0, a stripped thumbnail, then the lower
  levels as separate tiled IFDs; an ``Aperio Image Library ...|AppMag = 20|MPP = 0.5`` image
  description). ``metadata=None`` matters: with tifffile's own JSON metadata tiffslide sees one level.

:func:`tissue_image` draws tissue-like content (pink/purple blobs with texture on a white
background, optional black scanner padding and a blue pen mark) so tissue detection has something
realistic to find, and returns the ground-truth tissue mask. :data:`FIXTURES` lists the standard
test slides (40x, 20x, non-round mpp, no mpp, odd sizes, 40x without a 20x level) and
:func:`write_fixture` writes one by name.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np


@dataclasses.dataclass(frozen=True)
class SyntheticSlide:
    """Recipe for one synthetic slide: level-0 size, resolution and pyramid.

    ``mpp=None`` writes no resolution at all (no tags, no MPP/AppMag keys): the "no mpp" case.
    ``app_mag`` is the Aperio objective power written into an SVS description (None: omitted).
    ``downsamples`` are the integer factors of the stored levels (first must be 1).
    """

    width: int
    height: int
    mpp: float | None
    downsamples: tuple[int, ...] = (1, 4)
    fmt: str = "svs"  # "svs" | "tiff"
    app_mag: float | None = None
    tile: int = 256
    seed: int = 0
    pen: bool = False
    black_border: bool = False


# The standard fixtures tests use. Sizes are small (a few megapixels) so writing them takes < 1 s.
FIXTURES: dict[str, SyntheticSlide] = {
    "svs_40x": SyntheticSlide(3000, 2400, 0.25, (1, 2, 8), "svs", app_mag=40, tile=240, seed=1),
    "svs_20x": SyntheticSlide(1800, 1500, 0.5, (1, 4), "svs", app_mag=20, tile=240, seed=2),
    "tiff_nonround": SyntheticSlide(2600, 2100, 0.2527, (1, 4, 16), "tiff", tile=256, seed=3),
    "svs_no_mpp": SyntheticSlide(1200, 1000, None, (1, 4), "svs", app_mag=None, tile=240, seed=4),
    "tiff_odd": SyntheticSlide(1999, 1337, 0.5, (1, 3), "tiff", tile=128, seed=5, black_border=True),
    "svs_40x_no20x": SyntheticSlide(3200, 2600, 0.25, (1, 4, 16), "svs", app_mag=40, tile=256, seed=6, pen=True),
    "svs_mag_only": SyntheticSlide(1600, 1200, None, (1, 4), "svs", app_mag=20, tile=240, seed=7),
}


def tissue_image(width: int, height: int, *, seed: int = 0, n_blobs: int = 5, pen: bool = False,
                 black_border: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Tissue-like RGB content and its ground-truth mask.

    Returns:
      image: (height, width, 3) uint8; white background, H&E-coloured blobs with texture.
      mask: (height, width) bool, True on tissue (pen marks and padding are not tissue).
    """
    rng = np.random.default_rng(seed)
    # Draw blob shapes on a coarse grid (fast), then upsample: tissue edges need no pixel detail.
    f = 8
    gh, gw = -(-height // f), -(-width // f)
    yy, xx = np.mgrid[0:gh, 0:gw].astype(np.float32)
    field = np.zeros((gh, gw), np.float32)
    for _ in range(n_blobs):
        cy, cx = rng.uniform(0.2, 0.8) * gh, rng.uniform(0.2, 0.8) * gw
        ry, rx = rng.uniform(0.08, 0.22) * gh, rng.uniform(0.08, 0.22) * gw
        field = np.maximum(field, 1.0 - ((yy - cy) / ry) ** 2 - ((xx - cx) / rx) ** 2)
    coarse = field > 0
    mask = np.repeat(np.repeat(coarse, f, 0), f, 1)[:height, :width]
    img = np.full((height, width, 3), 240, np.uint8)
    img += rng.integers(0, 8, size=(height, width, 1), dtype=np.uint8)  # background paper noise
    # H&E: eosin pink stroma with haematoxylin purple "nuclei" speckles.
    tex = rng.random((gh * 2, gw * 2), dtype=np.float32)
    tex = np.repeat(np.repeat(tex, f // 2, 0), f // 2, 1)[:height, :width]
    pink = np.array([225, 140, 180], np.float32)
    purple = np.array([120, 60, 150], np.float32)
    colour = pink[None, None] * (1 - tex[..., None] ** 3) + purple[None, None] * tex[..., None] ** 3
    colour += rng.normal(0, 6, size=(height, width, 1)).astype(np.float32)
    img[mask] = np.clip(colour[mask], 0, 255).astype(np.uint8)
    if pen:
        # A thick blue marker stroke across the upper part, partly over tissue.
        y0 = height // 6
        band = slice(max(y0 - height // 60, 0), y0 + height // 60 + 1)
        img[band, width // 10: 9 * width // 10] = (40, 60, 200)
        mask[band, width // 10: 9 * width // 10] = False
    if black_border:
        b = max(width // 40, 8)
        img[:, -b:] = 0
        img[-b:, :] = 0
        mask[:, -b:] = False
        mask[-b:, :] = False
    return img, mask


def _downsample(img: np.ndarray, factor: int) -> np.ndarray:
    """Area (box) downsample by an integer factor; sizes floor like most scanners' pyramids."""
    from PIL import Image

    if factor == 1:
        return img
    h, w = img.shape[0] // factor, img.shape[1] // factor
    return np.asarray(Image.fromarray(img).resize((max(w, 1), max(h, 1)), Image.BOX))


def write_pyramidal_tiff(path: str | os.PathLike, image: np.ndarray, *, mpp: float | None,
                         downsamples=(1, 4), tile: int = 256, quality: int = 90) -> None:
    """Generic pyramidal TIFF: level 0 + SubIFDs (``subfiletype=1``), JPEG tiles, resolution tags.

    Args:
      image: (H, W, 3) uint8 level 0.
      mpp: um/px written as X/Y resolution in pixels/cm (None: no resolution tags).
    """
    import tifffile

    levels = [_downsample(image, int(d)) for d in downsamples]
    kw = dict(tile=(tile, tile), photometric="rgb", compression="jpeg", compressionargs={"level": quality},
              metadata=None)
    res = {}
    if mpp is not None:
        res = dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    with tifffile.TiffWriter(os.fspath(path), bigtiff=False) as tw:
        tw.write(levels[0], subifds=len(levels) - 1, **kw, **res)
        for lvl, d in zip(levels[1:], downsamples[1:]):
            lres = {}
            if mpp is not None:
                lres = dict(resolution=(1e4 / (mpp * d), 1e4 / (mpp * d)), resolutionunit="CENTIMETER")
            tw.write(lvl, subfiletype=1, **kw, **lres)


def write_aperio_svs(path: str | os.PathLike, image: np.ndarray, *, mpp: float | None,
                     app_mag: float | None = None, downsamples=(1, 4), tile: int = 240,
                     quality: int = 90) -> None:
    """Aperio-style SVS: level 0, stripped thumbnail, lower levels, each with an Aperio description.

    ``mpp=None`` and ``app_mag=None`` give a slide without any resolution information.
    """
    import tifffile

    h, w = image.shape[:2]
    keys = []
    if app_mag is not None:
        keys.append(f"AppMag = {app_mag:g}")
    if mpp is not None:
        keys.append(f"MPP = {mpp:.4f}")
    tail = "|".join(["ScanScope ID = SYNTHETIC", "Filename = synthetic", *keys])
    levels = [_downsample(image, int(d)) for d in downsamples]
    kw = dict(photometric="rgb", compression="jpeg", compressionargs={"level": quality}, metadata=None)
    thumb = _downsample(image, max(1, max(h, w) // 256))

    def desc(lw, lh):
        return f"Aperio Image Library v12.0.0 \r\n{w}x{h} [0,0 {lw}x{lh}] ({tile}x{tile}) JPEG/RGB Q={quality}|{tail}"

    with tifffile.TiffWriter(os.fspath(path), bigtiff=False) as tw:
        tw.write(levels[0], tile=(tile, tile), description=desc(w, h), **kw)
        tw.write(thumb, description=desc(thumb.shape[1], thumb.shape[0]), **kw)
        for lvl in levels[1:]:
            tw.write(lvl, tile=(tile, tile), description=desc(lvl.shape[1], lvl.shape[0]), **kw)


def write_slide(path: str | os.PathLike, spec: SyntheticSlide) -> np.ndarray:
    """Write ``spec`` to ``path``; returns the level-0 ground-truth tissue mask (H, W) bool."""
    img, mask = tissue_image(spec.width, spec.height, seed=spec.seed, pen=spec.pen, black_border=spec.black_border)
    if spec.fmt == "svs":
        write_aperio_svs(path, img, mpp=spec.mpp, app_mag=spec.app_mag, downsamples=spec.downsamples, tile=spec.tile)
    elif spec.fmt == "tiff":
        write_pyramidal_tiff(path, img, mpp=spec.mpp, downsamples=spec.downsamples, tile=spec.tile)
    else:
        raise ValueError(f"unknown synthetic slide format {spec.fmt!r} (use 'svs' or 'tiff')")
    return mask


def write_fixture(folder: str | os.PathLike, name: str) -> tuple[str, np.ndarray]:
    """Write the standard fixture ``name`` (a key of :data:`FIXTURES`) into ``folder``.

    Returns (path, level-0 tissue mask).
    """
    spec = FIXTURES[name]
    path = os.path.join(os.fspath(folder), f"{name}.{'svs' if spec.fmt == 'svs' else 'tif'}")
    return path, write_slide(path, spec)
