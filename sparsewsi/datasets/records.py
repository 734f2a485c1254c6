"""Typed records of the raw dataset files, the per-row problem report, and the file hash.

Every parser in :mod:`sparsewsi.datasets` returns a :class:`ParsedFile`: the good records, a
:class:`RowProblem` for every row it had to skip (row number, id, reason), the file's SHA-256 and
layout. File-level problems (missing file, missing columns, not JSON) raise
:class:`DatasetFileError`; row-level problems never raise.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import pathlib
from typing import Generic, TypeVar

LETTERS = "ABCDEFGHIJ"  # option letters, in order; SlideBench uses A-D

T = TypeVar("T")


class DatasetFileError(ValueError):
    """A dataset file that cannot be parsed at all; the message names the file and the problem."""

    def __init__(self, path: os.PathLike | str, detail: str):
        self.path = pathlib.Path(path)
        self.detail = detail
        super().__init__(f"dataset file {self.path}: {detail}")


def sha256_file(path: os.PathLike | str, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks).

    Record it with every result: the same SlideBench file name has meant different data.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class RowProblem:
    """One skipped (or flagged) row.

    Attributes:
      row: 1-based position of the record among the data rows of the file (the CSV header or
        the JSON list bracket is not counted), so ``row`` 1 is the first question.
      item_id: the row's id as written in the file (``""`` when it has none).
      reason: a short machine-readable code, e.g. ``answer_not_among_options``.
      detail: a human-readable explanation.
    """

    row: int
    item_id: str
    reason: str
    detail: str

    def __str__(self) -> str:
        return f"row {self.row} (id {self.item_id!r}): {self.reason}: {self.detail}"


@dataclasses.dataclass
class ParsedFile(Generic[T]):
    """The outcome of parsing one dataset file.

    Attributes:
      path: the file.
      sha256: hex SHA-256 of its bytes.
      layout: which layout was detected (``slidebench-vqa-tcga``, ``slidebench-vqa-bcnb``, ...).
      num_rows: data rows seen (records + skipped rows).
      records: the usable records, in file order.
      problems: the skipped rows.
      counts: named counts of notable but kept conditions (e.g. ``answer_not_among_choices``
        for WSI-VQA, ``leading_index_column``).
    """

    path: pathlib.Path
    sha256: str
    layout: str
    num_rows: int
    records: list[T]
    problems: list[RowProblem]
    counts: dict[str, int] = dataclasses.field(default_factory=dict)

    def problem_counts(self) -> dict[str, int]:
        """reason -> number of skipped rows."""
        return dict(collections.Counter(p.reason for p in self.problems))

    def summary(self) -> str:
        """One line: file, layout, kept/seen rows and the problem counts."""
        parts = [f"{self.path.name} [{self.layout}, sha256 {self.sha256[:12]}]: {len(self.records)}/{self.num_rows} rows kept"]
        if self.problems:
            parts.append("skipped " + ", ".join(f"{k}={v}" for k, v in sorted(self.problem_counts().items())))
        if self.counts:
            parts.append(", ".join(f"{k}={v}" for k, v in sorted(self.counts.items())))
        return "; ".join(parts)


@dataclasses.dataclass(frozen=True)
class MultipleChoiceQuestion:
    """One multiple-choice question about one slide (SlideBench-VQA TCGA/BCNB, closed WSI-VQA).

    Attributes:
      dataset: e.g. ``SlideBench-VQA-TCGA``, ``SlideBench-VQA-BCNB``, ``WSI-VQA``.
      row: 1-based data-row number in the source file.
      question_id: the file's ``ID`` (as text).
      slide_id: the slide (TCGA barcode, BCNB patient id, or WSI-VQA patient barcode).
      question: the question text.
      options: ordered letter -> option text, only the options that exist (``{"A": .., "B": ..}``).
      answer: the correct letter, always a key of ``options``.
      answer_text: ``options[answer]``.
      tumor: TCGA project code (``LUAD``) or ``""``.
      broad_category: TCGA broad category (Microscopy / Diagnosis / Clinical) or ``""``.
      narrow_category: TCGA narrow category or ``""``.
      task: BCNB task (``ER``, ``HER2``, ...) or ``""``.
    """

    dataset: str
    row: int
    question_id: str
    slide_id: str
    question: str
    options: dict[str, str]
    answer: str
    answer_text: str
    tumor: str = ""
    broad_category: str = ""
    narrow_category: str = ""
    task: str = ""

    def prompt_text(self) -> str:
        """SlideChat's user text without the image token: the question, then ``A. ...`` lines."""
        return "\n".join([self.question] + [f"{k}. {v}" for k, v in self.options.items()])


@dataclasses.dataclass(frozen=True)
class CaptionRecord:
    """One report-generation item (SlideBench-Caption).

    Attributes: dataset, row (1-based), item_id, slide_id, tumor, prompt (the question asking for
    a report), caption (the reference report).
    """

    dataset: str
    row: int
    item_id: str
    slide_id: str
    tumor: str
    prompt: str
    caption: str


@dataclasses.dataclass(frozen=True)
class WsiVqaRecord:
    """One WSI-VQA question; closed when ``choices`` is given, open otherwise.

    Attributes:
      dataset: ``WSI-VQA``.
      row: 1-based position in the JSON list.
      item_id: ``"<Id>#<row>"`` (the file's ``Id`` is a patient barcode shared by many questions).
      slide_id: the 12-character TCGA patient barcode (``TCGA-PL-A8LZ``); its feature file is
        found by prefix (see :class:`~sparsewsi.datasets.feature_paths.FeatureIndex`).
      question: the question text.
      answer: the reference answer text (option text for closed questions, not a letter).
      choices: the options, in file order, or ``None`` for an open question.
      answer_index: index of ``answer`` in ``choices`` (exact match, else after stripping case,
        whitespace and a trailing period), or ``None`` when it is not among them (the file has a
        few such answers; they are counted, not dropped).
    """

    dataset: str
    row: int
    item_id: str
    slide_id: str
    question: str
    answer: str
    choices: tuple[str, ...] | None = None
    answer_index: int | None = None

    @property
    def closed(self) -> bool:
        return self.choices is not None

    def as_multiple_choice(self) -> MultipleChoiceQuestion | None:
        """The lettered form (``A``.. in file order), or ``None`` when open or the answer is unmatched."""
        if self.choices is None or self.answer_index is None:
            return None
        options = {LETTERS[i]: c for i, c in enumerate(self.choices)}
        letter = LETTERS[self.answer_index]
        return MultipleChoiceQuestion(
            dataset=self.dataset, row=self.row, question_id=self.item_id, slide_id=self.slide_id,
            question=self.question, options=options, answer=letter, answer_text=options[letter],
        )


@dataclasses.dataclass(frozen=True)
class InstructionRecord:
    """One SlideInstruction (LLaVA-style) conversation about one slide.

    Attributes:
      dataset: ``SlideInstruction-stage1`` (captions) or ``SlideInstruction-stage2`` (VQA).
      row: 1-based position in the JSON list.
      item_id: the record's ``id`` (``train::0``).
      slide_id: the slide, i.e. the image file name without suffix.
      image_file: the file name as written (``TCGA-...-DX2.csv``).
      turns: ``((role, text), ...)`` alternating ``user`` / ``assistant``, starting with ``user``.
        The ``<image>`` placeholder is removed from the user text: prompt building puts the image
        at the front of the first user turn, as SlideChat does.
    """

    dataset: str
    row: int
    item_id: str
    slide_id: str
    image_file: str
    turns: tuple[tuple[str, str], ...]


def load_json_list(path: os.PathLike | str, what: str) -> list:
    """The top-level JSON list of a dataset file; DatasetFileError naming the file otherwise.

    ``what`` names the items for the message (e.g. ``"questions"``).
    """
    import json

    path = pathlib.Path(path)
    if not path.is_file():
        raise DatasetFileError(path, "does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetFileError(path, f"is not valid UTF-8 JSON ({e})") from e
    if not isinstance(data, list):
        raise DatasetFileError(path, f"holds a JSON {type(data).__name__}, expected a list of {what}")
    return data

