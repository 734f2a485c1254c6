"""Finding a slide's feature file under a features root.

Layouts searched, first match wins:

1. ``<root>/<Tumor>/<Slide>.csv`` then ``.h5`` (SlideChat layout, when the record has a tumor);
2. ``<root>/<Slide>.h5``, ``<root>/<Slide>.csv`` (flat TRIDENT/CLAM or CSV folder), then ``.pt``;
3. ``<root>/<any sub-folder>/<Slide>.<suffix>`` (SlideInstruction records carry no tumor);
4. with ``prefix=True``: the first file (sorted) whose name starts with ``<Slide>-`` or
   ``<Slide>.``, in the root or one sub-folder: WSI-VQA ids are 12-character patient barcodes
   (``TCGA-PL-A8LZ``) while files are named by slide (``TCGA-PL-A8LZ-01Z-00-DX1.h5``).
"""

from __future__ import annotations

import os
import pathlib

from sparsewsi.features.readers import FEATURE_SUFFIXES, slide_id_from_path

_FLAT_ORDER = (".h5", ".hdf5", ".csv", ".pt", ".pth")


def resolve_feature_file(
    root: os.PathLike | str, slide_id: str, *, tumor: str = "", prefix: bool = False
) -> pathlib.Path | None:
    """The feature file of one slide under ``root`` (see the module docstring), or ``None``.

    Touches the file system for every call; for many lookups build a :class:`FeatureIndex` once.
    """
    root = pathlib.Path(root)
    if tumor:
        for suffix in (".csv", ".h5"):
            p = root / tumor / f"{slide_id}{suffix}"
            if p.is_file():
                return p
    for suffix in _FLAT_ORDER:
        p = root / f"{slide_id}{suffix}"
        if p.is_file():
            return p
    return FeatureIndex(root).lookup(slide_id, tumor=tumor, prefix=prefix)


class FeatureIndex:
    """A one-time scan of ``root`` and its direct sub-folders, for fast bulk lookups.

    ``lookup`` applies the same order as :func:`resolve_feature_file`.
    """

    def __init__(self, root: os.PathLike | str):
        self.root = pathlib.Path(root)
        self._flat: dict[str, dict[str, pathlib.Path]] = {}  # slide -> suffix -> path (root level)
        self._nested: dict[str, dict[str, pathlib.Path]] = {}  # slide -> "<folder>/<suffix>" -> path
        self._names: list[tuple[str, pathlib.Path]] = []  # (file name, path), sorted
        if not self.root.is_dir():
            return
        for entry in sorted(os.scandir(self.root), key=lambda e: e.name):
            if entry.is_file() and entry.name.lower().endswith(FEATURE_SUFFIXES):
                self._add(pathlib.Path(entry.path), nested=False)
            elif entry.is_dir():
                for sub in sorted(os.scandir(entry.path), key=lambda e: e.name):
                    if sub.is_file() and sub.name.lower().endswith(FEATURE_SUFFIXES):
                        self._add(pathlib.Path(sub.path), nested=True)

    def _add(self, path: pathlib.Path, nested: bool) -> None:
        slide = slide_id_from_path(path)
        suffix = path.name[len(slide):].lower()
        if nested:
            self._nested.setdefault(slide, {})[f"{path.parent.name}/{suffix}"] = path
        else:
            self._flat.setdefault(slide, {})[suffix] = path
        self._names.append((path.name, path))

    def __len__(self) -> int:
        return len(self._names)

    def lookup(self, slide_id: str, *, tumor: str = "", prefix: bool = False) -> pathlib.Path | None:
        """The feature file of ``slide_id`` (optionally in folder ``tumor``), or ``None``."""
        nested = self._nested.get(slide_id, {})
        if tumor:
            for suffix in (".csv", ".h5"):
                if f"{tumor}/{suffix}" in nested:
                    return nested[f"{tumor}/{suffix}"]
        flat = self._flat.get(slide_id, {})
        for suffix in _FLAT_ORDER:
            if suffix in flat:
                return flat[suffix]
        for suffix in _FLAT_ORDER:
            for key in sorted(nested):
                if key.endswith("/" + suffix):
                    return nested[key]
        if prefix:
            hits = sorted(
                (name, p) for name, p in self._names if name.startswith(slide_id + "-") or name.startswith(slide_id + ".")
            )
            if hits:
                return hits[0][1]
        return None
