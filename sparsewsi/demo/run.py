"""``sparsewsi demo``, the main job end to end: one plain function per stage.

    slides    seeded synthetic SVS/TIFF slides with sparse evidence (:mod:`sparsewsi.demo.synthetic_slides`)
    extract   tissue -> grid -> encoder features, the ``sparsewsi extract`` code path (TRIDENT .h5 bags)
    annotate  per-patch ``evidence`` flags added to each bag (read by the oracle and evidence recall)
    dataset   training questions (+ option-order augmentation of the training split) -> TFDS dataset
              (``data_pipelines`` ``synthetic_slidebench`` builder); region bags (a training slide's
              evidence patches, with ``align.lookalikes`` its look-alike patches, with ``align.mosaic``
              both drawn from all training slides, + random ones) and their questions -> the
              alignment dataset
    align     stage 1: projector + tiny LLM learn to read visual tokens on the region bags
    train     stage 2, from the aligned weights: SparseWSI (scorer -> Soft Top-K + VP noise gate +
              denoiser -> projector -> tiny LLM) with SparseLearn on whole slides, through the trainer
              and the ``train`` command's data_pipelines wiring
    eval      the ``sparsewsi eval`` runner on the test questions for each selector at budget k
              (learned, random, uniform, spatial, all tokens (capped), oracle) + evidence recall@k
    report    summary.md, accuracy chart, selection heatmaps over slide thumbnails, training curves

Layout of the run folder (default ``runs/demo``)::

    demo_config.json   the run's config (a rerun with other content-deciding settings is refused)
    stages.json        finished stages with their wall / CPU seconds (a rerun skips them)
    bench/             the synthetic benchmark (slides/, evidence/, questions/, manifest.json)
    features/          <slide>.h5 bags (+ thumbnails/, extract_summary.process0.json)
    dataset/           tfds/ (the prepared dataset), tfds_align/ (the region-bag dataset)
    regions/           <slide>-r<j>.h5 region bags of the alignment stage
    align/, train/     the trainer workdirs of stages 1 and 2 (model.json, checkpoints/, metrics.jsonl)
    eval/<selector>/   evaluation runs (run.json, predictions, results.json/md/png)
    report/            summary.md, results.json, accuracy.png, training_curves.png, heatmaps/

Every stage is resumable: finished stages are recorded in ``stages.json`` and skipped; an
interrupted stage resumes from what it had written (slides and bags already written, the latest
training checkpoint, questions already answered). The report is rewritten on every run (seconds).
Everything derives from ``config.seed``.

This module is the command-line layer: it is the one place (besides ``sparsewsi.train_cli``, whose
wiring it reuses) where ``data_pipelines`` is imported, lazily inside :func:`stage_dataset` and
:func:`stage_train`.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from sparsewsi import atomic

STAGES = ("slides", "extract", "annotate", "dataset", "align", "train", "polish", "eval", "report")
STAGES_FILE = "stages.json"
CONFIG_FILE = "demo_config.json"
# The patch geometry a region bag's ``coords`` keep from its slide's (see :func:`_region_coord_attrs`).
REGION_COORD_ATTRS = ("patch_size", "patch_size_level0", "patch_size_level0_exact", "stride_level0", "mpp",
                      "target_mpp", "read_level", "read_downsample")
# Settings that do not change any result (throughput and display only): may differ between reruns.
VOLATILE_KEYS = ("progress", "workers", "extract.batch_size", "extract.threads", "extract.slide_workers",
                 "train.progress",
                 "train.log_every", "eval.batch_size")


class DemoError(RuntimeError):
    """A demo run that cannot go on as asked; the message names the file or setting."""


Log = Callable[[str], None]


# ------------------------------------------------------------------------------------------------
# Run folder, config and stage bookkeeping
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Paths:
    """Where each stage writes: ``paths.<name>`` is ``root / <name>`` for every name in ``FOLDERS``."""

    root: pathlib.Path
    FOLDERS = ("bench", "features", "dataset", "regions", "align", "train", "polish", "eval", "report")

    def __getattr__(self, name: str) -> pathlib.Path:  # only called for names that are not attributes
        if name in Paths.FOLDERS:
            return self.root / name
        raise AttributeError(f"{type(self).__name__} has no folder {name!r}; folders: {', '.join(Paths.FOLDERS)}")


def write_json_atomic(path: os.PathLike | str, obj: Any) -> None:
    atomic.write_json_atomic(path, obj, sort_keys=True, default=_json_default)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, pathlib.Path):
        return str(o)
    return str(o)


def config_dict(config) -> dict[str, Any]:
    """The config as plain JSON data (tuples become lists)."""
    return json.loads(json.dumps(config.to_dict(), default=_json_default))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_digest(config) -> str:
    """SHA-256 (16 hex) of the content-deciding settings (everything but :data:`VOLATILE_KEYS`)."""
    flat = {k: v for k, v in flatten(config_dict(config)).items() if k not in VOLATILE_KEYS}
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]


def check_run_folder(paths: Paths, config) -> None:
    """Record the config in a new run folder, or check that it matches the one already there.

    Raises:
      DemoError: the folder holds a run of other content-deciding settings (names them).
    """
    path = paths.root / CONFIG_FILE
    now = config_dict(config)
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DemoError(f"{path}: not valid JSON ({e}); delete the run folder to start again") from e
        a, b = flatten(old), flatten(now)
        diff = sorted(k for k in set(a) | set(b) if k not in VOLATILE_KEYS and a.get(k) != b.get(k))
        if diff:
            detail = "; ".join(f"{k}: {a.get(k)!r} there, {b.get(k)!r} now" for k in diff[:8])
            raise DemoError(f"{paths.root} holds a demo run with other settings ({detail}); "
                            "use another --out or delete that folder")
    paths.root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, now)


def read_stages(paths: Paths) -> dict[str, Any]:
    """``stages.json``: stage -> {"wall_s", "cpu_s", "info", "finished_at"} for finished stages."""
    path = paths.root / STAGES_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}  # a damaged record only costs re-checking the stages (each one skips its finished work)


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class StageTimer:
    """Wall-clock and CPU (user + system, this process and its children) seconds of a block."""

    def __enter__(self):
        self.wall0, self.cpu0 = time.perf_counter(), _cpu_seconds()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall0
        self.cpu = _cpu_seconds() - self.cpu0


# ------------------------------------------------------------------------------------------------
# Stage 1: slides
# ------------------------------------------------------------------------------------------------

def benchmark_config(config):
    """The :class:`~sparsewsi.demo.synthetic_slides.BenchmarkConfig` the demo config describes."""
    from sparsewsi.demo.synthetic_slides import EVIDENCE_KINDS, BenchmarkConfig

    s = config.slides
    return BenchmarkConfig(
        num_slides=int(config.num_slides), seed=int(config.seed), test_fraction=float(config.test_fraction),
        mpp=float(s.mpp), patch_size=int(s.patch_size), target_mpp=float(s.target_mpp),
        tissue_patches=tuple(int(v) for v in s.tissue_patches), max_foci=int(s.max_foci),
        distractors=tuple(int(v) for v in s.distractors), max_evidence_fraction=float(s.max_evidence_fraction),
        focus_size=tuple(float(v) for v in s.focus_size), svs_every=int(s.svs_every), tile=int(s.tile),
        jpeg_quality=int(s.jpeg_quality), option_order=str(s.get("option_order", "shuffled")),
        questions=tuple(str(q) for q in s.get("questions", ("kind", "count"))),
        kinds=tuple(str(k) for k in s.get("kinds", EVIDENCE_KINDS)), none_option=bool(s.get("none_option", False)))


def stage_slides(config, paths: Paths, log: Log = print) -> dict[str, Any]:
    """Generate (or finish) the synthetic benchmark in ``paths.bench``."""
    from sparsewsi.demo.synthetic_slides import generate_benchmark

    bcfg = benchmark_config(config)
    man = generate_benchmark(paths.bench, bcfg, workers=int(config.workers), log=log,
                             progress=bool(config.progress))
    if not man["slides"]:
        raise DemoError(f"{paths.bench}: no slide could be generated ({man['failed'][:3]})")
    tissue = [s["tissue_patches"] for s in man["slides"]]
    frac = [s["evidence_fraction"] for s in man["slides"] if s["count"] > 0] or [0.0]  # slides with evidence
    return {"config_digest": man["config_digest"], "slides": man["num_slides"], "questions": man["num_questions"],
            "failed": man["failed"], "tissue_patches": [int(min(tissue)), int(np.mean(tissue)), int(max(tissue))],
            "evidence_fraction_max": float(max(frac)), "evidence_fraction_mean": float(np.mean(frac)),
            "kinds": list(man["evidence_kinds"].values()), "none_option": man.get("none_option"),
            "evidence_free_slides": sum(s["count"] == 0 for s in man["slides"]),
            "formats": {f: sum(s["format"] == f for s in man["slides"]) for f in ("svs", "tiff")}}


# ------------------------------------------------------------------------------------------------
# Stage 2: features (the `sparsewsi extract` path) and stage 3: evidence flags
# ------------------------------------------------------------------------------------------------

def extract_config(config):
    from sparsewsi.features.extract import ExtractConfig

    e = config.extract
    return ExtractConfig(encoder=str(e.encoder), weights=str(e.weights) or None, seed=int(e.encoder_seed),
                         patch_size=int(config.slides.patch_size), target_mpp=float(config.slides.target_mpp),
                         min_tissue=float(e.min_tissue), batch_size=int(e.batch_size), num_threads=int(e.threads),
                         slide_workers=int(e.get("slide_workers", 1)), thumbnails=bool(e.thumbnails))


def stage_extract(config, paths: Paths, log: Log = print) -> dict[str, Any]:
    """Slides -> ``features/<slide>.h5`` with the real extraction code (tissue, grid, encoder)."""
    from sparsewsi.features import extract

    ecfg = extract_config(config)
    slides = extract.list_slides([os.fspath(paths.bench / "slides")])
    if not slides:
        raise DemoError(f"{paths.bench / 'slides'}: no slide files to extract")
    t0 = time.perf_counter()
    results = extract.run_extraction(slides, os.fspath(paths.features), ecfg, progress=bool(config.progress),
                                     log=log)
    extract.write_summary(os.fspath(paths.features), results)
    log(f"extract: {extract.summarize(results)}")
    done = [r for r in results if r.status == "done"]
    ok = [r for r in results if r.status != "failed"]
    if not ok:
        raise DemoError(f"every slide failed feature extraction; see {paths.features}/extract_summary.process0.json")
    patches = sum(r.patches for r in done)
    secs = time.perf_counter() - t0
    return {"encoder": ecfg.encoder, "weights": ecfg.weights or f"random init, seed {ecfg.seed}",
            "patch_size": ecfg.patch_size, "target_mpp": ecfg.target_mpp, "bags": len(ok),
            "extracted_this_run": len(done), "patches_this_run": patches,
            "patches_per_s": patches / secs if done and secs > 0 else None,
            "failed": [{"slide": r.slide, "reason": r.reason} for r in results if r.status == "failed"]}


def stage_annotate(config, paths: Paths, log: Log = print) -> dict[str, Any]:
    """Add the ``evidence`` flags of every bag from the benchmark's evidence boxes."""
    from sparsewsi.demo.synthetic_slides import annotate_feature_folder

    rep = annotate_feature_folder(paths.features, paths.bench, log=log)
    if not rep["annotated"]:
        raise DemoError(f"no bag under {paths.features} could be annotated ({rep['failed'] or rep['missing'][:5]})")
    return {"annotated": len(rep["annotated"]), "evidence_patches": int(sum(rep["annotated"].values())),
            "missing": rep["missing"], "failed": rep["failed"], "foci_not_found": rep["foci_not_found"]}


def feature_dim(paths: Paths) -> int:
    """D of the extracted bags (from the first readable one)."""
    import h5py

    for p in sorted(paths.features.glob("*.h5")):
        try:
            with h5py.File(p, "r") as f:
                return int(f["features"].shape[1])
        except (OSError, KeyError):
            continue
    raise DemoError(f"{paths.features}: no readable feature bag")


# ------------------------------------------------------------------------------------------------
# Stage 4: the training dataset
# ------------------------------------------------------------------------------------------------

def augment_questions(rows: Sequence[dict[str, str]], orders: int, seed: int) -> list[dict[str, str]]:
    """The training rows plus ``orders`` re-asked copies of every identification question.

    A copy lists the same options in another (seeded) order, with the answer letter moved
    with its option, so the model has to read the options rather than learn a letter per kind.
    Counting questions keep their natural order (one, two, three) and are not copied.
    """
    from sparsewsi.demo.synthetic_slides import NARROW_KIND

    out = []
    for row in rows:
        out.append(dict(row))
        if row.get("Narrow Category") != NARROW_KIND or orders <= 0:
            continue
        letters = [k for k in "ABCD" if row.get(k)]
        answer_text = row[row["Answer"]]
        options = [row[k] for k in letters]
        rng = np.random.default_rng([seed, int(hashlib.sha256(row["ID"].encode()).hexdigest()[:8], 16)])
        seen = {tuple(options)}
        for j in range(orders):
            perm = options
            for _ in range(20):  # a new order when one exists
                perm = [options[i] for i in rng.permutation(len(options))]
                if tuple(perm) not in seen:
                    break
            seen.add(tuple(perm))
            copy = dict(row, ID=f"{row['ID']}-order{j + 1}", **dict(zip(letters, perm)))
            copy["Answer"] = letters[perm.index(answer_text)]
            out.append(copy)
    return out


def _read_csv(path: pathlib.Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def stage_dataset(config, paths: Paths, log: Log = print) -> dict[str, Any]:
    """Write the (augmented) training questions and build the TFDS dataset over the bags."""
    from sparsewsi.demo.synthetic_slides import CSV_COLUMNS, load_manifest, write_csv_atomic

    man = load_manifest(paths.bench)
    qdir = paths.bench / "questions"
    train_rows = _read_csv(paths.bench / man["questions"]["train"])
    rows = augment_questions(train_rows, int(config.dataset.option_orders), int(config.seed))
    # Beside the benchmark's own CSVs, so the builder records the benchmark's manifest digest.
    train_csv = qdir / "train_augmented.csv"
    write_csv_atomic(train_csv, rows, CSV_COLUMNS)
    d = feature_dim(paths)
    # The CLI layer meets data_pipelines here (sparsewsi itself never imports it).
    from data_pipelines.build import build

    builder = build("synthetic_slidebench", {"train": train_csv, "test": paths.bench / man["questions"]["test"]},
                    features_root=paths.features, data_dir=paths.dataset / "tfds", feature_dim=d,
                    reply=str(config.dataset.reply))
    sources = builder.info.metadata.get("sources", {})
    kept = {s: v.get("kept") for s, v in sources.items()}
    skipped = {s: v.get("skipped") for s, v in sources.items()}
    log(f"dataset: {builder.data_path} (train {kept.get('train')} questions from {len(train_rows)} + "
        f"{len(rows) - len(train_rows)} re-ordered copies; test {kept.get('test')}); skipped {skipped}")
    info = {"data_path": os.fspath(builder.data_path), "feature_dim": d, "train_questions": kept.get("train"),
            "train_questions_original": len(train_rows), "test_questions": kept.get("test"), "skipped": skipped}
    a = config.align
    # (name, bag-name tag, tokens): the alignment's region bags, and its first phase's short bags when it has one.
    sets = [("align", "r", int(a.tokens))] if int(a.steps) > 0 else []
    if int(a.steps) > 0 and int(a.get("short_steps", 0)) > 0:
        sets.append(("align_short", "s", int(a.short_tokens)))
    norm_cache: dict[str, np.ndarray] = {}  # each training slide normalised once for every set
    for n_set, (name, tag, tokens) in enumerate(sets):
        region_rows = write_region_bags(paths, rows, int(a.regions_per_slide), tokens, int(config.seed), log,
                                        feature_norm=str(config.train.model.feature_norm),
                                        lookalikes=bool(config.align.get("lookalikes", False)),
                                        mosaic=bool(config.align.get("mosaic", False)), tag=tag,
                                        norm_cache=norm_cache)
        n_bags, patch_rows = len({r["Slide"] for r in region_rows}), []
        if n_set == len(sets) - 1 and int(a.get("patches_per_slide", 0)) > 0:
            # Single-patch questions join the alignment's first phase (the short bags when it has them).
            patch_rows = write_patch_bags(paths, rows, int(a.patches_per_slide), int(config.seed), log,
                                          feature_norm=str(config.train.model.feature_norm),
                                          evidence_repeat=int(a.get("patch_evidence_repeat", 1)),
                                          norm_cache=norm_cache)
            info[f"{name}_patch_questions"] = len(patch_rows)
        align_csv = qdir / f"{name}.csv"
        write_csv_atomic(align_csv, region_rows + patch_rows, CSV_COLUMNS)
        ab = build("synthetic_slidebench", {"train": align_csv}, features_root=paths.regions,
                   data_dir=paths.dataset / f"tfds_{name}", feature_dim=d, reply=str(config.dataset.reply))
        info.update({f"{name}_data_path": os.fspath(ab.data_path), f"{name}_questions": len(region_rows) + len(patch_rows)})
        log(f"dataset: region alignment set {ab.data_path} ({len(region_rows)} questions over {n_bags} region bags "
            f"of {tokens} tokens" + (f", {len(patch_rows)} over {len({r['Slide'] for r in patch_rows})} single patches"
                                     if patch_rows else "") + ")")
    return info


# Bag normalisations of ``SparseWSIConfig.feature_norm`` whose statistics come from the whole bag.
SLIDE_NORMS = ("bag", "bag_robust")


def slide_normalized(features: np.ndarray, feature_norm: str) -> np.ndarray:
    """``features`` [N, D] normalised over the whole slide exactly as the model's ``input_features``
    does (``feature_norm`` in :data:`SLIDE_NORMS`; anything else: unchanged). float32 [N, D]."""
    if feature_norm not in SLIDE_NORMS:
        return np.asarray(features, np.float32)
    import jax.numpy as jnp

    from sparsewsi.selection.sparselearn import standardize_bag, standardize_bag_robust

    fn = standardize_bag_robust if feature_norm == "bag_robust" else standardize_bag
    # Padded (masked) to a multiple of 64 rows: one compilation per bucket, not one per bag size
    # (per-size compiles took ~35 s of the demo's dataset stage).
    n = len(features)
    padded = np.zeros((-(-max(n, 1) // 64) * 64, features.shape[1]), np.float32)
    padded[:n] = features
    valid = np.arange(len(padded)) < n
    return np.asarray(_jit_norm(fn)(jnp.asarray(padded)[None], jnp.asarray(valid)[None]))[0, :n]


@functools.cache
def _jit_norm(fn):
    import jax

    return jax.jit(fn)


def region_feature_norm(feature_norm: str) -> str:
    """The model's ``feature_norm`` for region bags written by :func:`write_region_bags`: ``"token"``
    (per-token only) when their features already carry the slide's normalisation."""
    return "token" if feature_norm in SLIDE_NORMS else feature_norm


def write_region_bags(paths: Paths, rows: Sequence[dict[str, str]], regions_per_slide: int, tokens: int, seed: int,
                      log: Log = print, feature_norm: str = "token", lookalikes: bool = False,
                      mosaic: bool = False, tag: str = "r",
                      norm_cache: dict[str, np.ndarray] | None = None) -> list[dict[str, str]]:
    """Region bags for the alignment stage and their questions (training slides only).

    A region bag holds ``tokens`` patches of one training slide: all of its evidence patches plus
    patches drawn at random from the rest, in slide order (``regions/<slide>-<tag><j>.h5``, TRIDENT
    layout, written atomically, reused when present and written with the same settings). Its
    questions are the slide's own (the region holds every focus, so the answers are unchanged).
    This is the demo's stand-in for region-level image-text pairs (ROI captions): the LLM learns to
    read visual tokens from short bags; it never tells the scorer where evidence is (the scorer gets
    no gradient here: with N <= k every token has mask 1).

    With ``lookalikes`` every bag also holds all of the slide's look-alike patches (the distractors
    of ``bench/evidence/<slide>.json``, which a random fill rarely draws): the reader then learns to
    tell evidence from its look-alikes, which a scorer that selects every atypical patch shows it.

    With ``mosaic`` a bag's evidence and look-alike patches are drawn afresh for every bag, as many
    as its slide holds, from all training slides: evidence patches of the slide's own kind,
    look-alikes of any kind; the rest is the slide's own random fill, and the bag's tokens are
    shuffled. Why: with a slide's own few evidence and look-alike patches in all of its bags, the
    reader can tie the answer to those very patches (a look-alike seen in an evidence-free bag means
    "none") instead of learning what each kind looks like; measured on the demo, a reader aligned
    that way answered 97% of the evidence-free training slides shown their look-alikes and random
    patches, 77% of the test slides. Patches keep their own slide's normalisation and coordinates.

    With a bag normalisation (``feature_norm`` "bag" / "bag_robust") the region's features are
    written already normalised with the statistics of the *whole slide* (attribute ``slide_norm`` on
    ``features``: the normalisation applied, or "none"), and the alignment stage skips the bag
    normalisation (:func:`region_feature_norm`): at stage 2 and at inference the LLM sees tokens
    normalised by their slide, and the statistics of a 32-token bag are a noisy stand-in for those
    (measured on the demo: a 128-wide reader aligned on self-normalised region bags answered 48% of
    the test slides shown every evidence patch, on slide-normalised ones 95%).
    """
    import h5py

    paths.regions.mkdir(parents=True, exist_ok=True)
    by_slide: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_slide.setdefault(row["Slide"], []).append(row)
    # Pass 1: each slide's patches, evidence and look-alikes (normalised when a bag first needs them).
    slides = _training_slides(paths, sorted(by_slide), records=lookalikes or mosaic, lookalikes=lookalikes,
                              feature_norm=feature_norm, need_kind=mosaic, log=log, norm_cache=norm_cache)
    # A mosaic bag draws from every training slide, so the pool is part of what decides its content.
    recipe = _region_recipe(feature_norm, tokens, seed, lookalikes, mosaic, pool=sorted(slides) if mosaic else None)

    # The mosaic's pools, as (slide, patch index): evidence by the slide's kind, look-alikes of any kind.
    ev_pool: dict[Any, list[tuple[str, int]]] = {}
    look_pool: list[tuple[str, int]] = []
    if mosaic:
        for sid, sl in slides.items():
            ev_pool.setdefault(sl["kind"], []).extend((sid, int(i)) for i in np.flatnonzero(sl["evidence"]))
            look_pool.extend((sid, int(i)) for i in np.flatnonzero(sl["look"]))

    # Pass 2: the bags.
    out = []
    for slide, sl in slides.items():
        evidence, look = sl["evidence"], sl["look"]
        ev = np.flatnonzero(evidence)
        # Look-alikes are kept in every bag after the evidence, as many as fit in `tokens`.
        kept = np.concatenate([ev, np.flatnonzero(look)[:max(tokens - len(ev), 0)]]).astype(ev.dtype)
        rest = np.flatnonzero(~(evidence | look))
        for j in range(regions_per_slide):
            name = f"{slide}-{tag}{j}"
            dst = paths.regions / f"{name}.h5"
            if not _region_bag_done(dst, recipe):
                rng = np.random.default_rng([seed, int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)])
                fill = rng.choice(rest, size=min(len(rest), max(tokens - len(kept), 0)), replace=False)
                if mosaic:
                    picked = []
                    for src_pool, n in ((ev_pool.get(sl["kind"], []), len(ev)), (look_pool, len(kept) - len(ev))):
                        picked += [src_pool[int(i)] for i in rng.choice(len(src_pool), size=n, replace=False)]
                    parts = [(slide, int(i)) for i in fill] + picked
                    parts = [parts[int(i)] for i in rng.permutation(len(parts))]
                    feats_ = np.stack([_normed(slides[sid])[i] for sid, i in parts])
                    coords_ = np.stack([slides[sid]["coords"][i] for sid, i in parts])
                    flags = np.array([slides[sid]["evidence"][i] for sid, i in parts], np.uint8)
                else:
                    idx = np.sort(np.concatenate([kept, fill]))
                    feats_, coords_, flags = _normed(sl)[idx], sl["coords"][idx], evidence[idx].astype(np.uint8)
                with atomic.atomic_path(dst) as tmp:
                    with h5py.File(tmp, "w") as f:
                        fd = f.create_dataset("features", data=feats_)
                        fd.attrs["slide_norm"] = _slide_norm(feature_norm)
                        fd.attrs["region_recipe"] = recipe
                        c = f.create_dataset("coords", data=coords_)
                        for k, v in _region_coord_attrs(sl["coord_attrs"]).items():
                            c.attrs[k] = v
                        f.create_dataset("evidence", data=flags)
            for row in by_slide[slide]:
                out.append(dict(row, ID=f"{row['ID']}-{tag}{j}", Slide=name))
    _remove_stale_bags(paths.regions, tag, {slide: regions_per_slide for slide in slides})
    return out


def _training_slides(paths: Paths, slide_ids: Sequence[str], *, records: bool, lookalikes: bool,
                     feature_norm: str, need_kind: bool = False, log: Log = print,
                     norm_cache: dict[str, np.ndarray] | None = None) -> dict[str, dict[str, Any]]:
    """Each training slide's bag for the region and patch bags: ``{slide: dict(feats, coords, coord_attrs,
    evidence, look, kind, feature_norm, normed)}`` (``look``: look-alike patches, read from the slide's
    benchmark record with ``records`` and ``lookalikes``; ``kind``: the slide's kind from the record, which
    must name it with ``need_kind``). ``norm_cache`` ({slide: normalised features}, filled by :func:`_normed`)
    lets several calls on the same slides and ``feature_norm`` normalise each slide once.
    A slide whose feature file or record cannot be read is reported by path and left out."""
    import h5py

    from sparsewsi.demo.synthetic_slides import evidence_labels

    slides: dict[str, dict[str, Any]] = {}
    for slide in slide_ids:
        src = paths.features / f"{slide}.h5"
        try:
            with h5py.File(src, "r") as f:
                feats = np.asarray(f["features"])
                coords = np.asarray(f["coords"])
                coord_attrs = dict(f["coords"].attrs)
                evidence = np.asarray(f["evidence"], bool)
        except (OSError, KeyError) as e:
            log(f"dataset: {src}: no region bags ({type(e).__name__}: {e}); slide skipped")
            continue
        look = np.zeros_like(evidence)
        kind = None
        if records:
            rec_path = paths.bench / "evidence" / f"{slide}.json"
            try:
                rec = json.loads(rec_path.read_text())
                boxes = [d["box"] for d in rec["distractors"]]
                kind = rec["kind"] if need_kind else rec.get("kind")
            except (OSError, ValueError, KeyError, TypeError) as e:
                log(f"dataset: {rec_path}: cannot read the slide's record (look-alike boxes, kind) "
                    f"({type(e).__name__}: {e}); slide skipped for the region bags")
                continue
            if lookalikes and boxes:
                look = evidence_labels(coords, float(coord_attrs["patch_size_level0_exact"]), boxes) & ~evidence
        cache = {} if norm_cache is None else norm_cache
        slides[slide] = dict(id=slide, feats=feats, coords=coords, coord_attrs=coord_attrs, evidence=evidence,
                             look=look, kind=kind, feature_norm=feature_norm, cache=cache)
    return slides


def _normed(sl: dict[str, Any]) -> np.ndarray:
    """A :func:`_training_slides` slide's features normalised by the whole slide (computed once per cache)."""
    if sl["id"] not in sl["cache"]:
        sl["cache"][sl["id"]] = slide_normalized(sl["feats"], sl["feature_norm"])
    return sl["cache"][sl["id"]]


def write_patch_bags(paths: Paths, rows: Sequence[dict[str, str]], patches_per_slide: int, seed: int,
                     log: Log = print, feature_norm: str = "token", evidence_repeat: int = 1,
                     tag: str = "p", norm_cache: dict[str, np.ndarray] | None = None) -> list[dict[str, str]]:
    """Single-patch bags and their questions for the alignment (training slides only): region-level supervision.

    Each training slide gives one-patch bags (``regions/<slide>-<tag><j>.h5``, TRIDENT layout, written
    atomically, reused when written with the same settings): all of its evidence patches, then its look-alike
    patches and plain tissue, alternating, drawn at random, up to ``patches_per_slide`` bags in all. Each is
    asked the slide's questions, answered for that patch alone: the slide's kind for an evidence patch, "none
    of these" for any other; a question whose options do not name that answer (a counting question, or one
    without "none of these") is not asked of the patch. Evidence questions are repeated ``evidence_repeat``
    times (there are few evidence patches). This is the demo's stand-in for ROI-level captions: the reader is
    told what each kind of patch is, where a slide's answer only says that one of its ~350 patches is of a kind.
    The features carry their slide's normalisation as the region bags' do (:func:`write_region_bags`).
    """
    import h5py

    from sparsewsi.demo.synthetic_slides import NONE_OPTION, kind_name

    paths.regions.mkdir(parents=True, exist_ok=True)
    by_slide: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_slide.setdefault(row["Slide"], []).append(row)
    recipe = json.dumps({"patch": True, "slide_norm": _slide_norm(feature_norm), "seed": int(seed)}, sort_keys=True)
    slides = _training_slides(paths, sorted(by_slide), records=True, lookalikes=True, feature_norm=feature_norm,
                              need_kind=True, log=log, norm_cache=norm_cache)
    out, counts = [], {}
    for slide, sl in slides.items():
        ev, look = sl["evidence"], sl["look"]
        rng = np.random.default_rng([seed, int(hashlib.sha256(f"{slide}-{tag}".encode()).hexdigest()[:8], 16)])
        others_look = [int(i) for i in rng.permutation(np.flatnonzero(look))]
        plain = np.flatnonzero(~(ev | look))
        others_plain = [int(i) for i in rng.permutation(plain)]
        others = []  # look-alike, plain, look-alike, plain, ... then plain
        while others_look or others_plain:
            for pool in (others_look, others_plain):
                if pool:
                    others.append(pool.pop(0))
        picks = [(int(i), True) for i in np.flatnonzero(ev)]
        picks += [(i, False) for i in others[:max(patches_per_slide - len(picks), 0)]]
        for j, (i, is_evidence) in enumerate(picks):
            name = f"{slide}-{tag}{j}"
            dst = paths.regions / f"{name}.h5"
            patch_recipe = json.dumps({"recipe": recipe, "patch": i})
            if not _region_bag_done(dst, patch_recipe):
                with atomic.atomic_path(dst) as tmp:
                    with h5py.File(tmp, "w") as f:
                        fd = f.create_dataset("features", data=_normed(sl)[i:i + 1])
                        fd.attrs["slide_norm"] = _slide_norm(feature_norm)
                        fd.attrs["region_recipe"] = patch_recipe
                        c = f.create_dataset("coords", data=sl["coords"][i:i + 1])
                        for k, v in _region_coord_attrs(sl["coord_attrs"]).items():
                            c.attrs[k] = v
                        f.create_dataset("evidence", data=np.array([is_evidence], np.uint8))
            answer = kind_name(sl["kind"]) if is_evidence else NONE_OPTION
            for row in by_slide[slide]:
                letter = next((L for L in "ABCD" if row.get(L) == answer), None)
                if letter is None:
                    continue  # no option names this patch (no "none of these" among the options)
                for r in range(int(evidence_repeat) if is_evidence else 1):
                    out.append(dict(row, ID=f"{row['ID']}-{tag}{j}" + (f"-{r}" if r else ""), Slide=name,
                                    Answer=letter))
        counts[slide] = len(picks)
    _remove_stale_bags(paths.regions, tag, counts)
    return out


def _slide_norm(feature_norm: str) -> str:
    return feature_norm if feature_norm in SLIDE_NORMS else "none"


def _region_recipe(feature_norm: str, tokens: int, seed: int, lookalikes: bool, mosaic: bool = False,
                   pool: Sequence[str] | None = None) -> str:
    """What decides a region bag's content, as the string stored with it (attribute ``region_recipe``);
    ``pool``: the training slides a mosaic bag draws from (stored as a digest of their sorted ids)."""
    recipe = {"slide_norm": _slide_norm(feature_norm), "tokens": int(tokens), "seed": int(seed),
              "lookalikes": bool(lookalikes), "mosaic": bool(mosaic)}
    if pool is not None:
        recipe["pool"] = hashlib.sha256("\n".join(pool).encode()).hexdigest()[:16]
    return json.dumps(recipe, sort_keys=True)


def _remove_stale_bags(regions: pathlib.Path, tag: str, counts: dict[str, int]) -> None:
    """Delete ``regions/<slide>-<tag><j>.h5`` for j >= ``counts[slide]``: bags of an earlier run with more bags
    per slide, which no question names any more (they would only mislead someone reading the folder). One
    directory listing for all slides (a glob per slide over ~9k files took 5 s of the demo's dataset stage)."""
    import re

    pattern = re.compile(r"(.+)-" + re.escape(tag) + r"(\d+)\.h5")
    for entry in os.scandir(regions):
        m = pattern.fullmatch(entry.name)
        if m and m.group(1) in counts and int(m.group(2)) >= counts[m.group(1)]:
            os.unlink(entry.path)


def _region_coord_attrs(coord_attrs: dict[str, Any]) -> dict[str, Any]:
    """The ``coords`` attributes a region or patch bag keeps: the patch geometry, shared by every training slide.
    A slide's own (name, source path, size, tissue settings) would be wrong for a mosaic bag, and writing and
    reading a TRIDENT bag's ~30 attributes took longer than its features."""
    return {k: coord_attrs[k] for k in REGION_COORD_ATTRS if k in coord_attrs}


def _region_bag_done(path: pathlib.Path, recipe: str) -> bool:
    """Whether ``path`` is a finished region bag written with ``recipe`` (:func:`_region_recipe`); a bag
    written with other settings (normalisation, size, seed, look-alikes, mosaic) is written again."""
    import h5py

    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            return f["features"].attrs.get("region_recipe") == recipe
    except (OSError, KeyError):
        return False


# ------------------------------------------------------------------------------------------------
# Stage 5: training
# ------------------------------------------------------------------------------------------------

def train_config(config, paths: Paths, dataset_info: dict[str, Any]):
    """The trainer config: ``config.train`` with the feature width and the prepared dataset filled in."""
    import ml_collections

    t = ml_collections.ConfigDict(config.train.to_dict())
    t.model.feature_dim = int(dataset_info["feature_dim"])
    t.data.path = dataset_info["data_path"]
    t.data.features_root = os.fspath(paths.features)
    t.data.split = "train"
    t.progress = bool(config.progress) and bool(t.progress)
    return t


def latest_step(workdir: pathlib.Path) -> int:
    ckpt = workdir / "checkpoints"
    steps = [int(p.name) for p in ckpt.iterdir() if p.is_dir() and p.name.isdigit()] if ckpt.is_dir() else []
    return max(steps, default=0)


def align_config(config, paths: Paths, dataset_info: dict[str, Any], short: bool = False):
    """The trainer config of the alignment stage: region bags of ``align.tokens`` tokens (<= k, so
    every token passes clean), ``align.steps`` steps at ``align.lr``, every module trained. With
    ``short``: its first phase, ``align.short_steps`` steps on bags of ``align.short_tokens`` tokens
    without noise slots (see ``configs/demo.py``)."""
    t = train_config(config, paths, dataset_info)
    a = config.align
    steps, tokens = (int(a.short_steps), int(a.short_tokens)) if short else (int(a.steps), int(a.tokens))
    t.total_steps = steps
    t.batch_size = int(a.batch_size)
    t.optim.lr = float(a.lr)
    t.checkpoint.every = steps
    t.data.path = dataset_info["align_short_data_path" if short else "align_data_path"]
    t.data.features_root = os.fspath(paths.regions)
    t.data.max_patches = tokens
    t.data.patch_buckets = (tokens,)
    t.model.feature_norm = region_feature_norm(str(t.model.feature_norm))  # region bags carry the slide's
    # Alignment trains the projector and the LLM at full rate (whatever groups stage 2 uses; the scorer
    # gets no gradient here: with N <= k every token has mask 1).
    t.optim.param_groups = [(r".*", 1.0)]
    t.model.noise_slots = 0 if short else int(a.get("noise_slots", 0))
    # The gate floor is stage 2's continuation towards the Soft Top-K; here every real token is clean already,
    # and a floor would only half-clean the noise slots.
    t.model.gate_floor = 0.0
    t.model.score_noise = 0.0  # nothing to explore: every token passes (and the noise gate keeps its keys)
    return t


def _train(tcfg, workdir: pathlib.Path, log: Log, name: str) -> dict[str, Any]:
    """Run (or resume) the trainer on ``tcfg`` in ``workdir``; a summary of its metrics."""
    import logging

    from sparsewsi import train_cli
    from sparsewsi.training import NonFiniteLossError, spec_from_config, train

    logging.getLogger("absl").setLevel(logging.WARNING)
    spec = spec_from_config(tcfg)
    done = latest_step(workdir)
    if done >= tcfg.total_steps:
        log(f"{name}: {workdir} already holds step {done}")
    else:
        batches = train_cli.make_batches(tcfg, spec)  # the `train` command's data_pipelines wiring
        try:
            out = train(tcfg, batches, workdir, spec=spec)
        except NonFiniteLossError as e:
            raise DemoError(f"{name} diverged: {e}") from e
        if out["resumed_from"] is not None:
            log(f"{name}: resumed from step {out['resumed_from']}")
        skipped = getattr(batches, "skipped", None)
        if skipped:
            log(f"{name}: bad items skipped by the input pipeline: {dict(skipped)}")
    hist = read_metrics(workdir)
    last = hist[-1] if hist else {}
    n = max(1, len(hist) // 10)
    return {"steps": int(last.get("step", 0)), "final_loss_mean_last10pct": float(np.mean([h["loss"] for h in hist[-n:]]))
            if hist else None, "final_tau": last.get("tau"), "batch_size": int(tcfg.batch_size),
            "model": {k: tcfg.model[k] for k in ("feature_dim", "k", "candidate_cap", "scorer_kind", "scorer_hidden",
                                                 "scorer_squares",
                                                 "tau_start", "tau_end", "tau_steps", "projector_hidden")},
            "llm": dict(tcfg.llm.tiny), "lr": float(tcfg.optim.lr)}


def stage_align(config, paths: Paths, dataset_info: dict[str, Any], log: Log = print) -> dict[str, Any]:
    """Alignment (the recipe's stage 1): projector + LLM learn to read visual tokens on region bags."""
    if int(config.align.steps) <= 0:
        log("align: off (align.steps = 0)")
        return {"steps": 0}
    tcfg = align_config(config, paths, dataset_info)
    short = None
    if int(config.align.get("short_steps", 0)) > 0:
        # First phase: short bags, no noise slots (its own workdir, so either phase resumes on its own).
        short = _train(align_config(config, paths, dataset_info, short=True), paths.align / "short", log,
                       "align (short bags)")
        short["questions"] = dataset_info.get("align_short_questions")
        tcfg.init_from = os.fspath(paths.align / "short")
        tcfg.init_llm = True
    info = _train(tcfg, paths.align, log, "align")
    info["questions"] = dataset_info.get("align_questions")
    info["short"] = short
    return info


def stage_train(config, paths: Paths, dataset_info: dict[str, Any], log: Log = print) -> dict[str, Any]:
    """Train SparseWSI with SparseLearn on whole slides (resumes from the newest checkpoint of
    ``paths.train``), starting from the alignment stage's weights (LLM included) when it ran."""
    tcfg = train_config(config, paths, dataset_info)
    if int(config.align.steps) > 0:
        tcfg.init_from = os.fspath(paths.align)
        tcfg.init_llm = True
    return _train(tcfg, paths.train, log, "train")


def polish_config(config, paths: Paths, dataset_info: dict[str, Any]):
    """The trainer config of the polish stage: the stage-2 model read on exactly what inference shows it.

    The candidate cap is set to k, so the LLM reads the Hard Top-K of the trained scorer, k clean tokens
    in slide order, as at inference (with N = k every token has mask 1: no noise, no gradient to the
    scorer); the scorer is held still (learning-rate scale 0) and the rest trains at ``polish.lr``.
    """
    t = train_config(config, paths, dataset_info)
    p = config.polish
    t.init_from = os.fspath(paths.train)
    t.init_llm = True
    t.total_steps = int(p.steps)
    t.batch_size = int(p.batch_size)
    t.optim.lr = float(p.lr)
    t.optim.warmup_steps = int(p.warmup_steps)
    t.checkpoint.every = int(p.steps)
    t.model.candidate_cap = int(t.model.k)
    t.model.gate_floor = 0.0
    t.model.noise_slots = 0
    t.model.score_noise = 0.0  # N = k: no selection to explore
    t.optim.param_groups = [(r"scorer\..*", 0.0), (r".*", 1.0)]
    return t


def stage_polish(config, paths: Paths, dataset_info: dict[str, Any], log: Log = print) -> dict[str, Any]:
    """Polish (after SparseLearn): the reader (projector, LLM) fine-tuned on the Hard Top-K tokens of the
    frozen scorer, the very tokens it reads at inference. SparseLearn shows the LLM every token of a slide,
    ~k of them clean and the rest noise; inference shows it k clean tokens and nothing else."""
    if int(config.polish.steps) <= 0:
        log("polish: off (polish.steps = 0)")
        return {"steps": 0}
    return _train(polish_config(config, paths, dataset_info), paths.polish, log, "polish")


def model_dir(config, paths: Paths) -> pathlib.Path:
    """The run's final model: the polish stage's when it runs, else stage 2's."""
    return paths.polish if int(config.polish.steps) > 0 else paths.train


def read_metrics(workdir: pathlib.Path) -> list[dict[str, float]]:
    """The trainer's ``metrics.jsonl`` rows (step order)."""
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda r: r["step"])


# ------------------------------------------------------------------------------------------------
# Stage 6: evaluation
# ------------------------------------------------------------------------------------------------

def load_predictor(config, paths: Paths):
    """(SparseWSIPredictor, spec) of the trained model at budget ``eval.k``."""
    from sparsewsi.model import SparseWSIPredictor, load_checkpoint

    model, tokenizer, spec = load_checkpoint(model_dir(config, paths))
    e = config.eval
    inner = SparseWSIPredictor(model, tokenizer, k=int(e.k), max_new_tokens=int(e.max_new_tokens),
                               all_tokens_cap=int(e.all_tokens_cap))
    return inner, spec


def selections(inner, selector: str, features: np.ndarray, coords: np.ndarray | None, evidence: np.ndarray | None,
               item_id: str, seed: int) -> np.ndarray:
    """The token indices ``selector`` shows the model for one question (what evaluation uses).

    Same function and per-question seed as the evaluation path (``CheckpointPredictor`` ->
    ``SparseWSIPredictor.host_selection``; ``learned`` is the host twin of the in-graph Hard Top-K).
    Returns int64 indices [<= k] (all tokens, capped, for ``all``).
    """
    from sparsewsi.evaluation.predictor import question_seed

    n = features.shape[0]
    idx, valid = inner.host_selection(
        selector, features[None], np.ones((1, n), bool), coords=None if coords is None else coords[None],
        seeds=np.array([question_seed(item_id, seed)]), evidence=None if evidence is None else evidence[None])
    return np.asarray(idx[0][valid[0]], np.int64)


def evidence_recall(selected: np.ndarray, evidence: np.ndarray) -> float:
    """Fraction of the evidence tokens among ``selected`` (nan when the bag has no evidence)."""
    ev = np.flatnonzero(np.asarray(evidence, bool))
    if len(ev) == 0:
        return float("nan")
    return float(np.isin(ev, selected).mean())


def _mean_or_none(values: Sequence[float]) -> float | None:
    """Mean of the non-nan ``values``; None when there are none."""
    v = np.asarray(values, np.float64)
    v = v[~np.isnan(v)]
    return float(v.mean()) if len(v) else None


def stage_eval(config, paths: Paths, log: Log = print) -> dict[str, Any]:
    """Evaluate every selector on the test questions (resumable runs under ``paths.eval``)."""
    from sparsewsi.evaluation.items import load_eval_set
    from sparsewsi.evaluation.predictor import CheckpointPredictor
    from sparsewsi.evaluation.report import merge_run
    from sparsewsi.evaluation.runner import BagSource, SkipItem, ensure_manifest, manifest_for, run_shard

    e = config.eval
    man_q = json.loads((paths.bench / "manifest.json").read_text())["questions"]
    eval_set = load_eval_set(paths.bench / man_q["test"])
    # One more breakdown of the scorer's report: per answer, i.e. per evidence kind.
    eval_set = dataclasses.replace(eval_set, items=[
        dataclasses.replace(it, groups={**it.groups, "answer": it.reference}) for it in eval_set.items])
    inner, spec = load_predictor(config, paths)
    source = BagSource(paths.features, max_patches=None, cache_size=256)

    def prepare_for(selector):
        def prepare(item):
            q = source.prepare(item)
            if selector == "spatial" and q.coords is None:
                raise SkipItem("no_coords", f"slide {item.slide_id}: the feature file has no coordinates")
            if selector == "oracle" and q.evidence is None:
                raise SkipItem("no_evidence", f"slide {item.slide_id}: no 'evidence' flags in the bag")
            return q
        return prepare

    out: dict[str, Any] = {"questions": len(eval_set.items), "data_sha256": eval_set.sha256, "selectors": {}}
    for selector in e.selectors:
        run_dir = paths.eval / selector
        predictor = CheckpointPredictor(inner, selector=selector, batch_size=int(e.batch_size), seed=int(e.seed),
                                        describe={"name": f"sparsewsi-demo:{model_dir(config, paths)}",
                                                  "spec": json.loads(spec.to_json())})
        conf = {"max_new_tokens": int(e.max_new_tokens), "seed": int(e.seed), "all_tokens_cap": int(e.all_tokens_cap)}
        ensure_manifest(run_dir, manifest_for(eval_set, predictor.describe(), 1, conf))
        t0 = time.perf_counter()
        stats = run_shard(eval_set.items, predictor, prepare_for(selector), run_dir, batch_size=int(e.batch_size),
                          log=lambda m, s=selector: log(f"eval {s}: {m}"))
        results = merge_run(run_dir, eval_set)
        ch = results["report"].get("choice") or {}
        # Evidence recall of the very selections the model was shown (overall and per answer).
        recalls, shown = [], []
        recall_by_answer: dict[str, list[float]] = {}
        for item in eval_set.items:
            try:
                feats, coords, ev = source.load(item)
            except SkipItem:
                continue
            if ev is None:
                continue
            sel = selections(inner, selector, feats, coords, ev, item.item_id, int(e.seed))
            recalls.append(evidence_recall(sel, ev))
            recall_by_answer.setdefault(item.reference, []).append(recalls[-1])
            shown.append(len(sel))
        by_task = {k: v["accuracy"] for k, v in (ch.get("breakdowns", {}).get("narrow", {}) or {}).items()}
        out["selectors"][selector] = {
            "accuracy": ch.get("accuracy"), "n": ch.get("n"), "by_task": by_task,
            "unparseable": ch.get("unparseable"), "skipped": results["report"]["counts"]["skipped"],
            # Over the questions whose slide has evidence (an evidence-free slide has no recall).
            "complete": results["complete"], "evidence_recall": _mean_or_none(recalls),
            "tokens_shown_mean": float(np.mean(shown)) if shown else None,
            "by_answer": {ref: {"n": v["n"], "accuracy": v["accuracy"],
                                "evidence_recall": _mean_or_none(recall_by_answer.get(ref, []))}
                          for ref, v in sorted((ch.get("breakdowns", {}).get("answer") or {}).items())},
            "evaluated_this_run": stats.evaluated, "seconds_this_run": round(time.perf_counter() - t0, 2),
            "baselines": ch.get("baselines", {}),
        }
        acc = ch.get("accuracy")
        log(f"eval {selector:8s}: accuracy {'n/a' if acc is None else f'{100 * acc:.1f}%'} on {ch.get('n')} questions"
            f" ({by_task}), evidence recall {out['selectors'][selector]['evidence_recall']}")
    return out


# ------------------------------------------------------------------------------------------------
# Stage 7: the report
# ------------------------------------------------------------------------------------------------

SELECTOR_NOTES = {
    "learned": "the trained scorer's Hard Top-K",
    "random": "k tokens at random (seeded per question)",
    "uniform": "k evenly spaced tokens in bag order (SlideChat's sub-sampling)",
    "spatial": "k tokens on the coarsest regular grid over the tissue",
    "all": "every token (evenly sub-sampled above the cap)",
    "oracle": "the ground-truth evidence tokens first, random fill (upper bound)",
}


def scorer_ranks(config, paths: Paths, inner, log: Log = print) -> dict[str, dict[str, Any]]:
    """Where the trained scorer ranks each kind of structure on the test slides.

    Every patch holding an evidence focus or a look-alike distractor (from the benchmark's boxes) gets
    its rank by score within its bag (0 = first). Per kind: its role (``evidence`` / ``look-alike``),
    how many patches, the median rank, the median rank as a fraction of the bag, and the fraction
    inside the top ``eval.k``. A kind the scorer never selects shows whether it sits just below the
    budget or at the bottom of the bag (pushed down: Soft Top-K then gives it no gradient).
    ``inner``: the trained model's predictor (:func:`load_predictor`). Unreadable slides are logged
    and left out.
    """
    import h5py

    from sparsewsi.demo.probe import ALL_KINDS, patch_kinds
    from sparsewsi.demo.synthetic_slides import EVIDENCE_KINDS, KIND_NAMES, load_manifest

    man = load_manifest(paths.bench)
    k = int(config.eval.k)
    ranks: dict[str, list[tuple[int, int]]] = {}
    for entry in man["slides"]:
        if entry.get("split") != "test":
            continue
        path = paths.features / f"{entry['slide_id']}.h5"
        try:
            rec = json.loads((paths.bench / entry["evidence_file"]).read_text())
            with h5py.File(path, "r") as f:
                feats = np.asarray(f["features"], np.float32)
                coords = np.asarray(f["coords"])
                a = f["coords"].attrs
                ps = float(a.get("patch_size_level0_exact", a.get("patch_size_level0")))
        except (OSError, KeyError, json.JSONDecodeError) as e:
            log(f"scorer ranks: {entry['slide_id']} left out ({type(e).__name__}: {e})")
            continue
        scores = inner.host_scores(feats[None], np.ones((1, len(feats)), bool))[0]
        rank = np.empty(len(scores), np.int64)
        rank[np.argsort(-scores, kind="stable")] = np.arange(len(scores))
        kinds = patch_kinds(coords, ps, rec)
        for i in np.flatnonzero(kinds >= 0):
            ranks.setdefault(ALL_KINDS[kinds[i]], []).append((int(rank[i]), len(scores)))
    out = {}
    for kind in ALL_KINDS:
        if kind not in ranks:
            continue
        r = np.array(ranks[kind])
        out[KIND_NAMES[kind][0]] = {
            "role": "evidence" if kind in EVIDENCE_KINDS else "look-alike", "patches": len(r),
            "rank_median": float(np.median(r[:, 0])), "rank_fraction_median": float(np.median(r[:, 0] / r[:, 1])),
            f"in_top_{k}": float(np.mean(r[:, 0] < k))}
    return out


def _savefig(fig, path: pathlib.Path, dpi: int = 100) -> None:
    import matplotlib.pyplot as plt

    try:
        with atomic.atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)


def ordered_selectors(config, eval_info: dict[str, Any]) -> list[str]:
    """The evaluated selectors in the config's order (JSON round trips sort them)."""
    sels = [s for s in config.eval.selectors if s in eval_info["selectors"]]
    return sels + sorted(s for s in eval_info["selectors"] if s not in sels)


def accuracy_chart(eval_info: dict[str, Any], path: pathlib.Path, *, k: int, selectors: Sequence[str],
                   title: str = "") -> None:
    """Grouped bars: overall and per-task accuracy of every selector (target lines at 90% and 60%)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sels = list(selectors)
    tasks = sorted({t for s in sels for t in eval_info["selectors"][s]["by_task"]})
    series = [("overall", [eval_info["selectors"][s]["accuracy"] for s in sels])]
    series += [(t, [eval_info["selectors"][s]["by_task"].get(t) for s in sels]) for t in tasks]
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    x = np.arange(len(sels))
    w = 0.8 / len(series)
    colors = ["#1f4e79", "#6fa8dc", "#f6b26b", "#93c47d"]
    for i, (name, vals) in enumerate(series):
        v = [100 * (a or 0.0) for a in vals]
        bars = ax.bar(x + (i - (len(series) - 1) / 2) * w, v, w, label=name, color=colors[i % len(colors)])
        if name == "overall":
            for b, val in zip(bars, v):
                ax.text(b.get_x() + b.get_width() / 2, val + 1, f"{val:.0f}", ha="center", va="bottom", fontsize=7)
    labels = [f"{s}\n({eval_info['selectors'][s]['tokens_shown_mean']:.0f} tok)"
              if eval_info["selectors"][s].get("tokens_shown_mean") else s for s in sels]
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylim(0, 108)
    ax.set_ylabel("accuracy (%)")
    ax.axhline(90, color="green", lw=0.8, ls="--")
    ax.axhline(60, color="red", lw=0.8, ls=":")
    ax.set_title(title or f"Synthetic sparse-evidence benchmark: test accuracy by selector (k = {k})", fontsize=9)
    ax.legend(fontsize=7, ncol=len(series), loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False)
    fig.tight_layout()
    _savefig(fig, path, dpi=110)


def training_curves(hist: list[dict[str, float]], path: pathlib.Path,
                    polish: Sequence[dict[str, float]] = ()) -> None:
    """Loss (raw and smoothed), Soft Top-K temperature and soft-mask sharpness against the step; the
    polish stage's loss (``polish``, its own step count) continues stage 2's curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([h["step"] for h in hist])
    loss = np.array([h["loss"] for h in hist])
    fig, axes = plt.subplots(1, 3, figsize=(10, 2.8))
    axes[0].plot(steps, loss, lw=0.6, alpha=0.4, color="#1f4e79")
    if len(loss) >= 5:
        n = max(3, len(loss) // 25)
        smooth = np.convolve(loss, np.ones(n) / n, mode="valid")
        axes[0].plot(steps[n - 1:], smooth, lw=1.4, color="#1f4e79", label=f"mean of {n}")
        axes[0].legend(fontsize=7)
    if len(polish):
        end = steps[-1] if len(steps) else 0
        axes[0].plot(end + np.array([h["step"] for h in polish]), [h["loss"] for h in polish], lw=0.8,
                     color="#e69138", label="polish (Hard Top-K)")
        axes[0].legend(fontsize=7)
    axes[0].set_yscale("log")
    axes[0].set_title("training loss (answer tokens)", fontsize=9)
    axes[1].plot(steps, [h.get("tau", np.nan) for h in hist], color="#cc4125")
    axes[1].set_title("Soft Top-K temperature tau", fontsize=9)
    axes[2].plot(steps, [h.get("mask_topk_mass", np.nan) for h in hist], color="#6aa84f", label="top-k mass")
    axes[2].plot(steps, [h.get("mask_frac_above_half", np.nan) for h in hist], color="#999999", label="frac > 0.5")
    axes[2].set_ylim(0, 1.05)
    axes[2].set_title("soft mask sharpness", fontsize=9)
    axes[2].legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    _savefig(fig, path)


def slide_thumbnail(slide_path: pathlib.Path, max_px: int) -> tuple[np.ndarray, float]:
    """(RGB thumbnail, level-0 px per thumbnail px) from the slide's lowest-resolution level."""
    from PIL import Image

    from sparsewsi.slides.wsi import open_slide

    with open_slide(slide_path) as slide:
        level = slide.level_count - 1
        img = np.asarray(slide.level_array(level)[:, :, :3])
        ds = slide.level_downsamples[level]
    h, w = img.shape[:2]
    f = min(1.0, max_px / max(h, w)) if max(h, w) > max_px else max_px / max(h, w)
    out = np.asarray(Image.fromarray(img).resize((max(1, round(w * f)), max(1, round(h * f))), Image.BILINEAR))
    return out, ds / f


def selection_heatmaps(config, paths: Paths, out_dir: pathlib.Path, inner, log: Log = print) -> list[pathlib.Path]:
    """One PNG per shown test slide (and ``heatmaps.png`` with all of them): the learned scores over
    the thumbnail with the learned top-k, the random k and the true evidence marked (``inner``: the
    trained model's predictor, :func:`load_predictor`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from sparsewsi.demo.synthetic_slides import load_manifest
    from sparsewsi.evaluation.items import load_eval_set
    from sparsewsi.evaluation.runner import BagSource, SkipItem

    man = load_manifest(paths.bench)
    eval_set = load_eval_set(paths.bench / man["questions"]["test"])
    source = BagSource(paths.features, max_patches=None)
    k, seed = int(config.eval.k), int(config.eval.seed)
    by_slide = {s["slide_id"]: s for s in man["slides"]}
    # The first identification question of each test slide, most foci first (the richest pictures).
    items = {}
    for it in eval_set.items:
        if it.slide_id in by_slide and it.slide_id not in items and it.item_id.endswith("-kind"):
            items[it.slide_id] = it
    order = sorted(items, key=lambda s: (-by_slide[s]["count"], s))[: int(config.report.heatmap_slides)]
    rows = []
    for sid in order:
        it = items[sid]
        try:
            feats, coords, ev = source.load(it)
        except SkipItem as e:
            log(f"heatmap: {sid} skipped ({e.detail})")
            continue
        if ev is None or coords is None:
            continue
        import h5py

        with h5py.File(paths.features / f"{sid}.h5", "r") as f:
            a = f["coords"].attrs
            ps = float(a.get("patch_size_level0_exact", a.get("patch_size_level0")))
        scores = inner.host_scores(feats[None], np.ones((1, len(feats)), bool))[0]
        learned = selections(inner, "learned", feats, coords, ev, it.item_id, seed)
        rand = selections(inner, "random", feats, coords, ev, it.item_id, seed)
        thumb, scale = slide_thumbnail(paths.bench / by_slide[sid]["file"], int(config.report.thumbnail_px))
        rows.append((sid, by_slide[sid], thumb, scale, coords, ps, scores, learned, rand, ev))
    written = []
    if not rows:
        return written
    cmap = plt.get_cmap("magma")

    def panel(ax, thumb, scale, coords, ps, values, chosen, ev, title):
        ax.imshow(thumb)
        s = ps / scale
        if values is not None:
            lo, hi = np.percentile(values, [5, 99.5])
            for (x, y), v in zip(coords / scale, values):
                c = cmap(float(np.clip((v - lo) / max(hi - lo, 1e-6), 0, 1)))
                ax.add_patch(Rectangle((x, y), s, s, facecolor=c, edgecolor="none", alpha=0.55))
        for i in chosen:
            x, y = coords[i] / scale
            ax.add_patch(Rectangle((x, y), s, s, fill=False, edgecolor="#00e5ff", lw=0.9))
        for i in np.flatnonzero(ev):
            x, y = coords[i] / scale
            ax.add_patch(Rectangle((x - s * 0.35, y - s * 0.35), s * 1.7, s * 1.7, fill=False, edgecolor="#00ff00",
                                   lw=1.6))
        hit = int(np.isin(np.flatnonzero(ev), chosen).sum())
        ax.set_title(f"{title}: {hit}/{int(ev.sum())} evidence", fontsize=8)
        ax.set_axis_off()

    def draw(rows_, path):
        fig, axes = plt.subplots(len(rows_), 2, figsize=(7.2, 3.3 * len(rows_)), squeeze=False)
        for r, (sid, rec, thumb, scale, coords, ps, scores, learned, rand, ev) in enumerate(rows_):
            panel(axes[r, 0], thumb, scale, coords, ps, scores, learned, ev, f"{sid} learned scores, top-{k}")
            panel(axes[r, 1], thumb, scale, coords, ps, None, rand, ev, f"random {k}")
            axes[r, 0].text(0.0, -0.04, f"{rec['count']} x {rec['kind'].replace('_', ' ')}; {len(coords)} patches",
                            transform=axes[r, 0].transAxes, fontsize=7, va="top")
        fig.suptitle("cyan: tokens shown to the LLM; green: true evidence patches; colour: learned score",
                     fontsize=8)
        fig.tight_layout()
        _savefig(fig, path, dpi=90)

    for row in rows:
        p = out_dir / f"{row[0]}.png"
        draw([row], p)
        written.append(p)
    combined = out_dir / "heatmaps.png"
    draw(rows, combined)
    written.append(combined)
    return written


def _kinds_sentence(config, slides_info: dict[str, Any]) -> str:
    """'1-3 evidence foci of one of four kinds per slide (...)', for the report."""
    kinds = slides_info.get("kinds") or []
    words = {1: "one", 2: "two", 3: "three", 4: "four"}
    if not kinds:  # a run from before the benchmark recorded its kinds
        return f"1-{config.slides.max_foci} evidence foci of one kind per slide"
    return (f"1-{config.slides.max_foci} evidence foci of one of {words.get(len(kinds), len(kinds))} kinds per slide "
            f"({', '.join(kinds)})")


def _none_sentence(slides_info: dict[str, Any]) -> str:
    """'; 120 slides hold none of them (...)' when the benchmark has evidence-free slides, else ''."""
    if not slides_info.get("none_option"):
        return ""
    return (f"; {slides_info.get('evidence_free_slides', 0)} slides hold none of them (answer "
            f"\"{slides_info['none_option']}\")")


def _pct(x) -> str:
    return "n/a" if x is None or x != x else f"{100 * x:.1f}"


def targets(eval_info: dict[str, Any]) -> list[tuple[str, bool | None, str]]:
    """The issue's acceptance targets as (description, met, measured)."""
    s = eval_info["selectors"]

    def get(sel, key):
        return s.get(sel, {}).get(key)

    out = []
    acc = get("learned", "accuracy")
    out.append(("learned top-k accuracy >= 90%", None if acc is None else acc >= 0.9, _pct(acc) + "%"))
    for sel in ("random", "uniform"):
        a = get(sel, "accuracy")
        out.append((f"{sel} accuracy <= 60%", None if a is None else a <= 0.6, _pct(a) + "%"))
    rec = get("learned", "evidence_recall")
    out.append(("learned evidence recall@k >= 0.9", None if rec is None else rec >= 0.9,
                "n/a" if rec is None else f"{rec:.3f}"))
    return out


def diagnosis(eval_info: dict[str, Any], margin: float = 0.1) -> list[str]:
    """Plain-language readings of the table that explain a missed target (empty when none applies)."""
    s = eval_info["selectors"]
    acc = {k: v.get("accuracy") for k, v in s.items() if v.get("accuracy") is not None}
    out = []
    if "oracle" in acc and "random" in acc and acc["oracle"] <= acc["random"] + margin:
        out.append(f"the oracle selection (every evidence patch shown) scores {_pct(acc['oracle'])}% against "
                   f"{_pct(acc['random'])}% for random tokens: the trained model does not read the evidence from its "
                   "visual tokens, so no selector can do better than the text alone")
    rec = s.get("learned", {}).get("evidence_recall")
    rnd = s.get("random", {}).get("evidence_recall")
    if rec is not None and rnd is not None and rec <= rnd:
        out.append(f"the learned scorer finds fewer evidence patches (recall {rec:.3f}) than random picks ({rnd:.3f}): "
                   "without a reader that uses the evidence, SparseLearn gives the scorer no signal towards it")
    return out


def _group_text(rule) -> str:
    """One param_groups rule in words: ``(regex, scale[, start_step])``."""
    text = f"`{rule[0]}` {'frozen' if rule[1] is None else rule[1]}"
    return text + (f" from step {rule[2]}" if len(rule) > 2 and rule[2] else "")


def summary_markdown(config, paths: Paths, stages: dict[str, Any], eval_info: dict[str, Any],
                     pictures: dict[str, str], command: str, ranks: dict[str, dict[str, Any]] | None = None) -> str:
    """The report's summary.md."""
    import platform

    import jax

    k = int(config.eval.k)
    sl, ex, an = stages["slides"]["info"], stages["extract"]["info"], stages["annotate"]["info"]
    ds, tr = stages["dataset"]["info"], stages["train"]["info"]
    al = (stages.get("align") or {}).get("info") or {}
    po = (stages.get("polish") or {}).get("info") or {}
    # Single-patch questions (`align.patches_per_slide`), counted in their alignment set's questions.
    n_patch = ds.get("align_short_patch_questions", 0) or ds.get("align_patch_questions", 0)
    lines = ["# SparseWSI demo: learned token selection on a synthetic sparse-evidence slide benchmark", ""]
    lines += [
        f"- command: `{command}`",
        f"- seed {config.seed}; config digest `{config_digest(config)}` (`{paths.root / CONFIG_FILE}`); "
        f"benchmark digest `{sl['config_digest']}`",
        f"- machine: {os.cpu_count()} CPU(s) visible, JAX {jax.__version__} on {jax.default_backend()} "
        f"({jax.local_device_count()} device(s)), Python {platform.python_version()}",
        "",
        "## What was run", "",
        f"1. **slides**: {sl['slides']['train'] + sl['slides']['test']} synthetic slides ({sl['slides']['train']} train, "
        f"{sl['slides']['test']} test; {sl['formats']['svs']} Aperio SVS, {sl['formats']['tiff']} pyramidal TIFF), "
        f"{sl['tissue_patches'][0]}-{sl['tissue_patches'][2]} tissue patches each (mean {sl['tissue_patches'][1]}); "
        + _kinds_sentence(config, sl) +
        f", at most {100 * sl['evidence_fraction_max']:.2f}% of the tissue patches (mean "
        f"{100 * sl['evidence_fraction_mean']:.2f}%)" + _none_sentence(sl) + "; "
        f"every slide has {config.slides.distractors[0]}-{config.slides.distractors[1]} look-alike distractors; "
        f"{len(sl['failed'])} failed.",
        f"2. **extract**: `sparsewsi extract` code path, encoder `{ex['encoder']}` ({ex['weights']}), "
        f"{ex['patch_size']} px patches at {ex['target_mpp']} um/px; {ex['bags']} bags, {len(ex['failed'])} failed"
        + (f"; {ex['patches_per_s']:.0f} patches/s" if ex.get("patches_per_s") else "") + ".",
        f"3. **annotate**: evidence flags on {an['annotated']} bags ({an['evidence_patches']} evidence patches; "
        f"{len(an['foci_not_found'])} bags with a focus-count mismatch).",
        f"4. **dataset**: TFDS `synthetic_slidebench`: {ds['train_questions']} training questions "
        f"({ds['train_questions_original']} + identification questions re-asked with "
        f"{config.dataset.option_orders} other option orders), {ds['test_questions']} test questions; "
        f"D = {ds['feature_dim']}; replies: {config.dataset.reply}"
        + (f"; {ds['align_questions'] - ds.get('align_patch_questions', 0)} region-bag questions "
           f"({config.align.regions_per_slide} bags of "
           f"{config.align.tokens} tokens per training slide: its evidence patches"
           f"{' and look-alike patches' if config.align.get('lookalikes', False) else ''}"
           f"{' (as many as it holds, drawn afresh for each bag from all training slides: the mosaic)' if config.align.get('mosaic', False) else ''}"
           f" + random ones"
           f"{f', among {config.align.noise_slots} pure-noise tokens in training' if config.align.get('noise_slots', 0) else ''})"
           + (f", and {ds['align_short_questions'] - ds.get('align_short_patch_questions', 0)} on short bags of "
              f"{config.align.short_tokens} tokens drawn the same way" if ds.get("align_short_questions") else "")
           + (f"; {n_patch} single-patch questions in the first phase (each training slide's evidence patches, "
              f"answered with its kind, then look-alikes and plain tissue, answered \"none of these\"; up to "
              f"{config.align.patches_per_slide} per slide)" if n_patch else "") + "."
           if ds.get("align_questions") else "."),
        (f"5. **align** (stage 1): projector + tiny LLM {tr['llm']} (random init, built-in tokenizer) learn to read "
         f"visual tokens on the region bags: "
         + (f"first {al['short']['steps']} steps on the short bags{' and single patches' if n_patch else ''} without "
            f"noise tokens (final loss "
            f"{al['short']['final_loss_mean_last10pct']:.4f}), then " if al.get("short") else "")
         + f"{al['steps']} steps of batch {al['batch_size']}, lr {al['lr']}; "
         f"final loss {al['final_loss_mean_last10pct']:.4f}. The scorer gets no gradient here (N <= k: every token "
         f"has mask 1); no location reaches the SparseLearn stage."
         if al.get("steps") else "5. **align**: off (`align.steps = 0`)."),
        f"6. **train** (stage 2): SparseWSI with SparseLearn on whole slides, from the aligned weights (scorer "
        f"`{tr['model']['scorer_kind']}`{' on x and log1p(x^2)' if config.train.model.get('scorer_squares', False) else ''} -> Soft Top-K k = "
        f"{tr['model']['k']} over a candidate cap of {tr['model']['candidate_cap']} -> VP noise gate -> diagonal "
        f"denoiser -> projector -> LLM), {tr['steps']} steps of "
        f"batch {tr['batch_size']}, lr {tr['lr']} (scales by parameter: "
        f"{', '.join(_group_text(rule) for rule in config.train.optim.param_groups)}), "
        f"tau {tr['model']['tau_start']} -> {tr['model']['tau_end']} over "
        f"{tr['model']['tau_steps']} steps"
        + (f"; gate floor {config.train.model.gate_floor} -> 0 over {config.train.model.gate_floor_steps} steps "
           "(the noise gate keeps every token at least that clean)" if config.train.model.get("gate_floor", 0) else "")
        + (f"; Gumbel exploration noise on the scores, {config.train.model.score_noise}"
           + (f" -> 0 over {config.train.model.score_noise_steps} steps" if config.train.model.get("score_noise_steps", 0)
              else " throughout") if config.train.model.get("score_noise", 0) else "")
        + f"; final loss {tr['final_loss_mean_last10pct']:.4f} (mean of the last 10% of steps).",
        (f"7. **polish**: the reader (projector + LLM) fine-tuned on exactly what inference shows it, the Hard Top-K "
         f"of the frozen scorer (k = {tr['model']['k']} clean tokens in slide order; stage 2 shows every token, ~k of "
         f"them clean), {po['steps']} steps of batch {po['batch_size']}, lr {po['lr']}, scorer held still; final loss "
         f"{po['final_loss_mean_last10pct']:.4f}." if po.get("steps") else "7. **polish**: off (`polish.steps = 0`)."),
        f"8. **eval**: the `sparsewsi eval` runner (CheckpointPredictor, greedy decoding, answer-extraction cascade) on "
        f"the {eval_info['questions']} test questions for each selector at k = {k}; `all` shows every token "
        f"(cap {config.eval.all_tokens_cap}).",
        "",
        "## Results", "",
        f"| selector | tokens shown | accuracy % | identification % | counting % | evidence recall@{k} | unparseable |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    from sparsewsi.demo.synthetic_slides import NARROW_COUNT, NARROW_KIND

    for sel in ordered_selectors(config, eval_info):
        r = eval_info["selectors"][sel]
        rec = r.get("evidence_recall")
        rec_s = "n/a" if rec is None else f"{rec:.3f}"
        if sel == "all":
            rec_s += " (all tokens)"
        lines.append(f"| {sel} | {r['tokens_shown_mean']:.0f} | **{_pct(r['accuracy'])}** | "
                     f"{_pct(r['by_task'].get(NARROW_KIND))} | {_pct(r['by_task'].get(NARROW_COUNT))} | {rec_s} | "
                     f"{r['unparseable']} |")
    any_sel = next(iter(eval_info["selectors"].values()))
    b = any_sel.get("baselines", {})
    if b:
        lines += ["", f"Baselines without the slide on the same questions: constant letter "
                      f"{b.get('best_constant_letter')} {_pct(b.get('best_constant_letter_accuracy'))}%, majority "
                      f"answer per task {_pct(b.get('majority_accuracy'))}%. Chance: 25% (identification, 4 options), "
                      f"33% (counting, 3 options)."]
    answers = sorted({a for r in eval_info["selectors"].values() for a in r.get("by_answer", {})})
    if answers:
        sels = ordered_selectors(config, eval_info)
        lines += ["", f"Per answer (accuracy % / evidence recall@{k}; n questions):", "",
                  "| answer | n | " + " | ".join(sels) + " |", "|---|---:|" + "---:|" * len(sels)]
        for a in answers:
            cells, n = [], 0
            for sel in sels:
                v = eval_info["selectors"][sel].get("by_answer", {}).get(a, {})
                n = max(n, v.get("n") or 0)
                rec = v.get("evidence_recall")
                cells.append(f"{_pct(v.get('accuracy'))} / {'n/a' if rec is None else f'{rec:.2f}'}")
            lines.append(f"| {a} | {n} | " + " | ".join(cells) + " |")
    if ranks:
        lines += ["", f"Where the learned scorer ranks each structure in its bag (test slides; rank 0 = first, "
                      f"top {k} selected):", "",
                  f"| structure | role | patches | median rank | median rank / bag | in top {k} |",
                  "|---|---|---:|---:|---:|---:|"]
        for name, r in ranks.items():
            lines.append(f"| {name} | {r['role']} | {r['patches']} | {r['rank_median']:.0f} | "
                         f"{r['rank_fraction_median']:.2f} | {r[f'in_top_{k}']:.2f} |")
    lines += ["", "Selectors: " + "; ".join(f"`{s}` {SELECTOR_NOTES.get(s, '')}"
                                            for s in ordered_selectors(config, eval_info)) + ".",
              "", "### Targets", ""]
    for desc, met, got in targets(eval_info):
        lines.append(f"- {desc}: {got} -> {'met' if met else ('not met' if met is not None else 'not measured')}")
    lines += [f"- {note}" for note in diagnosis(eval_info)]
    lines += ["", "## Time per stage", "",
              "Wall-clock and CPU (user + system, all threads and child processes) seconds; the machine may be shared.",
              "", "| stage | wall s | CPU s | this run |", "|---|---:|---:|---|"]
    tw = tc = 0.0
    for st in STAGES:
        # The report is being written: its own time is not known yet (a stored one is an earlier report's).
        if st not in stages or st == "report":
            continue
        r = stages[st]
        tw += r["wall_s"]
        tc += r["cpu_s"]
        lines.append(f"| {st} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r.get('status', 'ran')} |")
    lines.append(f"| **total** (before the report) | **{tw:.1f}** | **{tc:.1f}** | |")
    lines += ["", "## Pictures", ""]
    for name, rel in pictures.items():
        lines.append(f"- {name}: `{rel}`")
    if "heatmaps" in pictures:
        lines += ["", f"![selection heatmaps]({pictures['heatmaps']})"]
    if "accuracy chart" in pictures:
        lines += ["", f"![accuracy]({pictures['accuracy chart']})"]
    return "\n".join(lines) + "\n"


def stage_report(config, paths: Paths, stages: dict[str, Any], command: str, log: Log = print) -> dict[str, Any]:
    """Write the report folder (summary.md, results.json, accuracy.png, training_curves.png, heatmaps/)."""
    rep = paths.report
    rep.mkdir(parents=True, exist_ok=True)
    eval_info = stages["eval"]["info"]
    k = int(config.eval.k)
    pictures = {}
    accuracy_chart(eval_info, rep / "accuracy.png", k=k, selectors=ordered_selectors(config, eval_info))
    pictures["accuracy chart"] = "accuracy.png"
    hist = read_metrics(paths.train)
    if hist:
        training_curves(hist, rep / "training_curves.png", polish=read_metrics(paths.polish))
        pictures["training curves"] = "training_curves.png"
    inner, _ = load_predictor(config, paths)  # the trained model, loaded once for the pictures and the ranks
    maps = selection_heatmaps(config, paths, rep / "heatmaps", inner, log=log)
    for p in maps:
        key = "heatmaps" if p.name == "heatmaps.png" else f"heatmap {p.stem}"
        pictures[key] = os.fspath(p.relative_to(rep))
    ranks = scorer_ranks(config, paths, inner, log=log)
    results = {"config_digest": config_digest(config), "seed": int(config.seed), "k": k, "eval": eval_info,
               "scorer_ranks": ranks,
               "targets": [{"target": d, "met": m, "measured": g} for d, m, g in targets(eval_info)],
               "stages": {s: {kk: v for kk, v in r.items() if kk != "info"} for s, r in stages.items()}}
    write_json_atomic(rep / "results.json", results)
    # The report stage's own time is not known until it ends: the summary lists the stages before it.
    atomic.write_text_atomic(rep / "summary.md",
                             summary_markdown(config, paths, stages, eval_info, pictures, command, ranks))
    log(f"report: {rep / 'summary.md'}")
    return {"files": sorted(os.fspath(p.relative_to(rep)) for p in rep.rglob("*") if p.is_file())}


# ------------------------------------------------------------------------------------------------
# The whole job
# ------------------------------------------------------------------------------------------------

def run_demo(config, out_dir: os.PathLike | str, *, command: str = "sparsewsi demo", log: Log = print,
             until: str | None = None) -> dict[str, Any]:
    """Run (or resume) every stage in order; returns ``stages.json``'s content.

    Args:
      config: the demo config (``configs/demo.py``).
      out_dir: the run folder.
      until: stop after this stage (default: all of them).
    """
    if until is not None and until not in STAGES:
        raise DemoError(f"unknown stage {until!r}; stages are {', '.join(STAGES)}")
    paths = Paths(pathlib.Path(out_dir).absolute())  # orbax restores only from absolute paths
    check_run_folder(paths, config)
    stages = read_stages(paths)
    t_all = time.perf_counter()
    for st in STAGES:
        prev = stages.get(st)
        if prev and prev.get("done") and st != "report":
            prev["status"] = "done earlier"
            log(f"== {st}: done earlier ({prev['wall_s']:.1f} s wall, {prev['cpu_s']:.1f} s CPU); skipped")
        else:
            log(f"== {st}")
            with StageTimer() as timer:
                if st == "slides":
                    info = stage_slides(config, paths, log)
                elif st == "extract":
                    info = stage_extract(config, paths, log)
                elif st == "annotate":
                    info = stage_annotate(config, paths, log)
                elif st == "dataset":
                    info = stage_dataset(config, paths, log)
                elif st == "align":
                    info = stage_align(config, paths, stages["dataset"]["info"], log)
                elif st == "train":
                    info = stage_train(config, paths, stages["dataset"]["info"], log)
                elif st == "polish":
                    info = stage_polish(config, paths, stages["dataset"]["info"], log)
                elif st == "eval":
                    info = stage_eval(config, paths, log)
                else:
                    info = None
            if st != "report":
                stages[st] = {"done": True, "wall_s": round(timer.wall, 2), "cpu_s": round(timer.cpu, 2),
                              "status": "ran", "info": info, "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")}
                write_json_atomic(paths.root / STAGES_FILE, stages)
                log(f"== {st}: {timer.wall:.1f} s wall, {timer.cpu:.1f} s CPU")
        if st == "report":
            with StageTimer() as timer:
                info = stage_report(config, paths, {s: stages[s] for s in STAGES if s in stages}, command, log)
            stages["report"] = {"done": True, "wall_s": round(timer.wall, 2), "cpu_s": round(timer.cpu, 2),
                                "status": "ran", "info": info, "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")}
            write_json_atomic(paths.root / STAGES_FILE, stages)
        if until == st:
            break
    log(f"demo: {time.perf_counter() - t_all:.1f} s this run; report in {paths.report}")
    return stages
