"""Inference: ONE jit-compiled program per selector shape, scorer -> Hard Top-K -> gather -> projector
-> splice -> prefill -> decode, and a predictor around it for evaluation.

None of the SparseLearn training pieces (Soft Top-K, VP noise gate, denoiser) are in this graph:
inference reads only ``scorer``, ``projector`` and ``llm``. Baseline selectors (random, uniform,
spatial, all tokens) run on the host (``sparsewsi.selection.baselines``) and hand their indices to
the same compiled program, which then skips the scorer.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparsewsi.llm import SamplingConfig, generate_tokens, stop_token_ids
from sparsewsi.model.prompts import check_batch, encode_chats, image_token_id
from sparsewsi.model.sparsewsi import SparseWSI
from sparsewsi.selection import baselines

Array = jax.Array


def infer(model: SparseWSI, features: Array, feature_mask: Array, input_ids: Array, attention_mask: Array,
          rng: Array, sampling: SamplingConfig, k: int, indices: Array | None = None, valid: Array | None = None):
    """Traceable inference (wrap in jit, or use ``infer_jit``).

    Args:
      features [B, N, D], feature_mask [B, N]; input_ids / attention_mask [B, T] prompts ending with
      the assistant header, one ``<image>`` each (left padding recommended).
      indices / valid: [B, M] a host selector's picks; None -> the learned scorer + Hard Top-K (k).
    Returns:
      (tokens [B, max_new_tokens] int32, lengths [B], indices [B, M], valid [B, M]).
    """
    if indices is None:
        sel = model.select(features, feature_mask, k)
        indices, valid = sel.indices, sel.valid
    embeds, mask = model.prompt_embeddings(features, input_ids, attention_mask, indices, valid, feature_mask)
    tokens, lengths = generate_tokens(model.llm, embeds, mask, rng, sampling)
    return tokens, lengths, indices, valid


infer_jit = jax.jit(infer, static_argnames=("sampling", "k"))


SCORE_BUCKET = 64  # host scoring pads a bag's length to a multiple of this (bounds the compiled shapes)


@jax.jit
def _scores_jit(model: SparseWSI, features, feature_mask):
    return model.scores(features, feature_mask.astype(bool))


@dataclasses.dataclass
class Prediction:
    """tokens [B, L] int32 (padded), lengths [B], texts (decoded replies), indices / valid [B, M] the tokens shown."""

    tokens: np.ndarray
    lengths: np.ndarray
    texts: list[str]
    indices: np.ndarray
    valid: np.ndarray


class SparseWSIPredictor:
    """Answers questions about slides with a trained SparseWSI model.

    ``predict(features, feature_mask, questions, selector='learned')`` tokenises the questions with the
    chat template, selects k visual tokens (learned scorer by default, or a baseline selector at the
    same budget), and runs the single compiled inference program. Prompts are left-padded to a
    multiple of ``pad_to_multiple_of`` so varying lengths reuse the compiled program.
    """

    def __init__(self, model: SparseWSI, tokenizer, *, k: int | None = None, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, all_tokens_cap: int = 1024,
                 pad_to_multiple_of: int = 16):
        self.model = model
        self.tokenizer = tokenizer
        self.k = k or model.config.k
        self.all_tokens_cap = all_tokens_cap
        self.pad_to_multiple_of = pad_to_multiple_of
        if image_token_id(tokenizer) != model.config.image_token_id:
            raise ValueError(f"the tokenizer's <image> id {image_token_id(tokenizer)} differs from the model's "
                             f"{model.config.image_token_id}")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=float(temperature),
                                       top_p=float(top_p), stop_token_ids=stop_token_ids(tokenizer, model.config.llm),
                                       pad_token_id=int(pad))

    def encode(self, questions: Sequence[str]) -> dict[str, np.ndarray]:
        return encode_chats(self.tokenizer, questions, prompt_only=True, pad_to_multiple_of=self.pad_to_multiple_of)

    def host_scores(self, features, feature_mask) -> np.ndarray:
        """The scorer's scores [B, N] (float32) of bags [B, N, D].

        N is padded (masked) to a multiple of ``SCORE_BUCKET`` for the jitted scorer: one compilation per
        bucket, not per bag size (one bag at a time over a benchmark's ~100 bag sizes recompiled ~100 times)."""
        features = np.asarray(features, np.float32)
        mask = np.asarray(feature_mask, bool)
        b, n, d = features.shape
        padded_n = -(-max(n, 1) // SCORE_BUCKET) * SCORE_BUCKET
        if padded_n != n:
            features = np.concatenate([features, np.zeros((b, padded_n - n, d), np.float32)], axis=1)
            mask = np.concatenate([mask, np.zeros((b, padded_n - n), bool)], axis=1)
        return np.asarray(_scores_jit(self.model, features, mask))[:, :n]

    def host_selection(self, selector: str, features, feature_mask, *, coords=None, seeds=None, evidence=None):
        """[B, M] indices + valid for a named selector (``baselines.SELECTORS``); M = k, or the cap for 'all'.

        ``evidence`` [B, N] bool: ground-truth evidence flags, needed by 'oracle' (synthetic data).
        """
        features = np.asarray(features)
        b, n = features.shape[:2]
        mask = np.asarray(feature_mask, bool)
        scores = self.host_scores(features, mask) if selector == "learned" else None
        budget = min(self.all_tokens_cap, n) if selector == "all" else self.k
        picks = []
        for i in range(b):
            picks.append(baselines.select_indices(
                selector, n, self.k, mask=mask[i], scores=None if scores is None else scores[i],
                coords=None if coords is None else np.asarray(coords)[i],
                evidence=None if evidence is None else np.asarray(evidence, bool)[i],
                seed=int(seeds[i]) if seeds is not None else i, cap=budget))
        return baselines.pad_selections(picks, budget)

    def predict(self, features, feature_mask, questions: Sequence[str] | None = None, *, selector: str = "learned",
                prompt: dict | None = None, coords=None, seeds=None, seed: int = 0, evidence=None) -> Prediction:
        """Generate answers.

        Args:
          features [B, N, D], feature_mask [B, N]: the bags (padded to a common N >= k).
          questions: B question strings (or pass ``prompt``: pre-tokenised ``input_ids/attention_mask``).
          selector: 'learned' (in-graph scorer + Hard Top-K) or a host baseline from
            ``baselines.SELECTORS`` ('random', 'uniform', 'spatial' (needs coords), 'all', ...).
          seeds: per-row seeds for the random selectors.
          evidence: [B, N] bool ground-truth evidence flags, for the 'oracle' selector.
        """
        if (questions is None) == (prompt is None):
            raise ValueError("pass exactly one of questions or prompt")
        enc = self.encode(questions) if prompt is None else prompt
        batch = {"features": features, "feature_mask": feature_mask, **enc}
        check_batch(batch, self.model.config.image_token_id, training=False)
        if np.shape(features)[1] < self.k:
            raise ValueError(f"bags are padded to N={np.shape(features)[1]} tokens, fewer than k={self.k}; pad to >= k")
        args = (jnp.asarray(features), jnp.asarray(feature_mask, bool), jnp.asarray(enc["input_ids"], jnp.int32),
                jnp.asarray(enc["attention_mask"], jnp.int32), jax.random.key(seed))
        if selector == "learned":
            out = infer_jit(self.model, *args, sampling=self.sampling, k=self.k)
        else:
            idx, val = self.host_selection(selector, features, feature_mask, coords=coords, seeds=seeds,
                                           evidence=evidence)
            out = infer_jit(self.model, *args, sampling=self.sampling, k=self.k, indices=jnp.asarray(idx),
                            valid=jnp.asarray(val))
        tokens, lengths, idx, val = (np.asarray(o) for o in out)
        texts = [self.tokenizer.decode(t[:n], skip_special_tokens=True) for t, n in zip(tokens, lengths)]
        return Prediction(tokens, lengths, texts, idx, val)
