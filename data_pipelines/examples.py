"""Parsed dataset records -> the one flat example schema every builder writes.

Every example, whatever its dataset, holds the conversation to train on (``user_turns`` /
``assistant_turns``, the ``<image>`` placeholder removed: the pipeline puts the image at the front
of the first user turn) and the structured fields evaluation needs (question, lettered options,
answer letter, categories). Strings only, so the schema serialises without TensorFlow.
"""

from __future__ import annotations

from typing import Any

from sparsewsi.datasets import CaptionRecord, InstructionRecord, MultipleChoiceQuestion, WsiVqaRecord

# Field name -> kind ("text", "int", "texts"); the TFDS feature spec is derived from this.
SCHEMA: dict[str, str] = {
    "id": "text",              # the item's id in its source file
    "row": "int",              # 1-based data row in the source file
    "dataset": "text",         # e.g. SlideBench-VQA-BCNB
    "slide_id": "text",
    "feature_file": "text",    # path of the slide's feature file, relative to the features root
    "num_patches": "int",      # N of the feature file when validated at build time, else -1
    "user_turns": "texts",     # [T] user messages (no <image>)
    "assistant_turns": "texts",  # [T] reference replies
    "question": "text",
    "options": "texts",        # option texts in letter order ([] for open questions)
    "option_letters": "text",  # e.g. "ABC"; aligned with options
    "answer": "text",          # the reference answer text
    "answer_letter": "text",   # "" for open questions and unmatched WSI-VQA answers
    "tumor": "text",
    "broad_category": "text",
    "narrow_category": "text",
    "task": "text",
}


def _base(**fields: Any) -> dict[str, Any]:
    out = {k: ([] if kind == "texts" else (-1 if kind == "int" else "")) for k, kind in SCHEMA.items()}
    out.update(fields)
    return out


def lettered(question: str, options: dict[str, str]) -> str:
    """SlideChat's user text: the question, then one ``A. option`` line per option."""
    return "\n".join([question] + [f"{k}. {v}" for k, v in options.items()])


REPLY_STYLES = ("letter_and_text", "letter")


def from_multiple_choice(q: MultipleChoiceQuestion, reply: str = "letter_and_text") -> dict[str, Any]:
    """A SlideBench-VQA question; the reply is ``"C. <option text>"`` as SlideChat answers, or just
    ``"C"`` with ``reply="letter"`` (the whole answer loss on the decision)."""
    if reply not in REPLY_STYLES:
        raise ValueError(f"reply must be one of {REPLY_STYLES}, got {reply!r}")
    return _base(
        id=q.question_id, row=q.row, dataset=q.dataset, slide_id=q.slide_id,
        user_turns=[lettered(q.question, q.options)],
        assistant_turns=[q.answer if reply == "letter" else f"{q.answer}. {q.answer_text}"],
        question=q.question, options=list(q.options.values()), option_letters="".join(q.options),
        answer=q.answer_text, answer_letter=q.answer, tumor=q.tumor, broad_category=q.broad_category,
        narrow_category=q.narrow_category, task=q.task,
    )


def from_caption(c: CaptionRecord) -> dict[str, Any]:
    """A SlideBench-Caption item: the report prompt and the reference report."""
    return _base(
        id=c.item_id, row=c.row, dataset=c.dataset, slide_id=c.slide_id, user_turns=[c.prompt],
        assistant_turns=[c.caption], question=c.prompt, answer=c.caption, tumor=c.tumor,
    )


def from_wsi_vqa(r: WsiVqaRecord, *, lettered_options: bool = True) -> dict[str, Any]:
    """A WSI-VQA question.

    Closed questions: with ``lettered_options`` the user text lists ``A. ...`` lines and the reply
    is ``"B. <option>"`` (LLM-style); otherwise the options are listed unlettered and the reply is
    the option text (the original work's similarity scoring). An answer not among the options
    keeps its text as the reply and has no letter. Open questions: question -> answer text.
    """
    if r.choices is None:
        return _base(id=r.item_id, row=r.row, dataset=r.dataset, slide_id=r.slide_id,
                     user_turns=[r.question], assistant_turns=[r.answer], question=r.question, answer=r.answer)
    mc = r.as_multiple_choice()
    letters = "ABCDEFGHIJ"[: len(r.choices)]
    options = dict(zip(letters, r.choices))
    if lettered_options:
        user = lettered(r.question, options)
        reply = f"{mc.answer}. {mc.answer_text}" if mc is not None else r.answer
    else:
        user = "\n".join([r.question, *r.choices])
        reply = mc.answer_text if mc is not None else r.answer
    return _base(
        id=r.item_id, row=r.row, dataset=r.dataset, slide_id=r.slide_id, user_turns=[user], assistant_turns=[reply],
        question=r.question, options=list(r.choices), option_letters=letters,
        answer=mc.answer_text if mc is not None else r.answer, answer_letter=mc.answer if mc is not None else "",
    )


def from_instruction(r: InstructionRecord) -> dict[str, Any]:
    """A SlideInstruction conversation (one or more user/assistant exchanges)."""
    users = [t for role, t in r.turns if role == "user"]
    replies = [t for role, t in r.turns if role == "assistant"]
    return _base(
        id=r.item_id, row=r.row, dataset=r.dataset, slide_id=r.slide_id, user_turns=users,
        assistant_turns=replies, question=users[0], answer=replies[0],
    )
