"""One evaluation item per question, whatever the benchmark: :class:`EvalItem`, and :func:`load_eval_set`.

The dataset parsers (:mod:`sparsewsi.datasets`) give typed records per file format; the evaluator
needs one shape for all of them: the slide, the user prompt shown to the model, how the reply is
scored (``kind``) and the breakdown groups. ``load_eval_set`` detects the benchmark from the file:

* SlideBench-VQA CSV (TCGA / BCNB): ``kind="choice"``, groups ``broad``/``narrow``/``tumor`` (TCGA)
  or ``task`` (BCNB); the prompt is SlideChat's (question, then ``A. ...`` lines).
* WSI-VQA JSON: closed questions ``kind="choice"`` with the lettered prompt (LLM style) *and*
  ``choices`` for the original string-similarity rule; an answer not among its options has no
  letter (``answer=None``) and is scored by similarity only. Open questions ``kind="open"``.
* SlideBench-Caption CSV: ``kind="caption"`` (BLEU-1..4, ROUGE-L).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

from sparsewsi.datasets import (
    DatasetFileError,
    RowProblem,
    detect_vqa_layout,
    read_slidebench_caption,
    read_slidebench_vqa,
    read_wsi_vqa,
)

KINDS = ("choice", "open", "caption")


@dataclasses.dataclass(frozen=True)
class EvalItem:
    """One question to put to the model and score.

    Attributes:
      item_id: unique within the file (SlideBench ``ID``; WSI-VQA ``<Id>#<row>``).
      dataset: benchmark name (``SlideBench-VQA-BCNB``, ``WSI-VQA``, ...).
      row: 1-based data row in the source file (for messages).
      slide_id: the slide (or WSI-VQA patient barcode, matched to files by prefix).
      tumor: TCGA project code or ``""`` (SlideChat feature layout ``<root>/<tumor>/<slide>.csv``).
      kind: ``choice`` | ``open`` | ``caption``.
      prompt: the user text shown after the image (SlideChat format, no ``<image>`` token).
      reference: the reference text (option text for choice items, answer or caption otherwise).
      options: letter -> option text (choice items; empty otherwise).
      answer: the correct letter, or ``None`` (open/caption, or a WSI-VQA answer not among its options).
      choices: WSI-VQA option strings for the similarity rule (``()`` for other benchmarks).
      groups: breakdown name -> value, e.g. ``{"task": "ER"}`` or ``{"broad": .., "narrow": ..}``.
    """

    item_id: str
    dataset: str
    row: int
    slide_id: str
    tumor: str
    kind: str
    prompt: str
    reference: str
    options: dict[str, str] = dataclasses.field(default_factory=dict)
    answer: str | None = None
    choices: tuple[str, ...] = ()
    groups: dict[str, str] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["choices"] = list(self.choices)
        return d


@dataclasses.dataclass
class EvalSet:
    """A benchmark file turned into items: provenance (path, SHA-256, layout) and skipped rows."""

    path: pathlib.Path
    sha256: str
    layout: str
    dataset: str
    items: list[EvalItem]
    problems: list[RowProblem]
    counts: dict[str, int]

    def by_id(self) -> dict[str, EvalItem]:
        return {it.item_id: it for it in self.items}

    def provenance(self) -> dict[str, Any]:
        """What every result records about its data: file, SHA-256, layout, kept/skipped rows."""
        return {
            "path": str(self.path), "sha256": self.sha256, "layout": self.layout, "dataset": self.dataset,
            "items": len(self.items), "malformed_rows": [dataclasses.asdict(p) for p in self.problems],
            "counts": dict(self.counts),
        }


def _lettered_prompt(question: str, options: dict[str, str]) -> str:
    return "\n".join([question] + [f"{k}. {v}" for k, v in options.items()])


def detect_benchmark(path: os.PathLike | str) -> str:
    """``slidebench-vqa-tcga``, ``slidebench-vqa-bcnb``, ``slidebench-caption`` or ``wsi-vqa-json``."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise DatasetFileError(path, "does not exist")
    if path.suffix.lower() == ".json":
        return "wsi-vqa-json"
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        header = {h.strip().strip('"') for h in f.readline().split(",")}
    if "Caption" in header:
        return "slidebench-caption"
    return detect_vqa_layout(path)


def load_eval_set(path: os.PathLike | str) -> EvalSet:
    """Parse a benchmark file (layout detected) into :class:`EvalItem` s; malformed rows are reported, not raised."""
    path = pathlib.Path(path)
    layout = detect_benchmark(path)
    items: list[EvalItem] = []
    if layout == "wsi-vqa-json":
        parsed = read_wsi_vqa(path)
        for r in parsed.records:
            if r.closed:
                mc = r.as_multiple_choice()
                options = {chr(ord("A") + i): c for i, c in enumerate(r.choices)}
                items.append(EvalItem(
                    item_id=r.item_id, dataset=r.dataset, row=r.row, slide_id=r.slide_id, tumor="", kind="choice",
                    prompt=_lettered_prompt(r.question, options), reference=r.answer, options=options,
                    answer=None if mc is None else mc.answer, choices=tuple(r.choices), groups={"type": "closed"},
                ))
            else:
                items.append(EvalItem(
                    item_id=r.item_id, dataset=r.dataset, row=r.row, slide_id=r.slide_id, tumor="", kind="open",
                    prompt=r.question, reference=r.answer, groups={"type": "open"},
                ))
    elif layout == "slidebench-caption":
        parsed = read_slidebench_caption(path)
        for r in parsed.records:
            items.append(EvalItem(
                item_id=r.item_id, dataset=r.dataset, row=r.row, slide_id=r.slide_id, tumor=r.tumor, kind="caption",
                prompt=r.prompt, reference=r.caption, groups={"tumor": r.tumor} if r.tumor else {},
            ))
    else:
        parsed = read_slidebench_vqa(path)
        for r in parsed.records:
            if r.task:
                groups = {"task": r.task}
            else:
                groups = {k: v for k, v in (("broad", r.broad_category), ("narrow", r.narrow_category), ("tumor", r.tumor)) if v}
            items.append(EvalItem(
                item_id=r.question_id, dataset=r.dataset, row=r.row, slide_id=r.slide_id, tumor=r.tumor, kind="choice",
                prompt=r.prompt_text(), reference=r.answer_text, options=dict(r.options), answer=r.answer, groups=groups,
            ))
    dataset = items[0].dataset if items else layout
    return EvalSet(path=path, sha256=parsed.sha256, layout=layout, dataset=dataset, items=items,
                   problems=list(parsed.problems), counts=dict(parsed.counts))
