"""Feature-bag readers: TRIDENT/CLAM h5, SlideChat/DSMIL CSV, .pt, and their error messages."""

import h5py
import numpy as np
import pytest

from sparsewsi.features.bag import FeatureBag, patch_name_xy, uniform_subsample_indices
from sparsewsi.features.readers import FeatureFileError, read_feature_bag, slide_id_from_path


def _write_h5(path, feats, coords=None, batched=False, **attrs):
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats[None] if batched else feats)
        if coords is not None:
            c = f.create_dataset("coords", data=coords)
            for k, v in attrs.items():
                c.attrs[k] = v


def _write_csv(path, feats, tail_header=(), tails=None, index=False):
    d = feats.shape[1]
    head = ([""] if index else []) + [str(i) for i in range(d)] + list(tail_header)
    lines = [",".join(head)]
    for i, row in enumerate(feats):
        cells = ([str(i)] if index else []) + [repr(float(v)) for v in row] + (list(tails[i]) if tails else [])
        lines.append(",".join(cells))
    path.write_text("\n".join(lines) + "\n")


def test_h5_trident_layout_and_attrs(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(7, 16)).astype(np.float32)
    coords = rng.integers(0, 10_000, size=(7, 2))
    _write_h5(tmp_path / "S1.h5", feats, coords, patch_size=224, patch_size_level0=448,
              level0_magnification=40, target_magnification=20, name=b"S1")
    bag = read_feature_bag(tmp_path / "S1.h5", expected_dim=16)
    np.testing.assert_array_equal(bag.features, feats)
    np.testing.assert_array_equal(bag.coords, coords)
    assert bag.coords.dtype == np.int64 and bag.features.dtype == np.float32
    assert bag.slide_id == "S1" and bag.locations is None
    assert bag.attrs["patch_size_level0"] == 448 and bag.attrs["name"] == "S1"
    assert isinstance(bag.attrs["patch_size"], int)
    lean = read_feature_bag(tmp_path / "S1.h5", expected_dim=16, with_attrs=False)  # what input pipelines read
    assert lean.attrs == {}
    np.testing.assert_array_equal(lean.features, feats)
    np.testing.assert_array_equal(lean.coords, coords)


def test_h5_clam_batched_features(tmp_path):
    feats = np.arange(12, dtype=np.float32).reshape(3, 4)
    _write_h5(tmp_path / "c.h5", feats, np.zeros((3, 2), np.int64), batched=True)
    bag = read_feature_bag(tmp_path / "c.h5")
    assert bag.features.shape == (3, 4)
    np.testing.assert_array_equal(bag.features, feats)


def test_csv_with_patch_names_and_coordinates(tmp_path):
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(5, 8)).astype(np.float32)
    _write_csv(tmp_path / "TCGA-AA.csv", feats, ["name"], [[f"{i}_{i + 3}.jpg"] for i in range(5)])
    bag = read_feature_bag(tmp_path / "TCGA-AA.csv", csv_feature_columns=8)
    np.testing.assert_allclose(bag.features, feats, rtol=1e-6)
    assert bag.coords is None and list(bag.locations) == [f"{i}_{i + 3}.jpg" for i in range(5)]
    assert patch_name_xy(bag.locations[2]) == (2, 5)
    _write_csv(tmp_path / "xy.csv", feats, ["x", "y"], [[str(10 * i), str(20 * i)] for i in range(5)], index=True)
    bag = read_feature_bag(tmp_path / "xy.csv", csv_feature_columns=8, expected_dim=8)
    np.testing.assert_array_equal(bag.coords, [[10 * i, 20 * i] for i in range(5)])
    np.testing.assert_allclose(bag.features, feats, rtol=1e-6)


def test_csv_quoted_fields(tmp_path):
    (tmp_path / "q.csv").write_text('0,1,loc\n1.5,2.5,"a,b_1_2.png"\n3,4,"c_5_6.png"\n')
    bag = read_feature_bag(tmp_path / "q.csv", csv_feature_columns=2)
    np.testing.assert_array_equal(bag.features, [[1.5, 2.5], [3, 4]])
    assert list(bag.locations) == ["a,b_1_2.png", "c_5_6.png"]


def test_pt_with_weights_only(tmp_path):
    torch = pytest.importorskip("torch")
    feats = torch.randn(4, 6)
    torch.save(feats[None], tmp_path / "p.pt")
    np.testing.assert_allclose(read_feature_bag(tmp_path / "p.pt").features, feats.numpy())
    torch.save({"features": feats, "coords": torch.zeros(4, 2, dtype=torch.int64)}, tmp_path / "d.pt")
    assert read_feature_bag(tmp_path / "d.pt").coords.shape == (4, 2)


@pytest.mark.parametrize(
    "make, reason, words",
    [
        (lambda p: None, "missing", "does not exist"),
        (lambda p: _write_h5(p.with_suffix(".h5"), np.full((3, 4), np.nan, np.float32)), "non_finite", "NaN/inf"),
        (lambda p: _write_h5(p.with_suffix(".h5"), np.zeros((3, 5), np.float32)), "wrong_width", "5 wide, expected 4"),
        (lambda p: _write_h5(p.with_suffix(".h5"), np.zeros((0, 4), np.float32)), "empty", "N = 0"),
        (lambda p: p.with_suffix(".h5").write_bytes(b"not hdf5"), "unreadable", "HDF5"),
        (lambda p: p.with_suffix(".csv").write_text("0,1,2\n1,2\n"), "wrong_width", "at least 4"),
        (lambda p: p.with_suffix(".csv").write_text("0,1,2,3\n1,2,x,4\n"), "unreadable", "malformed"),
        (lambda p: p.with_suffix(".csv").write_text("0,1,2,3\n"), "empty", "N = 0"),
        (lambda p: p.with_suffix(".txt").write_text("x"), "unsupported", "unsupported suffix"),
    ],
)
def test_errors_name_file_and_problem(tmp_path, make, reason, words):
    base = tmp_path / "bad"
    make(base)
    path = next(iter(tmp_path.iterdir()), base.with_suffix(".h5"))
    with pytest.raises(FeatureFileError) as err:
        read_feature_bag(path, expected_dim=4, csv_feature_columns=4)
    assert err.value.reason == reason
    assert str(path) in str(err.value) and words in str(err.value)


def test_subsample_is_even_and_keeps_order():
    idx = uniform_subsample_indices(10, 4)
    assert list(idx) == [0, 2, 5, 7]
    assert uniform_subsample_indices(4, 10) is None and uniform_subsample_indices(4, None) is None
    bag = FeatureBag(np.arange(20, dtype=np.float32).reshape(10, 2), coords=np.arange(20).reshape(10, 2))
    small = bag.subsample(4)
    assert small.num_patches == 4 and small.dim == 2
    np.testing.assert_array_equal(small.coords[:, 0], [0, 4, 10, 14])
    assert slide_id_from_path("/a/b/TCGA-X.Y-DX1.csv") == "TCGA-X.Y-DX1"
