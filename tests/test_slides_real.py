"""Slides stage on the real Aperio slide ../shared/data/CMU-1-Small-Region.svs (20x, 0.499 um/px, 240 px JPEG tiles)."""

import numpy as np
import pytest
from PIL import Image

from sparsewsi.slides import grid as G
from sparsewsi.slides import tiles as T
from sparsewsi.slides import tissue as TI
from sparsewsi.slides import wsi as W


@pytest.fixture(scope="module")
def cmu(shared_data):
    path = shared_data / "CMU-1-Small-Region.svs"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    with W.open_slide(path) as slide:
        yield slide


def test_metadata(cmu):
    assert cmu.dimensions == (2220, 2967) and cmu.level_count == 1
    assert cmu.mpp == pytest.approx(0.499) and cmu.mpp_info.source == "properties"


def test_tissue_is_where_it_is(cmu, tmp_path):
    tissue = TI.detect_tissue(cmu)
    m = tissue.mask
    assert 0.2 < m.mean() < 0.5
    h, w = m.shape
    # The section is a vertical strip in the middle-right of this region; the left third and the
    # top-right corner are glass (a faint strand of debris on the left is too small to count).
    assert m[:, : w // 4].mean() < 0.02
    assert m[h // 2:, w // 3: 3 * w // 4].mean() > 0.7
    assert m[: h // 8, 3 * w // 4:].mean() < 0.05
    g = G.patch_grid(cmu, tissue)
    assert g.level.level == 0 and g.patch_size_level0 == pytest.approx(224 * 0.5 / 0.499)
    assert T.resample_plan(g.patch_size_level0, 224)[0] == "crop"  # 224.45 px footprint: no resampling
    assert 35 <= len(g) <= 70 and g.coords.shape == (len(g), 2)
    assert (g.tissue_fraction >= 0.25).all()
    out = tmp_path / "thumb.png"
    TI.save_thumbnail(out, tissue, g.coords, g.patch_size_level0)
    img = np.asarray(Image.open(out))
    assert img.ndim == 3 and min(img.shape[:2]) >= 256
    assert ((img[..., 2] > 200) & (img[..., 0] < 60)).any()  # the blue grid is drawn


def test_reader_equals_tiffslide_read_region(cmu):
    g = G.patch_grid(cmu, None, min_tissue=0)
    got = np.empty((len(g), 224, 224, 3), np.uint8)
    seen = np.zeros(len(g), bool)
    for idx, px in T.iter_blocks(cmu, g, block_px=1000, num_threads=2, prefetch=2):
        got[idx] = px
        seen[idx] = True
    assert seen.all()
    for n in range(0, len(g), 7):
        x, y = (int(v) for v in g.coords[n])
        off = int(round((g.patch_size_level0 - 224) / 2))
        np.testing.assert_array_equal(got[n], cmu.read_region_tiffslide((x + off, y + off), 0, (224, 224)))
