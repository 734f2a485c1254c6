"""The synthetic sparse-evidence benchmark: real slide files, determinism, sparse evidence,
questions consistent with the evidence, SlideBench parsing, evidence flags on real feature bags,
the TFDS builder, and a frozen random-weight encoder separating evidence patches."""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import pathlib

import numpy as np
import pytest

from sparsewsi.demo import probe
from sparsewsi.demo import synthetic_slides as ss
from sparsewsi.demo.render import EVIDENCE_KINDS, KIND_NAMES

TEST_CFG = ss.PRESETS["test"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("synth") / "bench"
    ss.generate_benchmark(out, TEST_CFG, log=None)
    return out


@pytest.fixture(scope="module")
def features(bench, tmp_path_factory) -> pathlib.Path:
    """Features of every slide through the real pipeline (tissue -> grid -> tiny encoder)."""
    from sparsewsi.features import extract

    out = tmp_path_factory.mktemp("feats")
    cfg = extract.ExtractConfig(encoder="tiny", patch_size=TEST_CFG.patch_size, target_mpp=TEST_CFG.target_mpp,
                                thumbnails=False, batch_size=64)
    man = ss.load_manifest(bench)
    res = extract.run_extraction([str(bench / s["file"]) for s in man["slides"]], str(out), cfg, progress=False,
                                 log=lambda s: None)
    assert [r.reason for r in res if r.status == "failed"] == []
    return out


def test_slides_open_with_tiffslide_and_sparsewsi(bench):
    import tiffslide

    from sparsewsi.slides.wsi import open_slide

    man = ss.load_manifest(bench)
    assert len(man["slides"]) == TEST_CFG.num_slides and man["failed"] == []
    assert {s["format"] for s in man["slides"]} == {"svs", "tiff"}
    for s in man["slides"]:
        path = bench / s["file"]
        with tiffslide.TiffSlide(path) as ts:
            assert ts.dimensions == (s["width"], s["height"])
            assert ts.level_count >= 2
            assert float(ts.properties["tiffslide.mpp-x"]) == pytest.approx(TEST_CFG.mpp, rel=1e-3)
        with open_slide(path) as slide:
            assert slide.mpp_info.source == "properties"
            rec = json.loads((bench / s["evidence_file"]).read_text())
            x0, y0, x1, y1 = rec["evidence"][0]["box"]
            focus = slide.read_level_region(0, x0, y0, x1 - x0, y1 - y0).astype(float)
            corner = slide.read_level_region(0, 0, 0, 16, 16).astype(float)
            assert corner.mean() > 225  # glass
            assert focus.mean() < corner.mean() - 20  # stained structure


def test_deterministic_for_a_seed_and_independent_of_workers(tmp_path):
    cfg = dataclasses.replace(TEST_CFG, num_slides=3, seed=11)
    a = ss.generate_benchmark(tmp_path / "a", cfg, workers=1, log=None)
    b = ss.generate_benchmark(tmp_path / "b", cfg, workers=2, log=None)
    assert [s["sha256"] for s in a["slides"]] == [s["sha256"] for s in b["slides"]]
    for s in a["slides"]:
        ra = json.loads((tmp_path / "a" / s["evidence_file"]).read_text())
        rb = json.loads((tmp_path / "b" / s["evidence_file"]).read_text())
        ra.pop("seconds"), rb.pop("seconds")
        assert ra == rb
    for name in ("train.csv", "test.csv"):
        assert (tmp_path / "a/questions" / name).read_bytes() == (tmp_path / "b/questions" / name).read_bytes()
    other = ss.generate_benchmark(tmp_path / "c", dataclasses.replace(cfg, seed=12), log=None)
    assert [s["sha256"] for s in other["slides"]] != [s["sha256"] for s in a["slides"]]
    # A rerun reuses the finished slides; another config in the same folder is refused.
    again = ss.generate_benchmark(tmp_path / "a", cfg, log=None)
    assert again["timing"]["generated_this_run"] == 0
    assert [s["sha256"] for s in again["slides"]] == [s["sha256"] for s in a["slides"]]
    with pytest.raises(ss.BenchmarkConfigError, match="another config"):
        ss.generate_benchmark(tmp_path / "a", dataclasses.replace(cfg, seed=99), log=None)


def test_a_failing_slide_is_reported_and_the_rest_written(tmp_path, monkeypatch):
    cfg = dataclasses.replace(TEST_CFG, num_slides=3)
    real = ss.render_slide

    def flaky(plan, c):
        if plan.index == 1:
            raise RuntimeError("disk full (simulated)")
        return real(plan, c)

    monkeypatch.setattr(ss, "render_slide", flaky)
    man = ss.generate_benchmark(tmp_path, cfg, log=None)
    assert [f["slide_id"] for f in man["failed"]] == ["SYN-0001"]
    assert "disk full" in man["failed"][0]["reason"]
    assert [s["slide_id"] for s in man["slides"]] == ["SYN-0000", "SYN-0002"]
    rows = list(csv.DictReader(open(tmp_path / "questions/all.csv")))
    assert {r["Slide"] for r in rows} == {"SYN-0000", "SYN-0002"}
    monkeypatch.setattr(ss, "render_slide", real)
    man = ss.generate_benchmark(tmp_path, cfg, log=None)  # the rerun finishes only the missing slide
    assert man["failed"] == [] and man["timing"]["generated_this_run"] == 1 and len(man["slides"]) == 3


def test_bad_config_names_the_field(tmp_path):
    with pytest.raises(ss.BenchmarkConfigError, match="tissue_patches"):
        dataclasses.replace(TEST_CFG, max_foci=3, tissue_patches=(100, 200)).validate()
    with pytest.raises(ss.BenchmarkConfigError, match="target_mpp"):
        dataclasses.replace(TEST_CFG, target_mpp=0.37).validate()
    with pytest.raises(ss.BenchmarkConfigError, match="unknown"):
        ss.BenchmarkConfig.from_json({"num_slides": 3, "colour": "blue"})
    with pytest.raises(FileNotFoundError, match="manifest"):
        ss.load_manifest(tmp_path)


def test_plan_is_balanced_and_stratified():
    plans = ss.plan_slides(ss.PRESETS["demo"])
    pairs = collections.Counter((p.kind, p.count) for p in plans)
    assert len(pairs) == len(EVIDENCE_KINDS) * 3 and max(pairs.values()) - min(pairs.values()) <= 1
    for kind in EVIDENCE_KINDS:
        of_kind = [p for p in plans if p.kind == kind]
        n_test = sum(p.split == "test" for p in of_kind)
        assert n_test == ss.num_test_slides(0.25, len(of_kind)) == int(0.25 * len(of_kind) + 0.5)
    assert ss.num_test_slides(0.25, 2) == 1 and ss.num_test_slides(0.0, 5) == 0 and ss.num_test_slides(0.25, 1) == 0


def test_evidence_is_sparse_and_lies_on_the_extraction_grid(bench):
    """Tissue detection + patch grid (the real pipeline): each focus marks exactly one kept
    patch, evidence <= 1% of the tissue patches, distractors never on evidence patches."""
    from sparsewsi.slides.grid import patch_grid
    from sparsewsi.slides.tissue import detect_tissue
    from sparsewsi.slides.wsi import open_slide

    man = ss.load_manifest(bench)
    for s in man["slides"]:
        rec = json.loads((bench / s["evidence_file"]).read_text())
        with open_slide(bench / s["file"]) as slide:
            grid = patch_grid(slide, detect_tissue(slide), patch_size=TEST_CFG.patch_size,
                              target_mpp=TEST_CFG.target_mpp)
        ev = ss.evidence_labels(grid.coords, grid.patch_size_level0, [e["box"] for e in rec["evidence"]])
        dis = ss.evidence_labels(grid.coords, grid.patch_size_level0, [d["box"] for d in rec["distractors"]])
        assert ev.sum() == rec["count"] == len(rec["evidence"])
        assert dis.sum() == len(rec["distractors"]) and not (ev & dis).any()
        assert ev.sum() / len(grid) <= TEST_CFG.max_evidence_fraction
        assert {e["kind"] for e in rec["evidence"]} == {rec["kind"]}


def test_demo_preset_slide_with_three_foci_stays_under_one_percent(tmp_path):
    from sparsewsi.slides.grid import patch_grid
    from sparsewsi.slides.tissue import detect_tissue
    from sparsewsi.slides.wsi import open_slide

    cfg = ss.PRESETS["demo"]
    plan = next(p for p in ss.plan_slides(cfg) if p.count == 3)
    rec = ss.generate_slide(plan, cfg, tmp_path)
    with open_slide(tmp_path / rec["file"]) as slide:
        grid = patch_grid(slide, detect_tissue(slide), patch_size=cfg.patch_size, target_mpp=cfg.target_mpp)
    ev = ss.evidence_labels(grid.coords, grid.patch_size_level0, [e["box"] for e in rec["evidence"]])
    assert ev.sum() == 3
    assert ev.sum() / len(grid) <= 0.01
    assert cfg.tissue_patches[0] <= len(grid) <= 1.3 * cfg.tissue_patches[1]


def test_questions_parse_as_slidebench_and_match_the_evidence(bench):
    from sparsewsi.datasets import read_slidebench_vqa

    man = ss.load_manifest(bench)
    by_id = {s["slide_id"]: s for s in man["slides"]}
    seen = collections.Counter()
    for split in ("train", "test"):
        parsed = read_slidebench_vqa(bench / man["questions"][split], dataset=ss.BENCHMARK_NAME)
        assert parsed.layout == "slidebench-vqa-tcga" and parsed.problems == []
        assert len(parsed.records) == 2 * man["num_slides"][split]
        for q in parsed.records:
            s = by_id[q.slide_id]
            rec = json.loads((bench / s["evidence_file"]).read_text())
            assert s["split"] == split
            if q.narrow_category == ss.NARROW_KIND:
                assert q.answer_text == KIND_NAMES[rec["kind"]][0]
                assert sorted(q.options.values()) == sorted(KIND_NAMES[k][0] for k in EVIDENCE_KINDS)
            else:
                assert q.narrow_category == ss.NARROW_COUNT
                assert q.answer_text == ss.COUNT_WORDS[len(rec["evidence"])]
                assert KIND_NAMES[rec["kind"]][1] in q.question
            seen[q.slide_id] += 1
    assert set(seen.values()) == {2} and set(seen) == set(by_id)


def test_question_options_fixed_order_and_kind_only():
    plans = ss.plan_slides(dataclasses.replace(TEST_CFG, num_slides=8))
    base = dataclasses.replace(TEST_CFG, num_slides=8)
    fixed = dataclasses.replace(base, option_order="fixed", questions=("kind",))
    names = [KIND_NAMES[k][0] for k in EVIDENCE_KINDS]
    orders = set()
    for plan in plans:
        shuffled_rows, fixed_rows = ss.slide_questions(plan, base), ss.slide_questions(plan, fixed)
        assert [r["Narrow Category"] for r in shuffled_rows] == [ss.NARROW_KIND, ss.NARROW_COUNT]
        assert len(fixed_rows) == 1 and fixed_rows[0]["Narrow Category"] == ss.NARROW_KIND
        row = fixed_rows[0]
        assert [row[k] for k in "ABCD"] == names and row[row["Answer"]] == KIND_NAMES[plan.kind][0]
        assert row["Question"] == shuffled_rows[0]["Question"]  # same template draw either way
        orders.add(tuple(shuffled_rows[0][k] for k in "ABCD"))
    assert len(orders) > 1  # the default still shuffles
    with pytest.raises(ss.BenchmarkConfigError, match="questions"):
        dataclasses.replace(base, questions=("colour",)).validate()
    with pytest.raises(ss.BenchmarkConfigError, match="option_order"):
        dataclasses.replace(base, option_order="sorted").validate()


def test_none_option_plans_questions_and_an_evidence_free_slide(tmp_path):
    """``none_option``: evidence-free slides as frequent as each kind, stratified; their question's answer is
    "none of these" (the last fixed option), with no counting question; the slide file holds look-alikes only."""
    kinds = ("keratin_pearl", "signet_ring", "psammoma_body")
    cfg = dataclasses.replace(ss.PRESETS["demo"], kinds=kinds, none_option=True, option_order="fixed",
                              questions=("kind", "count"))
    plans = ss.plan_slides(cfg)
    per_answer = collections.Counter(p.kind for p in plans)
    assert set(per_answer) == set(kinds) | {ss.NONE_KIND} and max(per_answer.values()) - min(per_answer.values()) <= 1
    assert {p.count for p in plans if p.kind == ss.NONE_KIND} == {0}
    for answer in per_answer:
        of = [p for p in plans if p.kind == answer]
        assert sum(p.split == "test" for p in of) == ss.num_test_slides(cfg.test_fraction, len(of))
    none_plan = next(p for p in plans if p.kind == ss.NONE_KIND)
    (row,) = ss.slide_questions(none_plan, cfg)  # no counting question: nothing to count
    assert [row[k] for k in "ABCD"] == [KIND_NAMES[k][0] for k in kinds] + [ss.NONE_OPTION] and row["Answer"] == "D"
    kind_plan = next(p for p in plans if p.kind == "signet_ring")
    rows = ss.slide_questions(kind_plan, cfg)
    assert [r["Narrow Category"] for r in rows] == [ss.NARROW_KIND, ss.NARROW_COUNT] and rows[0]["Answer"] == "B"
    two = ss.slide_questions(none_plan, dataclasses.replace(cfg, kinds=kinds[:1]))[0]  # fewer than four options
    assert [two[k] for k in "ABCD"] == [KIND_NAMES[kinds[0]][0], ss.NONE_OPTION, "", ""]

    small = dataclasses.replace(TEST_CFG, kinds=kinds, none_option=True)
    plan = next(p for p in ss.plan_slides(small) if p.kind == ss.NONE_KIND)
    rec = ss.generate_slide(plan, small, tmp_path)
    assert rec["evidence"] == [] and rec["count"] == 0 and rec["kind_name"] == ss.NONE_OPTION
    assert len(rec["distractors"]) >= small.distractors[0]
    with pytest.raises(ss.BenchmarkConfigError, match="kinds.*four options"):
        dataclasses.replace(cfg, kinds=EVIDENCE_KINDS).validate()
    with pytest.raises(ss.BenchmarkConfigError, match="kinds"):
        dataclasses.replace(cfg, kinds=("keratin_pearl", "keratin_pearl")).validate()
    with pytest.raises(ss.BenchmarkConfigError, match="kinds"):
        dataclasses.replace(cfg, kinds=("haemorrhage",)).validate()
    with pytest.raises(ss.BenchmarkConfigError, match="none_option"):
        dataclasses.replace(cfg, questions=("count",)).validate()


def test_evidence_labels_geometry():
    coords = np.array([[0, 0], [100, 0], [0, 100], [100, 100]])
    inside = ss.evidence_labels(coords, 100, [[10, 10, 60, 60]])
    assert inside.tolist() == [True, False, False, False]
    straddle = ss.evidence_labels(coords, 100, [[70, 10, 130, 40]])  # half in each of two patches
    assert straddle.tolist() == [True, True, False, False]
    mostly = ss.evidence_labels(coords, 100, [[80, 80, 180, 180]])  # 64% in the last patch
    assert mostly.tolist() == [False, False, False, True]
    assert not ss.evidence_labels(coords, 100, []).any()


def test_annotated_bags_tfds_build_and_encoder_separates_evidence(bench, features, tmp_path):
    import h5py

    from data_pipelines.build import build
    from sparsewsi.evaluation.runner import _read_evidence

    report = ss.annotate_feature_folder(features, bench, log=None)
    man = ss.load_manifest(bench)
    assert report["missing"] == [] and report["failed"] == {} and report["foci_not_found"] == {}
    assert report["annotated"] == {s["slide_id"]: s["count"] for s in man["slides"]}
    h5 = features / f"{man['slides'][0]['slide_id']}.h5"
    with h5py.File(h5) as f:
        n = f["features"].shape[0]
        assert f["evidence"].attrs["kind"] == man["slides"][0]["kind"]
    assert _read_evidence(h5, n).sum() == man["slides"][0]["count"]  # what evaluation reads
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="bad.json"):
        ss.annotate_features(h5, bad)

    builder = build("synthetic_slidebench", str(bench), features_root=features, data_dir=tmp_path / "tfds",
                    feature_dim=48)
    meta = builder.info.metadata
    assert meta["build"]["benchmark_config_digest"] == man["config_digest"]
    for split in ("train", "test"):
        src = meta["sources"][split]
        assert src["kept"] == src["num_rows"] == 2 * man["num_slides"][split]
        ds = builder.as_data_source(split=split)
        ex = ds[0]
        text = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in ex.items()}
        assert text["dataset"] == ss.BENCHMARK_NAME and text["answer_letter"] in "ABCD"
        assert text["feature_file"].endswith(".h5") and text["num_patches"] > 0

    # A frozen random-weight tiny ViT: a linear probe fitted on the train slides ranks the held-out
    # slides' evidence patches far above the rest (the learned selector can find them).
    feats, classes, split = [], [], []
    for s in man["slides"]:
        rec = json.loads((bench / s["evidence_file"]).read_text())
        with h5py.File(features / f"{s['slide_id']}.h5") as f:
            feats.append(np.asarray(f["features"]))
            classes.append(probe.patch_classes(np.asarray(f["coords"]),
                                               float(f["coords"].attrs["patch_size_level0_exact"]), rec))
        split.append(s["split"])
    tr = [i for i, sp in enumerate(split) if sp == "train"]
    te = [i for i, sp in enumerate(split) if sp == "test"]
    res = probe.probe(feats, classes, tr, te, k=32)
    assert res["linear_probe"]["auc_evidence_vs_all"] > 0.9
    assert res["linear_probe"]["recall@32"] > res["random_recall@32"]


def test_mlp_kind_probe_tells_structure_kinds_apart_and_not_labels_the_features_do_not_carry():
    # Six bags of plain tissue (noise) with structure patches whose kind sets one feature far out,
    # on either side (as the demo's kinds sit at both ends of its colour axis).
    rng = np.random.default_rng(0)
    feats, kinds = [], []
    shifts = {0: (0, 6.0), 1: (1, 6.0), 5: (0, -6.0)}  # kind -> (feature, shift)
    for _ in range(6):
        x = rng.normal(size=(200, 8)).astype(np.float32)
        k = np.full(200, -1, np.int8)
        for j, (kind, (dim, shift)) in enumerate(shifts.items()):
            idx = np.arange(10 * j, 10 * j + 10)
            x[idx, dim] += shift
            k[idx] = kind
        feats.append(x)
        kinds.append(k)
    res = probe.mlp_kind_probe(feats, kinds, [0, 1, 2, 3], [4, 5], steps=400)
    acc = res["per_class_accuracy"]
    names = res["classes"]
    assert names[0] == "tissue" and len(res["confusion"]) == len(names)
    for kind in shifts:
        assert acc[probe.ALL_KINDS[kind]] >= 0.9, acc
    assert acc["tissue"] >= 0.9 and acc[probe.ALL_KINDS[2]] is None  # kind 2 never occurs
    assert res["test_patches"] == 2 * (30 + 20)
    # The same patches with their kinds shuffled: nothing to learn, the probe must not find it.
    shuffled = []
    for k in kinds:
        k = k.copy()
        m = k >= 0
        k[m] = rng.permutation(k[m])
        shuffled.append(k)
    res = probe.mlp_kind_probe(feats, shuffled, [0, 1, 2, 3], [4, 5], steps=400)
    assert np.mean([res["per_class_accuracy"][probe.ALL_KINDS[k]] for k in shifts]) < 0.7


def test_mlp_kind_probe_reads_whole_bags_and_counts_look_alikes_taken_for_evidence():
    """Slide level: a bag is answered by its most confident evidence patch. A look-alike whose features
    equal an evidence kind's makes the evidence-free bags that hold it wrong answers; a distinct one not."""
    rng = np.random.default_rng(1)

    def bags(lookalike_shift):
        feats, kinds = [], []
        for b in range(16):
            x = rng.normal(size=(150, 8)).astype(np.float32)
            k = np.full(150, -1, np.int8)
            kind = (0, 1, None, None)[b % 4]
            if kind is not None:
                x[:4, kind] += 8.0
                k[:4] = kind
            x[10:14, 2] += lookalike_shift  # look-alike (kind 7) patches on every slide
            k[10:14] = 7
            feats.append(x)
            kinds.append(k)
        return feats, kinds

    train, test = list(range(12)), list(range(12, 16))
    feats, kinds = bags(8.0)
    res = probe.mlp_kind_probe(feats, kinds, train, test, steps=400)["slide_answers"]
    assert res["accuracy"] == 1.0 and {k: n for k, (_, n) in res["by_answer"].items()} == {
        probe.ALL_KINDS[0]: 1, probe.ALL_KINDS[1]: 1, "none": 2}
    # Now the look-alikes carry keratin's features: no reader of single patches can tell the keratin slides
    # from the evidence-free ones (all hold "keratin-like" patches), so some slide answers must be wrong.
    for x in feats:
        x[10:14, 2] -= 8.0
        x[10:14, 0] += 8.0
    res = probe.mlp_kind_probe(feats, kinds, train, test, steps=400)["slide_answers"]
    assert res["accuracy"] <= 0.75 and res["by_answer"][probe.ALL_KINDS[1]] == [1, 1]
