"""TFDS builder of the synthetic sparse-evidence benchmark (:mod:`sparsewsi.demo.synthetic_slides`).

The benchmark's questions are SlideBench-VQA CSVs (TCGA layout), so this builder is the
SlideBench-VQA builder with the benchmark folder as its source: ``sources`` may be the folder
(or its ``manifest.json``), which gives the ``train`` and ``test`` splits, or the usual
``{split: csv}``. The manifest's config digest is stored in the dataset metadata, so a dataset is
traceable to the exact generator settings.

    python -m data_pipelines.build synthetic_slidebench --source /data/synth \
        --features-root /data/synth_features --data-dir /data/tfds --feature-dim 48
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

from data_pipelines import examples as ex
from data_pipelines.builders import BUILDERS, _SlideTextBuilder
from sparsewsi.datasets import read_slidebench_vqa
from sparsewsi.demo.synthetic_slides import BENCHMARK_NAME, load_manifest


def benchmark_sources(source: Mapping[str, os.PathLike | str] | os.PathLike | str) -> dict[str, pathlib.Path] | pathlib.Path:
    """``{split: csv}`` for a benchmark folder or manifest; any other source is returned unchanged.

    Raises:
      FileNotFoundError / ValueError: the folder has no usable manifest, or a split's CSV is absent.
    """
    if isinstance(source, Mapping):
        return {k: pathlib.Path(v) for k, v in source.items()}
    path = pathlib.Path(source)
    if path.is_dir() or path.name == "manifest.json":
        root = path if path.is_dir() else path.parent
        man = load_manifest(root)
        out = {}
        for split in ("train", "test"):
            csv_path = root / man["questions"][split]
            if not csv_path.is_file():
                raise FileNotFoundError(f"{root}/manifest.json names {csv_path} for split {split!r}, but it is missing")
            out[split] = csv_path
        return out
    return path


class SyntheticSlidebench(_SlideTextBuilder, skip_registration=True):
    """Synthetic sparse-evidence multiple-choice questions (structure kind, focus count) with feature-file pointers."""

    DEFAULT_SPLIT = "test"
    RELEASE_NOTES = {"1.0.0": "First release: the synthetic benchmark's train/test questions (SlideBench TCGA layout)."}

    def __init__(self, *, sources, reply: str = "letter_and_text", **kwargs: Any):
        if reply not in ex.REPLY_STYLES:
            raise ValueError(f"reply must be one of {ex.REPLY_STYLES}, got {reply!r}")
        self._reply = reply
        resolved = benchmark_sources(sources)
        self._manifest_digest = ""
        first = next(iter(resolved.values())) if isinstance(resolved, Mapping) else resolved
        manifest = pathlib.Path(first).parent.parent / "manifest.json"
        if manifest.is_file():
            try:
                self._manifest_digest = str(json.loads(manifest.read_text()).get("config_digest", ""))
            except (OSError, json.JSONDecodeError):
                self._manifest_digest = ""
        super().__init__(sources=resolved, **kwargs)

    def _parse(self, path):
        parsed = read_slidebench_vqa(path, dataset=BENCHMARK_NAME)
        if parsed.layout != "slidebench-vqa-tcga":
            raise ValueError(f"{path} has layout {parsed.layout}; the synthetic benchmark writes the TCGA layout")
        return parsed

    def _to_example(self, record):
        return ex.from_multiple_choice(record, self._reply)

    def build_parameters(self) -> dict[str, Any]:
        return {**super().build_parameters(), "benchmark_config_digest": self._manifest_digest, "reply": self._reply}


BUILDERS["synthetic_slidebench"] = SyntheticSlidebench
