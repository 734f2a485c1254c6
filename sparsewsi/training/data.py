"""Batches for the trainer: an in-memory, checkpointable iterator and a synthetic slide-QA task.

The trainer takes ANY iterator of batch dicts (the contract: ``features [B, N, D]``, ``feature_mask
[B, N]``, ``input_ids / attention_mask / loss_mask [B, T]``); when it also has ``get_state()`` /
``set_state(state)`` (grain iterators do), its position is checkpointed with the model. Real input
pipelines live in ``data_pipelines`` (wired in by the ``train`` command, never imported here).

``synthetic_examples`` builds a task that needs token selection: each bag is mostly noise with a few
"evidence" tokens carrying a class prototype; the answer names the class. It is what the tiny
config, the tests and the benchmark train on.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from sparsewsi.model.prompts import encode_chats

CLASS_NAMES = ("grade one", "grade two", "grade three", "normal tissue")
QUESTIONS = ("What is the histological grade of this tumour?", "Describe the whole slide image.")


def synthetic_examples(tokenizer, num: int, *, num_tokens: int = 64, feature_dim: int = 32,
                       evidence_tokens: int = 4, num_classes: int = 4, seed: int = 0,
                       min_valid: int | None = None, text_length: int | None = None) -> list[dict]:
    """``num`` examples of a synthetic slide-QA task (numpy, one dict per example).

    Each bag has ``num_tokens`` slots, of which a random number >= ``min_valid`` are valid (the rest
    is padding); ``evidence_tokens`` valid tokens carry the prototype of the example's class (plus
    noise), the others are pure noise. Coordinates lie on a grid; ``evidence`` marks the signal tokens.
    """
    if num_classes > len(CLASS_NAMES):
        raise ValueError(f"at most {len(CLASS_NAMES)} classes")
    rng = np.random.default_rng(seed)
    protos = np.random.default_rng(12345).normal(size=(num_classes, feature_dim)).astype(np.float32) * 3.0
    min_valid = min_valid or max(evidence_tokens, num_tokens // 2)
    labels = rng.integers(0, num_classes, num)
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(num)]
    answers = [CLASS_NAMES[c] for c in labels]
    text = encode_chats(tokenizer, questions, answers, max_length=text_length)
    side = int(np.ceil(np.sqrt(num_tokens)))
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:num_tokens] * 224
    out = []
    for i in range(num):
        valid = int(rng.integers(min_valid, num_tokens + 1))
        feats = rng.normal(size=(num_tokens, feature_dim)).astype(np.float32)
        where = rng.choice(valid, evidence_tokens, replace=False)
        feats[where] += protos[labels[i]]
        mask = np.arange(num_tokens) < valid
        feats[~mask] = 0.0
        evidence = np.zeros(num_tokens, bool)
        evidence[where] = True
        out.append({"features": feats, "feature_mask": mask, "coords": grid.astype(np.float32),
                    "evidence": evidence, "label": np.int32(labels[i]),
                    **{k: v[i] for k, v in text.items()}})
    return out


def stack(examples: Sequence[dict]) -> dict[str, np.ndarray]:
    """A batch from examples with equal shapes."""
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


class ArrayIterator:
    """Infinite, reshuffled-per-epoch batches over in-memory examples, with a checkpointable state.

    ``batch_size`` is the GLOBAL batch; on multi-host runs each process yields its contiguous slice
    of it (process p: rows ``[p * B / P, (p + 1) * B / P)``), which is where
    ``jax.make_array_from_process_local_data`` puts it: the global batch, and so the per-row noise of
    the VP gate, is then the same as in a single-process run.
    """

    def __init__(self, examples: Sequence[dict], batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 process_index: int = 0, process_count: int = 1):
        if not examples:
            raise ValueError("ArrayIterator needs at least one example")
        if batch_size % process_count:
            raise ValueError(f"global batch {batch_size} is not divisible by {process_count} processes")
        self.examples = list(examples)
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.process_index, self.process_count = process_index, process_count
        self._epoch, self._pos = 0, 0

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.examples)
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = []
        while len(rows) < self.batch_size:
            order = self._order(self._epoch)
            take = min(self.batch_size - len(rows), len(order) - self._pos)
            rows.extend(order[self._pos:self._pos + take].tolist())
            self._pos += take
            if self._pos == len(order):
                self._epoch, self._pos = self._epoch + 1, 0
        per = self.batch_size // self.process_count
        local = rows[self.process_index * per:(self.process_index + 1) * per]
        return stack([self.examples[i] for i in local])

    def get_state(self) -> dict:
        return {"epoch": self._epoch, "position": self._pos, "seed": self.seed}

    def set_state(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"iterator state was saved with seed {state['seed']}, this iterator has {self.seed}")
        self._epoch, self._pos = int(state["epoch"]), int(state["position"])
