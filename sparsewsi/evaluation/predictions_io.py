"""Reading predictions made elsewhere (no model): a CSV with an output column, or JSON lines.

* CSV: one row per question with an id column (default ``ID``; SlideBench's own column, so the
  benchmark CSV with an added output column, as SlideChat's test script writes it, works as is) and
  an output column (``--output-column``, else the first of ``Output``, ``output``, ``prediction``,
  ``Prediction``, ``pred``, ``response``). Without an id column, rows match questions by ``row``
  (1-based data row).
* JSON lines: objects with an id (``item_id``, ``ID``, ``id``) and a text (``prediction``,
  ``output``, ``Output``, ``response``, ``text``); our own run files (with ``status``) work too.

Rows without an id or an output are reported with their row numbers, never silently dropped.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import pathlib

from sparsewsi.datasets import DatasetFileError, RowProblem

OUTPUT_COLUMNS = ("Output", "output", "prediction", "Prediction", "pred", "response")
ID_KEYS = ("item_id", "ID", "id")
TEXT_KEYS = ("prediction", "output", "Output", "response", "text")


@dataclasses.dataclass
class LoadedPredictions:
    """item id (or ``row:<n>``) -> text, skipped ids -> reason, and the malformed rows."""

    path: pathlib.Path
    predictions: dict[str, str]
    skipped: dict[str, str]
    problems: list[RowProblem]
    by_row: bool = False


def load_predictions(path: os.PathLike | str, *, id_column: str | None = None,
                     output_column: str | None = None) -> LoadedPredictions:
    """Read a predictions CSV or JSONL (by suffix: ``.csv``, else JSON lines); see the module docstring."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise DatasetFileError(path, "does not exist")
    if path.suffix.lower() == ".csv":
        return _load_csv(path, id_column, output_column)
    return _load_jsonl(path, id_column, output_column)


def _load_csv(path, id_column, output_column) -> LoadedPredictions:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetFileError(path, f"is not UTF-8 text ({e})") from e
    reader = csv.reader(text.splitlines(keepends=True))
    header = [h.strip() for h in next(reader, [])]
    if not header:
        raise DatasetFileError(path, "is empty (no header row)")
    out_col = output_column or next((c for c in OUTPUT_COLUMNS if c in header), None)
    if out_col is None or out_col not in header:
        raise DatasetFileError(path, f"has no output column ({output_column or ' / '.join(OUTPUT_COLUMNS)}); header: "
                                     f"{', '.join(header)}")
    id_col = id_column or ("ID" if "ID" in header else None)
    if id_column and id_column not in header:
        raise DatasetFileError(path, f"has no id column {id_column!r}; header: {', '.join(header)}")
    preds, problems, row = {}, [], 0
    for fields in reader:
        if not fields or not any(f.strip() for f in fields):
            continue
        row += 1
        if len(fields) != len(header):
            problems.append(RowProblem(row, "", "unreadable_row", f"has {len(fields)} fields, the header {len(header)}"))
            continue
        rec = dict(zip(header, fields))
        key = rec[id_col].strip() if id_col else f"row:{row}"
        if not key:
            problems.append(RowProblem(row, "", "missing_field", f"empty {id_col}"))
            continue
        if key in preds:
            problems.append(RowProblem(row, key, "duplicate_id", f"{key!r} appeared in an earlier row"))
            continue
        preds[key] = rec[out_col]
    return LoadedPredictions(path, preds, {}, problems, by_row=id_col is None)


def _load_jsonl(path, id_key, text_key) -> LoadedPredictions:
    preds, skipped, problems = {}, {}, []
    with open(path, encoding="utf-8") as f:
        for row, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(RowProblem(row, "", "unreadable_row", f"not JSON ({e})"))
                continue
            if not isinstance(rec, dict):
                problems.append(RowProblem(row, "", "unreadable_row", "not a JSON object"))
                continue
            ik = id_key or next((k for k in ID_KEYS if k in rec), None)
            iid = str(rec.get(ik, "")).strip() if ik else ""
            if not iid:
                problems.append(RowProblem(row, "", "missing_field", f"no id ({' / '.join(ID_KEYS)})"))
                continue
            if rec.get("status", "ok") != "ok":
                skipped.setdefault(iid, str(rec.get("reason", rec["status"])))
                continue
            tk = text_key or next((k for k in TEXT_KEYS if k in rec), None)
            if tk is None or not isinstance(rec.get(tk), str):
                problems.append(RowProblem(row, iid, "missing_field", f"no text ({' / '.join(TEXT_KEYS)})"))
                continue
            if iid in preds:
                problems.append(RowProblem(row, iid, "duplicate_id", f"{iid!r} appeared in an earlier line"))
                continue
            preds[iid] = rec[tk]
    return LoadedPredictions(path, preds, skipped, problems)
