"""Evaluation runs with a real (tiny, random) model: batched predictor, selectors at the same budget,
missing features, resume after a crash, and a two-process sharded run merged into one report."""

import json
import os
import pathlib
import subprocess
import sys

import h5py
import numpy as np
import pytest

from sparsewsi.evaluation.items import load_eval_set
from sparsewsi.evaluation.predictor import PreparedQuestion, build_tiny_predictor
from sparsewsi.evaluation.report import merge_run
from sparsewsi.evaluation.runner import (BagSource, RunError, collect, ensure_manifest, manifest_for, read_jsonl,
                                         run_shard, shard_files, shard_path)

DIM = 16
REPO = pathlib.Path(__file__).resolve().parents[1]


def _write_bag(path, n, seed, evidence=False):
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        f["features"] = rng.normal(size=(n, DIM)).astype(np.float32)
        f["coords"] = (rng.integers(0, 40, size=(n, 2)) * 256).astype(np.int64)
        if evidence:
            f["evidence"] = rng.random(n) < 0.2


@pytest.fixture(scope="module")
def bench(shared_data, tmp_path_factory):
    """The first 24 real BCNB questions, and h5 bags for all their slides but two."""
    root = tmp_path_factory.mktemp("bench")
    lines = (shared_data / "SlideBench-VQA-BCNB.csv").read_text(encoding="utf-8").splitlines()[:25]
    data = root / "bcnb24.csv"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    items = load_eval_set(data).items
    slides = sorted({it.slide_id for it in items}, key=int)
    missing = set(slides[3:5])
    feats = root / "features"
    feats.mkdir()
    for i, s in enumerate(slides):
        if s not in missing:
            _write_bag(feats / f"{s}.h5", 20 + 7 * (i % 6), seed=i, evidence=True)  # N <= 64: one bag bucket
    return {"data": data, "features": feats, "missing": missing, "items": items}


@pytest.fixture(scope="module")
def predictor():
    return build_tiny_predictor(DIM, selector="learned", k=4, batch_size=8, max_new_tokens=6)


def _questions(n, seed=0):
    rng = np.random.default_rng(seed)
    return [PreparedQuestion(f"q{i}", f"Question {i}?\nA. yes\nB. no", rng.normal(size=(10 + 7 * i, DIM)).astype(np.float32),
                             rng.integers(0, 5000, size=(10 + 7 * i, 2))) for i in range(n)]


def test_batched_equals_one_at_a_time(predictor):
    qs = _questions(6)
    batched = predictor(qs)
    single = [predictor([q])[0] for q in qs]
    assert batched == single
    assert len(set(batched)) > 1  # replies depend on the question and its features
    assert any(t.strip() for t in batched)


@pytest.mark.parametrize("selector", ["random", "uniform", "spatial", "all", "oracle"])
def test_baseline_selectors_run_at_the_same_budget(selector):
    qs = _questions(3, seed=1)
    for q in qs:
        q.evidence = np.arange(q.features.shape[0]) % 5 == 0
    p = build_tiny_predictor(DIM, selector=selector, k=4, batch_size=8, max_new_tokens=4)
    assert p.describe()["k"] == 4 and p.describe()["selector"] == selector
    out = p(qs)
    assert len(out) == 3 and p(qs) == out  # deterministic (seeded per question)


def test_selector_changes_what_the_model_sees(predictor):
    qs = _questions(8, seed=2)
    uniform = build_tiny_predictor(DIM, selector="uniform", k=4, batch_size=8, max_new_tokens=6)
    assert predictor(qs) != uniform(qs)


def _run(bench, predictor, run_dir, *, limit=None, batch_size=1, shard=0, num_shards=1):
    eval_set = load_eval_set(bench["data"])
    source = BagSource(bench["features"])
    ensure_manifest(run_dir, manifest_for(eval_set, predictor.describe(), num_shards, {"batch_size": batch_size}))
    return run_shard(eval_set.items, predictor, source.prepare, run_dir, shard=shard, num_shards=num_shards,
                     batch_size=batch_size, limit=limit)


def test_missing_features_skipped_and_reported(bench, predictor, tmp_path):
    stats = _run(bench, predictor, tmp_path / "run", batch_size=4)
    n_missing = sum(it.slide_id in bench["missing"] for it in bench["items"])
    assert n_missing > 0 and stats.skipped == n_missing and stats.evaluated == 24 - n_missing
    res = merge_run(tmp_path / "run", load_eval_set(bench["data"]))
    rep = res["report"]
    assert res["complete"] and rep["skipped"]["n"] == n_missing
    assert {s["slide_id"] for s in rep["skipped"]["items"]} == bench["missing"]
    ch = rep["choice"]
    assert ch["accuracy_skipped_as_wrong"] == pytest.approx(ch["correct"] / 24)
    assert ch["accuracy"] == pytest.approx(ch["correct"] / (24 - n_missing))
    md = (tmp_path / "run" / "results.md").read_text()
    assert "feature_file_missing" in md and "sha256" in md and "constant letter" in md
    meta = json.loads((tmp_path / "run" / "results.json").read_text())["meta"]
    assert meta["selector"] == "learned" and meta["k"] == 4 and meta["data_sha256"] == load_eval_set(bench["data"]).sha256
    assert (tmp_path / "run" / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_after_interruption(bench, predictor, tmp_path):
    full = tmp_path / "full"
    _run(bench, predictor, full)
    reference = merge_run(full, load_eval_set(bench["data"]))

    run = tmp_path / "resumed"
    first = _run(bench, predictor, run, limit=7)
    assert first.evaluated + first.skipped == 7
    path = shard_path(run, 0, 1)
    with open(path, "a") as f:  # a crash in the middle of writing a line
        f.write('{"item_id": "12", "status": "ok", "predic')
    second = _run(bench, predictor, run)
    assert second.already_done == 7 and second.evaluated + second.skipped == 24 - 7
    third = _run(bench, predictor, run)  # nothing left to do
    assert third.evaluated == third.skipped == 0
    ids = [r["item_id"] for r in read_jsonl(path)]
    assert len(ids) == len(set(ids)) == 24
    resumed = merge_run(run, load_eval_set(bench["data"]))
    assert resumed["duplicates"] == 0
    assert resumed["report"] == reference["report"]
    preds_a, _, _ = collect(shard_files(full))
    preds_b, _, _ = collect(shard_files(run))
    assert preds_a == preds_b


def test_rerun_with_other_settings_is_refused(bench, predictor, tmp_path):
    _run(bench, predictor, tmp_path / "run", limit=2)
    other = build_tiny_predictor(DIM, selector="uniform", k=4, batch_size=8, max_new_tokens=6)
    with pytest.raises(RunError, match="selector"):
        _run(bench, other, tmp_path / "run")


def test_corrupt_line_in_the_middle_is_an_error(tmp_path):
    p = tmp_path / "predictions.shard00000-of00001.jsonl"
    p.write_text('{"item_id": "1", "status": "ok", "prediction": "A"}\nnot json\n{"item_id": "2"}\n')
    with pytest.raises(RunError, match="line 2"):
        read_jsonl(p)


def test_two_processes_merge_shards(bench, tmp_path):
    run = tmp_path / "mp"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    base = [sys.executable, "-m", "sparsewsi.cli", "eval", "--data", str(bench["data"]), "--features",
            str(bench["features"]), "--out", str(run), "--tiny", "--selector", "uniform", "--k", "4",
            "--batch-size", "4", "--max-new-tokens", "4", "--num-shards", "2", "--no-merge"]
    procs = [subprocess.Popen(base + ["--shard", str(i)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    files = shard_files(run)
    assert [f.name for f in files] == ["predictions.shard00000-of00002.jsonl", "predictions.shard00001-of00002.jsonl"]
    per_shard = [{r["item_id"] for r in read_jsonl(f)} for f in files]
    assert not per_shard[0] & per_shard[1] and len(per_shard[0] | per_shard[1]) == 24
    from sparsewsi import cli
    assert cli.main(["score", "--data", str(bench["data"]), "--run", str(run)]) == 0
    res = json.loads((run / "results.json").read_text())
    assert res["complete"] and res["duplicates"] == 0 and res["meta"]["num_shards"] == 2
    assert res["meta"]["selector"] == "uniform" and res["meta"]["k"] == 4
    assert res["report"]["counts"]["predicted"] + res["report"]["counts"]["skipped"] == 24
    assert res["shards"] == {f.name: len(s) for f, s in zip(files, per_shard)}


def test_eval_command_with_a_trainer_checkpoint(bench, tmp_path):
    """`sparsewsi eval --checkpoint <workdir>`: model.json + an orbax step as the trainer writes them."""
    model_lib = pytest.importorskip("sparsewsi.model")
    training_ckpt = pytest.importorskip("sparsewsi.training.checkpoint")
    from sparsewsi import cli
    from sparsewsi.llm import build_tiny_tokenizer, tiny_config

    tok = build_tiny_tokenizer()
    cfg = model_lib.SparseWSIConfig(feature_dim=DIM, llm=tiny_config(vocab_size=len(tok)),
                                    image_token_id=model_lib.image_token_id(tok), k=4, scorer_hidden=16, seed=3)
    spec = model_lib.ModelSpec(model=cfg, tokenizer="builtin:tiny")
    model = model_lib.build_model(spec)
    trained = {n: np.asarray(v) for n, v in model_lib.flat_params(model).items() if not n.startswith("llm.")}
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    (workdir / "model.json").write_text(spec.to_json())
    ckpt = training_ckpt.Checkpointer(workdir, every=1, async_save=False)
    ckpt.save(7, {"params": trained, "step": 7}, force=True)
    ckpt.manager.wait_until_finished()
    out = tmp_path / "run"
    args = ["eval", "--data", str(bench["data"]), "--features", str(bench["features"]), "--out", str(out),
            "--checkpoint", str(workdir), "--k", "4", "--max-new-tokens", "4", "--batch-size", "8"]
    assert cli.main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["complete"] and res["meta"]["model"] == f"checkpoint:{workdir}" and res["meta"]["k"] == 4
    assert res["report"]["skipped"]["n"] == sum(it.slide_id in bench["missing"] for it in bench["items"])
    assert cli.main(args) == 0  # rerun: nothing left, no duplicates
    assert len(read_jsonl(shard_path(out, 0, 1))) == 24
