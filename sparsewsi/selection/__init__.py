"""Token selection: the SparseLearn operators and the scorer.

Pure functions (``soft_topk``, ``hard_topk``, ``gather_tokens``, ``vp_noise``,
``cosine_temperature``) import nothing else from the project; NNX modules (``Scorer``,
``VPNoiseGate``, ``DiagonalDenoiser``) hold the trainable parameters.
"""

from sparsewsi.selection.hard_topk import gather_tokens, hard_topk
from sparsewsi.selection.schedules import cosine_temperature
from sparsewsi.selection.scorer import MLPScorer, Scorer, TransformerScorer, standardize_scores
from sparsewsi.selection.soft_topk import soft_topk
from sparsewsi.selection.sparselearn import DiagonalDenoiser, VPNoiseGate, vp_noise

__all__ = [
    "DiagonalDenoiser",
    "MLPScorer",
    "Scorer",
    "TransformerScorer",
    "VPNoiseGate",
    "cosine_temperature",
    "gather_tokens",
    "hard_topk",
    "soft_topk",
    "standardize_scores",
    "vp_noise",
]

from sparsewsi.selection.baselines import SELECTORS, pad_selections, select_indices  # noqa: E402

__all__ += ["SELECTORS", "pad_selections", "select_indices"]
