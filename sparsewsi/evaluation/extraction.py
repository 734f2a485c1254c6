"""Answer extraction for multiple-choice questions: a documented cascade from generated text to a letter.

No official scorer exists for SlideBench-VQA; SlideChat answers in the form ``C. <option text>``.
The cascade, first hit wins (``Extraction.method`` says which step decided):

1. ``leading_letter``: the text starts with a letter, optionally in brackets, followed by ``.``,
   ``)``, ``]``, ``:`` or the end of the text (``"C. Other"``, ``"(B)"``, ``"A"``); a letter followed
   only by a space counts when the option text of that letter follows (``"C Other"``), so that an
   English sentence starting with the article ``A`` is not read as option A.
2. ``answer_is``: "answer is X" / "answer: X" / "option X" / "choice X" anywhere (``"The correct
   answer is (B)."``); all such mentions must agree on one letter.
3. ``option_text``: the whole text equals one option's text, or exactly one option's text occurs in
   the text as whole words (options contained in another matched option are dropped first, so
   ``"Grade 1-2"`` beats ``"Grade 1"``); matching ignores case, spacing and edge punctuation.
4. otherwise ``unparseable``: scored as wrong and counted in the unparseable rate.

At every step only letters of options that exist are accepted: ``"D."`` on a two-option BCNB
question is not an answer, and the cascade goes on to the next step.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

METHODS = ("leading_letter", "answer_is", "option_text", "unparseable")

_LEADING = re.compile(r"^\s*[\(\[]?\s*([A-J])\s*(?:[.):\]]|$)")
_LEADING_SPACE = re.compile(r"^\s*([A-J])\s+(.*)$", re.S)
# "answer is C", "answer: (c)", "the correct option is c(grade 3)", "choice B". A lower-case letter
# counts only when bracketed or followed by punctuation / the end, never as an English word.
_ANSWER_IS = re.compile(
    r"(?i:answer|option|choice)\s*(?:(?i:is|would be|should be|=)\s*|:\s*)?(?:[\(\[]\s*([A-Ja-j])\s*[\)\]]|([A-J])\b|([a-j])(?=[.)(:,;]|\s*$))"
)
_NON_WORD = re.compile(r"[^\w+\-]+")  # keep + and -: "er+ pr-" and "er- pr+" are different options


@dataclasses.dataclass(frozen=True)
class Extraction:
    """The outcome of extracting an answer: ``letter`` (``None`` when unparseable) and the step that decided."""

    letter: str | None
    method: str


def normalize_text(text: str) -> str:
    """Lower-cased words joined by single spaces; punctuation other than ``+``/``-`` becomes a word boundary."""
    return " ".join(_NON_WORD.sub(" ", text.lower()).split())


def _contains_words(haystack: str, needle: str) -> bool:
    return bool(needle) and f" {needle} " in f" {haystack} "


def _option_text_match(text: str, options: Mapping[str, str]) -> str | None:
    norm_text = normalize_text(text)
    norm_opts = {k: normalize_text(v) for k, v in options.items()}
    exact = [k for k, v in norm_opts.items() if v and v == norm_text]
    if len(exact) == 1:
        return exact[0]
    hits = [k for k, v in norm_opts.items() if _contains_words(norm_text, v)]
    # Drop an option whose text is part of another matched option's text ("grade 1" in "grade 1 2").
    hits = [k for k in hits if not any(j != k and norm_opts[j] != norm_opts[k] and _contains_words(norm_opts[j], norm_opts[k])
                                       for j in hits)]
    return hits[0] if len(hits) == 1 else None


def extract_choice(text: str, options: Mapping[str, str]) -> Extraction:
    """The letter a generated ``text`` chooses among ``options`` (letter -> option text), by the cascade above.

    Args:
      text: the model's reply.
      options: the options that exist, e.g. ``{"A": "ER positive", "B": "ER negative"}``.
    Returns:
      :class:`Extraction` with a letter of ``options`` or ``None`` (method ``unparseable``).
    """
    text = text or ""
    m = _LEADING.match(text)
    if m and m.group(1) in options:
        return Extraction(m.group(1), "leading_letter")
    m = _LEADING_SPACE.match(text)
    if m and m.group(1) in options:
        rest, opt = normalize_text(m.group(2)), normalize_text(options[m.group(1)])
        if opt and (rest == opt or rest.startswith(opt + " ")):
            return Extraction(m.group(1), "leading_letter")
    letters = {(g1 or g2 or g3).upper() for g1, g2, g3 in _ANSWER_IS.findall(text)}
    letters = {x for x in letters if x in options}
    if len(letters) == 1:
        return Extraction(letters.pop(), "answer_is")
    letter = _option_text_match(text, options)
    if letter is not None:
        return Extraction(letter, "option_text")
    return Extraction(None, "unparseable")
