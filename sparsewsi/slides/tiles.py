"""Patch reading by grid-aligned blocks, in background threads, with bounded prefetch.

Per-patch ``read_region`` (how CLAM/TRIDENT read) decodes every JPEG tile several times: an
unaligned 224-448 px window touches up to 9 tiles, and neighbouring patches share them. Here the
kept patches are grouped into blocks of ``b x b`` grid cells; inside a block every tile that some
patch needs is read (``os.pread``) and decoded exactly once, and its pixels are copied straight
into the source window of each patch that overlaps it (no block image is assembled; tiles no patch
touches are never decoded). Only tiles on a block border are decoded twice, about
``tile / block_px`` of the work per axis (~8% per axis with 3072 px blocks and 240-256 px tiles).
Layouts without direct tile access fall back to one region read per block through tiffslide.

Patches are resampled from the chosen level with area interpolation (PIL ``BOX`` filter over the
exact, possibly fractional, source box), so exact-physical-size grids need no rounding of the
patch footprint. Decoding and resizing release the GIL, so a few threads scale on a few cores.
"""

from __future__ import annotations

import collections
import concurrent.futures as futures
import dataclasses
import math
from typing import Iterator

import numpy as np

from sparsewsi.slides.grid import PatchGrid
from sparsewsi.slides.wsi import Slide


@dataclasses.dataclass(frozen=True)
class Windows:
    """Integer source windows of every grid patch at the read level.

    Patch n is made from level pixels [iy[n], iy[n] + side) x [ix[n], ix[n] + side):
    ``how == "crop"``: taken as is (side = P); ``"reduce"``: side = k * P, box-averaged by k;
    ``"resize"``: area-resampled from the fractional box (ox[n], oy[n]) + ``ps_l`` inside it.
    """

    how: str
    k: int
    side: int
    ps_l: float
    ix: np.ndarray
    iy: np.ndarray
    ox: np.ndarray
    oy: np.ndarray


def resample_plan(ps_l: float, patch_size: int) -> tuple[str, int]:
    """How to turn a ``ps_l``-pixel source square into ``patch_size`` pixels.

    ("crop", P): the footprint is within half a source pixel of P: crop, no resampling;
    ("reduce", k): within half an output pixel of k * P: crop k*P and box-average k x k blocks;
    ("resize", 0): anything else: PIL area (BOX) resampling of the exact fractional box.
    The tolerances are below the accuracy of the slide's own mpp metadata.
    """
    if abs(ps_l - patch_size) < 0.5:
        return "crop", patch_size
    k = int(round(ps_l / patch_size))
    if k >= 2 and abs(ps_l - k * patch_size) < 0.5 * k:
        return "reduce", k
    return "resize", 0


def patch_windows(grid: PatchGrid) -> Windows:
    """The source window of every patch of ``grid`` (vectorised)."""
    ds = grid.level.downsample
    ps_l = grid.patch_size_level0 / ds
    p = grid.patch_size
    fx = grid.coords[:, 0] / ds
    fy = grid.coords[:, 1] / ds
    how, k = resample_plan(ps_l, p)
    if how == "resize":
        ix, iy = np.floor(fx).astype(np.int64), np.floor(fy).astype(np.int64)
        side = int(math.ceil(ps_l)) + 1
    else:
        side = p if how == "crop" else k * p
        # Centre the integer window on the exact footprint (error < half a source pixel).
        ix = np.round(fx + (ps_l - side) / 2).astype(np.int64)
        iy = np.round(fy + (ps_l - side) / 2).astype(np.int64)
    return Windows(how, k, side, ps_l, ix, iy, fx - ix, fy - iy)


@dataclasses.dataclass(frozen=True)
class Block:
    """Kept patches read together, and the rectangle of read-level pixels their windows cover.

    ``indices`` index into the grid's coords; ``x0, y0, w, h`` is the union of their windows.
    """

    indices: np.ndarray
    x0: int
    y0: int
    w: int
    h: int


def plan_blocks(grid: PatchGrid, block_px: int = 3072, windows: Windows | None = None) -> list[Block]:
    """Group the grid's kept patches into blocks about ``block_px`` level pixels wide, raster order."""
    n = len(grid)
    if n == 0:
        return []
    win = windows or patch_windows(grid)
    st_l = grid.stride_level0 / grid.level.downsample
    b = max(1, int(round(block_px / max(st_l, 1.0))))
    col = np.round(grid.coords[:, 0] / grid.stride_level0).astype(np.int64)
    row = np.round(grid.coords[:, 1] / grid.stride_level0).astype(np.int64)
    key = (row // b) * (int(col.max()) // b + 1) + (col // b)
    order = np.lexsort((col, row, key))  # by block, then raster inside the block
    cuts = np.flatnonzero(np.diff(key[order])) + 1
    blocks = []
    for idx in np.split(order, cuts):
        x0, y0 = int(win.ix[idx].min()), int(win.iy[idx].min())
        x1, y1 = int(win.ix[idx].max()) + win.side, int(win.iy[idx].max()) + win.side
        blocks.append(Block(indices=idx, x0=x0, y0=y0, w=x1 - x0, h=y1 - y0))
    return blocks


def _sources_from_tiles(slide: Slide, level: int, ix: np.ndarray, iy: np.ndarray, side: int,
                        tg: tuple[int, int, int, int], k: int = 1) -> np.ndarray:
    """Fill (n, side // k, side // k, 3) windows by decoding each needed tile once and scattering
    its pixels straight into the windows that overlap it (one copy; no block image is assembled).

    ``k > 1`` (windows, tiles aligned to k): each tile is box-averaged by k once, before the
    scatter, which equals averaging every window (same k x k cells; pixels outside the image are
    zeros in both) at a quarter of the copying for k = 2.
    """
    from PIL import Image

    tw, th, _, _ = tg
    H, W = slide.level_array(level).shape[:2]
    n = len(ix)
    # Only windows that run past the image edge need zeros; the rest is overwritten by tiles.
    src = np.empty((n, side // k, side // k, 3), np.uint8)
    outside = (ix < 0) | (iy < 0) | (ix + side > W) | (iy + side > H)
    src[outside] = 0
    users: dict[tuple[int, int], list[int]] = {}
    for j in range(n):
        x0, y0 = max(int(ix[j]), 0), max(int(iy[j]), 0)
        x1, y1 = min(int(ix[j]) + side, W), min(int(iy[j]) + side, H)
        if x1 <= x0 or y1 <= y0:
            continue
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                users.setdefault((ty, tx), []).append(j)
    for (ty, tx), js in sorted(users.items()):
        tile = slide.decode_tile(level, tx, ty)
        tx0, ty0 = tx * tw, ty * th
        if tile is None:  # sparse (absent) tile: black, like tiffslide's fill value
            tile = np.zeros((th, tw, 3), np.uint8)
        tx1, ty1 = min(tx0 + tw, W), min(ty0 + th, H)  # edge tiles are padded beyond the image
        if k > 1:
            body = np.zeros((th, tw, 3), np.uint8)  # outside the image: zeros, as in a window
            body[:ty1 - ty0, :tx1 - tx0] = tile[:ty1 - ty0, :tx1 - tx0, :3]
            tile = np.asarray(Image.fromarray(body).reduce(k))
            tx1, ty1 = tx0 + (-(-(tx1 - tx0) // k)) * k, ty0 + (-(-(ty1 - ty0) // k)) * k
            for j in js:
                ax0, ay0 = max(tx0, int(ix[j])), max(ty0, int(iy[j]))
                ax1, ay1 = min(tx1, int(ix[j]) + side), min(ty1, int(iy[j]) + side)
                src[j, (ay0 - iy[j]) // k:(ay1 - iy[j]) // k, (ax0 - ix[j]) // k:(ax1 - ix[j]) // k] = \
                    tile[(ay0 - ty0) // k:(ay1 - ty0) // k, (ax0 - tx0) // k:(ax1 - tx0) // k]
            continue
        for j in js:
            ax0, ay0 = max(tx0, int(ix[j])), max(ty0, int(iy[j]))
            ax1, ay1 = min(tx1, int(ix[j]) + side), min(ty1, int(iy[j]) + side)
            src[j, ay0 - iy[j]:ay1 - iy[j], ax0 - ix[j]:ax1 - ix[j]] = tile[ay0 - ty0:ay1 - ty0, ax0 - tx0:ax1 - tx0, :3]
    return src


def read_block(slide: Slide, grid: PatchGrid, block: Block, windows: Windows | None = None) -> np.ndarray:
    """Decode one block and return its patches (n, P, P, 3) uint8.

    Raises:
      SlideError: naming the file, level and region when a tile cannot be read or decoded.
    """
    from PIL import Image

    win = windows or patch_windows(grid)
    level, idx, p = grid.level.level, block.indices, grid.patch_size
    ix, iy = win.ix[idx], win.iy[idx]
    tg = slide.tile_grid(level)
    if tg is not None:
        k = win.k if win.how == "reduce" else 1
        if k > 1 and (tg[0] % k or tg[1] % k or (ix % k).any() or (iy % k).any()):
            k = 1  # windows not aligned to k-cells of the tiles: average per window below
        try:
            src = _sources_from_tiles(slide, level, ix, iy, win.side, tg, k)
            if k > 1:
                return src
        except Exception as err:
            raise slide.region_error(level, block.x0, block.y0, block.x0 + block.w, block.y0 + block.h, err) from err
    else:  # layouts without direct tile access: one region read through tiffslide's zarr store
        region = slide.read_level_region(level, block.x0, block.y0, block.w, block.h)
        src = np.stack([region[y - block.y0:y - block.y0 + win.side, x - block.x0:x - block.x0 + win.side]
                        for x, y in zip(ix, iy)])
    if win.how == "crop":
        return src
    out = np.empty((len(idx), p, p, 3), np.uint8)
    for j in range(len(idx)):
        img = Image.fromarray(src[j])
        if win.how == "reduce":
            out[j] = np.asarray(img.reduce(win.k))
        else:
            ox, oy = float(win.ox[idx[j]]), float(win.oy[idx[j]])
            out[j] = np.asarray(img.resize((p, p), Image.BOX, box=(ox, oy, ox + win.ps_l, oy + win.ps_l)))
    return out


def iter_blocks(slide: Slide, grid: PatchGrid, *, block_px: int = 3072, num_threads: int = 2,
                prefetch: int = 4) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (indices (n,), patches (n, P, P, 3) uint8) per block, in plan order.

    Blocks are decoded in ``num_threads`` background threads with at most ``prefetch`` blocks in
    flight, so decoding overlaps whatever the consumer does (e.g. running the encoder). A read
    error is raised from the iterator (as :class:`~sparsewsi.slides.wsi.SlideError`).
    """
    win = patch_windows(grid)
    blocks = plan_blocks(grid, block_px, win)
    if num_threads <= 0:
        for blk in blocks:
            yield blk.indices, read_block(slide, grid, blk, win)
        return
    with futures.ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="sparsewsi-tiles") as pool:
        pending: collections.deque = collections.deque()
        it = iter(blocks)
        try:
            for blk in it:
                pending.append((blk, pool.submit(read_block, slide, grid, blk, win)))
                if len(pending) >= max(prefetch, 1):
                    break
            while pending:
                blk, fut = pending.popleft()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(read_block, slide, grid, nxt, win)))
                yield blk.indices, fut.result()
        finally:
            for _, fut in pending:
                fut.cancel()


def iter_batches(slide: Slide, grid: PatchGrid, batch_size: int, **kwargs) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Re-chunk :func:`iter_blocks` into batches: (indices (b,), patches (b, P, P, 3)), b <= batch_size."""
    buf_idx: list[np.ndarray] = []
    buf_px: list[np.ndarray] = []
    have = 0
    for idx, px in iter_blocks(slide, grid, **kwargs):
        buf_idx.append(idx)
        buf_px.append(px)
        have += len(idx)
        while have >= batch_size:
            all_idx = np.concatenate(buf_idx)
            all_px = np.concatenate(buf_px)
            yield all_idx[:batch_size], all_px[:batch_size]
            buf_idx, buf_px = [all_idx[batch_size:]], [all_px[batch_size:]]
            have -= batch_size
    if have:
        yield np.concatenate(buf_idx), np.concatenate(buf_px)
