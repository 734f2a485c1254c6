"""``sparsewsi convert-features``: SlideChat/DSMIL CSV (or ``.pt`` / CLAM ``.h5``) features -> HDF5, once.

    sparsewsi convert-features /data/slidechat_csv --out /data/features_h5
    sparsewsi convert-features a.csv b.csv --out feats/ --csv-feature-columns 1024

Folders keep their layout (``<Tumor>/<Slide>.csv`` -> ``<Tumor>/<Slide>.h5``). Reruns skip files
already converted from an unchanged source. Exit status: 0 when nothing failed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import collections


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="feature files or folders (searched recursively)")
    parser.add_argument("--out", required=True, help="output folder for the .h5 files")
    parser.add_argument("--csv-feature-columns", type=int, default=512,
                        help="leading CSV columns that are features (512 for CONCH)")
    parser.add_argument("--overwrite", action="store_true", help="convert again even when up to date")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from sparsewsi.features.convert import convert_feature_files

    results = convert_feature_files(args.inputs, args.out, csv_feature_columns=args.csv_feature_columns,
                                    overwrite=args.overwrite, progress=not args.no_progress)
    counts = collections.Counter(r.status for r in results)
    print(f"convert-features: {counts['done']} converted, {counts['skipped']} up to date, {counts['failed']} failed")
    for r in results:
        if r.status == "failed":
            print(f"  FAILED {r.source}: {r.detail}")
    if not results:
        print("convert-features: no feature files found in", ", ".join(args.inputs))
        return 1
    return 1 if counts["failed"] else 0
