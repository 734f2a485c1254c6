"""Parser of the WSI-VQA JSON (ECCV 2024): closed questions with ``Choice``, open ones without.

Each element: ``{"Id": <12-char TCGA patient barcode>, "Question": str, "Choice": [str, ...]
(closed only), "Answer": str}``. Answers are option text, not letters; a few are not among the
options (e.g. ``"grade 3."`` for ``"grade 3"``, or ``"the correct option is c(grade 3)."``).
"""

from __future__ import annotations

import os
import pathlib

from sparsewsi.datasets.records import ParsedFile, RowProblem, WsiVqaRecord, load_json_list, sha256_file

LAYOUT_WSIVQA = "wsi-vqa-json"


def _norm(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


def match_choice(answer: str, choices: tuple[str, ...]) -> tuple[int | None, bool]:
    """Index of ``answer`` in ``choices`` and whether it matched exactly.

    Exact match first, then after lower-casing, collapsing whitespace and dropping a trailing
    period; ambiguous normalised matches count as no match. Returns ``(None, False)`` if none.
    """
    if answer in choices:
        return choices.index(answer), True
    hits = [i for i, c in enumerate(choices) if _norm(c) == _norm(answer)]
    return (hits[0], False) if len(hits) == 1 else (None, False)


def read_wsi_vqa(path: os.PathLike | str, *, dataset: str = "WSI-VQA") -> ParsedFile[WsiVqaRecord]:
    """Parse a WSI-VQA JSON list.

    Skipped and reported: elements that are not objects or lack a non-empty ``Id``/``Question``/
    ``Answer`` string (``missing_field``), and a ``Choice`` that is not a list of at least two
    non-empty strings (``bad_choices``). Kept and counted in ``counts``: ``closed``, ``open``,
    ``answer_not_among_choices`` (no exact match; the format notes ask to count these),
    ``answer_matched_after_normalization`` (of those, matched after normalisation) and
    ``answer_unmatched`` (``answer_index`` is ``None``).
    """
    path = pathlib.Path(path)
    data = load_json_list(path, "questions")
    records: list[WsiVqaRecord] = []
    problems: list[RowProblem] = []
    counts = dict(closed=0, open=0, answer_not_among_choices=0, answer_matched_after_normalization=0, answer_unmatched=0)
    for row, item in enumerate(data, start=1):
        if not isinstance(item, dict):
            problems.append(RowProblem(row, "", "missing_field", f"element is a {type(item).__name__}, not an object"))
            continue
        pid = item.get("Id")
        pid = pid.strip() if isinstance(pid, str) else ""
        bad = [k for k in ("Id", "Question", "Answer") if not isinstance(item.get(k), str) or not item[k].strip()]
        if bad:
            problems.append(RowProblem(row, pid, "missing_field", f"missing or empty {', '.join(bad)}"))
            continue
        item_id = f"{pid}#{row}"
        choices, answer_index = None, None
        answer = item["Answer"].strip()
        if "Choice" in item and item["Choice"] is not None:
            raw = item["Choice"]
            if not isinstance(raw, list) or not all(isinstance(c, str) and c.strip() for c in raw) or len(raw) < 2:
                problems.append(RowProblem(row, item_id, "bad_choices", f"Choice must be a list of >= 2 non-empty strings, got {raw!r}"))
                continue
            choices = tuple(c.strip() for c in raw)
            answer_index, exact = match_choice(item["Answer"], tuple(raw))
            if not exact:
                counts["answer_not_among_choices"] += 1
                if answer_index is not None:
                    counts["answer_matched_after_normalization"] += 1
                else:
                    counts["answer_unmatched"] += 1
            counts["closed"] += 1
        else:
            counts["open"] += 1
        records.append(WsiVqaRecord(
            dataset=dataset, row=row, item_id=item_id, slide_id=pid, question=item["Question"].strip(),
            answer=answer, choices=choices, answer_index=answer_index,
        ))
    return ParsedFile(
        path=path, sha256=sha256_file(path), layout=LAYOUT_WSIVQA, num_rows=len(data), records=records,
        problems=problems, counts=counts,
    )
