"""Resumable, sharded evaluation runs: per-question JSON lines, written as they finish.

Layout of a run folder::

    run.json                                   what is being evaluated (model, config, data SHA-256,
                                               selector, k, shard count); a rerun must match it
    predictions.shard00000-of00002.jsonl       one JSON object per finished question, per shard
    predictions.shard00001-of00002.jsonl
    results.json / results.md / results.png    written by :func:`merge_run` (see ``report``)

Each host (process) evaluates ``items[shard::num_shards]`` with its own devices and appends to its
own file, so hosts never write the same file and no collective is needed. A line is
``{"item_id", "slide_id", "status": "ok", "prediction"}`` or ``{..., "status": "skipped",
"reason", "detail"}`` (slide features missing or unreadable); lines are flushed and fsync'ed after
every batch. A rerun reads the file, drops a torn last line left by a crash, and evaluates only the
questions that have no line yet: finished questions are never redone nor duplicated. A skipped
question is final for the run (start a new run folder once the features exist).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import pathlib
import re
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from sparsewsi.atomic import write_bytes_atomic
from sparsewsi.datasets import FeatureIndex
from sparsewsi.evaluation.items import EvalItem, EvalSet
from sparsewsi.evaluation.predictor import PreparedQuestion
from sparsewsi.features.readers import FeatureFileError, read_feature_bag

MANIFEST = "run.json"
_SHARD_RE = re.compile(r"^predictions\.shard(\d+)-of(\d+)\.jsonl$")
# Fields of run.json that must agree between the runs writing into one folder.
MANIFEST_KEYS = ("model", "selector", "k", "data_sha256", "num_shards")


class RunError(RuntimeError):
    """A run folder that cannot be used as asked (settings differ, a corrupt line); names the file."""


class SkipItem(Exception):
    """An item that cannot be evaluated: ``reason`` (machine-readable) and ``detail``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def write_atomic(path: os.PathLike | str, data: bytes | str) -> None:
    """Write ``data`` to ``path`` atomically and fsync it (results must survive a preemption)."""
    write_bytes_atomic(path, data, fsync=True)


def shard_items(items: Sequence[EvalItem], shard: int, num_shards: int) -> list[EvalItem]:
    """Round-robin share of one shard: ``items[shard::num_shards]`` (balanced across tasks/slides)."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} is not in [0, {num_shards})")
    return list(items[shard::num_shards])


def shard_path(run_dir: os.PathLike | str, shard: int, num_shards: int) -> pathlib.Path:
    return pathlib.Path(run_dir) / f"predictions.shard{shard:05d}-of{num_shards:05d}.jsonl"


def read_jsonl(path: os.PathLike | str, *, repair: bool = False) -> list[dict[str, Any]]:
    """The records of a JSON-lines file.

    A last line that is incomplete (no newline) or not JSON is what a crash mid-write leaves: it is
    ignored, and with ``repair`` cut off the file so appends start on a clean line. A bad line
    anywhere else raises :class:`RunError` with the file and line number.
    """
    path = pathlib.Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    records, good_bytes = [], 0
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        if last and not line.strip():
            break
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or "item_id" not in rec:
                raise ValueError("not an object with an item_id")
        except (ValueError, UnicodeDecodeError) as e:
            torn = i >= len(lines) - 2 and (last or not lines[-1].strip())
            if torn:
                break
            raise RunError(f"{path}: line {i + 1} is not a result record ({e})") from e
        if last:  # valid JSON but no newline yet: still a torn write, redo it
            break
        records.append(rec)
        good_bytes += len(line) + 1
    if repair and good_bytes != len(raw):
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
    return records


class BagSource:
    """Finds and reads the feature bag of each item's slide, with a small cache (questions share slides).

    Args:
      features_root: folder of feature files (layouts of :mod:`sparsewsi.datasets.feature_paths`).
      prefix: match files by slide-id prefix (WSI-VQA patient barcodes).
      max_patches: evenly sub-sample larger bags to this many patches (SlideChat's test-time cap).
      expected_dim: required feature width, if known.
      cache_size: how many bags to keep in memory.
    """

    def __init__(self, features_root: os.PathLike | str, *, prefix: bool = False, max_patches: int | None = 38400,
                 expected_dim: int | None = None, cache_size: int = 16):
        self.index = FeatureIndex(features_root)
        self.root = pathlib.Path(features_root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"features root {self.root} is not a folder")
        self.prefix, self.max_patches, self.expected_dim = prefix, max_patches, expected_dim
        self._cache: collections.OrderedDict[str, tuple] = collections.OrderedDict()
        self.cache_size = cache_size

    def load(self, item: EvalItem) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(features [N, D], coords [N, 2] or None, evidence [N] or None); raises :class:`SkipItem`."""
        key = f"{item.tumor}/{item.slide_id}"
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        path = self.index.lookup(item.slide_id, tumor=item.tumor, prefix=self.prefix)
        if path is None:
            raise SkipItem("feature_file_missing", f"no feature file for slide {item.slide_id!r} under {self.root}")
        try:
            bag = read_feature_bag(path, expected_dim=self.expected_dim, slide_id=item.slide_id)
        except FeatureFileError as e:
            raise SkipItem(f"feature_file_{e.reason}", str(e)) from e
        evidence = _read_evidence(path, bag.num_patches)
        if self.max_patches is not None and bag.num_patches > self.max_patches:
            idx = (np.arange(self.max_patches, dtype=np.int64) * bag.num_patches) // self.max_patches
            bag = bag.take(idx)
            evidence = None if evidence is None else evidence[idx]
        value = (bag.features, bag.coords, evidence)
        self._cache[key] = value
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return value

    def prepare(self, item: EvalItem) -> PreparedQuestion:
        features, coords, evidence = self.load(item)
        return PreparedQuestion(item.item_id, item.prompt, features, coords, evidence)


def _read_evidence(path: pathlib.Path, n: int) -> np.ndarray | None:
    """Ground-truth evidence flags [N] from an HDF5 bag's ``evidence`` dataset (synthetic data), else None."""
    if path.suffix.lower() not in (".h5", ".hdf5"):
        return None
    import h5py

    with h5py.File(path, "r") as f:
        if "evidence" not in f:
            return None
        ev = np.asarray(f["evidence"]).reshape(-1).astype(bool)
    return ev if ev.shape == (n,) else None


@dataclasses.dataclass
class ShardStats:
    """What one :func:`run_shard` call did."""

    shard: int
    num_shards: int
    assigned: int
    already_done: int
    evaluated: int = 0
    skipped: int = 0
    seconds: float = 0.0

    @property
    def questions_per_second(self) -> float:
        return self.evaluated / self.seconds if self.seconds > 0 else float("nan")


def run_shard(items: Sequence[EvalItem], predictor: Callable[[Sequence[PreparedQuestion]], list[str]],
              prepare: Callable[[EvalItem], PreparedQuestion], run_dir: os.PathLike | str, *, shard: int = 0,
              num_shards: int = 1, batch_size: int = 8, limit: int | None = None,
              log: Callable[[str], None] | None = None) -> ShardStats:
    """Evaluate this shard's unfinished items and append one JSON line per item.

    Args:
      items: all items of the benchmark (this function takes its shard).
      predictor: questions -> texts.
      prepare: item -> :class:`PreparedQuestion`; raises :class:`SkipItem` to skip and report an item.
      run_dir: the run folder.
      shard, num_shards: this process's shard.
      batch_size: questions handed to the predictor at a time (and written per flush).
      limit: stop after this many newly evaluated items (for smoke tests / time-boxed jobs).
    """
    run_dir = pathlib.Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = shard_path(run_dir, shard, num_shards)
    mine = shard_items(items, shard, num_shards)
    done = {r["item_id"] for r in read_jsonl(path, repair=True)}
    # Slide order inside the shard, so consecutive questions reuse the cached bag.
    pending = sorted((it for it in mine if it.item_id not in done), key=lambda it: (it.tumor, it.slide_id))
    if limit is not None:
        pending = pending[:limit]
    stats = ShardStats(shard, num_shards, assigned=len(mine), already_done=sum(it.item_id in done for it in mine))
    start = time.perf_counter()
    with open(path, "a", encoding="utf-8") as f:
        for lo in range(0, len(pending), batch_size):
            lines, ready, prepared = [], [], []
            for it in pending[lo:lo + batch_size]:
                try:
                    prepared.append(prepare(it))
                    ready.append(it)
                except SkipItem as e:
                    stats.skipped += 1
                    lines.append({"item_id": it.item_id, "slide_id": it.slide_id, "status": "skipped",
                                  "reason": e.reason, "detail": e.detail})
            if prepared:
                texts = predictor(prepared)
                if len(texts) != len(prepared):
                    raise RuntimeError(f"predictor returned {len(texts)} texts for {len(prepared)} questions")
                for it, text in zip(ready, texts):
                    lines.append({"item_id": it.item_id, "slide_id": it.slide_id, "status": "ok", "prediction": text})
                stats.evaluated += len(prepared)
            f.write("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in lines))
            f.flush()
            os.fsync(f.fileno())
            if log:
                log(f"shard {shard}/{num_shards}: {stats.already_done + lo + len(lines)}/{len(mine)} done")
    stats.seconds = time.perf_counter() - start
    return stats


def shard_files(run_dir: os.PathLike | str) -> list[pathlib.Path]:
    """The prediction files of a run folder, sorted."""
    return sorted(p for p in pathlib.Path(run_dir).iterdir() if _SHARD_RE.match(p.name))


def collect(paths: Iterable[os.PathLike | str]) -> tuple[dict[str, str], dict[str, str], int]:
    """Merge shard files: (item id -> prediction, item id -> skip reason, number of duplicate lines dropped).

    An item with several lines keeps its first ``ok`` line (else its first line).
    """
    predictions: dict[str, str] = {}
    skipped: dict[str, str] = {}
    duplicates = 0
    for p in paths:
        for r in read_jsonl(p):
            iid = r["item_id"]
            if iid in predictions or (iid in skipped and r.get("status") != "ok"):
                duplicates += 1
                continue
            if r.get("status") == "ok":
                if iid in skipped:
                    duplicates += 1
                    del skipped[iid]
                predictions[iid] = str(r.get("prediction", ""))
            else:
                skipped[iid] = str(r.get("reason", "skipped"))
    return predictions, skipped, duplicates


def manifest_for(eval_set: EvalSet, describe: dict[str, Any], num_shards: int, extra: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
    """run.json content: model description, selector, k, data provenance, shard count (+ extra config)."""
    return {
        "model": describe.get("name", "unknown"), "selector": describe.get("selector"), "k": describe.get("k"),
        "model_config": describe, "data": eval_set.provenance(), "data_sha256": eval_set.sha256,
        "num_shards": int(num_shards), "config": dict(extra or {}),
    }


def ensure_manifest(run_dir: os.PathLike | str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write run.json, or check an existing one agrees on :data:`MANIFEST_KEYS` (raises :class:`RunError`)."""
    run_dir = pathlib.Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / MANIFEST
    if path.exists():
        old = json.loads(path.read_text())
        diff = [k for k in MANIFEST_KEYS if old.get(k) != manifest.get(k)]
        if diff:
            detail = ", ".join(f"{k}: {old.get(k)!r} there, {manifest.get(k)!r} now" for k in diff)
            raise RunError(f"{path}: this folder holds a run with other settings ({detail}); use a new folder")
        return old
    write_atomic(path, json.dumps(manifest, indent=2, sort_keys=True, default=str))
    return manifest
