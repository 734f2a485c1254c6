"""Parsers of the SlideBench CSVs (SlideChat, CVPR 2025): VQA in the TCGA and BCNB layouts, Caption.

TCGA VQA: ``ID, Slide, Tumor, Broad Category, Narrow Category, Question, A, B, C, D, Answer``
(some releases add an unnamed leading index column). BCNB VQA: ``ID, Slide, Task, Question, A, B,
C, D, Answer`` with 2-4 options (empty ``C``/``D`` when absent). Caption: ``ID, Slide, Tumor,
Question, Caption``.
"""

from __future__ import annotations

import os
import pathlib

from sparsewsi.datasets._csvtable import read_table
from sparsewsi.datasets.records import (
    CaptionRecord,
    DatasetFileError,
    MultipleChoiceQuestion,
    ParsedFile,
    RowProblem,
    sha256_file,
)

OPTION_COLUMNS = ("A", "B", "C", "D")
TCGA_COLUMNS = ("ID", "Slide", "Tumor", "Broad Category", "Narrow Category", "Question", *OPTION_COLUMNS, "Answer")
BCNB_COLUMNS = ("ID", "Slide", "Task", "Question", *OPTION_COLUMNS, "Answer")
CAPTION_COLUMNS = ("ID", "Slide", "Tumor", "Question", "Caption")

LAYOUT_TCGA = "slidebench-vqa-tcga"
LAYOUT_BCNB = "slidebench-vqa-bcnb"
LAYOUT_CAPTION = "slidebench-caption"


def detect_vqa_layout(path: os.PathLike | str) -> str:
    """``slidebench-vqa-tcga`` or ``slidebench-vqa-bcnb`` from the header row (raises DatasetFileError)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise DatasetFileError(path, "does not exist")
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        header = {h.strip().strip('"') for h in f.readline().split(",")}
    if {"Broad Category", "Narrow Category", "Tumor"} <= header:
        return LAYOUT_TCGA
    if "Task" in header:
        return LAYOUT_BCNB
    raise DatasetFileError(
        path, f"is neither a SlideBench-VQA TCGA ({', '.join(TCGA_COLUMNS)}) nor BCNB ({', '.join(BCNB_COLUMNS)}) CSV"
    )


def read_slidebench_vqa(path: os.PathLike | str, *, dataset: str | None = None) -> ParsedFile[MultipleChoiceQuestion]:
    """Parse a SlideBench-VQA CSV (TCGA or BCNB layout, detected from the header).

    Rows are skipped with a :class:`RowProblem` (never raised) for: a wrong field count
    (``unreadable_row``), an empty ID/Slide/Question (``missing_field``), a duplicate ID
    (``duplicate_id``), fewer than two non-empty options (``too_few_options``), or an answer that is
    not the letter of a non-empty option (``answer_not_among_options``).

    Args:
      path: the CSV.
      dataset: the name stored in each record (default ``SlideBench-VQA-TCGA`` / ``-BCNB``).

    Returns:
      ParsedFile of :class:`MultipleChoiceQuestion`; ``counts["leading_index_column"]`` is 1 when
      the release carried a pandas index column.
    """
    path = pathlib.Path(path)
    layout = detect_vqa_layout(path)
    required = TCGA_COLUMNS if layout == LAYOUT_TCGA else BCNB_COLUMNS
    dataset = dataset or ("SlideBench-VQA-TCGA" if layout == LAYOUT_TCGA else "SlideBench-VQA-BCNB")
    _, has_index, rows = read_table(path, required)
    records: list[MultipleChoiceQuestion] = []
    problems: list[RowProblem] = []
    seen: set[str] = set()
    num_rows = 0
    for row, fields, error in rows:
        num_rows = row
        if fields is None:
            problems.append(RowProblem(row, "", "unreadable_row", error))
            continue
        f = {k: (v or "").strip() for k, v in fields.items()}
        qid = f["ID"]
        empty = [c for c in ("ID", "Slide", "Question") if not f[c]]
        if empty:
            problems.append(RowProblem(row, qid, "missing_field", f"empty {', '.join(empty)}"))
            continue
        if qid in seen:
            problems.append(RowProblem(row, qid, "duplicate_id", f"ID {qid!r} appeared in an earlier row"))
            continue
        options = {k: f[k] for k in OPTION_COLUMNS if f[k]}
        if len(options) < 2:
            problems.append(RowProblem(row, qid, "too_few_options", f"{len(options)} non-empty option(s)"))
            continue
        answer = f["Answer"].upper().rstrip(".):").strip()
        if answer not in options:
            problems.append(RowProblem(
                row, qid, "answer_not_among_options",
                f"answer {f['Answer']!r} is not one of the option letters {''.join(options)}",
            ))
            continue
        seen.add(qid)
        records.append(MultipleChoiceQuestion(
            dataset=dataset, row=row, question_id=qid, slide_id=f["Slide"], question=f["Question"],
            options=options, answer=answer, answer_text=options[answer],
            tumor=f.get("Tumor", ""), broad_category=f.get("Broad Category", ""),
            narrow_category=f.get("Narrow Category", ""), task=f.get("Task", ""),
        ))
    return ParsedFile(
        path=path, sha256=sha256_file(path), layout=layout, num_rows=num_rows, records=records,
        problems=problems, counts={"leading_index_column": int(has_index)},
    )


def read_slidebench_caption(path: os.PathLike | str, *, dataset: str = "SlideBench-Caption") -> ParsedFile[CaptionRecord]:
    """Parse a SlideBench-Caption CSV (``ID, Slide, Tumor, Question, Caption``).

    Rows with a wrong field count (``unreadable_row``), an empty ID/Slide/Question/Caption
    (``missing_field``) or a duplicate ID (``duplicate_id``) are skipped and reported.
    """
    path = pathlib.Path(path)
    _, has_index, rows = read_table(path, CAPTION_COLUMNS)
    records: list[CaptionRecord] = []
    problems: list[RowProblem] = []
    seen: set[str] = set()
    num_rows = 0
    for row, fields, error in rows:
        num_rows = row
        if fields is None:
            problems.append(RowProblem(row, "", "unreadable_row", error))
            continue
        f = {k: (v or "").strip() for k, v in fields.items()}
        empty = [c for c in ("ID", "Slide", "Question", "Caption") if not f[c]]
        if empty:
            problems.append(RowProblem(row, f["ID"], "missing_field", f"empty {', '.join(empty)}"))
            continue
        if f["ID"] in seen:
            problems.append(RowProblem(row, f["ID"], "duplicate_id", f"ID {f['ID']!r} appeared in an earlier row"))
            continue
        seen.add(f["ID"])
        records.append(CaptionRecord(
            dataset=dataset, row=row, item_id=f["ID"], slide_id=f["Slide"], tumor=f["Tumor"],
            prompt=f["Question"], caption=f["Caption"],
        ))
    return ParsedFile(
        path=path, sha256=sha256_file(path), layout=LAYOUT_CAPTION, num_rows=num_rows, records=records,
        problems=problems, counts={"leading_index_column": int(has_index)},
    )
