"""Shared CSV reading for the SlideBench parsers: header checks, a pandas index column, bad rows."""

from __future__ import annotations

import csv
import pathlib
from collections.abc import Iterator, Sequence

from sparsewsi.datasets.records import DatasetFileError

_INDEX_HEADERS = ("", "unnamed: 0")


def read_table(
    path: pathlib.Path, required: Sequence[str]
) -> tuple[list[str], bool, Iterator[tuple[int, dict[str, str] | None, str]]]:
    """Open a CSV and yield its rows as dicts keyed by the (stripped) header names.

    Returns ``(header, has_index_column, rows)`` where ``rows`` yields ``(row_number, fields,
    error)``: ``fields`` is ``None`` and ``error`` says why when the row has the wrong number of
    fields. A leading unnamed column (a pandas index written to disk) is dropped.

    Raises:
      DatasetFileError: missing file, not UTF-8, no header, or a required column absent.
    """
    if not path.is_file():
        raise DatasetFileError(path, "does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetFileError(path, f"is not UTF-8 text ({e})") from e
    reader = csv.reader(text.splitlines(keepends=True))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise DatasetFileError(path, "is empty (no header row)") from None
    except csv.Error as e:
        raise DatasetFileError(path, f"has an unreadable header ({e})") from e
    has_index = bool(header) and header[0].lower() in _INDEX_HEADERS and len(header) > len(required)
    names = header[1:] if has_index else header
    missing = [c for c in required if c not in names]
    if missing:
        raise DatasetFileError(
            path, f"lacks column(s) {', '.join(missing)} (header: {', '.join(header)}); expected {', '.join(required)}"
        )

    def rows() -> Iterator[tuple[int, dict[str, str] | None, str]]:
        row = 0
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                row += 1
                yield row, None, f"unparseable CSV ({e})"
                continue
            if not fields or not any(f.strip() for f in fields):
                continue  # blank lines are not rows
            row += 1
            if len(fields) != len(header):
                yield row, None, f"has {len(fields)} fields, the header {len(header)}"
                continue
            if has_index:
                fields = fields[1:]
            yield row, dict(zip(names, fields)), ""

    return names, has_index, rows()
