"""Open whole-slide images with tiffslide, resolve their resolution, and pick a pyramid level.

Microns per pixel (mpp) is resolved in a fixed, documented order and its source is recorded:

1. ``"properties"``: ``tiffslide.mpp-x`` / ``tiffslide.mpp-y`` (tiffslide folds the TIFF resolution
   tags and vendor keys such as Aperio ``MPP`` into these);
2. ``"objective-power"``: ``tiffslide.objective-power`` or Aperio ``AppMag``, converted with the
   usual convention 10 / magnification (40x -> 0.25 um/px, 20x -> 0.5 um/px);
3. ``"override"``: the value the user passes (``mpp_override``).

A user override can also be forced ahead of the slide's own values (``force_override=True``),
e.g. for slides known to carry a wrong resolution tag. Every candidate is sanity-checked against
``MPP_RANGE``; an out-of-range value is skipped (and noted) rather than trusted.

Handles are not fork-safe (a handle opened before ``fork`` returns wrong pixels in the child):
open one handle per process; threads may share it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import numpy as np

# Plausible microscope resolutions (um/px): 100x oil ~0.1, 2.5x ~4 would be unusual for level 0.
MPP_RANGE = (0.1, 2.0)
# Stored pyramid downsamples are not exact (e.g. 4.0015 for a nominal 4): accept a level whose
# downsample exceeds the wanted one by up to this relative tolerance.
LEVEL_TOLERANCE = 0.02


class SlideError(Exception):
    """A problem with one slide; the message names the file and what is wrong."""


@dataclasses.dataclass(frozen=True)
class MppInfo:
    """Resolved level-0 resolution: ``mpp`` (um/px, mean of x and y), where it came from, and notes."""

    mpp: float
    mpp_x: float
    mpp_y: float
    source: str  # "properties" | "objective-power" | "override"
    notes: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class LevelChoice:
    """A pyramid level to read from: its index, exact downsample and the resampling still needed.

    ``scale`` = level pixels per output pixel (>= 1 - tolerance); 1.0 means no resize.
    """

    level: int
    downsample: float
    mpp: float
    scale: float


def _as_float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) and out > 0 else None


def resolve_mpp(
    properties: dict[str, Any],
    mpp_override: float | None = None,
    *,
    force_override: bool = False,
    name: str = "slide",
) -> MppInfo:
    """Level-0 microns per pixel from slide properties, objective power, or a user override.

    Args:
      properties: the slide's property dict (tiffslide keys; values may be ``None``).
      mpp_override: user value, used when the slide has no usable resolution (or always, when
        ``force_override``).
      name: the slide's name, for error messages.

    Raises:
      SlideError: when no source gives a resolution inside ``MPP_RANGE``.
    """
    lo, hi = MPP_RANGE
    notes: list[str] = []

    def ok(v: float | None, what: str) -> bool:
        if v is None:
            return False
        if not lo <= v <= hi:
            notes.append(f"ignored {what}={v:g} um/px (outside the plausible range {lo}-{hi})")
            return False
        return True

    override = _as_float(mpp_override) if mpp_override is not None else None
    if mpp_override is not None and override is None:
        raise SlideError(f"{name}: mpp override {mpp_override!r} is not a positive number")
    if force_override and override is not None and ok(override, "override"):
        return MppInfo(override, override, override, "override", tuple(notes))

    mx = _as_float(properties.get("tiffslide.mpp-x"))
    my = _as_float(properties.get("tiffslide.mpp-y"))
    if mx is None and my is not None:
        mx = my
    if my is None and mx is not None:
        my = mx
    if mx is not None and my is not None and ok(mx, "mpp-x") and ok(my, "mpp-y"):
        if abs(mx - my) / max(mx, my) > 0.05:
            notes.append(f"anisotropic pixels mpp-x={mx:g} mpp-y={my:g}; using their mean")
        return MppInfo((mx + my) / 2, mx, my, "properties", tuple(notes))

    mag = _as_float(properties.get("tiffslide.objective-power"))
    if mag is None:
        mag = _as_float(properties.get("aperio.AppMag"))
    if mag is not None:
        m = 10.0 / mag
        if ok(m, f"10/objective-power({mag:g})"):
            notes.append(f"mpp derived from objective power {mag:g}x as 10/{mag:g}")
            return MppInfo(m, m, m, "objective-power", tuple(notes))

    if override is not None and ok(override, "override"):
        return MppInfo(override, override, override, "override", tuple(notes))
    detail = f" ({'; '.join(notes)})" if notes else ""
    raise SlideError(
        f"{name}: no microns-per-pixel in the slide (no mpp properties, no objective power){detail}; "
        "pass an override (--mpp)"
    )


def choose_level(downsamples: list[float] | tuple[float, ...], mpp0: float, target_mpp: float,
                 tolerance: float = LEVEL_TOLERANCE) -> LevelChoice:
    """The lowest-resolution level whose mpp is still <= ``target_mpp`` (within ``tolerance``).

    Reading a coarser level would upsample (lose detail); reading a much finer one wastes decode
    time. The remaining factor ``scale`` is applied by area interpolation.
    """
    want = target_mpp / mpp0
    best = 0
    for i, ds in enumerate(downsamples):
        if ds <= want * (1 + tolerance) and ds >= downsamples[best]:
            best = i
    ds = float(downsamples[best])
    scale = want / ds
    if abs(scale - 1.0) < 1e-3:
        scale = 1.0
    return LevelChoice(best, ds, mpp0 * ds, scale)


class Slide:
    """One open slide: tiffslide handle, resolved mpp, level geometry and zarr arrays for reads.

    Args:
      path: a slide file tiffslide can read (SVS, generic pyramidal TIFF, NDPI, ...).
      mpp_override / force_override: see :func:`resolve_mpp`.

    Raises:
      SlideError: file missing, not a slide, corrupt, or without a usable resolution.
    """

    def __init__(self, path: str | os.PathLike, mpp_override: float | None = None, *,
                 force_override: bool = False):
        import tiffslide  # local import: optional heavy dependency of this stage only

        self.path = os.fspath(path)
        self._fds: list[int] = []
        self.name = os.path.splitext(os.path.basename(self.path))[0]
        if not os.path.isfile(self.path):
            raise SlideError(f"{self.path}: no such file")
        self._ts = None
        try:
            self._ts = tiffslide.TiffSlide(self.path)
            props = dict(self._ts.properties)
            self.level_dimensions = tuple(tuple(int(v) for v in d) for d in self._ts.level_dimensions)
            self.level_downsamples = tuple(float(d) for d in self._ts.level_downsamples)
            group = self._ts.zarr_group
            self._arrays = [group[str(i)] for i in range(len(self.level_dimensions))]
        except Exception as err:  # tifffile/tiffslide raise many types for bad files
            self.close()
            raise SlideError(f"{self.path}: cannot open as a slide ({type(err).__name__}: {err})") from err
        try:
            for i, arr in enumerate(self._arrays):
                if arr.ndim != 3 or arr.shape[2] < 3 or arr.dtype != np.uint8:
                    raise SlideError(f"{self.path}: level {i} is {arr.shape} {arr.dtype}, expected (H, W, 3) uint8 RGB")
            self.properties = props
            self.mpp_info = resolve_mpp(props, mpp_override, force_override=force_override, name=self.path)
            self._tiled = [self._direct_reader(i) for i in range(len(self._arrays))]
        except BaseException:
            self.close()  # no leaked handles when a slide is rejected
            raise

    @property
    def mpp(self) -> float:
        return self.mpp_info.mpp

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height)."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def level_array(self, level: int):
        """The zarr array (H, W, C) uint8 of one level; slicing decodes only the tiles touched."""
        return self._arrays[level]

    def _direct_reader(self, level: int):
        """The TIFF page of a level when its tiles can be decoded directly (else None: use zarr).

        Direct decoding (``os.pread`` of the tile bytes + tifffile's codec for the page) skips the
        zarr store machinery, which costs more than the JPEG decode itself for 240-256 px tiles.
        It is used only for the plain case: one tiled, chunky (RGB interleaved) page per level
        whose shape matches what tiffslide reports.
        """
        try:
            series = self._ts.ts_tifffile.series[int(self.properties.get("tiffslide.series-index") or 0)]
            lvl = series.levels[level]
            if len(lvl.pages) != 1:
                return None
            page = lvl.pages[0]
            if (not page.is_tiled or page.planarconfig != 1 or page.tiledepth != 1
                    or tuple(page.shape[:2]) != tuple(self._arrays[level].shape[:2])
                    or page.dtype != np.uint8 or page.samplesperpixel < 3):
                return None
            if not self._fds:  # one descriptor per slide, shared by levels and threads (pread)
                self._fds.append(os.open(self.path, os.O_RDONLY))
            return page, self._fds[0]
        except Exception:  # unusual layouts: the zarr path handles them
            return None

    def read_level_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Pixels [y, y+h) x [x, x+w) of ``level`` as (h, w, 3) uint8; outside the image is black.

        Each tile intersecting the region is decoded once. Thread-safe (``os.pread``).

        Raises:
          SlideError: when the decoder fails (corrupt or truncated tile data).
        """
        arr = self._arrays[level]
        H, W = arr.shape[:2]
        out = np.zeros((h, w, 3), np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
        if x1 <= x0 or y1 <= y0:
            return out
        try:
            if self._tiled[level] is not None:
                self._read_tiles(level, out, x, y, x0, y0, x1, y1)
            else:
                out[y0 - y:y1 - y, x0 - x:x1 - x] = np.asarray(arr[y0:y1, x0:x1])[..., :3]
        except Exception as err:
            raise self.region_error(level, x0, y0, x1, y1, err) from err
        return out

    def region_error(self, level: int, x0: int, y0: int, x1: int, y1: int, err: Exception) -> SlideError:
        """A :class:`SlideError` naming the file, the level and region, and the underlying problem."""
        detail = str(err)
        if detail.startswith(self.path + ": "):
            detail = detail[len(self.path) + 2:]
        elif not isinstance(err, SlideError):
            detail = f"{type(err).__name__}: {detail}"
        return SlideError(f"{self.path}: cannot read level {level} region x={x0}..{x1} y={y0}..{y1} ({detail})")

    def tile_grid(self, level: int) -> tuple[int, int, int, int] | None:
        """(tile width, tile height, tiles across, tiles down) when ``level`` is directly decodable."""
        if self._tiled[level] is None:
            return None
        page = self._tiled[level][0]
        tw, th = page.tilewidth, page.tilelength
        return tw, th, -(-page.imagewidth // tw), -(-page.imagelength // th)

    def decode_tile(self, level: int, tx: int, ty: int) -> np.ndarray | None:
        """Tile (tx, ty) of ``level`` as (tile height, tile width, >=3) uint8; None for a sparse
        (absent) tile, which reads as black. Requires :meth:`tile_grid` to be non-None.

        Raises:
          SlideError: truncated or undecodable tile data (callers add the region).
        """
        page, fd = self._tiled[level]
        tw, th = page.tilewidth, page.tilelength
        index = ty * (-(-page.imagewidth // tw)) + tx
        count = page.databytecounts[index]
        if count == 0:
            return None
        data = os.pread(fd, count, page.dataoffsets[index])
        if len(data) != count:
            raise SlideError(f"{self.path}: level {level} tile {index} is truncated ({len(data)} of {count} bytes)")
        try:
            tile = page.decode(data, index, jpegtables=page.jpegtables)[0]
        except Exception as err:
            raise SlideError(f"{self.path}: level {level} tile {index} cannot be decoded "
                             f"({type(err).__name__}: {err})") from err
        if tile is None:
            raise SlideError(f"{self.path}: level {level} tile {index} could not be decoded")
        return tile.reshape(th, tw, -1)

    def _read_tiles(self, level, out, x, y, x0, y0, x1, y1) -> None:
        page, _ = self._tiled[level]
        tw, th = page.tilewidth, page.tilelength
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                tile = self.decode_tile(level, tx, ty)
                if tile is None:  # sparse tile: stays black, like tiffslide's fill value
                    continue
                # Intersection of this tile with the requested region, in image coordinates.
                ax0, ay0 = max(tx * tw, x0), max(ty * th, y0)
                ax1, ay1 = min((tx + 1) * tw, x1), min((ty + 1) * th, y1)
                out[ay0 - y:ay1 - y, ax0 - x:ax1 - x] = tile[ay0 - ty * th:ay1 - ty * th,
                                                              ax0 - tx * tw:ax1 - tx * tw, :3]

    def read_region_tiffslide(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """tiffslide's own ``read_region`` (level-0 location), RGB uint8: the reference reader."""
        return np.asarray(self._ts.read_region(location, level, size, as_array=True))[..., :3]

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        if self._ts is not None:
            self._ts.close()
            self._ts = None

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_slide(path: str | os.PathLike, mpp_override: float | None = None, *, force_override: bool = False) -> Slide:
    """Open ``path`` as a :class:`Slide` (one handle per process; see the module docstring)."""
    return Slide(path, mpp_override, force_override=force_override)
