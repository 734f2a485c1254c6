"""Evaluation without a model: extraction cascade, baselines on the real BCNB CSV, WSI-VQA similarity
rule on the real val JSON, text metrics, and scoring existing predictions through `sparsewsi score`."""

import collections
import csv
import difflib
import json

import pytest

from sparsewsi import cli
from sparsewsi.evaluation import metrics
from sparsewsi.evaluation.extraction import extract_choice
from sparsewsi.evaluation.items import load_eval_set
from sparsewsi.evaluation.scoring import choice_baselines, score_predictions

BCNB_OPTS = {"A": "Invasive ductal carcinoma", "B": "Invasive lobular carcinoma", "C": "Other"}
GRADE_OPTS = {"A": "Grade 1", "B": "Grade 1-2", "C": "Grade 3"}
RECEPTOR_OPTS = {"A": "er- pr-", "B": "er+ pr-", "C": "er- pr+", "D": "er+ pr+"}
TWO_OPTS = {"A": "Positive", "B": "Negative"}


@pytest.mark.parametrize("text, options, letter, method", [
    ("C. Other", BCNB_OPTS, "C", "leading_letter"),
    ("B", BCNB_OPTS, "B", "leading_letter"),
    ("(A) Invasive ductal carcinoma", BCNB_OPTS, "A", "leading_letter"),
    ("  B) lobular", BCNB_OPTS, "B", "leading_letter"),
    ("[C]", BCNB_OPTS, "C", "leading_letter"),
    ("C Other", BCNB_OPTS, "C", "leading_letter"),                       # space, then that option's text
    ("A case of invasive lobular carcinoma", BCNB_OPTS, "B", "option_text"),  # article "A" is not a letter...
    ("A tumour is seen", BCNB_OPTS, None, "unparseable"),                # ...and nothing else decides
    ("The answer is B.", BCNB_OPTS, "B", "answer_is"),
    ("the correct option is c(grade 3).", GRADE_OPTS, "C", "answer_is"),  # as written in WSI-VQA answers
    ("Answer: (b)", BCNB_OPTS, "B", "answer_is"),
    ("answer is A, not C", BCNB_OPTS, "A", "answer_is"),
    ("D. Other", BCNB_OPTS, "C", "option_text"),     # D does not exist: the letter is refused, the text decides
    ("C.", TWO_OPTS, None, "unparseable"),           # only A/B exist on this question
    ("The answer is C.", TWO_OPTS, None, "unparseable"),
    ("Invasive lobular carcinoma.", BCNB_OPTS, "B", "option_text"),
    ("It looks like invasive ductal carcinoma to me", BCNB_OPTS, "A", "option_text"),
    ("ductal or lobular, hard to say", BCNB_OPTS, None, "unparseable"),
    ("Invasive ductal carcinoma or invasive lobular carcinoma", BCNB_OPTS, None, "unparseable"),  # ambiguous
    ("This is grade 1-2 disease", GRADE_OPTS, "B", "option_text"),        # longer option wins over its part
    ("er+ pr-", RECEPTOR_OPTS, "B", "option_text"),                       # +/- matter
    ("er- pr+", RECEPTOR_OPTS, "C", "option_text"),
    ("", BCNB_OPTS, None, "unparseable"),
])
def test_extraction_cascade(text, options, letter, method):
    ex = extract_choice(text, options)
    assert (ex.letter, ex.method) == (letter, method)


def _read_bcnb_rows(path):
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_bcnb_baselines_match_independent_count(shared_data):
    path = shared_data / "SlideBench-VQA-BCNB.csv"
    rows = _read_bcnb_rows(path)
    eval_set = load_eval_set(path)
    assert len(eval_set.items) == len(rows) == 7274 and not eval_set.problems
    base = choice_baselines(eval_set.items, "task")

    # Independent: plain csv + Counter on the raw columns.
    letters = collections.Counter(r["Answer"].strip() for r in rows)
    for letter in "ABCD":
        assert base["constant_letter"][letter] == pytest.approx(letters[letter] / len(rows))
    by_task = collections.defaultdict(collections.Counter)
    for r in rows:
        by_task[r["Task"]][r[r["Answer"].strip()].strip().lower()] += 1
    assert len(by_task) == 7
    majority = sum(c.most_common(1)[0][1] for c in by_task.values()) / len(rows)
    assert base["majority_accuracy"] == pytest.approx(majority)
    assert round(100 * base["majority_accuracy"], 1) == 65.2

    # The same baselines through the model path: answering them as text scores exactly the same.
    label_of = {t: c.most_common(1)[0][0] for t, c in by_task.items()}
    majority_preds = {it.item_id: label_of[it.groups["task"]].capitalize() for it in eval_set.items}
    rep = score_predictions(eval_set.items, majority_preds)
    assert rep["choice"]["accuracy"] == pytest.approx(majority)
    best = letters.most_common(1)[0][0]
    rep = score_predictions(eval_set.items, {it.item_id: f"{best}." for it in eval_set.items})
    assert rep["choice"]["accuracy"] == pytest.approx(letters[best] / len(rows))
    assert rep["choice"]["baselines"]["best_constant_letter"] == best
    assert rep["choice"]["unparseable"] == 0
    er = rep["choice"]["breakdowns"]["task"]["ER"]
    er_rows = [r for r in rows if r["Task"] == "ER"]
    assert er["n"] == len(er_rows)
    assert er["accuracy"] == pytest.approx(sum(r["Answer"].strip() == best for r in er_rows) / len(er_rows))
    assert er["majority"] == pytest.approx(by_task["ER"].most_common(1)[0][1] / len(er_rows))


def test_skipped_items_reported_both_ways(shared_data):
    items = load_eval_set(shared_data / "SlideBench-VQA-BCNB.csv").items[:40]
    preds = {it.item_id: f"{it.answer}." for it in items[:30]}  # all 30 right
    skipped = {it.item_id: "feature_file_missing" for it in items[30:]}
    rep = score_predictions(items, preds, skipped)
    ch = rep["choice"]
    assert ch["accuracy"] == 1.0 and ch["accuracy_skipped_as_wrong"] == pytest.approx(30 / 40)
    assert rep["skipped"]["n"] == 10 and rep["skipped"]["by_reason"] == {"feature_file_missing": 10}
    assert {s["item_id"] for s in rep["skipped"]["items"]} == set(skipped)
    assert rep["counts"]["missing"] == 0


def _independent_similarity(pred, choices, answer):
    ratios = [difflib.SequenceMatcher(None, pred, c).quick_ratio() for c in choices]
    return ratios[choices.index(answer)] >= max(ratios)


def test_wsivqa_similarity_rule_on_real_val(shared_data):
    eval_set = load_eval_set(shared_data / "WsiVQA_val.json")
    raw = json.loads((shared_data / "WsiVQA_val.json").read_text())
    closed = [it for it in eval_set.items if it.choices]
    assert len(closed) == 421 and len(eval_set.items) == 798
    # The true option text is always right; both scorings agree.
    rep = score_predictions(eval_set.items, {it.item_id: it.reference for it in eval_set.items})
    assert rep["similarity"]["accuracy"] == 1.0 and rep["choice"]["accuracy"] == 1.0
    # Always the first option: compare with an independent implementation over the raw JSON.
    preds = {it.item_id: it.choices[0] for it in closed}
    expected = sum(_independent_similarity(r["Choice"][0], r["Choice"], r["Answer"]) for r in raw if "Choice" in r)
    rep = score_predictions(eval_set.items, preds)
    assert rep["similarity"]["correct"] == expected
    assert rep["choice"]["accuracy"] == pytest.approx(rep["choice"]["baselines"]["constant_letter"]["A"])
    # A reply in SlideChat's form "B. <text>" of the true option: right by both rules.
    preds = {it.item_id: f"{it.answer}. {it.options[it.answer]}" for it in closed}
    rep = score_predictions(eval_set.items, preds)
    assert rep["choice"]["accuracy"] == 1.0
    assert rep["similarity"]["accuracy"] == pytest.approx(
        sum(_independent_similarity(preds[it.item_id], list(it.choices), it.reference) for it in closed) / len(closed))
    assert rep["similarity"]["accuracy"] > 0.9


def test_text_metrics_definitions():
    # Identical texts (including one-word answers) score 1.
    same = ["grade 2", "yes", "invasive ductal carcinoma of the breast"]
    m = metrics.text_metrics(same, same)
    assert m["bleu1"] == m["bleu4"] == pytest.approx(1.0) and m["rouge_l"] == pytest.approx(1.0)
    # BLEU by hand: hyp "the cat sat" vs ref "the cat sat on the mat": p1 = p2 = 1, BP = exp(1 - 6/3).
    b = metrics.bleu_scores(["the cat sat"], ["the cat sat on the mat"])
    assert b["bleu1"] == pytest.approx(2.718281828 ** (1 - 2)) and b["bleu2"] == pytest.approx(b["bleu1"])
    # ROUGE-L by hand: LCS 3, P = 1, R = 0.5 -> F = 2PR / (P + R).
    assert metrics.rouge_l(["the cat sat"], ["the cat sat on the mat"]) == pytest.approx(2 * 0.5 / 1.5)
    # METEOR (Banerjee & Lavie): Fmean = PR / (0.9 P + 0.1 R), penalty = 0.5 (chunks / matches)^3.
    fmean = (1 * 0.5) / (0.9 * 1 + 0.1 * 0.5)
    # (A reference without repeated words: NLTK aligns greedily, not by fewest chunks as the paper.)
    assert metrics.meteor(["the cat sat"], ["the cat sat on a mat"]) == pytest.approx(fmean * (1 - 0.5 / 27))
    # Stem matching (Porter): "cats running" ~ "cat runs": 2 matches in 1 chunk, P = R = 1.
    assert metrics.meteor(["cats running"], ["cat runs"]) == pytest.approx(1 - 0.5 * (1 / 2) ** 3)
    # Reordered words: 3 matches in 3 chunks.
    assert metrics.meteor(["sat cat the"], ["the cat sat"]) == pytest.approx(1 - 0.5)
    assert isinstance(metrics.meteor_wordnet(), bool)


def test_caption_scoring_on_real_file(shared_data):
    eval_set = load_eval_set(shared_data / "SlideBench-Caption-TCGA.csv")
    items = eval_set.items[:60]
    rep = score_predictions(items, {it.item_id: it.reference for it in items})
    assert rep["caption"]["bleu4"] == pytest.approx(1.0) and rep["caption"]["rouge_l"] == pytest.approx(1.0)
    half = {it.item_id: " ".join(it.reference.split()[: len(it.reference.split()) // 2]) for it in items}
    rep2 = score_predictions(items, half)
    assert 0 < rep2["caption"]["bleu1"] < 1 and 0 < rep2["caption"]["rouge_l"] < 1
    assert "meteor" not in rep2["caption"]


def test_score_command_slidechat_csv_and_jsonl(shared_data, tmp_path):
    rows = _read_bcnb_rows(shared_data / "SlideBench-VQA-BCNB.csv")[:50]
    out_csv = tmp_path / "bcnb_output.csv"
    with open(out_csv, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) + ["Output"])
        w.writeheader()
        for i, r in enumerate(rows):
            # right for even rows (SlideChat style), a wrong existing letter for odd rows
            wrong = next(L for L in "ABCD" if r[L] and L != r["Answer"])
            w.writerow({**r, "Output": f"{r['Answer']}. {r[r['Answer']]}" if i % 2 == 0 else f"{wrong}."})
    assert cli.main(["score", "--predictions", str(out_csv), "--out", str(tmp_path / "a")]) == 0
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    assert res["report"]["choice"]["accuracy"] == pytest.approx(25 / 50)
    assert res["meta"]["data_sha256"] == load_eval_set(out_csv).sha256
    assert (tmp_path / "a" / "results.png").stat().st_size > 1000
    assert "constant letter" in (tmp_path / "a" / "results.md").read_text()

    jsonl = tmp_path / "preds.jsonl"
    lines = [json.dumps({"item_id": r["ID"], "prediction": f"{r['Answer']}."}) for r in rows[:10]]
    lines.insert(3, "{not json")
    lines.append(json.dumps({"item_id": rows[10]["ID"]}))  # no text
    jsonl.write_text("\n".join(lines) + "\n")
    data = shared_data / "SlideBench-VQA-BCNB.csv"
    assert cli.main(["score", "--data", str(data), "--predictions", str(jsonl), "--out", str(tmp_path / "b")]) == 0
    res = json.loads((tmp_path / "b" / "results.json").read_text())
    assert res["report"]["choice"]["accuracy"] == 1.0 and res["report"]["choice"]["n"] == 10
    assert res["report"]["counts"]["missing"] == 7274 - 10
    bad = res["meta"]["prediction_rows_malformed"]
    assert len(bad) == 2 and bad[0].startswith("row 4 ") and bad[1].startswith("row 12 ")
    # a predictions file whose output column is absent: a clear error naming the file
    assert cli.main(["score", "--data", str(data), "--predictions", str(data)]) == 2


def test_malformed_data_rows_are_reported(tmp_path, shared_data):
    rows = (shared_data / "SlideBench-VQA-BCNB.csv").read_text(encoding="utf-8").splitlines()[:12]
    rows[3] = rows[3] + ",extra"            # wrong field count
    rows[5] = rows[5].rsplit(",", 1)[0] + ",E"  # answer letter not among the options
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    eval_set = load_eval_set(path)
    assert [p.row for p in eval_set.problems] == [3, 5]
    assert len(eval_set.items) == 9
    assert [p["row"] for p in eval_set.provenance()["malformed_rows"]] == [3, 5]
