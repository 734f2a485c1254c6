"""``sparsewsi score``: score existing predictions without a model, or (re)merge a run folder.

Examples::

    # SlideChat-style output: the benchmark CSV with an added Output column (it is also the data)
    sparsewsi score --predictions slidebench_bcnb_output.csv

    # predictions as JSON lines {"item_id": ..., "prediction": ...} against a benchmark file
    sparsewsi score --data WsiVQA_val.json --predictions preds.jsonl --out scored/

    # merge the shards of a `sparsewsi eval` run folder again (e.g. after the last host finished)
    sparsewsi score --data SlideBench-VQA-BCNB.csv --run runs/eval-bcnb

Writes ``results.json``, ``results.md`` and ``results.png`` (to ``--out``, or the run folder) and
prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="benchmark file (default: the predictions CSV itself, SlideChat style)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--predictions", help="a CSV with an output column, or JSON lines")
    src.add_argument("--run", help="a `sparsewsi eval` run folder: merge its shards")
    parser.add_argument("--output-column", help="CSV output column / JSONL text key (default: auto)")
    parser.add_argument("--id-column", help="CSV id column / JSONL id key (default: ID / item_id)")
    parser.add_argument("--out", help="folder for results.* (default: beside the predictions, or the run folder)")
    parser.add_argument("--model-name", help="what the results record as the model (default: the file name)")
    parser.add_argument("--selector", default=None, help="selector to record (informational)")
    parser.add_argument("--k", type=int, default=None, help="token budget to record (informational)")


def run(args) -> int:
    from sparsewsi.datasets import DatasetFileError
    from sparsewsi.evaluation.items import load_eval_set
    from sparsewsi.evaluation.predictions_io import load_predictions
    from sparsewsi.evaluation.report import bar_chart, merge_run, to_markdown
    from sparsewsi.evaluation.runner import RunError, write_atomic
    from sparsewsi.evaluation.scoring import score_predictions

    data = args.data or (args.predictions if args.predictions and args.predictions.lower().endswith(".csv") else None)
    if data is None:
        print("sparsewsi score: --data is required (the predictions file is not a benchmark CSV)", file=sys.stderr)
        return 2
    try:
        eval_set = load_eval_set(data)
        if args.run:
            results = merge_run(args.run, eval_set)
            print(to_markdown(results))
            return 0
        loaded = load_predictions(args.predictions, id_column=args.id_column, output_column=args.output_column)
    except (DatasetFileError, RunError) as e:
        print(f"sparsewsi score: {e}", file=sys.stderr)
        return 2
    predictions = loaded.predictions
    if loaded.by_row:  # no id column: match questions by their data row
        by_row = {f"row:{it.row}": it.item_id for it in eval_set.items}
        predictions = {by_row[k]: v for k, v in predictions.items() if k in by_row}
    report = score_predictions(eval_set.items, predictions, loaded.skipped)
    meta = {
        "model": args.model_name or pathlib.Path(args.predictions).name, "selector": args.selector, "k": args.k,
        "data": eval_set.provenance(), "data_sha256": eval_set.sha256, "num_shards": None,
        "config": {"predictions": str(args.predictions)},
        "prediction_rows_malformed": [str(p) for p in loaded.problems],
    }
    results = {"meta": meta, "report": report, "duplicates": 0, "complete": report["counts"]["missing"] == 0,
               "shards": {}}
    out = pathlib.Path(args.out) if args.out else pathlib.Path(args.predictions).parent
    out.mkdir(parents=True, exist_ok=True)
    stem = "results" if args.out else f"{pathlib.Path(args.predictions).stem}.results"
    write_atomic(out / f"{stem}.json", json.dumps(results, indent=2, sort_keys=True, default=str))
    markdown = to_markdown(results)
    if loaded.problems:
        markdown += f"\nMalformed prediction rows ({len(loaded.problems)}):\n" + "".join(
            f"- {p}\n" for p in loaded.problems[:50])
    write_atomic(out / f"{stem}.md", markdown)
    bar_chart(results, out / f"{stem}.png")
    print(markdown)
    return 0
