"""Scoring predictions against :class:`~sparsewsi.evaluation.items.EvalItem` s: pure functions, no model.

:func:`score_predictions` takes the items, the generated texts (item id -> text) and the skipped
items (item id -> reason, e.g. slide features missing) and returns one JSON-able report:

* ``choice``: lettered accuracy (extraction cascade of :mod:`~sparsewsi.evaluation.extraction`),
  micro over all scored questions, with skipped questions both excluded (``accuracy``) and counted
  as wrong (``accuracy_skipped_as_wrong``); the unparseable rate; per-group breakdowns (TCGA broad /
  narrow category and tumor, BCNB task); the constant-letter and majority-label baselines on the
  same questions, overall and per group.
* ``similarity``: WSI-VQA closed questions by the original difflib rule (same two accuracies).
* ``open`` / ``caption``: BLEU-1..4, ROUGE-L (and METEOR for open questions) over predicted items.
* ``skipped``: how many and which, by reason.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sparsewsi.evaluation import metrics
from sparsewsi.evaluation.extraction import METHODS, extract_choice, normalize_text
from sparsewsi.evaluation.items import EvalItem

# The group whose per-group majority label forms the "majority" baseline (first present wins).
MAJORITY_GROUP_ORDER = ("task", "narrow")


def _acc(correct: int, n: int) -> float | None:
    return correct / n if n else None


def majority_group(items: Sequence[EvalItem]) -> str | None:
    """The breakdown used by the majority-label baseline: ``task`` (BCNB), ``narrow`` (TCGA), else ``None`` (overall)."""
    for key in MAJORITY_GROUP_ORDER:
        if items and all(key in it.groups for it in items):
            return key
    return None


def choice_baselines(items: Sequence[EvalItem], group: str | None = None) -> dict[str, Any]:
    """Constant-letter and majority-label accuracies of lettered items (items without a letter are ignored).

    * constant letter L: always answer L; accuracy = share of questions whose answer is L.
    * majority label: within each ``group`` value (all items when ``None``), always answer the most
      frequent correct option *text* (option order is shuffled per question, so the label, not the
      letter, is what a constant guesser would pick); ties go to the alphabetically first label.

    Returns:
      ``{"n", "constant_letter": {L: acc}, "best_constant_letter", "best_constant_letter_accuracy",
      "majority_group", "majority_label": {group value: label}, "majority_accuracy"}``.
    """
    items = [it for it in items if it.answer is not None]
    n = len(items)
    letters = sorted({k for it in items for k in it.options})
    counts = collections.Counter(it.answer for it in items)
    constant = {L: counts[L] / n for L in letters} if n else {}
    best = max(letters, key=lambda L: (counts[L], -ord(L))) if letters else None
    by_group: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for it in items:
        by_group[it.groups.get(group, "all") if group else "all"][normalize_text(it.reference)] += 1
    labels = {g: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for g, c in by_group.items()}
    majority_correct = sum(c[labels[g]] for g, c in by_group.items())
    return {
        "n": n, "constant_letter": constant, "best_constant_letter": best,
        "best_constant_letter_accuracy": constant.get(best) if best else None,
        "majority_group": group or "all", "majority_label": labels, "majority_accuracy": _acc(majority_correct, n),
    }


def _score_choice(items: Sequence[EvalItem], predictions: Mapping[str, str], skipped: Mapping[str, str]) -> dict[str, Any]:
    lettered = [it for it in items if it.answer is not None]
    scored = [it for it in lettered if it.item_id in predictions]
    n_skipped = sum(1 for it in lettered if it.item_id in skipped)
    methods = collections.Counter({m: 0 for m in METHODS})
    correct_ids = set()
    for it in scored:
        ex = extract_choice(predictions[it.item_id], it.options)
        methods[ex.method] += 1
        if ex.letter == it.answer:
            correct_ids.add(it.item_id)
    group_key = majority_group(scored)
    base = choice_baselines(scored, group_key)
    best = base["best_constant_letter"]
    n, c = len(scored), len(correct_ids)
    out: dict[str, Any] = {
        "n": n, "correct": c, "skipped": n_skipped,
        "accuracy": _acc(c, n), "accuracy_skipped_as_wrong": _acc(c, n + n_skipped),
        "unparseable": methods["unparseable"], "unparseable_rate": _acc(methods["unparseable"], n),
        "extraction_methods": dict(methods),
        "no_letter_answer": sum(1 for it in items if it.answer is None),
        "baselines": base, "breakdowns": {},
    }
    group_names = sorted({g for it in scored for g in it.groups})
    for name in group_names:
        table: dict[str, dict[str, Any]] = {}
        values = sorted({it.groups[name] for it in scored if name in it.groups})
        for v in values:
            members = [it for it in scored if it.groups.get(name) == v]
            m_correct = sum(it.item_id in correct_ids for it in members)
            majority = sum(
                normalize_text(it.reference) == base["majority_label"][it.groups.get(group_key, "all") if group_key else "all"]
                for it in members
            )
            table[v] = {
                "n": len(members), "accuracy": _acc(m_correct, len(members)),
                "constant_letter": _acc(sum(it.answer == best for it in members), len(members)),
                "majority": _acc(majority, len(members)),
                "unparseable": sum(extract_choice(predictions[it.item_id], it.options).letter is None for it in members),
            }
        out["breakdowns"][name] = table
    return out


def _score_similarity(items: Sequence[EvalItem], predictions: Mapping[str, str], skipped: Mapping[str, str]) -> dict[str, Any]:
    closed = [it for it in items if it.choices]
    scored = [it for it in closed if it.item_id in predictions]
    correct = 0
    for it in scored:
        if it.answer is not None:
            idx = ord(it.answer) - ord("A")
            true, others = it.choices[idx], [c for i, c in enumerate(it.choices) if i != idx]
        else:  # answer not among the options: compare with the answer text itself
            true, others = it.reference, [c for c in it.choices if normalize_text(c) != normalize_text(it.reference)]
        correct += metrics.similarity_correct(predictions[it.item_id], true, others)
    n_skipped = sum(1 for it in closed if it.item_id in skipped)
    return {
        "rule": "difflib quick_ratio to the true option >= ratio to every other option",
        "n": len(scored), "correct": correct, "skipped": n_skipped,
        "accuracy": _acc(correct, len(scored)), "accuracy_skipped_as_wrong": _acc(correct, len(scored) + n_skipped),
        "answer_not_among_options": sum(1 for it in closed if it.answer is None),
    }


def _score_text(items: Sequence[EvalItem], predictions: Mapping[str, str], skipped: Mapping[str, str], *,
                with_meteor: bool) -> dict[str, Any]:
    scored = [it for it in items if it.item_id in predictions]
    out = metrics.text_metrics([predictions[it.item_id] for it in scored], [it.reference for it in scored],
                               with_meteor=with_meteor)
    out["skipped"] = sum(1 for it in items if it.item_id in skipped)
    if with_meteor:
        out["meteor_wordnet"] = metrics.meteor_wordnet()
    return out


def score_predictions(items: Sequence[EvalItem], predictions: Mapping[str, str],
                      skipped: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Score generated texts; see the module docstring for the report's sections.

    Args:
      items: the benchmark's items.
      predictions: item id -> generated text (items absent here and not skipped count as ``missing``).
      skipped: item id -> reason the item could not be run (e.g. ``feature_file_missing``).
    """
    skipped = dict(skipped or {})
    ids = {it.item_id for it in items}
    unknown = sorted(set(predictions) - ids)
    by_id = {it.item_id: it for it in items}
    missing = [it.item_id for it in items if it.item_id not in predictions and it.item_id not in skipped]
    report: dict[str, Any] = {
        "counts": {"items": len(items), "predicted": sum(1 for i in predictions if i in ids),
                   "skipped": sum(1 for i in skipped if i in ids), "missing": len(missing),
                   "unknown_prediction_ids": len(unknown)},
        "skipped": {
            "n": sum(1 for i in skipped if i in ids),
            "by_reason": dict(collections.Counter(r for i, r in skipped.items() if i in ids)),
            "items": [{"item_id": i, "slide_id": by_id[i].slide_id, "reason": r} for i, r in sorted(skipped.items()) if i in ids],
            "policy": "accuracy excludes skipped items; accuracy_skipped_as_wrong counts them as wrong",
        },
        "missing_ids": missing[:50],
        "unknown_prediction_ids": unknown[:50],
    }
    kinds = collections.defaultdict(list)
    for it in items:
        kinds[it.kind].append(it)
    if kinds["choice"]:
        report["choice"] = _score_choice(kinds["choice"], predictions, skipped)
        if any(it.choices for it in kinds["choice"]):
            report["similarity"] = _score_similarity(kinds["choice"], predictions, skipped)
    if kinds["open"]:
        report["open"] = _score_text(kinds["open"], predictions, skipped, with_meteor=True)
    if kinds["caption"]:
        report["caption"] = _score_text(kinds["caption"], predictions, skipped, with_meteor=False)
    return report


def iter_group_rows(report: Mapping[str, Any]) -> Iterable[tuple[str, str, dict[str, Any]]]:
    """(group name, group value, row) for every breakdown row of a report's ``choice`` section."""
    for name, table in report.get("choice", {}).get("breakdowns", {}).items():
        for value, row in table.items():
            yield name, value, row
