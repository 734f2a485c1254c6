"""``sparsewsi demo`` end to end, shrunken (``configs/demo.py:small``): every stage runs through the real
code (slides -> extract -> evidence flags -> TFDS dataset -> trainer -> eval runner -> report), the report
folder holds its files and every selector, and reruns skip or resume work. Plumbing, not accuracy."""

import csv
import json
import pathlib

import numpy as np
import pytest

from sparsewsi.demo import run as demo
from sparsewsi.train_cli import apply_overrides, load_config

REPO = pathlib.Path(__file__).resolve().parents[1]
SELECTORS = ("learned", "random", "uniform", "spatial", "all", "oracle")


def small_config(**overrides):
    c = load_config(str(REPO / "configs" / "demo.py") + ":small")
    c.num_slides = 6
    c.progress = False
    return apply_overrides(c, [f"{k}={v!r}" for k, v in overrides.items()])


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    logs = []
    stages = demo.run_demo(small_config(), out, log=logs.append)
    return out, stages, logs


def test_report_folder_has_every_file_and_selector(first_run):
    out, stages, _ = first_run
    assert [s for s in demo.STAGES if stages[s]["status"] == "ran"] == list(demo.STAGES)
    rep = out / "report"
    for name in ("summary.md", "results.json", "accuracy.png", "training_curves.png", "heatmaps/heatmaps.png"):
        assert (rep / name).is_file() and (rep / name).stat().st_size > 0, name
    assert len(list((rep / "heatmaps").glob("SYN-*.png"))) >= 1
    summary = (rep / "summary.md").read_text()
    table = [line for line in summary.splitlines() if line.startswith("| ") and "selector" not in line]
    for sel in SELECTORS:
        assert any(line.startswith(f"| {sel} |") for line in table), f"{sel} missing from the accuracy table"
    assert "## Time per stage" in summary and "evidence recall@" in summary
    results = json.loads((rep / "results.json").read_text())
    ev = results["eval"]["selectors"]
    assert set(ev) == set(SELECTORS)
    n_test = len(list(csv.DictReader(open(out / "bench" / "questions" / "test.csv"))))
    for sel, r in ev.items():
        assert r["n"] == n_test and r["complete"], sel
        assert 0.0 <= r["accuracy"] <= 1.0
        # Per answer (evidence kind): the counts add up and reproduce the overall accuracy.
        by = r["by_answer"]
        assert sum(v["n"] for v in by.values()) == n_test, sel
        assert abs(sum(v["n"] * v["accuracy"] for v in by.values()) / n_test - r["accuracy"]) < 1e-9, sel
    assert "Per answer (accuracy % / evidence recall@32" in summary
    # Where the scorer ranks each structure: every evidence patch of the test slides is counted once.
    ranks = results["scorer_ranks"]
    assert "Where the learned scorer ranks each structure" in summary
    test_slides = {r["Slide"] for r in csv.DictReader(open(out / "bench" / "questions" / "test.csv"))}
    import h5py

    n_evidence = 0
    for sid in test_slides:
        with h5py.File(out / "features" / f"{sid}.h5") as f:
            n_evidence += int(np.asarray(f["evidence"], bool).sum())
    assert sum(r["patches"] for r in ranks.values() if r["role"] == "evidence") == n_evidence > 0
    for r in ranks.values():
        assert r["role"] in ("evidence", "look-alike") and 0 <= r["rank_fraction_median"] <= 1
        assert 0 <= r["in_top_32"] <= 1 and r["rank_median"] >= 0
    # The oracle sees every evidence token; 'all' sees every token; the others at most k.
    assert ev["oracle"]["evidence_recall"] == 1.0 and ev["all"]["evidence_recall"] == 1.0
    assert ev["random"]["tokens_shown_mean"] == 32 and ev["all"]["tokens_shown_mean"] > 32
    # Stage outputs of the real pipeline.
    import h5py

    assert len(list((out / "features").glob("SYN-*.h5"))) == 6
    assert (out / "train" / "model.json").is_file() and demo.latest_step(out / "train") == 4
    assert demo.latest_step(out / "align") == 2  # the alignment stage ran and seeded the SparseLearn run
    # ... after its first phase on short bags (`align.short_steps`), without noise slots.
    assert demo.latest_step(out / "align" / "short") == 2
    short_model = json.loads((out / "align" / "short" / "model.json").read_text())["model"]
    assert short_model["noise_slots"] == 0 and json.loads((out / "align" / "model.json").read_text())["model"]["noise_slots"] > 0
    # Its set holds the short bags and the single-patch questions (`align.patches_per_slide`).
    first_rows = list(csv.DictReader(open(out / "bench" / "questions" / "align_short.csv")))
    short_rows = [r for r in first_rows if "-s" in r["Slide"]]
    patch_rows = [r for r in first_rows if "-p" in r["Slide"]]
    assert len(short_rows) + len(patch_rows) == len(first_rows) and short_rows and patch_rows
    train_ids = {x["Slide"] for x in csv.DictReader(open(out / "bench" / "questions" / "train.csv"))}
    assert all(r["Slide"].rsplit("-s", 1)[0] in train_ids for r in short_rows)
    assert all(r["Slide"].rsplit("-p", 1)[0] in train_ids for r in patch_rows)
    for r in short_rows:
        with h5py.File(out / "regions" / f"{r['Slide']}.h5") as f:
            assert len(f["features"]) == 8
    for r in patch_rows:
        with h5py.File(out / "regions" / f"{r['Slide']}.h5") as f:
            assert len(f["features"]) == 1
            # An evidence patch is answered with its slide's kind, any other with "none of these".
            assert (r[r["Answer"]] == "none of these") == (not f["evidence"][0])
    assert stages["dataset"]["info"]["align_short_patch_questions"] == len(patch_rows)
    # Region bags (`align.mosaic`, on in the demo): as many evidence and look-alike patches as the slide
    # holds, drawn from all training slides (evidence of the slide's kind), plus the slide's own random
    # patches, `tokens` in all; every patch normalised with its own whole slide's median / MAD.
    import h5py

    from sparsewsi.demo.synthetic_slides import evidence_labels

    align_rows = list(csv.DictReader(open(out / "bench" / "questions" / "align.csv")))
    train_slides = {r["Slide"] for r in csv.DictReader(open(out / "bench" / "questions" / "train.csv"))}
    assert {r["Slide"].rsplit("-r", 1)[0] for r in align_rows} == train_slides
    normed, kind, is_ev, is_look = {}, {}, {}, {}
    for slide in train_slides:
        with h5py.File(out / "features" / f"{slide}.h5") as g:
            full = np.asarray(g["features"], np.float64)
            med = np.median(full, 0)
            normed[slide] = (full - med) / (1.4826 * np.median(np.abs(full - med), 0) + 1e-6)
            rec = json.loads((out / "bench" / "evidence" / f"{slide}.json").read_text())
            kind[slide], is_ev[slide] = rec["kind"], np.asarray(g["evidence"], bool)
            is_look[slide] = (evidence_labels(np.asarray(g["coords"]), float(g["coords"].attrs["patch_size_level0_exact"]),
                                              [d["box"] for d in rec["distractors"]]) & ~is_ev[slide]
                              if rec["distractors"] else np.zeros(len(full), bool))
    n_lookalike = 0
    for region in sorted({r["Slide"] for r in align_rows}):
        slide = region.rsplit("-r", 1)[0]
        with h5py.File(out / "regions" / f"{region}.h5") as f:
            x, ev = np.asarray(f["features"], np.float64), np.asarray(f["evidence"], bool)
            assert f["features"].attrs["slide_norm"] == "bag_robust"
        assert len(x) == min(32, len(normed[slide]))
        # Each token is one patch of one training slide, with that slide's normalisation.
        src = []
        for row in x:
            hits = [(s, int(i)) for s in sorted(normed) for i in np.flatnonzero(np.abs(normed[s] - row).max(1) < 1e-3)]
            assert hits, f"{region}: a token that is no training slide's slide-normalised patch"
            src.append(hits[0])
        assert ev.sum() == is_ev[slide].sum()  # 0: evidence-free
        assert all(is_ev[s][i] and kind[s] == kind[slide] for (s, i), e in zip(src, ev) if e)
        looks = [(s, i) for s, i in src if is_look[s][i]]
        assert len(looks) == is_look[slide].sum()
        assert all(s == slide for s, i in src if not is_ev[s][i] and not is_look[s][i])  # the fill is the slide's own
        n_lookalike += len(looks)
    assert n_lookalike > 0  # the demo's `align.lookalikes` is on
    # ... so the alignment stage reads them without a second (bag) normalisation.
    assert json.loads((out / "align" / "model.json").read_text())["model"]["feature_norm"] == "token"
    assert json.loads((out / "train" / "model.json").read_text())["model"]["feature_norm"] == "bag_robust"
    for sel in SELECTORS:
        assert (out / "eval" / sel / "results.json").is_file()
    # Polish: the stage-2 model read on its own Hard Top-K (candidate cap = k, no noise slots, no floor); the
    # scorer is held still (bit-identical to stage 2's), the reader moved; evaluation loads the polished model.
    from sparsewsi.model import flat_params, load_checkpoint

    assert demo.latest_step(out / "polish") == 2
    polish_model = json.loads((out / "polish" / "model.json").read_text())["model"]
    assert polish_model["candidate_cap"] == polish_model["k"] == 32
    assert polish_model["noise_slots"] == 0 and polish_model["gate_floor"] == 0
    trained, polished = (flat_params(load_checkpoint(out / d)[0]) for d in ("train", "polish"))
    scorer = [n for n in trained if n.startswith("scorer.")]
    assert scorer and all(np.array_equal(trained[n], polished[n]) for n in scorer)
    assert any(not np.array_equal(trained[n], polished[n]) for n in trained if n.startswith("llm."))
    assert json.loads((out / "eval" / "learned" / "run.json").read_text())["model"] == f"sparsewsi-demo:{out / 'polish'}"
    assert "**polish**" in summary
    for st in demo.STAGES:
        assert stages[st]["wall_s"] >= 0 and stages[st]["cpu_s"] >= 0


def test_rerun_skips_finished_stages_and_resumes_an_interrupted_eval(first_run):
    out, _, _ = first_run
    before = json.loads((out / "report" / "results.json").read_text())["eval"]["selectors"]
    # Simulate an evaluation killed after one answer of the random selector.
    pred = out / "eval" / "random" / "predictions.shard00000-of00001.jsonl"
    lines = pred.read_text().splitlines(keepends=True)
    pred.write_text(lines[0])
    stages = json.loads((out / demo.STAGES_FILE).read_text())
    del stages["eval"]
    (out / demo.STAGES_FILE).write_text(json.dumps(stages))
    logs = []
    again = demo.run_demo(small_config(), out, log=logs.append)
    assert [s for s in demo.STAGES if again[s]["status"] == "done earlier"] == list(demo.STAGES[:demo.STAGES.index("eval")])
    ev = again["eval"]["info"]["selectors"]
    assert ev["random"]["evaluated_this_run"] == len(lines) - 1
    assert all(ev[s]["evaluated_this_run"] == 0 for s in SELECTORS if s != "random")
    after = json.loads((out / "report" / "results.json").read_text())["eval"]["selectors"]
    for sel in SELECTORS:  # deterministic: the resumed answers are the ones the first run gave
        assert after[sel]["accuracy"] == before[sel]["accuracy"], sel
        assert after[sel]["evidence_recall"] == before[sel]["evidence_recall"], sel
    assert len(pred.read_text().splitlines()) == len(lines)
    # A third run has nothing left to do but the report.
    third = demo.run_demo(small_config(), out, log=[].append)
    assert [s for s in demo.STAGES if third[s]["status"] == "ran"] == ["report"]


def test_other_settings_in_the_same_folder_are_refused(first_run):
    out, _, _ = first_run
    with pytest.raises(demo.DemoError, match="train.total_steps"):
        demo.run_demo(small_config(**{"train.total_steps": 5}), out, log=[].append)
    # Throughput / display settings may change between reruns.
    demo.check_run_folder(demo.Paths(out), small_config(**{"eval.batch_size": 4, "progress": True}))


def test_command_line_overrides_and_errors(tmp_path, capsys):
    from sparsewsi.cli import main

    out = tmp_path / "cli"
    rc = main(["demo", "--config", str(REPO / "configs" / "demo.py") + ":small", "--out", str(out),
               "--config.num_slides=3", "--config.slides.distractors=(1,2)", "--until", "slides", "--no-progress"])
    assert rc == 0
    man = json.loads((out / "bench" / "manifest.json").read_text())
    assert len(man["slides"]) == 3 and man["config"]["distractors"] == [1, 2]
    saved = json.loads((out / demo.CONFIG_FILE).read_text())
    assert saved["num_slides"] == 3
    assert main(["demo", "--out", str(out), "--config", str(tmp_path / "missing.py")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # unknown field: argparse names it
        main(["demo", "--out", str(out), "--config.no_such_field=1"])


def test_augmented_questions_move_the_answer_letter_with_its_option():
    row = {"ID": "SYN-0001-kind", "Slide": "SYN-0001", "Tumor": "SYN", "Broad Category": "Microscopy",
           "Narrow Category": "Structure identification", "Question": "Which?", "A": "alpha", "B": "beta",
           "C": "gamma", "D": "delta", "Answer": "C"}
    count = dict(row, ID="SYN-0001-count", **{"Narrow Category": "Focus counting", "Answer": "B"})
    out = demo.augment_questions([row, count], 3, seed=0)
    assert len(out) == 5 and out[0] == row and out[-1] == count
    orders = set()
    for r in out[:4]:
        assert r[r["Answer"]] == "gamma"
        assert sorted(r[k] for k in "ABCD") == sorted(["alpha", "beta", "gamma", "delta"])
        orders.add(tuple(r[k] for k in "ABCD"))
    assert len(orders) == 4  # every copy is a new order
    assert demo.augment_questions([row, count], 3, seed=0) == out  # seeded
    assert demo.augment_questions([row], 0, seed=0) == [row]


def test_evidence_recall():
    ev = np.zeros(10, bool)
    ev[[2, 7]] = True
    assert demo.evidence_recall(np.array([0, 2, 5]), ev) == 0.5
    assert demo.evidence_recall(np.array([2, 7]), ev) == 1.0
    assert np.isnan(demo.evidence_recall(np.array([1]), np.zeros(10, bool)))


def test_align_config_trains_everything_on_region_bags_with_noise_slots(tmp_path):
    """The alignment stage's trainer config: region bags, every module at full rate, per-token norm when
    the bags carry their slide's normalisation, and the demo's `align.noise_slots` in the model."""
    c = small_config(**{"align.noise_slots": 5})
    info = {"feature_dim": 48, "data_path": "/data/train", "align_data_path": "/data/align"}
    t = demo.align_config(c, demo.Paths(tmp_path), info)
    assert t.model.noise_slots == 5 and t.model.feature_norm == "token"
    assert t.data.path == "/data/align" and t.data.features_root == str(tmp_path / "regions")
    assert t.optim.param_groups == [(r".*", 1.0)] and t.total_steps == c.align.steps
    assert demo.train_config(c, demo.Paths(tmp_path), info).model.get("noise_slots", 0) == 0  # stage 2: off
    # The gate floor is stage 2's alone (in the alignment it would half-clean the noise slots).
    assert c.train.model.gate_floor > 0 and t.model.gate_floor == 0
    assert demo.train_config(c, demo.Paths(tmp_path), info).model.gate_floor == c.train.model.gate_floor


def test_region_bags_keep_lookalikes_and_skip_a_slide_without_its_record(tmp_path):
    """``lookalikes``: every bag holds the slide's look-alike patches; a slide whose benchmark record
    is missing is reported by path and skipped, and the other slides' bags are still written."""
    import h5py

    paths = demo.Paths(tmp_path)
    paths.features.mkdir(parents=True)
    (paths.bench / "evidence").mkdir(parents=True)
    coords = np.stack(np.meshgrid(np.arange(8) * 100, np.arange(8) * 100), -1).reshape(-1, 2)  # 64 patches
    evidence = np.zeros(64, np.uint8)
    evidence[[3, 40]] = 1
    for sid in ("S1", "S2"):
        with h5py.File(paths.features / f"{sid}.h5", "w") as f:
            f.create_dataset("features", data=np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32))
            f.create_dataset("coords", data=coords).attrs["patch_size_level0_exact"] = 100.0
            f.create_dataset("evidence", data=evidence)
    # Look-alikes at patches (2, 1) and (5, 6) of the grid: rows 1*8+2 = 10 and 6*8+5 = 53.
    record = {"distractors": [{"kind": "vessel", "box": [210, 110, 290, 190]},
                              {"kind": "adipocytes", "box": [510, 610, 590, 690]}]}
    (paths.bench / "evidence" / "S1.json").write_text(json.dumps(record))
    rows = [{"ID": f"{sid}-kind", "Slide": sid, "Answer": "A"} for sid in ("S1", "S2")]
    logs = []
    out = demo.write_region_bags(paths, rows, regions_per_slide=2, tokens=8, seed=0, log=logs.append,
                                 lookalikes=True)
    assert sorted(r["Slide"] for r in out) == ["S1-r0", "S1-r1"]
    assert any("S2.json" in m and "skipped" in m for m in logs)
    for j in range(2):
        with h5py.File(paths.regions / f"S1-r{j}.h5") as f:
            got = [int(np.flatnonzero((coords == c).all(1))[0]) for c in np.asarray(f["coords"])]
        assert len(got) == 8 and {3, 40, 10, 53} <= set(got)


def test_region_bags_are_rewritten_when_their_settings_change(tmp_path):
    """A finished region bag is reused only when it was written with the same settings: a rerun with
    look-alikes switched on (or another size) writes the bags again instead of reusing stale ones."""
    import h5py

    paths = demo.Paths(tmp_path)
    paths.features.mkdir(parents=True)
    (paths.bench / "evidence").mkdir(parents=True)
    coords = np.stack(np.meshgrid(np.arange(8) * 100, np.arange(8) * 100), -1).reshape(-1, 2)
    evidence = np.zeros(64, np.uint8)
    evidence[3] = 1
    with h5py.File(paths.features / "S1.h5", "w") as f:
        f.create_dataset("features", data=np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32))
        f.create_dataset("coords", data=coords).attrs["patch_size_level0_exact"] = 100.0
        f.create_dataset("evidence", data=evidence)
    (paths.bench / "evidence" / "S1.json").write_text(json.dumps(
        {"distractors": [{"kind": "vessel", "box": [210, 110, 290, 190]}]}))  # patch row 10
    rows = [{"ID": "S1-kind", "Slide": "S1", "Answer": "A"}]

    def bag_rows(**kw):
        demo.write_region_bags(paths, rows, regions_per_slide=1, seed=0, **kw)
        with h5py.File(paths.regions / "S1-r0.h5") as f:
            return {int(np.flatnonzero((coords == c).all(1))[0]) for c in np.asarray(f["coords"])}

    plain = bag_rows(tokens=8, lookalikes=False)
    assert len(plain) == 8 and 3 in plain and 10 not in plain  # (seed 0's fill happens not to draw row 10)
    mtime = (paths.regions / "S1-r0.h5").stat().st_mtime_ns
    assert bag_rows(tokens=8, lookalikes=False) == plain  # same settings: reused as is
    assert (paths.regions / "S1-r0.h5").stat().st_mtime_ns == mtime
    assert 10 in bag_rows(tokens=8, lookalikes=True)  # look-alikes switched on: written again
    assert len(bag_rows(tokens=12, lookalikes=True)) == 12  # another size: written again



def test_region_bags_mosaic_draws_evidence_of_the_same_kind_and_lookalikes_from_all_training_slides(tmp_path):
    """``mosaic``: every bag keeps its slide's numbers of evidence and look-alike patches, but draws
    them afresh from all training slides (evidence of the slide's own kind only); the fill is the
    slide's own; each patch keeps the features of its own slide."""
    import h5py

    paths = demo.Paths(tmp_path)
    paths.features.mkdir(parents=True)
    (paths.bench / "evidence").mkdir(parents=True)
    coords = np.stack(np.meshgrid(np.arange(8) * 100, np.arange(8) * 100), -1).reshape(-1, 2)
    kinds = {"K1": "keratin_pearl", "K2": "keratin_pearl", "P1": "psammoma_body", "N1": "none"}
    feats = {}
    for n, (sid, kind) in enumerate(kinds.items()):
        x = np.random.default_rng(n).normal(size=(64, 4)).astype(np.float32)
        x[:, 0] = n * 100 + np.arange(64)  # feature 0 names the slide and patch
        feats[sid] = x
        evidence = np.zeros(64, np.uint8)
        if kind != "none":
            evidence[[3, 40]] = 1
        with h5py.File(paths.features / f"{sid}.h5", "w") as f:
            f.create_dataset("features", data=x)
            f.create_dataset("coords", data=coords).attrs["patch_size_level0_exact"] = 100.0
            f.create_dataset("evidence", data=evidence)
        (paths.bench / "evidence" / f"{sid}.json").write_text(json.dumps(
            {"kind": kind, "distractors": [{"kind": "vessel", "box": [210, 110, 290, 190]}]}))  # patch row 10
    rows = [{"ID": f"{sid}-kind", "Slide": sid, "Answer": "A"} for sid in kinds]
    out = demo.write_region_bags(paths, rows, regions_per_slide=6, tokens=8, seed=0, lookalikes=True, mosaic=True)
    assert len(out) == 24
    slide_of = {n: sid for n, sid in enumerate(kinds)}
    ev_sources = set()
    for sid in kinds:
        for j in range(6):
            with h5py.File(paths.regions / f"{sid}-r{j}.h5") as f:
                x, ev, c = np.asarray(f["features"]), np.asarray(f["evidence"], bool), np.asarray(f["coords"])
            src = [(slide_of[int(v // 100)], int(v % 100)) for v in x[:, 0]]
            for (s, i), row, xy in zip(src, x, c):
                np.testing.assert_array_equal(row, feats[s][i])  # a patch's own features (feature_norm "token")
                np.testing.assert_array_equal(xy, coords[i])
            assert len(x) == 8 and ev.sum() == (0 if kinds[sid] == "none" else 2)
            assert all(kinds[s] == kinds[sid] and i in (3, 40) for (s, i), e in zip(src, ev) if e)
            assert sum(i == 10 for s, i in src) == 1  # one look-alike, as the slide holds
            assert all(s == sid for (s, i), e in zip(src, ev) if not e and i != 10)  # the fill is the slide's own
            ev_sources |= {(sid, s) for (s, i), e in zip(src, ev) if e}
    assert ("K1", "K2") in ev_sources and ("K2", "K1") in ev_sources  # evidence crosses slides of a kind
    # The pool is part of the recipe: the same settings on fewer training slides write the bags again.
    mtime = (paths.regions / "K1-r0.h5").stat().st_mtime_ns
    demo.write_region_bags(paths, rows, regions_per_slide=6, tokens=8, seed=0, lookalikes=True, mosaic=True)
    assert (paths.regions / "K1-r0.h5").stat().st_mtime_ns == mtime
    demo.write_region_bags(paths, rows[:3], regions_per_slide=6, tokens=8, seed=0, lookalikes=True, mosaic=True)
    assert (paths.regions / "K1-r0.h5").stat().st_mtime_ns != mtime


def test_patch_bags_ask_each_patch_what_it_shows(tmp_path):
    """Single-patch bags (region-level supervision): every evidence patch (answer: the slide's kind, repeated),
    then look-alikes and plain tissue (answer: "none of these"), each with its slide's normalisation; a question
    without a "none of these" option is asked of the evidence patches only; a slide without its record is
    reported and skipped; a rerun reuses the bags."""
    import h5py

    paths = demo.Paths(tmp_path)
    paths.features.mkdir(parents=True)
    (paths.bench / "evidence").mkdir(parents=True)
    coords = np.stack(np.meshgrid(np.arange(8) * 100, np.arange(8) * 100), -1).reshape(-1, 2)
    x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    evidence = np.zeros(64, np.uint8)
    evidence[[3, 40]] = 1
    for sid in ("S1", "S2", "S3"):
        with h5py.File(paths.features / f"{sid}.h5", "w") as f:
            f.create_dataset("features", data=x)
            f.create_dataset("coords", data=coords).attrs["patch_size_level0_exact"] = 100.0
            f.create_dataset("evidence", data=evidence)
    (paths.bench / "evidence" / "S1.json").write_text(json.dumps(
        {"kind": "keratin_pearl", "distractors": [{"kind": "vessel", "box": [210, 110, 290, 190]}]}))  # row 10
    (paths.bench / "evidence" / "S2.json").write_text(json.dumps({"kind": "keratin_pearl", "distractors": []}))
    opts = {"A": "keratin pearl", "B": "psammoma body", "C": "none of these", "D": ""}
    rows = [{"ID": "S1-kind", "Slide": "S1", **opts, "Answer": "A"},
            {"ID": "S2-kind", "Slide": "S2", **opts, "A": "keratin pearl", "C": "signet-ring cell cluster",
             "Answer": "A"},  # no "none of these" among its options
            {"ID": "S3-kind", "Slide": "S3", **opts, "Answer": "A"}]  # S3 has no record
    logs = []
    out = demo.write_patch_bags(paths, rows, patches_per_slide=5, seed=0, log=logs.append, feature_norm="bag_robust",
                                evidence_repeat=2)
    assert any("S3.json" in m and "skipped" in m for m in logs)
    s1 = [r for r in out if r["Slide"].startswith("S1-")]
    assert [r["Answer"] for r in s1] == ["A", "A", "A", "A", "C", "C", "C"]  # 2 evidence x 2, then 3 others
    assert len({r["ID"] for r in out}) == len(out)
    normed = demo.slide_normalized(x, "bag_robust")
    shown = []
    for j in range(5):
        with h5py.File(paths.regions / f"S1-p{j}.h5") as f:
            feats, c, ev = np.asarray(f["features"]), np.asarray(f["coords"]), np.asarray(f["evidence"])
        i = int(np.flatnonzero((coords == c[0]).all(1))[0])
        np.testing.assert_allclose(feats[0], normed[i], rtol=1e-6)
        assert ev.tolist() == [int(evidence[i])]
        shown.append(i)
    assert shown[:2] == [3, 40] and shown[2] == 10  # evidence first, then a look-alike before plain tissue
    s2 = [r for r in out if r["Slide"].startswith("S2-")]
    assert [r["Answer"] for r in s2] == ["A"] * 4  # evidence only: "none of these" is not an option
    mtime = (paths.regions / "S1-p0.h5").stat().st_mtime_ns
    assert demo.write_patch_bags(paths, rows, patches_per_slide=5, seed=0, log=logs.append,
                                 feature_norm="bag_robust", evidence_repeat=2) == out
    assert (paths.regions / "S1-p0.h5").stat().st_mtime_ns == mtime
    # Fewer bags per slide: the bags beyond the new count go (no question names them); other tags stay.
    (paths.regions / "S1-r7.h5").write_bytes(b"a region bag")
    demo.write_patch_bags(paths, rows, patches_per_slide=3, seed=0, log=logs.append, feature_norm="bag_robust")
    assert sorted(p.name for p in paths.regions.glob("S1-*.h5")) == ["S1-p0.h5", "S1-p1.h5", "S1-p2.h5", "S1-r7.h5"]


def test_probe_reads_a_demo_run_folder(first_run, tmp_path):
    from sparsewsi.demo import probe

    out, _, _ = first_run
    res = probe.probe_run_folder(out, log=None)
    assert json.loads((out / "probe.json").read_text())["mlp_kinds"]["classes"] == res["mlp_kinds"]["classes"]
    assert res["slides"] == 6 and res["mlp_kinds"]["test_patches"] > 0
    assert 0.0 <= res["mlp_kinds"]["per_class_accuracy"]["tissue"] <= 1.0
    assert res["skipped"] == {}
    with pytest.raises(FileNotFoundError, match="not a demo run folder"):
        probe.probe_run_folder(tmp_path, log=None)
    # A corrupt feature file is reported by path and skipped; the other slides are probed.
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(out / "bench", copy / "bench")
    shutil.copytree(out / "features", copy / "features")
    bad = sorted((copy / "features").glob("SYN-*.h5"))[0]
    bad.write_bytes(b"not an h5 file")
    logs = []
    res = probe.probe_run_folder(copy, log=logs.append)
    assert list(res["skipped"]) == [str(bad)] and res["slides"] == 5
    assert any(str(bad) in line and "skipped" in line for line in logs)


def test_seeds_rerun_the_model_stages_on_the_base_data(first_run, tmp_path):
    """``python -m sparsewsi.demo.seeds``: a seed with the base's own config is read from the base; another
    seed runs align..report in its own folder on the base's linked slides, features and questions (which it
    leaves untouched); seeds.json / seeds.md hold every seed and selector; data settings must match the base."""
    from sparsewsi.demo import seeds

    base, _, _ = first_run
    base_stages = (base / demo.STAGES_FILE).read_text()
    base_results = json.loads((base / "report" / "results.json").read_text())["eval"]["selectors"]
    logs = []
    res = seeds.run_seeds(base, tmp_path / "seeds", [0, 1], small_config(), log=logs.append)
    assert any("seed 0 is the base run's own config" in m for m in logs)
    folder = tmp_path / "seeds" / "seed1"
    stages = json.loads((folder / demo.STAGES_FILE).read_text())
    assert [s for s in demo.STAGES if stages[s]["status"] == "ran"] == list(demo.STAGES[demo.STAGES.index("align"):])
    assert all(stages[s]["done_in"] == str(base) for s in seeds.DATA_STAGES)
    for name in seeds.LINKED:
        assert (folder / name).is_symlink() and (folder / name).resolve() == (base / name).resolve()
    cfg = json.loads((folder / demo.CONFIG_FILE).read_text())
    assert cfg["train"]["seed"] == cfg["train"]["model"]["seed"] == cfg["train"]["model"]["llm_seed"] == 1
    assert (folder / "report" / "summary.md").is_file()
    assert (base / demo.STAGES_FILE).read_text() == base_stages  # the base is read, never written
    seed1 = json.loads((folder / "report" / "results.json").read_text())["eval"]["selectors"]
    on_disk = json.loads((tmp_path / "seeds" / "seeds.json").read_text())
    assert on_disk["seeds"] == [0, 1] and on_disk["selectors"] == res["selectors"]
    for sel in SELECTORS:
        row = res["selectors"][sel]
        assert row["accuracy"] == {"0": base_results[sel]["accuracy"], "1": seed1[sel]["accuracy"]}
        np.testing.assert_allclose(row["accuracy_stats"]["mean"],
                                   (base_results[sel]["accuracy"] + seed1[sel]["accuracy"]) / 2)
    md = (tmp_path / "seeds" / "seeds.md").read_text()
    assert "| learned |" in md and "seed 1" in md
    # A second call resumes: nothing is trained again.
    logs = []
    seeds.run_seeds(base, tmp_path / "seeds", [1], small_config(), log=logs.append)
    assert any("align: done earlier" in m for m in logs) and any("eval: done earlier" in m for m in logs)
    # Data settings must be the base's; model settings may differ (only checked here, not run).
    with pytest.raises(demo.DemoError, match=r"slides\.max_foci"):
        seeds.run_seeds(base, tmp_path / "other", [1], small_config(**{"slides.max_foci": 2}))
    seeds.check_base(base, small_config(**{"train.total_steps": 5, "align.steps": 3}))
    assert seeds.main(["--base", str(tmp_path), "--out", str(tmp_path / "x")]) == 2  # not a demo run folder


def fake_seeds_base(base: pathlib.Path, config, dataset_info: dict):
    """A demo run folder that ``seeds.check_base`` accepts without any data: ``config``, empty linked folders,
    the data stages recorded as done (the dataset stage's info = ``dataset_info``). Returns (base, stages)."""
    from sparsewsi.demo import seeds

    base.mkdir()
    (base / demo.CONFIG_FILE).write_text(json.dumps(demo.config_dict(config)))
    for name in seeds.LINKED:
        (base / name).mkdir()
    stages = {s: {"done": True, "wall_s": 1.0, "cpu_s": 1.0, "info": dataset_info if s == "dataset" else {}}
              for s in seeds.DATA_STAGES}
    (base / demo.STAGES_FILE).write_text(json.dumps(stages))
    return base, stages


def test_seeds_refuse_a_base_without_the_alignment_sets_the_config_needs(tmp_path):
    """A model setting may differ from the base's, but not ask for data the base never built."""
    from sparsewsi.demo import seeds

    config = small_config()
    # The base's alignment had no first phase on short bags.
    base, stages = fake_seeds_base(tmp_path / "base", config, {"align_data_path": "x"})
    with pytest.raises(demo.DemoError, match="align.short_steps"):
        seeds.check_base(base, config)
    seeds.check_base(base, small_config(**{"align.short_steps": 0}))
    del stages["extract"]
    (base / demo.STAGES_FILE).write_text(json.dumps(stages))
    with pytest.raises(demo.DemoError, match="extract are not done"):
        seeds.check_base(base, config)


def test_seeds_report_a_failing_seed_and_run_the_others(tmp_path, monkeypatch):
    """A batch job: a seed whose run fails (here stage 2 diverges) is reported with its reason, left out
    of the statistics, and the other seeds still run and make the table; the exit status says so."""
    from sparsewsi.demo import seeds

    config = small_config()
    base, _ = fake_seeds_base(tmp_path / "base", config, {"align_data_path": "x", "align_short_data_path": "y"})
    ran = []

    def fake_run_demo(cfg, folder, command, log):
        s = int(cfg.train.seed)
        ran.append(s)
        if s == 1:
            raise demo.DemoError("train diverged: non-finite loss at step 57")
        acc = {2: 0.75, 3: 0.85}[s]
        return {"eval": {"info": {"selectors": {"learned": {"accuracy": acc, "evidence_recall": 0.9}}}}}

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    logs = []
    res = seeds.run_seeds(base, tmp_path / "out", [1, 2, 3], config, log=logs.append)
    assert ran == [1, 2, 3]  # the failure did not stop the job
    assert res["seeds"] == [2, 3] and list(res["failed"]) == ["1"] and "step 57" in res["failed"]["1"]
    np.testing.assert_allclose(res["selectors"]["learned"]["accuracy_stats"]["mean"], 0.80)
    assert any("seed 1 FAILED" in m for m in logs)
    md = (tmp_path / "out" / "seeds.md").read_text()
    assert "seed 1: train diverged" in md and "| learned | 75.0 (0.900) | 85.0 (0.900) | **80.0**" in md
    assert json.loads((tmp_path / "out" / "seeds.json").read_text())["failed"] == res["failed"]
    assert seeds.main(["--base", str(base), "--out", str(tmp_path / "out2"), "--seeds", "1,2", "--config",
                       str(REPO / "configs" / "demo.py") + ":small", "--set", "num_slides=6",
                       "--no-progress"]) == 1
    assert (tmp_path / "out2" / "seeds.md").is_file()
