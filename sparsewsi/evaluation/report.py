"""Results of a run, written three ways: ``results.json``, a markdown table and a bar chart PNG.

Every output records the model, its config, the data file's SHA-256, the selector and k (from the
run's manifest), so a number can always be traced to what produced it. Files are written
atomically (temporary file + rename).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from sparsewsi.atomic import atomic_path
from sparsewsi.evaluation.runner import MANIFEST, RunError, collect, read_jsonl, shard_files, write_atomic
from sparsewsi.evaluation.items import EvalSet
from sparsewsi.evaluation.scoring import score_predictions


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def _num(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{x:.4f}"


def header_lines(meta: dict[str, Any]) -> list[str]:
    data = meta.get("data", {})
    return [
        f"- model: `{meta.get('model')}`; selector: `{meta.get('selector') or 'not recorded'}`; "
        f"k: {meta.get('k') if meta.get('k') is not None else 'not recorded'}",
        f"- data: `{pathlib.Path(str(data.get('path', ''))).name}` ({data.get('layout')}), "
        f"sha256 `{meta.get('data_sha256')}`",
        f"- shards: {meta.get('num_shards')}; config: `{json.dumps(meta.get('config', {}), sort_keys=True)}`",
    ]


def to_markdown(results: dict[str, Any]) -> str:
    """A human-readable report: provenance, counts, the accuracy tables with baselines, text metrics."""
    meta, rep = results["meta"], results["report"]
    out = [f"# Evaluation: {meta.get('data', {}).get('dataset', '')}", ""] + header_lines(meta)
    c = rep["counts"]
    out += ["", f"Items {c['items']}: predicted {c['predicted']}, skipped {c['skipped']}, not yet run {c['missing']}"
                f" (complete: {results['complete']}); duplicate lines dropped at merge: {results['duplicates']}."]
    if rep["skipped"]["n"]:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(rep["skipped"]["by_reason"].items()))
        out += [f"Skipped ({reasons}); {rep['skipped']['policy']}."]
    malformed = meta.get("data", {}).get("malformed_rows", [])
    if malformed:
        rows = ", ".join(str(p["row"]) for p in malformed[:20])
        out += [f"Malformed rows in the data file ({len(malformed)}): {rows}{' ...' if len(malformed) > 20 else ''}."]
    ch = rep.get("choice")
    if ch:
        b = ch["baselines"]
        out += ["", "## Multiple choice (lettered, extraction cascade)", "",
                f"Accuracy {_pct(ch['accuracy'])}% on {ch['n']} questions (skipped counted as wrong: "
                f"{_pct(ch['accuracy_skipped_as_wrong'])}%); unparseable {_pct(ch['unparseable_rate'])}%. "
                f"Baselines on the same questions: constant letter {b['best_constant_letter']} "
                f"{_pct(b['best_constant_letter_accuracy'])}%, majority label per {b['majority_group']} "
                f"{_pct(b['majority_accuracy'])}%.", ""]
        for name, table in ch["breakdowns"].items():
            out += [f"| {name} | n | model % | constant letter {b['best_constant_letter']} % | majority % | unparseable |",
                    "|---|---:|---:|---:|---:|---:|"]
            for value, row in table.items():
                out.append(f"| {value} | {row['n']} | {_pct(row['accuracy'])} | {_pct(row['constant_letter'])} | "
                           f"{_pct(row['majority'])} | {row['unparseable']} |")
            out.append(f"| **overall (micro)** | {ch['n']} | {_pct(ch['accuracy'])} | "
                       f"{_pct(b['best_constant_letter_accuracy'])} | {_pct(b['majority_accuracy'])} | {ch['unparseable']} |")
            out.append("")
    sim = rep.get("similarity")
    if sim:
        out += ["## Closed questions by string similarity (WSI-VQA rule)", "",
                f"Accuracy {_pct(sim['accuracy'])}% on {sim['n']} (skipped as wrong: {_pct(sim['accuracy_skipped_as_wrong'])}%);"
                f" answers not among their options: {sim['answer_not_among_options']}. Prompt: lettered options.", ""]
    for key, title in (("open", "Open questions"), ("caption", "Captions")):
        tm = rep.get(key)
        if tm:
            cols = ["bleu1", "bleu2", "bleu3", "bleu4", "rouge_l"] + (["meteor"] if "meteor" in tm else [])
            out += [f"## {title}", "", "| n | " + " | ".join(cols) + " |", "|---:|" + "---:|" * len(cols),
                    f"| {tm['n']} | " + " | ".join(_num(tm[k]) for k in cols) + " |", ""]
            if "meteor" in tm:
                out.append("METEOR " + ("with WordNet synonyms." if tm["meteor_wordnet"] else
                                        "with exact + stem matching only (NLTK WordNet corpus not installed)."))
                out.append("")
    return "\n".join(out) + "\n"


def bar_chart(results: dict[str, Any], path: os.PathLike | str) -> None:
    """Per-group accuracy of the model beside the constant-letter and majority baselines (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    meta, rep = results["meta"], results["report"]
    ch = rep.get("choice")
    if ch:
        b = ch["baselines"]
        name = next(iter(ch["breakdowns"]), None)
        rows = list(ch["breakdowns"].get(name, {}).items()) if name else []
        labels = [v for v, _ in rows] + ["overall"]
        series = {
            "model": [r["accuracy"] for _, r in rows] + [ch["accuracy"]],
            f"constant {b['best_constant_letter']}": [r["constant_letter"] for _, r in rows] + [b["best_constant_letter_accuracy"]],
            "majority": [r["majority"] for _, r in rows] + [b["majority_accuracy"]],
        }
        ylabel = "accuracy (%)"
    else:
        tm = rep.get("open") or rep.get("caption") or {}
        labels = [k for k in ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "meteor") if k in tm]
        series = {"model": [tm[k] for k in labels]}
        ylabel = "score (x100)"
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(labels) + 2), 4.0))
    x = np.arange(len(labels))
    width = 0.8 / len(series)
    for i, (sname, vals) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, [100 * (v or 0.0) for v in vals], width, label=sname)
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    selector = f" / {meta['selector']} k={meta.get('k')}" if meta.get("selector") else ""
    ax.set_title(f"{meta.get('data', {}).get('dataset', '')}: {meta.get('model')}{selector}"
                 f"\ndata sha256 {str(meta.get('data_sha256'))[:16]}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)


def merge_run(run_dir: os.PathLike | str, eval_set: EvalSet, *, write: bool = True) -> dict[str, Any]:
    """Merge the shard files of a run, score them, and write results.json / results.md / results.png.

    Returns the results dict: ``meta`` (the run manifest), ``report`` (see
    :func:`~sparsewsi.evaluation.scoring.score_predictions`), ``complete``, ``duplicates``, ``shards``.
    """
    run_dir = pathlib.Path(run_dir)
    manifest_path = run_dir / MANIFEST
    if not manifest_path.exists():
        raise RunError(f"{run_dir}: no {MANIFEST}; not a run folder")
    meta = json.loads(manifest_path.read_text())
    if meta.get("data_sha256") != eval_set.sha256:
        raise RunError(f"{manifest_path}: the run used data sha256 {meta.get('data_sha256')}, but "
                       f"{eval_set.path} has {eval_set.sha256}")
    files = shard_files(run_dir)
    predictions, skipped, duplicates = collect(files)
    report = score_predictions(eval_set.items, predictions, skipped)
    results = {
        "meta": meta, "report": report, "duplicates": duplicates,
        "complete": report["counts"]["missing"] == 0,
        "shards": {p.name: len(read_jsonl(p)) for p in files},
    }
    if write:
        write_atomic(run_dir / "results.json", json.dumps(results, indent=2, sort_keys=True, default=str))
        write_atomic(run_dir / "results.md", to_markdown(results))
        bar_chart(results, run_dir / "results.png")
    return results
