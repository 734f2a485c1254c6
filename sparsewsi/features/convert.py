"""Converting feature files users already have (SlideChat/DSMIL CSV, ``.pt``, CLAM ``.h5``) to HDF5.

Parsing a 4,096 x 512 text CSV costs ~0.2 s, too slow to feed a training step on every epoch
(``benchmarks/input_pipeline.py``); converting once to the TRIDENT-style layout makes every later
read a binary slice. The output holds ``features`` ``[N, D]`` float32, ``coords`` ``[N, 2]`` int64
when the source had numeric coordinates, ``locations`` ``[N]`` strings when it had patch names, and
the source's attributes plus ``converted_from`` / ``source_size`` / ``source_mtime_ns`` (which let a
rerun skip files that are already converted and unchanged). Writes are atomic.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Iterable

import numpy as np

from sparsewsi.atomic import atomic_path
from sparsewsi.features.readers import FEATURE_SUFFIXES, FeatureFileError, read_feature_bag


@dataclasses.dataclass
class ConversionResult:
    source: str
    output: str | None
    status: str  # "done" | "skipped" | "failed"
    detail: str = ""


def list_feature_files(inputs: Iterable[str]) -> list[pathlib.Path]:
    """Files, or folders searched recursively for feature files, in sorted order."""
    files: list[pathlib.Path] = []
    for item in inputs:
        path = pathlib.Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in FEATURE_SUFFIXES and p.is_file())
        else:
            files.append(path)
    return files


def _is_current(out: pathlib.Path, src: pathlib.Path) -> bool:
    import h5py

    try:
        stat = src.stat()
        with h5py.File(out, "r") as f:
            a = f["features"].attrs
            return (int(a.get("source_size", -1)) == stat.st_size
                    and int(a.get("source_mtime_ns", -1)) == stat.st_mtime_ns)
    except (OSError, KeyError, ValueError):
        return False


def write_bag_h5(path: os.PathLike | str, bag, extra_attrs: dict | None = None) -> None:
    """Writes a FeatureBag atomically (temporary file in the same folder, then rename)."""
    import h5py

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            feats = f.create_dataset("features", data=bag.features.astype(np.float32))
            if bag.coords is not None:
                coords = f.create_dataset("coords", data=bag.coords.astype(np.int64))
                for k, v in bag.attrs.items():
                    if isinstance(v, (str, int, float, bool, np.integer, np.floating)):
                        coords.attrs[k] = v
            if bag.locations is not None:
                f.create_dataset("locations", data=np.asarray([str(x) for x in bag.locations], dtype=object),
                                 dtype=h5py.string_dtype())
            for k, v in (extra_attrs or {}).items():
                feats.attrs[k] = v


def convert_feature_file(src: os.PathLike | str, out: os.PathLike | str, *, csv_feature_columns: int = 512,
                         overwrite: bool = False) -> ConversionResult:
    """Converts one feature file to ``out`` (an ``.h5`` path); never raises for a bad source."""
    src, out = pathlib.Path(src), pathlib.Path(out)
    if not overwrite and out.is_file() and _is_current(out, src):
        return ConversionResult(str(src), str(out), "skipped", "already converted")
    try:
        bag = read_feature_bag(src, csv_feature_columns=csv_feature_columns)
        stat = src.stat()
        write_bag_h5(out, bag, {"converted_from": str(src), "source_size": stat.st_size,
                                "source_mtime_ns": stat.st_mtime_ns, "slide_id": bag.slide_id})
    except FeatureFileError as e:
        return ConversionResult(str(src), None, "failed", f"{e.reason}: {e}")
    except OSError as e:
        return ConversionResult(str(src), None, "failed", f"cannot write {out}: {e}")
    return ConversionResult(str(src), str(out), "done", f"{bag.num_patches} x {bag.dim}")


def convert_feature_files(inputs: Iterable[str], out_dir: os.PathLike | str, *, csv_feature_columns: int = 512,
                          overwrite: bool = False, progress: bool = True) -> list[ConversionResult]:
    """Converts every feature file under ``inputs`` into ``out_dir``, keeping sub-folders (``<Tumor>/``).

    A file given directly lands in ``out_dir``; files found in a folder keep their path relative to it,
    so the SlideChat layout ``<root>/<Tumor>/<Slide>.csv`` becomes ``<out>/<Tumor>/<Slide>.h5``.
    """
    from tqdm.auto import tqdm

    out_dir = pathlib.Path(out_dir)
    jobs: list[tuple[pathlib.Path, pathlib.Path]] = []
    for item in inputs:
        root = pathlib.Path(item)
        for src in list_feature_files([item]):
            rel = src.relative_to(root) if root.is_dir() else pathlib.Path(src.name)
            jobs.append((src, out_dir / rel.with_suffix(".h5")))
    results = []
    for src, out in tqdm(jobs, desc="convert", unit="file", disable=not progress):
        if src.resolve() == out.resolve():
            results.append(ConversionResult(str(src), None, "failed", "source and output are the same file"))
            continue
        results.append(convert_feature_file(src, out, csv_feature_columns=csv_feature_columns, overwrite=overwrite))
    return results
