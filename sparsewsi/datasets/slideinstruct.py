"""Parser of SlideInstruction training JSON (SlideChat; LLaVA-style conversations).

``[{"id": str, "image": ["<slide>.csv"], "conversations": [{"from": "human", "value":
"<question>\\n<image>"}, {"from": "gpt", "value": "<answer>"}, ...]}, ...]``. Stage 1 holds
captions (~4.2k slides), stage 2 VQA (~176k pairs); both share this layout.
"""

from __future__ import annotations

import os
import pathlib

from sparsewsi.datasets.records import InstructionRecord, ParsedFile, RowProblem, load_json_list, sha256_file
from sparsewsi.features.readers import slide_id_from_path

IMAGE_TOKEN = "<image>"
LAYOUT_SLIDEINSTRUCT = "slideinstruction-json"
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def strip_image_token(text: str) -> tuple[str, bool]:
    """``text`` without ``<image>`` (and the blank lines it leaves) and whether it was there."""
    if IMAGE_TOKEN not in text:
        return text.strip(), False
    lines = [ln for ln in text.replace(IMAGE_TOKEN, "\n").split("\n")]
    return "\n".join(ln for ln in lines if ln.strip()).strip(), True


def read_slide_instruction(path: os.PathLike | str, *, stage: int = 2, dataset: str | None = None) -> ParsedFile[InstructionRecord]:
    """Parse a SlideInstruction JSON list (``stage`` 1 = captions, 2 = VQA; only names the dataset).

    Skipped and reported: non-objects or a missing ``id`` (``missing_field``), an ``image`` that is
    not exactly one file name (``bad_image``), conversations that are empty, do not alternate
    human/gpt starting with human, or hold an empty turn (``bad_conversation``). Counted in
    ``counts["no_image_placeholder"]``: records whose first user turn lacks ``<image>`` (kept: the
    image is put at the front of the first user turn regardless).
    """
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    path = pathlib.Path(path)
    dataset = dataset or f"SlideInstruction-stage{stage}"
    data = load_json_list(path, "conversations")
    records: list[InstructionRecord] = []
    problems: list[RowProblem] = []
    counts = {"no_image_placeholder": 0}
    for row, item in enumerate(data, start=1):
        if not isinstance(item, dict) or not str(item.get("id", "")).strip():
            problems.append(RowProblem(row, "", "missing_field", "not an object with a non-empty 'id'"))
            continue
        item_id = str(item["id"]).strip()
        image = item.get("image")
        if isinstance(image, str):
            image = [image]
        if not isinstance(image, list) or len(image) != 1 or not isinstance(image[0], str) or not image[0].strip():
            problems.append(RowProblem(row, item_id, "bad_image", f"'image' must name exactly one feature file, got {image!r}"))
            continue
        convs = item.get("conversations")
        turns, why = [], ""
        if not isinstance(convs, list) or not convs:
            why = "no conversations"
        else:
            for i, turn in enumerate(convs):
                role = _ROLES.get(turn.get("from", "")) if isinstance(turn, dict) else None
                value = turn.get("value") if isinstance(turn, dict) else None
                expected = "user" if i % 2 == 0 else "assistant"
                if role != expected:
                    why = f"turn {i} is from {turn.get('from') if isinstance(turn, dict) else turn!r}, expected {expected}"
                    break
                if not isinstance(value, str) or not value.strip():
                    why = f"turn {i} is empty"
                    break
                turns.append((role, value))
            if not why and turns[-1][0] != "assistant":
                why = "ends with a user turn (no answer)"
        if why:
            problems.append(RowProblem(row, item_id, "bad_conversation", why))
            continue
        first, had_image = strip_image_token(turns[0][1])
        counts["no_image_placeholder"] += int(not had_image)
        # <image> may appear only once: drop stray placeholders elsewhere.
        clean = [("user", first)] + [(r, strip_image_token(t)[0] if r == "user" else t.strip()) for r, t in turns[1:]]
        records.append(InstructionRecord(
            dataset=dataset, row=row, item_id=item_id, slide_id=slide_id_from_path(image[0].strip()),
            image_file=image[0].strip(), turns=tuple(clean),
        ))
    return ParsedFile(
        path=path, sha256=sha256_file(path), layout=LAYOUT_SLIDEINSTRUCT, num_rows=len(data), records=records,
        problems=problems, counts=counts,
    )
