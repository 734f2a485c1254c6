"""Does a frozen patch encoder separate the synthetic evidence patches? A measurement.

The demo's learned selector can only find evidence the features show. This generates a small
benchmark, extracts features through the real pipeline (tissue -> grid -> encoder, random-weight
encoder by default), labels every patch (evidence / look-alike distractor / plain tissue) from the
evidence boxes, and fits two probes on the training slides, scored on held-out slides:

* nearest centroid (features standardised per dimension), evidence vs the rest;
* a ridge-regression linear probe; per held-out slide its top-``k`` patches are compared with the
  evidence: recall@k, against the recall@k that random and uniform (evenly spaced) ``k`` reach.

    python -m sparsewsi.demo.probe --out /tmp/probe --slides 24 --encoder tiny
    python -m sparsewsi.demo.probe --run runs/demo     # the demo's own slides and features

A third probe, a small MLP fitted to tell plain tissue and every structure kind apart (slide-normalised
features, as the demo's model sees them), is the ceiling a reader of the selected tokens could reach.

Writes ``probe.json`` (atomic) in ``--out`` and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from sparsewsi.demo import synthetic_slides as ss

NORMAL, EVIDENCE, DISTRACTOR = 0, 1, 2


def patch_classes(coords: np.ndarray, patch_size_level0: float, record: dict[str, Any]) -> np.ndarray:
    """(N,) int8: 1 evidence, 2 look-alike distractor, 0 plain tissue (from an evidence record)."""
    out = np.zeros(len(coords), np.int8)
    dis = ss.evidence_labels(coords, patch_size_level0, [d["box"] for d in record["distractors"]])
    ev = ss.evidence_labels(coords, patch_size_level0, [e["box"] for e in record["evidence"]])
    out[dis] = DISTRACTOR
    out[ev] = EVIDENCE
    return out


ALL_KINDS = ss.EVIDENCE_KINDS + ss.DISTRACTOR_KINDS


def patch_kinds(coords: np.ndarray, patch_size_level0: float, record: dict[str, Any]) -> np.ndarray:
    """(N,) int8: index into :data:`ALL_KINDS` of the structure a patch holds, -1 for plain tissue."""
    out = np.full(len(coords), -1, np.int8)
    for item in record["distractors"] + record["evidence"]:
        hit = ss.evidence_labels(coords, patch_size_level0, [item["box"]])
        out[hit] = ALL_KINDS.index(item["kind"])
    return out


def kind_accuracy(features: Sequence[np.ndarray], kinds: Sequence[np.ndarray], train: Sequence[int],
                  test: Sequence[int]) -> dict[str, float]:
    """Nearest-centroid classification of the structure patches into the 8 kinds (4 evidence,
    4 look-alikes), fitted on ``train`` bags: can a reader of the selected tokens tell them apart?"""
    xtr = np.concatenate([f[k >= 0] for f, k in ((features[i], kinds[i]) for i in train)]).astype(np.float64)
    ytr = np.concatenate([kinds[i][kinds[i] >= 0] for i in train])
    mu, sd = _standardiser(np.concatenate([features[i] for i in train]).astype(np.float64))
    z = (xtr - mu) / sd
    present = np.unique(ytr)
    cents = np.stack([z[ytr == c].mean(0) for c in present])
    correct = total = ev_correct = ev_total = 0
    for i in test:
        m = kinds[i] >= 0
        zi = (features[i][m].astype(np.float64) - mu) / sd
        pred = present[np.argmin(((zi[:, None, :] - cents[None]) ** 2).sum(-1), 1)]
        y = kinds[i][m]
        correct += int((pred == y).sum())
        total += len(y)
        ev = y < len(ss.EVIDENCE_KINDS)
        ev_correct += int((pred[ev] == y[ev]).sum())
        ev_total += int(ev.sum())
    return {"kind_accuracy_all_structures": correct / max(total, 1),
            "kind_accuracy_evidence_patches": ev_correct / max(ev_total, 1), "structure_patches_tested": total}


def mlp_kind_probe(features: Sequence[np.ndarray], kinds: Sequence[np.ndarray], train: Sequence[int],
                   test: Sequence[int], *, tissue_per_bag: int = 20, hidden: int = 128, steps: int = 1500,
                   lr: float = 3e-3, squares: bool = True, seed: int = 0,
                   answer_threshold: float = 0.8) -> dict[str, Any]:
    """A supervised ceiling for the demo's reader: per-patch classification into plain tissue and the
    structure kinds of :data:`ALL_KINDS` by a one-hidden-layer MLP fitted on the ``train`` bags.

    The reader sees a patch only through its features, normalised per slide (median / MAD, the demo
    model's ``bag_robust``); the probe sees the same (with ``squares``, also ``log1p(x^2)``, as the
    demo's scorer). Every structure patch of a bag is used, plus ``tissue_per_bag`` random plain-tissue
    patches; the loss is class-balanced. A reader as good as this probe on the patches it is shown would
    name a slide's evidence kind about as often as the per-class accuracies here.

    Args:
      features: per bag, [N, D] raw patch features.
      kinds: per bag, [N] int (:func:`patch_kinds`: index into :data:`ALL_KINDS`, -1 plain tissue).
      train / test: bag indices.
    Slide level, ``slide_answers``: each test bag read whole by the max rule (the evidence kind of the
    patch with the highest evidence-kind probability, if above ``answer_threshold``, else "none"), against
    the bag's evidence kind ("none" without evidence; bags holding several kinds are left out): what a
    reader of every token who reads each patch as well as this probe would answer. Look-alikes that the
    probe takes for evidence show up here as wrong answers on evidence-free slides.

    Returns:
      ``classes`` (names, "tissue" first), ``per_class_accuracy`` on the test bags' patches (None for a
      class absent there), ``confusion`` [true][predicted] counts, ``train_patches``, ``test_patches``,
      ``slide_answers`` (``accuracy``, ``by_answer`` {answer: [correct, n]}, ``threshold``).
    """
    import jax
    import jax.numpy as jnp
    import optax

    from sparsewsi.demo.run import slide_normalized

    names = ["tissue"] + list(ALL_KINDS)
    rng = np.random.default_rng(seed)

    def rows(indices):
        xs, ys = [], []
        for i in indices:
            z = slide_normalized(np.asarray(features[i], np.float32), "bag_robust")
            if squares:
                z = np.concatenate([z, np.log1p(z ** 2)], 1)
            y = np.asarray(kinds[i], np.int64) + 1  # -1 (tissue) -> 0
            tissue = np.flatnonzero(y == 0)
            keep = np.concatenate([np.flatnonzero(y > 0), rng.choice(tissue, min(tissue_per_bag, len(tissue)),
                                                                       replace=False)])
            xs.append(z[keep])
            ys.append(y[keep])
        return np.concatenate(xs), np.concatenate(ys)

    xtr, ytr = rows(train)
    xte, yte = rows(test)
    counts = np.bincount(ytr, minlength=len(names)).astype(np.float64)
    weight = jnp.asarray(np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / (counts > 0).sum(), 0.0),
                         jnp.float32)
    k1, k2 = jax.random.split(jax.random.key(seed))
    d = xtr.shape[1]
    params = {"w1": jax.random.normal(k1, (d, hidden)) / np.sqrt(d), "b1": jnp.zeros(hidden),
              "w2": jax.random.normal(k2, (hidden, len(names))) / np.sqrt(hidden), "b2": jnp.zeros(len(names))}

    def logits(p, x):
        return jax.nn.gelu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    def loss(p, x, y):
        ce = optax.softmax_cross_entropy_with_integer_labels(logits(p, x), y)
        return jnp.sum(ce * weight[y]) / jnp.sum(weight[y]) + 1e-4 * sum(jnp.sum(v ** 2) for v in jax.tree.leaves(p))

    opt = optax.adam(lr)
    x, y = jnp.asarray(xtr, jnp.float32), jnp.asarray(ytr)

    @jax.jit
    def fit(p):
        def body(carry, _):
            p, st = carry
            g = jax.grad(loss)(p, x, y)
            u, st = opt.update(g, st)
            return (optax.apply_updates(p, u), st), None
        return jax.lax.scan(body, (p, opt.init(p)), None, length=steps)[0][0]

    params = fit(params)
    pred = np.asarray(jnp.argmax(logits(params, jnp.asarray(xte, jnp.float32)), 1))
    confusion = np.zeros((len(names), len(names)), np.int64)
    np.add.at(confusion, (yte, pred), 1)
    per_class = {n: (float(confusion[c, c] / confusion[c].sum()) if confusion[c].sum() else None)
                 for c, n in enumerate(names)}
    n_ev = len(ss.EVIDENCE_KINDS)  # ALL_KINDS[:n_ev] are the evidence kinds (columns 1..n_ev)
    by_answer: dict[str, list[int]] = {}
    for i in test:
        z = slide_normalized(np.asarray(features[i], np.float32), "bag_robust")
        if squares:
            z = np.concatenate([z, np.log1p(z ** 2)], 1)
        present = sorted({int(k) for k in np.asarray(kinds[i]) if 0 <= k < n_ev})
        if len(present) > 1:
            continue
        truth = ALL_KINDS[present[0]] if present else "none"
        prob = np.asarray(jax.nn.softmax(logits(params, jnp.asarray(z, jnp.float32)), -1))[:, 1:1 + n_ev].max(0)
        answer = ALL_KINDS[int(prob.argmax())] if prob.max() > answer_threshold else "none"
        row = by_answer.setdefault(truth, [0, 0])
        row[0] += int(answer == truth)
        row[1] += 1
    n_slides = sum(n for _, n in by_answer.values())
    slide_answers = {"accuracy": (sum(c for c, _ in by_answer.values()) / n_slides) if n_slides else None,
                     "by_answer": dict(sorted(by_answer.items())), "threshold": answer_threshold}
    return {"classes": names, "per_class_accuracy": per_class, "confusion": confusion.tolist(),
            "train_patches": int(len(ytr)), "test_patches": int(len(yte)), "squares": squares,
            "slide_answers": slide_answers}


def _standardiser(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu = x.mean(0)
    sd = x.std(0)
    return mu, np.where(sd > 0, sd, 1.0)


def _auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (rank statistic; ties averaged)."""
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="stable")
    ranks = np.empty(len(order), np.float64)
    ranks[order] = np.arange(1, len(order) + 1)
    allv = np.concatenate([pos, neg])
    for v in np.unique(allv):  # average ranks of ties
        m = allv == v
        if m.sum() > 1:
            ranks[m] = ranks[m].mean()
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def probe(features: Sequence[np.ndarray], classes: Sequence[np.ndarray], train: Sequence[int], test: Sequence[int],
          k: int = 32, ridge: float = 1.0, seed: int = 0) -> dict[str, Any]:
    """Fit on the ``train`` bags, score the ``test`` bags.

    Args:
      features: per bag (N_i, D) float32.
      classes: per bag (N_i,) int from :func:`patch_classes`.

    Returns a dict of metrics (see the module docstring); recall@k is averaged over test bags.
    """
    xtr = np.concatenate([features[i] for i in train]).astype(np.float64)
    ytr = np.concatenate([classes[i] for i in train])
    mu, sd = _standardiser(xtr)
    z = (xtr - mu) / sd
    # Nearest centroid: evidence vs everything else (plain tissue and look-alikes pooled).
    c_ev = z[ytr == EVIDENCE].mean(0)
    c_rest = z[ytr != EVIDENCE].mean(0)
    # Ridge regression onto +1 (evidence) / -1 (rest), class-balanced weights.
    t = np.where(ytr == EVIDENCE, 1.0, -1.0)
    w_s = np.where(ytr == EVIDENCE, 0.5 / max((ytr == EVIDENCE).sum(), 1), 0.5 / max((ytr != EVIDENCE).sum(), 1))
    za = np.concatenate([z, np.ones((len(z), 1))], 1)
    A = (za * w_s[:, None]).T @ za + ridge / len(z) * np.eye(za.shape[1])
    w = np.linalg.solve(A, (za * w_s[:, None]).T @ t)
    rng = np.random.default_rng(seed)
    nc_correct, nc_total, nc_ev_hit, nc_ev, nc_dis_fp, nc_dis = 0, 0, 0, 0, 0, 0
    rec_probe, rec_rand, rec_unif, aucs, aucs_dis = [], [], [], [], []
    for i in test:
        zi = (features[i].astype(np.float64) - mu) / sd
        yi = classes[i]
        ev = yi == EVIDENCE
        pred_ev = ((zi - c_ev) ** 2).sum(1) < ((zi - c_rest) ** 2).sum(1)
        nc_correct += int((pred_ev == ev).sum())
        nc_total += len(yi)
        nc_ev_hit += int((pred_ev & ev).sum())
        nc_ev += int(ev.sum())
        nc_dis_fp += int((pred_ev & (yi == DISTRACTOR)).sum())
        nc_dis += int((yi == DISTRACTOR).sum())
        s = np.concatenate([zi, np.ones((len(zi), 1))], 1) @ w
        aucs.append(_auc(s, ev))
        nd = yi != NORMAL
        aucs_dis.append(_auc(s[nd], ev[nd]))  # evidence vs look-alikes only
        if ev.sum() == 0:
            continue
        kk = min(k, len(yi))
        top = np.argsort(-s, kind="stable")[:kk]
        rec_probe.append(ev[top].sum() / ev.sum())
        rec_rand.append(ev[rng.choice(len(yi), kk, replace=False)].sum() / ev.sum())
        unif = np.unique(np.round(np.linspace(0, len(yi) - 1, kk)).astype(int))
        rec_unif.append(ev[unif].sum() / ev.sum())
    return {
        "train_bags": len(train), "test_bags": len(test), "k": k,
        "train_patches": int(len(ytr)), "train_evidence_patches": int((ytr == EVIDENCE).sum()),
        "nearest_centroid": {"accuracy": nc_correct / max(nc_total, 1),
                             "evidence_recall": nc_ev_hit / max(nc_ev, 1),
                             "distractors_called_evidence": nc_dis_fp / max(nc_dis, 1)},
        "linear_probe": {"auc_evidence_vs_all": float(np.nanmean(aucs)),
                         "auc_evidence_vs_lookalikes": float(np.nanmean(aucs_dis)),
                         f"recall@{k}": float(np.mean(rec_probe)) if rec_probe else float("nan")},
        f"random_recall@{k}": float(np.mean(rec_rand)) if rec_rand else float("nan"),
        f"uniform_recall@{k}": float(np.mean(rec_unif)) if rec_unif else float("nan"),
    }


def load_bags(bench_dir: pathlib.Path, features_dir: pathlib.Path, manifest: dict[str, Any]):
    """Every slide of ``manifest`` with a readable feature file and evidence record.

    Returns (features [N, D] list, :func:`patch_classes` list, :func:`patch_kinds` list, train bag
    indices, test bag indices, skipped: ``{path: reason}`` of the slides left out, e.g. a missing or
    unreadable feature file)."""
    import h5py

    feats, classes, kinds, split, skipped = [], [], [], [], {}
    for s in manifest["slides"]:
        h5 = features_dir / f"{s['slide_id']}.h5"
        if not h5.is_file():
            skipped[os.fspath(h5)] = "no feature file"
            continue
        try:
            rec = json.loads((bench_dir / s["evidence_file"]).read_text())
            with h5py.File(h5, "r") as f:
                x = np.asarray(f["features"], np.float32)
                coords = np.asarray(f["coords"])
                ps = float(f["coords"].attrs["patch_size_level0_exact"])
            c, k = patch_classes(coords, ps, rec), patch_kinds(coords, ps, rec)
        except (OSError, KeyError, ValueError, TypeError) as e:
            skipped[os.fspath(h5)] = f"{type(e).__name__}: {e}"
            continue
        feats.append(x)
        classes.append(c)
        kinds.append(k)
        split.append(s["split"])
    train = [i for i, sp in enumerate(split) if sp == "train"]
    test = [i for i, sp in enumerate(split) if sp == "test"]
    return feats, classes, kinds, train, test, skipped


def probe_all(features, classes, kinds, train, test, k: int = 32) -> dict[str, Any]:
    """The three probes on loaded bags: :func:`probe` (linear, evidence vs the rest), nearest-centroid
    kinds (:func:`kind_accuracy`) and the MLP kind probe (:func:`mlp_kind_probe`)."""
    res = probe(features, classes, train, test, k=k)
    res["nearest_centroid_kinds"] = kind_accuracy(features, kinds, train, test)
    res["mlp_kinds"] = mlp_kind_probe(features, kinds, train, test)
    return res


def probe_run_folder(run_dir: os.PathLike | str, *, k: int = 32, log=print) -> dict[str, Any]:
    """Probe the slides and features of a finished ``sparsewsi demo`` run folder (``bench/``, ``features/``)
    without generating anything; writes ``<run_dir>/probe.json`` (atomic) and returns it."""
    run_dir = pathlib.Path(run_dir)
    man_path = run_dir / "bench" / "manifest.json"
    if not man_path.is_file() or not (run_dir / "features").is_dir():
        raise FileNotFoundError(f"{run_dir}: not a demo run folder (needs bench/manifest.json and features/; "
                                "run `sparsewsi demo --until extract` first)")
    man = json.loads(man_path.read_text())
    feats, classes, kinds, train, test, skipped = load_bags(run_dir / "bench", run_dir / "features", man)
    for path, reason in skipped.items():
        if log:
            log(f"probe: {path}: {reason}; slide skipped")
    if not train or not test:
        raise ValueError(f"{run_dir}: the probe needs train and test slides with features "
                         f"(found {len(train)} train, {len(test)} test; {len(skipped)} skipped)")
    res = probe_all(feats, classes, kinds, train, test, k=k)
    res.update({"run_dir": os.fspath(run_dir), "slides": len(feats), "patches": int(sum(len(x) for x in feats)),
                "skipped": skipped})
    ss.write_json_atomic(run_dir / "probe.json", res)
    if log:
        log(json.dumps(res, indent=1))
    return res


def run(out_dir: os.PathLike | str, cfg: ss.BenchmarkConfig, *, encoder: str = "tiny", encoder_seed: int = 0,
        workers: int = 1, k: int = 32, log=print) -> dict[str, Any]:
    """Generate ``cfg`` in ``out_dir/bench``, extract to ``out_dir/features``, probe; returns the results."""
    from sparsewsi.features import extract

    out = pathlib.Path(out_dir)
    t0 = time.perf_counter()
    man = ss.generate_benchmark(out / "bench", cfg, workers=workers, log=None)
    t_gen = time.perf_counter() - t0
    ecfg = extract.ExtractConfig(encoder=encoder, seed=encoder_seed, patch_size=cfg.patch_size,
                                 target_mpp=cfg.target_mpp, thumbnails=False)
    slides = [str(out / "bench" / s["file"]) for s in man["slides"]]
    t1 = time.perf_counter()
    results = extract.run_extraction(slides, str(out / "features"), ecfg, progress=False, log=lambda s: None)
    t_ext = time.perf_counter() - t1
    failed = [r.reason for r in results if r.status == "failed"]
    feats, classes, kinds, train, test, skipped = load_bags(out / "bench", out / "features", man)
    n_patches = sum(len(x) for x in feats)
    res = probe_all(feats, classes, kinds, train, test, k=k)
    res["skipped"] = skipped
    ev_frac = [float((c == EVIDENCE).sum() / len(c)) for c in classes]
    foci = [s["count"] for s in man["slides"]]
    res.update({
        "encoder": encoder, "encoder_seed": encoder_seed, "config": cfg.to_json(), "slides": len(feats),
        "patches": n_patches, "mean_patches_per_slide": n_patches / max(len(feats), 1),
        "evidence_fraction_max": max(ev_frac) if ev_frac else float("nan"),
        "evidence_patches_equal_foci": sum(int((c == EVIDENCE).sum()) == f for c, f in zip(classes, foci)),
        "extraction_failures": failed,
        "seconds": {"generate": round(t_gen, 2), "generate_per_slide": round(t_gen / max(len(slides), 1), 3),
                    "extract": round(t_ext, 2), "extract_patches_per_s": round(n_patches / max(t_ext, 1e-9), 1),
                    "workers": workers},
    })
    ss.write_json_atomic(out / "probe.json", res)
    if log:
        log(json.dumps(res, indent=1))
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sparsewsi.demo.probe", description=__doc__.splitlines()[0])
    p.add_argument("--out", help="folder for a new small benchmark, its features and probe.json")
    p.add_argument("--run", help="probe a finished `sparsewsi demo` run folder instead (its bench/ and features/; "
                                 "writes <run>/probe.json)")
    p.add_argument("--slides", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", choices=sorted(ss.PRESETS), default="demo")
    p.add_argument("--encoder", default="tiny")
    p.add_argument("--encoder-seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("-k", type=int, default=32)
    a = p.parse_args(argv)
    if bool(a.out) == bool(a.run):
        p.error("give exactly one of --out (generate and probe) and --run (probe a demo run folder)")
    if a.run:
        probe_run_folder(a.run, k=a.k)
        return 0
    import dataclasses

    cfg = dataclasses.replace(ss.PRESETS[a.preset], num_slides=a.slides, seed=a.seed)
    run(a.out, cfg, encoder=a.encoder, encoder_seed=a.encoder_seed, workers=a.workers, k=a.k)
    return 0


if __name__ == "__main__":
    sys.exit(main())
