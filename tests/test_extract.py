"""``sparsewsi extract`` end to end on synthetic slides (good and bad) and the real CMU slide."""

import json
import os

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsewsi import cli
from sparsewsi.features import encoders as E
from sparsewsi.features import extract as X
from sparsewsi.slides import grid as G
from sparsewsi.slides import synthetic as S
from sparsewsi.slides import tiles as T
from sparsewsi.slides import tissue as TI
from sparsewsi.slides import wsi as W

TRIDENT_ATTRS = ("patch_size", "patch_size_level0", "level0_magnification", "target_magnification", "overlap",
                 "level0_width", "level0_height", "name")
OUR_ATTRS = ("target_mpp", "mpp", "mpp_source", "read_level", "encoder", "encoder_weights_sha256",
             "tissue_params", "tissue_threshold", "code_version", "grid_mode")


@pytest.fixture(scope="module")
def slide_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("in")
    S.write_fixture(d, "svs_20x")
    S.write_fixture(d, "tiff_nonround")
    S.write_fixture(d, "svs_no_mpp")
    (d / "notes.svs").write_text("this is not a slide")
    S.write_aperio_svs(d / "blank.svs", np.full((900, 1100, 3), 243, np.uint8), mpp=0.5, app_mag=20)
    # A slide whose level-0 tiles are garbage: tissue detection (level 1) works, patch reads fail.
    path, _ = S.write_fixture(d, "svs_40x_no20x")
    with W.open_slide(path) as slide:
        page, _ = slide._tiled[0]
        offsets, counts = list(page.dataoffsets), list(page.databytecounts)
    data = bytearray(open(path, "rb").read())
    for off, cnt in zip(offsets, counts):
        data[off:off + min(cnt, 300)] = b"\x00" * min(cnt, 300)
    (d / "corrupt.svs").write_bytes(bytes(data))
    os.remove(path)
    return d


def _summary(out):
    return {os.path.basename(r["slide"]): r for r in json.load(open(out / "extract_summary.process0.json"))}


def test_extract_folder_with_bad_inputs(slide_dir, tmp_path, capsys):
    out = tmp_path / "feats"
    rc = cli.main(["extract", str(slide_dir), "--out", str(out), "--batch-size", "12", "--no-progress"])
    assert rc == 1  # some slides failed
    s = _summary(out)
    assert s["svs_20x.svs"]["status"] == "done" and s["tiff_nonround.tif"]["status"] == "done"
    assert "no microns-per-pixel" in s["svs_no_mpp.svs"]["reason"]
    assert "notes.svs: cannot open as a slide" in s["notes.svs"]["reason"]
    assert "blank.svs: no tissue found" in s["blank.svs"]["reason"]
    assert "corrupt.svs: cannot read level 0 region" in s["corrupt.svs"]["reason"]
    printed = capsys.readouterr().out
    assert "done 2, skipped 0, failed 4" in printed and "FAILED" in printed
    # Only finished outputs exist: nothing half-written, no temporary files left behind.
    assert sorted(p for p in os.listdir(out) if p.endswith(".h5")) == ["svs_20x.h5", "tiff_nonround.h5"]
    assert not [p for p in os.listdir(out) if ".tmp-" in p]
    assert sorted(os.listdir(out / "thumbnails")) == ["svs_20x.png", "tiff_nonround.png"]

    # Rerun: finished slides are skipped and not rewritten; the no-mpp slide now works with --mpp.
    before = os.stat(out / "svs_20x.h5").st_mtime_ns
    rc = cli.main(["extract", str(slide_dir / "svs_20x.svs"), str(slide_dir / "svs_no_mpp.svs"), "--out", str(out),
                   "--batch-size", "12", "--mpp", "0.5", "--no-progress"])
    assert rc == 0
    s = _summary(out)
    assert s["svs_20x.svs"]["status"] == "skipped" and s["svs_no_mpp.svs"]["status"] == "done"
    assert os.stat(out / "svs_20x.h5").st_mtime_ns == before
    with h5py.File(out / "svs_no_mpp.h5") as f:
        assert f["coords"].attrs["mpp_source"] == "override"


def test_slide_workers_write_the_same_files_and_report_in_input_order(slide_dir, tmp_path):
    # Several slides at once (threads sharing the encoder), bad ones among them: the same features, the
    # same statuses, and the summary in input order, as one slide at a time.
    slides = X.list_slides([str(slide_dir)])
    runs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        cfg = X.ExtractConfig(encoder="tiny", batch_size=12, thumbnails=False, slide_workers=workers)
        res = X.run_extraction(slides, str(out), cfg, progress=workers > 1, log=lambda m: None)
        runs[workers] = (out, res)
    (out1, res1), (out2, res2) = runs[1], runs[2]
    assert [r.slide for r in res2] == [r.slide for r in res1] == slides
    assert [r.status for r in res2] == [r.status for r in res1]
    assert sum(r.status == "done" for r in res2) == 2 and sum(r.status == "failed" for r in res2) == 4
    assert [r.reason for r in res2] == [r.reason for r in res1]
    for name in ("svs_20x.h5", "tiff_nonround.h5"):
        with h5py.File(out1 / name) as f1, h5py.File(out2 / name) as f2:
            np.testing.assert_array_equal(f1["coords"][()], f2["coords"][()])
            np.testing.assert_allclose(f1["features"][()], f2["features"][()], atol=1e-6)


def test_h5_layout_features_and_reader_roundtrip(slide_dir, tmp_path):
    out = tmp_path / "feats"
    cfg = X.ExtractConfig(encoder="tiny", batch_size=12, thumbnails=False)
    enc = X.DeviceEncoder(cfg)
    assert enc.batch_size % len(jax.local_devices()) == 0 and len(jax.local_devices()) == 8
    res = X.extract_slide(str(slide_dir / "tiff_nonround.tif"), str(out), enc, cfg)
    assert res.status == "done", res.reason
    path = out / "tiff_nonround.h5"
    with h5py.File(path) as f:
        feats, coords, attrs = f["features"][()], f["coords"][()], dict(f["coords"].attrs)
        assert f["features"].dtype == np.float32 and f["coords"].dtype == np.int64
    assert feats.shape == (res.patches, 48) and coords.shape == (res.patches, 2)
    for k in TRIDENT_ATTRS + OUR_ATTRS:
        assert k in attrs, k
    assert attrs["patch_size"] == 224 and attrs["patch_size_level0"] == 443 and attrs["level0_width"] == 2600
    assert attrs["mpp"] == pytest.approx(0.2527) and attrs["encoder"] == "tiny"

    # Features equal the encoder applied directly (unsharded, unpadded) to the same patches, in order.
    with W.open_slide(slide_dir / "tiff_nonround.tif") as slide:
        g = G.patch_grid(slide, TI.detect_tissue(slide))
        np.testing.assert_array_equal(g.coords, coords)
        patches = np.empty((len(g), 224, 224, 3), np.uint8)
        for idx, px in T.iter_batches(slide, g, 64):
            patches[idx] = px
    model = E.create_encoder("tiny", seed=0)
    direct = np.asarray(model(E.preprocess(jnp.asarray(patches), model.cfg)))
    np.testing.assert_allclose(feats, direct, atol=2e-5, rtol=1e-4)

    from sparsewsi.features.readers import read_feature_bag

    bag = read_feature_bag(path)
    np.testing.assert_array_equal(bag.features, feats)
    np.testing.assert_array_equal(bag.coords, coords)
    assert bag.attrs["patch_size_level0"] == 443 and bag.attrs["encoder"] == "tiny"


def test_extract_real_slide(shared_data, tmp_path):
    path = shared_data / "CMU-1-Small-Region.svs"
    out = tmp_path / "real"
    rc = cli.main(["extract", str(path), "--out", str(out), "--encoder", "tiny-conch", "--batch-size", "16",
                   "--no-progress"])
    assert rc == 0
    with h5py.File(out / "CMU-1-Small-Region.h5") as f:
        n = f["features"].shape[0]
        assert 35 <= n <= 70 and f["features"].shape == (n, 32) and f["coords"].shape == (n, 2)
        assert f["coords"].attrs["level0_magnification"] == pytest.approx(10 / 0.499)
        assert np.isfinite(f["features"][()]).all()
    assert (out / "thumbnails" / "CMU-1-Small-Region.png").stat().st_size > 1000


def test_slide_listing_and_sharding_helpers(tmp_path):
    (tmp_path / "a.svs").write_bytes(b"")
    (tmp_path / "b.tiff").write_bytes(b"")
    (tmp_path / "c.txt").write_text(f"{tmp_path / 'x.ndpi'}\n# comment\n")
    (tmp_path / "readme.md").write_text("")
    slides = X.list_slides([str(tmp_path), str(tmp_path / "c.txt")])
    assert [os.path.basename(p) for p in slides] == ["a.svs", "b.tiff", "x.ndpi"]
    shares = [X.slides_for_process(slides, i, 2) for i in range(2)]
    assert sorted(shares[0] + shares[1]) == slides and not set(shares[0]) & set(shares[1])


def test_output_validity_and_weights_provenance(tmp_path):
    import safetensors.numpy

    from sparsewsi.features import weights as WT

    path = str(tmp_path / "s.h5")
    X.write_features_h5(path, np.ones((3, 4), np.float32), np.zeros((3, 2), np.int64),
                        {"encoder": "tiny", "encoder_weights_sha256": "abc"})
    assert X.output_is_valid(path, "tiny", "abc")
    assert not X.output_is_valid(path, "tiny", "other-weights")  # new weights: extract again
    assert not X.output_is_valid(path, "conch", "abc")
    open(path, "r+b").truncate(100)  # a damaged file is redone, not trusted
    assert not X.output_is_valid(path, "tiny", "abc")
    wfile = tmp_path / "tiny.safetensors"
    safetensors.numpy.save_file(WT.export_state_dict(E.create_encoder("tiny", seed=7)), str(wfile))
    enc = X.DeviceEncoder(X.ExtractConfig(encoder="tiny", weights=str(wfile)))
    assert enc.weights_sha256 == WT.file_sha256(wfile)
    got = enc.encode(np.full((3, 224, 224, 3), 128, np.uint8))
    want = np.asarray(E.create_encoder("tiny", seed=7)(E.preprocess(jnp.full((3, 224, 224, 3), 128, jnp.uint8),
                                                                     E.get_config("tiny"))))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
