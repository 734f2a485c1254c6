"""`sparsewsi convert-features`: CSV features -> h5 once, identical bags, skip-what-is-done, bad files reported."""

import os

import numpy as np

from sparsewsi import cli
from sparsewsi.features.convert import convert_feature_files
from sparsewsi.features.readers import read_feature_bag


def write_csv(path, features, *, names=None, xy=None):
    cols = [f"f{i}" for i in range(features.shape[1])]
    header = cols + (["name"] if names is not None else []) + (["x", "y"] if xy is not None else [])
    with open(path, "w") as f:
        f.write(",".join(header) + "\n")
        for i, row in enumerate(features):
            cells = [repr(float(v)) for v in row]
            if names is not None:
                cells.append(names[i])
            if xy is not None:
                cells += [str(xy[i, 0]), str(xy[i, 1])]
            f.write(",".join(cells) + "\n")


def test_csv_to_h5_roundtrip_keeps_layout_and_skips_on_rerun(tmp_path, capsys):
    rng = np.random.default_rng(0)
    src = tmp_path / "csv"
    (src / "BRCA").mkdir(parents=True)
    a = rng.standard_normal((30, 16)).astype(np.float32)
    b = rng.standard_normal((12, 16)).astype(np.float32)
    write_csv(src / "BRCA" / "slide-a.csv", a, names=[f"{i}_{2 * i}.jpg" for i in range(30)])
    write_csv(src / "slide-b.csv", b, xy=rng.integers(0, 10_000, (12, 2)))
    (src / "broken.csv").write_text("f0,f1\n1.0\n")  # a short row
    out = tmp_path / "h5"

    results = convert_feature_files([str(src)], out, csv_feature_columns=16, progress=False)
    status = {os.path.basename(r.source): r.status for r in results}
    assert status == {"slide-a.csv": "done", "slide-b.csv": "done", "broken.csv": "failed"}
    failed = next(r for r in results if r.status == "failed")
    assert "broken.csv" in failed.detail

    for csv_path, h5_path in [(src / "BRCA" / "slide-a.csv", out / "BRCA" / "slide-a.h5"),
                              (src / "slide-b.csv", out / "slide-b.h5")]:
        before = read_feature_bag(csv_path, csv_feature_columns=16)
        after = read_feature_bag(h5_path)
        np.testing.assert_array_equal(after.features, before.features)
        if before.coords is not None:
            np.testing.assert_array_equal(after.coords, before.coords)
        if before.locations is not None:
            assert list(after.locations) == list(before.locations)
        assert after.slide_id == before.slide_id

    again = convert_feature_files([str(src)], out, csv_feature_columns=16, progress=False)
    assert {os.path.basename(r.source): r.status for r in again} == {
        "slide-a.csv": "skipped", "slide-b.csv": "skipped", "broken.csv": "failed"}
    os.utime(src / "slide-b.csv", ns=(1, 1))  # a changed source is converted again
    assert {r.status for r in convert_feature_files([str(src / "slide-b.csv")], out, csv_feature_columns=16,
                                                    progress=False)} == {"done"}

    rc = cli.main(["convert-features", str(src), "--out", str(out), "--csv-feature-columns", "16", "--no-progress"])
    assert rc == 1  # the broken file is reported, the others stay done
    printed = capsys.readouterr().out
    assert "0 converted, 2 up to date, 1 failed" in printed and "FAILED" in printed
    assert not list(out.rglob(".*tmp*"))  # no half-written files
