"""Slides stage on synthetic tifffile slides: mpp resolution, levels, tissue, grid, block reader."""

import os

import numpy as np
import pytest
from PIL import Image

from sparsewsi.slides import grid as G
from sparsewsi.slides import synthetic as S
from sparsewsi.slides import tiles as T
from sparsewsi.slides import tissue as TI
from sparsewsi.slides import wsi as W


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slides")
    return {name: S.write_fixture(folder, name) for name in S.FIXTURES}


# name -> (mpp, source, read level, resample plan) at the default 224 px / 0.5 um/px.
EXPECTED = {
    "svs_40x": (0.25, "properties", 1, "crop"),  # has a 2x level: read it, no resampling
    "svs_20x": (0.5, "properties", 0, "crop"),
    "tiff_nonround": (0.2527, "properties", 0, "resize"),  # 443.3 px footprint -> area resize
    "tiff_odd": (0.5, "properties", 0, "crop"),
    "svs_40x_no20x": (0.25, "properties", 0, "reduce"),  # levels 1/4/16: read level 0, 2x box average
    "svs_mag_only": (0.5, "objective-power", 0, "crop"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_geometry_and_grid(fixtures, name):
    path, truth = fixtures[name]
    spec = S.FIXTURES[name]
    mpp, source, level, plan = EXPECTED[name]
    with W.open_slide(path) as slide:
        assert slide.dimensions == (spec.width, spec.height)
        assert slide.level_count == len(spec.downsamples)
        assert slide.mpp == pytest.approx(mpp, rel=1e-3) and slide.mpp_info.source == source
        tissue = TI.detect_tissue(slide)
        g = G.patch_grid(slide, tissue)
        assert g.level.level == level
        assert T.resample_plan(g.patch_size_level0 / g.level.downsample, 224)[0] == plan
        assert g.patch_size_level0 == pytest.approx(224 * 0.5 / mpp, rel=1e-3)
        assert len(g) > 0 and g.coords.dtype == np.int64
        assert (g.coords >= 0).all()
        assert (g.coords[:, 0] + g.patch_size_level0 <= spec.width + 1).all()
        assert (g.coords[:, 1] + g.patch_size_level0 <= spec.height + 1).all()
        # Kept patches lie on true tissue, and patches mostly on tissue are kept.
        ps = int(round(g.patch_size_level0))
        frac = np.array([truth[y:y + ps, x:x + ps].mean() for x, y in g.coords])
        assert frac.min() > 0.1 and frac.mean() > 0.6
        everything = G.patch_grid(slide, None)
        full = np.array([truth[y:y + ps, x:x + ps].mean() for x, y in everything.coords])
        kept = {tuple(c) for c in g.coords.tolist()}
        rich = [tuple(c) for c, f in zip(everything.coords.tolist(), full) if f > 0.6]
        assert sum(c in kept for c in rich) >= 0.85 * len(rich)
        # Tissue mask agrees with the ground truth (IoU at mask resolution).
        s = tissue.scale
        ys = (np.arange(tissue.mask.shape[0]) * s + s / 2).astype(int).clip(0, spec.height - 1)
        xs = (np.arange(tissue.mask.shape[1]) * s + s / 2).astype(int).clip(0, spec.width - 1)
        gt = truth[np.ix_(ys, xs)]
        iou = (gt & tissue.mask).sum() / (gt | tissue.mask).sum()
        assert iou > 0.8, iou


def test_pen_and_black_padding_are_not_tissue(fixtures, tmp_path):
    for name in ("svs_40x_no20x", "tiff_odd"):  # pen mark / black border
        path, truth = fixtures[name]
        with W.open_slide(path) as slide:
            tissue = TI.detect_tissue(slide)
            img = tissue.thumbnail.astype(int)
            pen = (img[..., 2] - img[..., 0] > 60)
            black = img.max(-1) < 20
            assert pen.any() or black.any()
            assert not (tissue.mask & (pen | black)).any()
            g = G.patch_grid(slide, tissue)
            TI.save_thumbnail(tmp_path / f"{name}.png", tissue, g.coords, g.patch_size_level0)
            assert Image.open(tmp_path / f"{name}.png").size[0] > 0


def test_missing_mpp_needs_override(fixtures):
    path, _ = fixtures["svs_no_mpp"]
    with pytest.raises(W.SlideError, match=r"svs_no_mpp\.svs: no microns-per-pixel.*--mpp"):
        W.open_slide(path)
    with W.open_slide(path, mpp_override=0.5) as slide:
        assert slide.mpp == 0.5 and slide.mpp_info.source == "override"


@pytest.mark.parametrize("name", ["svs_40x", "tiff_nonround", "svs_40x_no20x", "tiff_odd"])
def test_block_reader_matches_per_patch_reference(fixtures, name):
    """Our block reads == per-patch tiffslide read_region at the same level + the same resampling."""
    path, _ = fixtures[name]
    with W.open_slide(path) as slide:
        g = G.patch_grid(slide, TI.detect_tissue(slide))
        got = np.empty((len(g), 224, 224, 3), np.uint8)
        for idx, px in T.iter_batches(slide, g, 16, block_px=1024, num_threads=2):
            got[idx] = px
        ds, lvl = g.level.downsample, g.level.level
        ps_l = g.patch_size_level0 / ds
        plan, k = T.resample_plan(ps_l, 224)
        for n in np.linspace(0, len(g) - 1, 12).astype(int):
            x, y = g.coords[n]
            side = 224 * (k if plan == "reduce" else 1) if plan != "resize" else int(np.ceil(ps_l)) + 2
            lx = int(round(x / ds + (ps_l - side) / 2)) if plan != "resize" else int(np.floor(x / ds))
            ly = int(round(y / ds + (ps_l - side) / 2)) if plan != "resize" else int(np.floor(y / ds))
            ref = slide.read_region_tiffslide((int(round(lx * ds)), int(round(ly * ds))), lvl, (side, side))
            if plan == "crop":
                np.testing.assert_array_equal(got[n], ref)
            elif plan == "reduce":
                want = np.asarray(Image.fromarray(ref).reduce(k))
                np.testing.assert_array_equal(got[n], want)
            else:
                box = (x / ds - lx, y / ds - ly, x / ds - lx + ps_l, y / ds - ly + ps_l)
                want = np.asarray(Image.fromarray(ref).resize((224, 224), Image.BOX, box=box))
                assert np.abs(got[n].astype(int) - want).max() <= 1


def test_resolve_mpp_order_and_sanity():
    props = {"tiffslide.mpp-x": None, "tiffslide.mpp-y": None, "tiffslide.objective-power": 40}
    info = W.resolve_mpp(props)
    assert info.mpp == 0.25 and info.source == "objective-power"
    info = W.resolve_mpp({"tiffslide.mpp-x": 0.2527, "tiffslide.mpp-y": 0.2527, "aperio.AppMag": 40})
    assert info.mpp == pytest.approx(0.2527) and info.source == "properties"
    # A broken resolution tag (e.g. dpi written as 1 px/cm) is skipped, not trusted.
    info = W.resolve_mpp({"tiffslide.mpp-x": 10000.0, "tiffslide.mpp-y": 10000.0, "aperio.AppMag": 20})
    assert info.mpp == 0.5 and any("10000" in n for n in info.notes)
    assert W.resolve_mpp({}, 0.3).source == "override"
    assert W.resolve_mpp({"tiffslide.mpp-x": 0.25, "tiffslide.mpp-y": 0.25}, 0.5, force_override=True).mpp == 0.5
    with pytest.raises(W.SlideError, match="x.svs"):
        W.resolve_mpp({"tiffslide.mpp-x": 50.0}, name="x.svs")
    with pytest.raises(W.SlideError, match="not a positive number"):
        W.resolve_mpp({}, "abc")


def test_choose_level_tolerance_and_nominal_mode():
    # Stored downsamples are inexact: 4.0015 must still count as the 4x level for 0.125 -> 0.5 um/px.
    c = W.choose_level((1.0, 4.0015, 16.01), 0.125, 0.5)
    assert c.level == 1 and c.scale == 1.0  # a 0.04% difference is snapped to "no resampling"
    c = W.choose_level((1.0, 4.0, 16.0), 0.25, 0.5)
    assert c.level == 0 and c.scale == 2.0  # no 2x level: read level 0, shrink by 2
    assert G.nominal_magnification(0.265) == 40.0 and G.nominal_magnification(0.499) == 20.0


def test_nominal_mode_grid(fixtures):
    path, _ = fixtures["tiff_nonround"]
    with W.open_slide(path) as slide:
        g = G.patch_grid(slide, None, mode="nominal")
        assert g.patch_size_level0 == 448.0 and g.level0_magnification == 40.0 and g.target_magnification == 20.0
        e = G.patch_grid(slide, None)
        assert e.patch_size_level0 == pytest.approx(224 * 0.5 / 0.2527)
        assert e.coords[1, 0] == 443 and g.coords[1, 0] == 448  # exact vs nominal level-0 step
        assert e.level.scale == pytest.approx(1.9786, rel=1e-3) and g.level.scale == 2.0


def test_corrupt_and_non_image_files(fixtures, tmp_path):
    path, _ = fixtures["svs_20x"]
    data = open(path, "rb").read()
    (tmp_path / "text.svs").write_text("not a slide")
    with pytest.raises(W.SlideError, match="text.svs: cannot open as a slide"):
        W.open_slide(tmp_path / "text.svs")
    # Truncated to a third (later IFDs and tile data gone): opening or reading fails, naming the file.
    cut = tmp_path / "truncated.svs"
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(W.SlideError, match="truncated.svs"):
        with W.open_slide(cut) as slide:
            slide.read_level_region(0, 0, 0, slide.dimensions[0], slide.dimensions[1])
    # Garbage in the tile data: the decoder fails, the error names file, level and region.
    with W.open_slide(path) as slide:
        page, _ = slide._tiled[0]
        off = int(page.dataoffsets[5])
    bad = bytearray(data)
    bad[off:off + 400] = os.urandom(400)
    (tmp_path / "garbled.svs").write_bytes(bytes(bad))
    with W.open_slide(tmp_path / "garbled.svs") as slide:
        with pytest.raises(W.SlideError, match=r"garbled.svs: cannot read level 0 region"):
            slide.read_level_region(0, 0, 0, slide.dimensions[0], slide.dimensions[1])


def test_zarr_fallback_reads_the_same_patches(fixtures):
    """Layouts without direct tile access go through tiffslide's zarr store: same pixels."""
    path, _ = fixtures["tiff_nonround"]
    with W.open_slide(path) as slide:
        g = G.patch_grid(slide, TI.detect_tissue(slide))
        direct = np.concatenate([px for _, px in T.iter_blocks(slide, g, num_threads=0)])
        slide._tiled = [None] * slide.level_count
        assert slide.tile_grid(0) is None
        fallback = np.concatenate([px for _, px in T.iter_blocks(slide, g, num_threads=0)])
    np.testing.assert_array_equal(direct, fallback)


def test_tile_level_reduce_equals_window_reduce_at_odd_edges(tmp_path):
    """Averaging each tile once (aligned fast path) == averaging each window, also where windows
    run past an odd image edge (outside pixels are zeros in both)."""
    path = tmp_path / "odd40x.svs"
    S.write_slide(path, S.SyntheticSlide(1201, 999, 0.25, (1, 4), "svs", app_mag=40, tile=128, seed=9))
    with W.open_slide(path) as slide:
        tg = slide.tile_grid(0)
        ix = np.array([0, 448, 800, 1000, -2], np.int64)
        iy = np.array([0, 300, 600, 800, 550], np.int64)
        fast = T._sources_from_tiles(slide, 0, ix, iy, 448, tg, k=2)
        full = T._sources_from_tiles(slide, 0, ix, iy, 448, tg, k=1)
    slow = np.stack([np.asarray(Image.fromarray(w).reduce(2)) for w in full])
    np.testing.assert_array_equal(fast, slow)
