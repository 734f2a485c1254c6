"""Readers of per-slide patch-feature files into :class:`~sparsewsi.features.bag.FeatureBag`.

Supported layouts (see ``docs/formats.md`` of the shared docs):

* **TRIDENT / CLAM HDF5** (``.h5``, ``.hdf5``): datasets ``features`` ``[N, D]`` (CLAM sometimes
  ``[1, N, D]``) and ``coords`` ``[N, 2]`` int64 level-0 ``(x, y)``; the attributes on ``coords``
  (``patch_size``, ``patch_size_level0``, ``level0_magnification``, ``target_magnification``,
  ``level0_width``, ``level0_height``, ``name``, ...) become ``bag.attrs``.
* **SlideChat / DSMIL CSV** (``.csv``): a header row, the first ``csv_feature_columns`` (512 for
  CONCH) columns are features, the remaining column(s) the patch location: numeric ``x``/``y``
  columns become ``coords``, a patch-name column (``12_34.jpg``) becomes ``locations``. A pandas
  index written as an unnamed first column is skipped.
* **PyTorch** (``.pt``, ``.pth``): a ``[N, D]`` / ``[1, N, D]`` tensor or a dict with ``features``
  (and optionally ``coords``), loaded only with ``torch.load(weights_only=True)`` (never unpickles
  arbitrary objects) and only when torch is importable.

Every problem raises :class:`FeatureFileError`, whose message names the file and the problem, so a
batch job can catch it, count the reason (``error.reason``) and carry on.
"""

from __future__ import annotations

import csv
import os
import pathlib
from typing import Any

import numpy as np

from sparsewsi.features.bag import FeatureBag

H5_SUFFIXES = (".h5", ".hdf5")
CSV_SUFFIXES = (".csv",)
PT_SUFFIXES = (".pt", ".pth")
FEATURE_SUFFIXES = H5_SUFFIXES + CSV_SUFFIXES + PT_SUFFIXES

# Header names recognised as the x / y location columns of a feature CSV (lower-cased).
_X_NAMES = ("x", "coord_x", "coords_x", "pos_x", "x_coord", "xcoord", "loc_x", "col")
_Y_NAMES = ("y", "coord_y", "coords_y", "pos_y", "y_coord", "ycoord", "loc_y", "row")
_INDEX_HEADERS = ("", "unnamed: 0")


class FeatureFileError(ValueError):
    """A feature file that cannot be used: ``path`` and a short machine-readable ``reason``.

    ``reason`` is one of ``missing``, ``unsupported``, ``unreadable``, ``wrong_width``,
    ``non_finite``, ``empty``, ``bad_layout``; ``str(error)`` is the human-readable message.
    """

    def __init__(self, path: os.PathLike | str, reason: str, detail: str):
        self.path = pathlib.Path(path)
        self.reason = reason
        self.detail = detail
        super().__init__(f"feature file {self.path}: {detail}")


def slide_id_from_path(path: os.PathLike | str) -> str:
    """The slide id of a feature file: its name without the feature suffix (``a/X.csv`` -> ``X``)."""
    name = pathlib.Path(path).name
    for suffix in FEATURE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_feature_bag(
    path: os.PathLike | str,
    *,
    expected_dim: int | None = None,
    csv_feature_columns: int = 512,
    slide_id: str | None = None,
    allow_empty: bool = False,
    check_finite: bool = True,
    with_attrs: bool = True,
) -> FeatureBag:
    """Read one slide's feature file, dispatching on its suffix.

    Args:
      path: a ``.h5``/``.hdf5``, ``.csv`` or ``.pt``/``.pth`` file.
      expected_dim: if given, D must equal it (else ``wrong_width``).
      csv_feature_columns: how many leading columns of a CSV are features (512 for CONCH).
      slide_id: the id to store in the bag (default: the file name without suffix).
      allow_empty: accept a bag with N = 0 (otherwise ``empty``).
      check_finite: reject NaN/inf features (``non_finite``).
      with_attrs: read an HDF5 file's attributes into ``attrs`` (False: ``{}``; a TRIDENT bag carries ~30 of
        them and reading them took longer than its features: input pipelines that only need the features
        skip them).

    Returns:
      a :class:`FeatureBag` with ``features`` ``[N, D]`` float32.

    Raises:
      FeatureFileError: naming the file and the problem.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FeatureFileError(path, "missing", "does not exist" if not path.exists() else "is not a file")
    suffix = path.suffix.lower()
    if suffix in H5_SUFFIXES:
        features, coords, locations, attrs = _read_h5(path, with_attrs=with_attrs)
    elif suffix in CSV_SUFFIXES:
        features, coords, locations, attrs = _read_csv(path, csv_feature_columns)
    elif suffix in PT_SUFFIXES:
        features, coords, locations, attrs = _read_pt(path)
    else:
        raise FeatureFileError(
            path, "unsupported", f"unsupported suffix {suffix!r}; expected one of {', '.join(FEATURE_SUFFIXES)}"
        )
    return _validated_bag(
        path, features, coords, locations, attrs,
        expected_dim=expected_dim, slide_id=slide_id, allow_empty=allow_empty, check_finite=check_finite,
    )


def _validated_bag(path, features, coords, locations, attrs, *, expected_dim, slide_id, allow_empty, check_finite):
    if features.ndim == 3 and features.shape[0] == 1:  # CLAM's batched [1, N, D]
        features = features[0]
    if features.ndim != 2:
        raise FeatureFileError(path, "bad_layout", f"features have shape {features.shape}, expected [N, D]")
    n, d = features.shape
    if n == 0 and not allow_empty:
        raise FeatureFileError(path, "empty", "holds no patches (N = 0)")
    if expected_dim is not None and d != expected_dim:
        raise FeatureFileError(path, "wrong_width", f"features are {d} wide, expected {expected_dim}")
    if not np.issubdtype(features.dtype, np.number):
        raise FeatureFileError(path, "bad_layout", f"features have non-numeric dtype {features.dtype}")
    features = np.asarray(features, dtype=np.float32)
    if check_finite:
        finite = np.isfinite(features)
        if not finite.all():
            bad_rows = np.flatnonzero(~finite.all(axis=1))
            raise FeatureFileError(
                path, "non_finite",
                f"{bad_rows.size} of {n} patches hold NaN/inf features (first at row {int(bad_rows[0])})",
            )
    if coords is not None:
        coords = np.asarray(coords)
        if coords.ndim == 3 and coords.shape[0] == 1:
            coords = coords[0]
        if coords.shape != (n, 2):
            raise FeatureFileError(path, "bad_layout", f"coords have shape {coords.shape}, expected [{n}, 2]")
        coords = coords.astype(np.int64)
    return FeatureBag(
        features=features,
        coords=coords,
        locations=locations,
        slide_id=slide_id if slide_id is not None else slide_id_from_path(path),
        source=path,
        attrs=attrs,
    )


def _plain(value: Any) -> Any:
    """HDF5 attribute value -> plain Python (bytes -> str, numpy scalars/arrays -> Python)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()] if value.dtype.kind in "OSU" else value.tolist()
    return value


def _read_h5(path: pathlib.Path, with_attrs: bool = True):
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "features" not in f:
                raise FeatureFileError(
                    path, "bad_layout", f"has no 'features' dataset (found: {', '.join(sorted(f.keys())) or 'nothing'})"
                )
            attrs = {}
            if with_attrs:
                attrs = {k: _plain(v) for k, v in f.attrs.items()}
                attrs.update({k: _plain(v) for k, v in f["features"].attrs.items()})
            features = f["features"][()]
            coords = None
            if "coords" in f:
                coords = f["coords"][()]
                if with_attrs:
                    attrs.update({k: _plain(v) for k, v in f["coords"].attrs.items()})
            locations = None
            if "locations" in f:  # patch names kept by `sparsewsi convert-features` from CSVs
                locations = np.asarray(f["locations"].asstr()[()], dtype=object)
    except FeatureFileError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise FeatureFileError(path, "unreadable", f"cannot be read as HDF5 ({type(e).__name__}: {e})") from e
    return np.asarray(features), coords, locations, attrs


def _read_pt(path: pathlib.Path):
    try:
        import torch
    except ImportError as e:
        raise FeatureFileError(
            path, "unsupported", "is a PyTorch file but torch is not installed (pip install 'sparsewsi[torch]')"
        ) from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types (UnpicklingError, RuntimeError, EOFError ...)
        raise FeatureFileError(
            path, "unreadable", f"cannot be loaded with torch.load(weights_only=True) ({type(e).__name__}: {e})"
        ) from e
    coords = None
    if isinstance(obj, dict):
        key = next((k for k in ("features", "feats", "feature") if k in obj), None)
        if key is None:
            raise FeatureFileError(path, "bad_layout", f"dict has no 'features' entry (keys: {sorted(map(str, obj))})")
        feats = obj[key]
        if obj.get("coords") is not None:
            coords = obj["coords"]
            coords = coords.numpy() if hasattr(coords, "numpy") else np.asarray(coords)
    else:
        feats = obj
    if not hasattr(feats, "numpy"):
        raise FeatureFileError(path, "bad_layout", f"holds a {type(feats).__name__}, expected a tensor")
    return feats.detach().float().numpy(), coords, None, {}


def _read_csv(path: pathlib.Path, width: int):
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            header_line = f.readline()
            body = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise FeatureFileError(path, "unreadable", f"cannot be read as UTF-8 text ({type(e).__name__}: {e})") from e
    if not header_line.strip():
        raise FeatureFileError(path, "empty", "is empty (no header row)")
    header = next(csv.reader([header_line]))
    start = 1 if header[0].strip().lower() in _INDEX_HEADERS else 0  # a pandas index column
    if len(header) - start < width:
        raise FeatureFileError(
            path, "wrong_width",
            f"has {len(header) - start} feature/location columns, expected at least {width} feature columns",
        )
    extra = [h.strip() for h in header[start + width:]]
    attrs: dict[str, Any] = {"csv_location_columns": extra}
    lines = [line for line in body.splitlines() if line.strip()]
    if not lines:
        return np.zeros((0, width), np.float32), None, None, attrs
    k = len(extra)
    if '"' in body:
        # Quoted fields (rare): the csv module splits them correctly.
        rows = list(csv.reader(lines))
        bad = next((i for i, r in enumerate(rows) if len(r) != len(header)), None)
        if bad is not None:
            raise FeatureFileError(
                path, "unreadable", f"data row {bad + 1} has {len(rows[bad])} fields, the header {len(header)}"
            )
        feature_text = [",".join(r[start : start + width]) for r in rows]
        tails = [r[start + width :] for r in rows]
    elif k:
        # Split the location column(s) off the right end; the rest goes to numpy's C parser.
        split = [line.rsplit(",", k) for line in lines]
        bad = next((i for i, r in enumerate(split) if len(r) != k + 1), None)
        if bad is not None:
            raise FeatureFileError(path, "unreadable", f"data row {bad + 1} has too few fields")
        feature_text = [r[0] for r in split]
        tails = [r[1:] for r in split]
    else:
        feature_text, tails = lines, None
    try:
        # numpy's C parser is ~3x faster than csv + float() on 512-wide rows; without usecols it
        # also rejects rows whose field count differs from the header.
        features = np.loadtxt(
            feature_text, delimiter=",", dtype=np.float32, ndmin=2, comments=None, quotechar=None,
            usecols=range(start, start + width) if start else None,
        )
    except ValueError as e:
        raise FeatureFileError(path, "unreadable", f"has a malformed feature row ({e})") from e
    if features.shape[1] != width:
        raise FeatureFileError(path, "wrong_width", f"rows hold {features.shape[1]} features, expected {width}")
    coords, locations = None, None
    if k:
        coords, locations = _csv_locations(path, tails, extra)
    return features, coords, locations, attrs


def _csv_locations(path, tails, extra):
    """``tails``: per row, the fields after the features. -> (coords [N, 2] int64 | None, names | None)."""
    lower = [h.lower() for h in extra]
    xi = next((lower.index(h) for h in _X_NAMES if h in lower), None)
    yi = next((lower.index(h) for h in _Y_NAMES if h in lower), None)
    named = xi is not None and yi is not None
    if not named and len(extra) == 2:
        xi, yi = 0, 1  # two unnamed trailing columns: (x, y) if they are numbers
    if xi is not None and yi is not None:
        try:
            coords = np.array([(float(r[xi]), float(r[yi])) for r in tails], dtype=np.float64)
            return np.rint(coords).astype(np.int64), None
        except (ValueError, IndexError):
            if named:
                raise FeatureFileError(path, "unreadable", f"has non-numeric coordinates in columns {extra}") from None
    # A patch-name column (``12_34.jpg``): kept verbatim.
    return None, np.array([r[0] for r in tails], dtype=object)
