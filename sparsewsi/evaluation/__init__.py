"""Evaluation at scale: SlideBench-VQA (TCGA, BCNB), WSI-VQA and SlideBench-Caption.

* :mod:`~sparsewsi.evaluation.items` -- benchmark files -> :class:`EvalItem` (one shape for all).
* :mod:`~sparsewsi.evaluation.extraction` -- the documented answer-extraction cascade.
* :mod:`~sparsewsi.evaluation.metrics` -- BLEU-1..4, ROUGE-L, METEOR, WSI-VQA similarity rule.
* :mod:`~sparsewsi.evaluation.scoring` -- accuracies, breakdowns, constant-letter / majority baselines.
* :mod:`~sparsewsi.evaluation.predictor` -- the predictor interface, an LLM + selector predictor
  and the adapter to trained checkpoints (``sparsewsi.model``).
* :mod:`~sparsewsi.evaluation.runner` -- sharded, resumable JSON-lines runs.
* :mod:`~sparsewsi.evaluation.report` -- merge shards, results JSON / markdown / bar chart.
* :mod:`~sparsewsi.evaluation.predictions_io` -- predictions made elsewhere (CSV / JSONL).
"""

from sparsewsi.evaluation.extraction import Extraction, extract_choice
from sparsewsi.evaluation.items import EvalItem, EvalSet, load_eval_set
from sparsewsi.evaluation.scoring import choice_baselines, score_predictions

__all__ = ["EvalItem", "EvalSet", "Extraction", "choice_baselines", "extract_choice", "load_eval_set",
           "score_predictions"]
