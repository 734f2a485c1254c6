"""TFDS builders (array_record, no TensorFlow needed) for the slide-text datasets.

One builder per source family; all write the flat schema of :mod:`data_pipelines.examples`:

=========================  ==========================  =========================================
builder                    configs                     sources (split -> file)
=========================  ==========================  =========================================
``SlidebenchVqa``          ``tcga``, ``bcnb``          SlideBench-VQA CSV (layout auto-detected)
``SlidebenchCaption``      ``default``                 SlideBench-Caption CSV
``WsiVqa``                 ``lettered``, ``plain``     WSI-VQA JSON (train / validation / test)
``SlideInstruction``       ``stage1``, ``stage2``      SlideInstruction JSON
=========================  ==========================  =========================================

Each example points at its slide's feature file (``.h5`` or SlideChat CSV) relative to the
``features_root`` given at build time (the pipeline can re-root it). Rows the parser rejects and
items whose feature file is absent or unusable (wrong width, NaN/inf, empty, unreadable) are
skipped and listed with row, id and reason in ``builder.build_report`` (written beside the data as
``build_report.json`` by :func:`data_pipelines.build.build`); the dataset metadata holds each
source's SHA-256, the build parameters and the per-reason counts. A prepared directory built from
a different source file (another SHA-256) is refused instead of silently reused.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

import sparsewsi
from data_pipelines import examples as ex
from sparsewsi.datasets import (
    FeatureIndex,
    ParsedFile,
    RowProblem,
    detect_vqa_layout,
    read_slide_instruction,
    read_slidebench_caption,
    read_slidebench_vqa,
    read_wsi_vqa,
    sha256_file,
)
from sparsewsi.features.readers import FeatureFileError, read_feature_bag

MAX_PROBLEMS_IN_METADATA = 200  # the full list goes to build_report.json


class StaleDatasetError(RuntimeError):
    """A prepared dataset directory was built from a different source file than the one given."""


def feature_spec() -> tfds.features.FeaturesDict:
    """The TFDS features of :data:`data_pipelines.examples.SCHEMA`."""
    kinds = {
        "text": tfds.features.Text,
        "int": lambda: tfds.features.Scalar(np.int64),
        "texts": lambda: tfds.features.Sequence(tfds.features.Text()),
    }
    return tfds.features.FeaturesDict({k: kinds[kind]() for k, kind in ex.SCHEMA.items()})


class _SlideTextBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared machinery: parse sources, resolve and validate feature files, report, write.

    Args (keyword-only, besides TFDS's ``data_dir``/``config``/``version``):
      sources: ``{split: path}`` or a single path (split :attr:`DEFAULT_SPLIT`).
      features_root: folder holding the per-slide feature files.
      validate_features: read every referenced feature file once at build time (width, NaN/inf,
        N); items with a bad file are skipped and reported. ``False`` only checks existence.
      feature_dim: expected D; ``csv_feature_columns``: leading feature columns of CSV bags.
      check_stale: refuse a prepared directory built from another source file (SHA-256).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release: flat slide-text schema, feature-file pointers, build report."}
    DEFAULT_SPLIT = "test"
    PREFIX_LOOKUP = False  # WSI-VQA ids are patient barcodes: match feature files by prefix

    def __init__(
        self,
        *,
        sources: Mapping[str, os.PathLike | str] | os.PathLike | str,
        features_root: os.PathLike | str,
        validate_features: bool = True,
        feature_dim: int = 512,
        csv_feature_columns: int = 512,
        check_stale: bool = True,
        **kwargs: Any,
    ):
        if not isinstance(sources, Mapping):
            sources = {self.DEFAULT_SPLIT: sources}
        self._sources = {split: pathlib.Path(p) for split, p in sources.items()}
        for split, p in self._sources.items():
            if not p.is_file():
                raise FileNotFoundError(f"source file for split {split!r} does not exist: {p}")
        self._features_root = pathlib.Path(features_root)
        self._validate = bool(validate_features)
        self._feature_dim = int(feature_dim)
        self._csv_columns = int(csv_feature_columns)
        self._sha = {split: sha256_file(p) for split, p in self._sources.items()}
        self.build_report: dict[str, Any] = {}
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)
        if check_stale:
            self._refuse_stale()

    # -- hooks for subclasses ---------------------------------------------------------------
    def _parse(self, path: pathlib.Path) -> ParsedFile:
        raise TypeError(f"{type(self).__name__} must define _parse")

    def _to_example(self, record: Any) -> dict[str, Any]:
        raise TypeError(f"{type(self).__name__} must define _to_example")

    @staticmethod
    def _tumor(record: Any) -> str:
        return getattr(record, "tumor", "") or ""

    # -- TFDS -------------------------------------------------------------------------------
    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=(self.__doc__ or "").strip().splitlines()[0],
            features=feature_spec(),
            metadata=tfds.core.MetadataDict(),
        )

    def build_parameters(self) -> dict[str, Any]:
        """The parameters that decide the content (stored in the metadata)."""
        return {
            "builder": type(self).__name__,
            "config": self.builder_config.name if self.builder_config else "",
            "features_root": str(self._features_root.resolve()),
            "validate_features": self._validate,
            "feature_dim": self._feature_dim,
            "csv_feature_columns": self._csv_columns,
            "sparsewsi_version": sparsewsi.__version__,
        }

    def _refuse_stale(self) -> None:
        meta_file = pathlib.Path(os.fspath(self.data_path)) / "metadata.json"
        if not meta_file.is_file():
            return
        old = json.loads(meta_file.read_text()).get("sources", {})
        for split, sha in self._sha.items():
            if split in old and old[split].get("sha256") != sha:
                raise StaleDatasetError(
                    f"{self.data_path} was built from {old[split].get('path')} (sha256 {old[split].get('sha256')}), "
                    f"but split {split!r} now comes from {self._sources[split]} (sha256 {sha}); "
                    "use another data_dir or rebuild with overwrite=True"
                )

    def _split_generators(self, dl_manager):
        index = FeatureIndex(self._features_root)
        checked: dict[pathlib.Path, tuple[str, str, int]] = {}  # path -> (reason, detail, N)
        generators, meta_sources = {}, {}
        for split, path in self._sources.items():
            parsed = self._parse(path)
            problems = list(parsed.problems)
            kept = []
            for record in parsed.records:
                item_id = getattr(record, "question_id", None) or record.item_id
                fpath = index.lookup(record.slide_id, tumor=self._tumor(record), prefix=self.PREFIX_LOOKUP)
                if fpath is None:
                    problems.append(RowProblem(record.row, item_id, "feature_file_missing",
                                               f"no feature file for slide {record.slide_id!r} under {self._features_root}"))
                    continue
                reason, detail, n = checked.get(fpath) or checked.setdefault(fpath, self._check(fpath))
                if reason:
                    problems.append(RowProblem(record.row, item_id, reason, detail))
                    continue
                example = self._to_example(record)
                example["feature_file"] = fpath.relative_to(self._features_root).as_posix()
                example["num_patches"] = n
                kept.append(example)
            problems.sort(key=lambda p: p.row)
            skipped = dict(collections.Counter(p.reason for p in problems))
            self.build_report[split] = {
                "source": str(path), "sha256": parsed.sha256, "layout": parsed.layout, "num_rows": parsed.num_rows,
                "kept": len(kept), "skipped": skipped, "counts": parsed.counts,
                "problems": [{"row": p.row, "id": p.item_id, "reason": p.reason, "detail": p.detail} for p in problems],
            }
            meta_sources[split] = {k: v for k, v in self.build_report[split].items() if k != "problems"}
            meta_sources[split]["path"] = str(path.resolve())
            meta_sources[split]["first_problems"] = self.build_report[split]["problems"][:MAX_PROBLEMS_IN_METADATA]
            generators[split] = self._generate_examples(kept)
        self.info.metadata.update({"sources": meta_sources, "build": self.build_parameters()})
        return generators

    def _check(self, fpath: pathlib.Path) -> tuple[str, str, int]:
        if not self._validate:
            return "", "", -1
        try:
            bag = read_feature_bag(fpath, expected_dim=self._feature_dim, csv_feature_columns=self._csv_columns,
                                   with_attrs=False)
        except FeatureFileError as e:
            return f"feature_{e.reason}", str(e), -1
        return "", "", bag.num_patches

    def _generate_examples(self, kept: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
        for example in kept:
            yield f"{example['row']:09d}", example


class SlidebenchVqa(_SlideTextBuilder, skip_registration=True):
    """SlideBench-VQA multiple-choice questions (TCGA or BCNB layout) with feature-file pointers."""

    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="tcga", description="TCGA layout: Tumor, Broad/Narrow Category"),
        tfds.core.BuilderConfig(name="bcnb", description="BCNB layout: Task, 2-4 options"),
    ]

    def __init__(self, *, sources, config=None, **kwargs):
        if config is None:  # pick the config from the file's header
            first = next(iter(sources.values())) if isinstance(sources, Mapping) else sources
            config = "tcga" if detect_vqa_layout(first) == "slidebench-vqa-tcga" else "bcnb"
        super().__init__(sources=sources, config=config, **kwargs)

    def _parse(self, path):
        parsed = read_slidebench_vqa(path)
        want = f"slidebench-vqa-{self.builder_config.name}"
        if parsed.layout != want:
            raise ValueError(f"{path} has layout {parsed.layout}, but config {self.builder_config.name!r} was chosen")
        return parsed

    def _to_example(self, record):
        return ex.from_multiple_choice(record)


class SlidebenchCaption(_SlideTextBuilder, skip_registration=True):
    """SlideBench-Caption report generation (prompt -> reference report) with feature-file pointers."""

    def _parse(self, path):
        return read_slidebench_caption(path)

    def _to_example(self, record):
        return ex.from_caption(record)


class WsiVqa(_SlideTextBuilder, skip_registration=True):
    """WSI-VQA closed and open questions; feature files are found by patient-barcode prefix."""

    DEFAULT_SPLIT = "train"
    PREFIX_LOOKUP = True
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="lettered", description="closed questions shown as A./B. lines, reply 'B. text'"),
        tfds.core.BuilderConfig(name="plain", description="closed questions' options unlettered, reply = option text"),
    ]

    def _parse(self, path):
        return read_wsi_vqa(path)

    def _to_example(self, record):
        return ex.from_wsi_vqa(record, lettered_options=self.builder_config.name == "lettered")


class SlideInstruction(_SlideTextBuilder, skip_registration=True):
    """SlideInstruction training conversations: stage 1 (captions) or stage 2 (VQA)."""

    DEFAULT_SPLIT = "train"
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="stage1", description="stage 1: slide captions"),
        tfds.core.BuilderConfig(name="stage2", description="stage 2: visual question answering"),
    ]

    def _parse(self, path):
        return read_slide_instruction(path, stage=1 if self.builder_config.name == "stage1" else 2)

    def _to_example(self, record):
        return ex.from_instruction(record)


BUILDERS: dict[str, type[_SlideTextBuilder]] = {
    "slidebench_vqa": SlidebenchVqa,
    "slidebench_caption": SlidebenchCaption,
    "wsi_vqa": WsiVqa,
    "slide_instruction": SlideInstruction,
}
