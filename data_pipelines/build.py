"""Build entry point (the ``tfds`` command needs TensorFlow; this does not).

    python -m data_pipelines.build slidebench_vqa --source test=../shared/data/SlideBench-VQA-BCNB.csv \
        --features-root /data/bcnb_conch --data-dir /data/tfds
    python -m data_pipelines.build wsi_vqa --source train=WsiVQA_train.json --source validation=WsiVQA_val.json \
        --features-root /data/wsivqa_feats --data-dir /data/tfds --config lettered

Reruns reuse a finished build (TFDS skips prepared data); ``--overwrite`` rebuilds. The build
report (every skipped row with its row number, id and reason) is written atomically to
``<data_dir>/<name>/<config>/<version>/build_report.json`` and summarised on stdout.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import sys
from collections.abc import Mapping
from typing import Any

import tensorflow_datasets as tfds

from data_pipelines.builders import BUILDERS
from sparsewsi.atomic import write_json_atomic
from data_pipelines import synthetic as _synthetic  # noqa: F401,E402  (registers synthetic_slidebench)


def build(
    dataset: str,
    sources: Mapping[str, os.PathLike | str] | os.PathLike | str,
    *,
    features_root: os.PathLike | str,
    data_dir: os.PathLike | str,
    config: str | None = None,
    overwrite: bool = False,
    **builder_kwargs: Any,
):
    """Prepare one dataset; returns the builder (``builder.data_path`` is where it lives).

    Args:
      dataset: a key of :data:`data_pipelines.builders.BUILDERS`.
      sources: ``{split: file}`` or one file (the builder's default split).
      features_root: folder of the per-slide feature files.
      data_dir: TFDS data directory.
      config: builder config (``tcga``/``bcnb``, ``lettered``/``plain``, ``stage1``/``stage2``).
      overwrite: rebuild even when prepared data exists.
      builder_kwargs: ``validate_features``, ``feature_dim``, ``csv_feature_columns``.
    """
    if dataset not in BUILDERS:
        raise KeyError(f"unknown dataset {dataset!r}; choose from {', '.join(BUILDERS)}")
    cls = BUILDERS[dataset]
    kwargs = dict(sources=sources, features_root=features_root, data_dir=os.fspath(data_dir), **builder_kwargs)
    if config is not None:
        kwargs["config"] = config
    if overwrite:
        # Remove the old build first, so that the stale-source check does not refuse a deliberate rebuild.
        shutil.rmtree(os.fspath(cls(**kwargs, check_stale=False).data_path), ignore_errors=True)
    builder = cls(**kwargs)
    mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=mode))
    if builder.build_report:  # empty when an existing build was reused
        write_json_atomic(pathlib.Path(os.fspath(builder.data_path)) / "build_report.json", builder.build_report)
    return builder


def _parse_sources(items: list[str]) -> dict[str, str] | str:
    if len(items) == 1 and "=" not in items[0]:
        return items[0]
    out = {}
    for item in items:
        split, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"--source {item!r}: use SPLIT=PATH when giving several sources")
        out[split] = path
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_pipelines.build", description=__doc__.splitlines()[0])
    p.add_argument("dataset", choices=sorted(BUILDERS))
    p.add_argument("--source", action="append", required=True, help="PATH, or SPLIT=PATH (repeatable)")
    p.add_argument("--features-root", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--config", default=None)
    p.add_argument("--feature-dim", type=int, default=512)
    p.add_argument("--csv-feature-columns", type=int, default=512)
    p.add_argument("--no-validate-features", action="store_true", help="only check that feature files exist")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    builder = build(
        a.dataset, _parse_sources(a.source), features_root=a.features_root, data_dir=a.data_dir, config=a.config,
        overwrite=a.overwrite, validate_features=not a.no_validate_features, feature_dim=a.feature_dim,
        csv_feature_columns=a.csv_feature_columns,
    )
    print(f"prepared {builder.name}/{builder.builder_config.name if builder.builder_config else ''} at {builder.data_path}")
    for split, src in builder.info.metadata.get("sources", {}).items():
        print(f"  {split}: {src['kept']}/{src['num_rows']} kept from {src['path']} (sha256 {src['sha256'][:12]}), "
              f"skipped {src['skipped'] or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
