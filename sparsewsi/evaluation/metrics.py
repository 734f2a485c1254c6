"""Text metrics for captions and open questions, and WSI-VQA's string-similarity rule for closed questions.

* BLEU-1..4: ``sacrebleu`` (corpus level, cumulative uniform weights, brevity penalty, no
  smoothing) on our tokenisation -- the coco-caption definition the field reports.
* ROUGE-L: Google's ``rouge-score`` (``rougeL`` F-measure, its own tokenizer), averaged over items.
* METEOR: ``nltk.translate.meteor_score`` (Banerjee & Lavie 2005: exact, Porter-stem and WordNet
  synonym matching, F-mean with alpha 0.9, fragmentation penalty 0.5 * (chunks / matches) ** 3),
  averaged over items. WordNet synonyms need the NLTK ``wordnet`` corpus on disk, which cannot be
  downloaded at run time and which no well-kept PyPI package ships; without it a WordNet with no
  synsets is passed, so METEOR uses exact + stem matching only. ``meteor_wordnet()`` says which, and
  every report records it, because the two are not comparable.
* WSI-VQA closed questions (the original rule): correct when the prediction's ``difflib`` quick
  ratio to the true option is at least its ratio to every other option.

Tokenisation for BLEU and METEOR (:func:`tokenize`): lower case, words of letters/digits (inner
``'`` and ``-`` kept), punctuation dropped -- like coco-caption's PTB tokenizer, which also drops
punctuation.
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Sequence

_WORD = re.compile(r"[a-z0-9]+(?:['\-][a-z0-9]+)*")


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens without punctuation (``"Grade 2, ER+."`` -> ``["grade", "2", "er"]``)."""
    return _WORD.findall((text or "").lower())


def bleu_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU-1..4 of predictions against one reference each (values in [0, 1]).

    sacrebleu on :func:`tokenize` d text (``tokenize="none"``), no smoothing: n-gram matches and
    counts are summed over the corpus before the precisions are taken, as in coco-caption. (NLTK's
    ``corpus_bleu`` counts a one-word hypothesis as one bigram with no match, so identical
    one-word answers would not score 1.)
    """
    from sacrebleu.metrics import BLEU

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        return {f"bleu{n}": float("nan") for n in range(1, 5)}
    hyps = [" ".join(tokenize(p)) for p in predictions]
    refs = [[" ".join(tokenize(r)) for r in references]]
    out = {}
    for n in range(1, 5):
        bleu = BLEU(max_ngram_order=n, tokenize="none", smooth_method="none", effective_order=False)
        out[f"bleu{n}"] = min(1.0, float(bleu.corpus_score(hyps, refs).score) / 100.0)  # 100.00000000000004 happens
    return out


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure (``rouge-score``) over items, in [0, 1]."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        return float("nan")
    scorer = _rouge_scorer()
    return float(sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)) / len(predictions))


class _NoSynonyms:
    """A stand-in for NLTK's WordNet reader with no synsets: METEOR's synonym stage matches nothing."""

    def synsets(self, *args, **kwargs):
        return []


@functools.lru_cache(maxsize=1)
def _wordnet():
    import nltk

    try:
        nltk.data.find("corpora/wordnet")
    except LookupError:
        return None
    from nltk.corpus import wordnet

    try:
        wordnet.ensure_loaded()
    except (LookupError, OSError):
        return None
    return wordnet


def meteor_wordnet() -> bool:
    """Whether METEOR can use WordNet synonyms (the NLTK ``wordnet`` corpus is installed locally)."""
    return _wordnet() is not None


def meteor(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean METEOR (NLTK) over items, in [0, 1]; synonym matching only when :func:`meteor_wordnet`."""
    from nltk.translate.meteor_score import meteor_score

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        return float("nan")
    wn = _wordnet() or _NoSynonyms()
    total = 0.0
    for p, r in zip(predictions, references):
        hyp, ref = tokenize(p), tokenize(r)
        total += meteor_score([ref], hyp, wordnet=wn) if hyp and ref else 0.0
    return float(total / len(predictions))


def text_metrics(predictions: Sequence[str], references: Sequence[str], *, with_meteor: bool = True) -> dict[str, float]:
    """BLEU-1..4, ROUGE-L and (optionally) METEOR, plus ``n``; see the module docstring for definitions."""
    out = dict(bleu_scores(predictions, references))
    out["rouge_l"] = rouge_l(predictions, references)
    if with_meteor:
        out["meteor"] = meteor(predictions, references)
    out["n"] = len(predictions)
    return out


def quick_ratio(a: str, b: str) -> float:
    """``difflib.SequenceMatcher(None, a, b).quick_ratio()``: an upper bound on the match ratio, in [0, 1]."""
    return difflib.SequenceMatcher(None, a, b).quick_ratio()


def similarity_correct(prediction: str, true_option: str, other_options: Sequence[str]) -> bool:
    """WSI-VQA's closed-question rule: ``quick_ratio(pred, true) >= quick_ratio(pred, o)`` for every other ``o``.

    Ties count as correct (the original compares with ``>=``); ratios are computed on the raw
    strings, as the original did.
    """
    target = quick_ratio(prediction, true_option)
    return all(target >= quick_ratio(prediction, o) for o in other_options)
