"""Hyper-parameters of the assembled SparseWSI model (hashable, so it can be a static jit argument)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from sparsewsi.llm import LLMConfig


FEATURE_NORMS = ("token", "bag", "bag_robust")


@dataclasses.dataclass(frozen=True)
class SparseWSIConfig:
    """Scorer -> (Soft Top-K + VP noise gate + denoiser | Hard Top-K) -> projector -> LLM.

    Attributes:
      feature_dim: D, the width of the frozen patch features (512 for CONCH, 1024 for UNI).
      llm: the decoder's configuration.
      image_token_id: id of the ``<image>`` placeholder in the prompt (replaced by the visual tokens).
      k: the visual-token budget (Soft Top-K budget in training, Hard Top-K at inference).
      candidate_cap: training-time cap M (0 = off): only the M best-scored tokens (M >> k) enter the
        noise gate, denoiser and LLM. Tokens outside carry ~zero mask mass, hence only noise and ~zero
        gradient; the cap trades that for a cost that no longer grows with N in the LLM.
      scorer_kind / scorer_hidden / scorer_depth / scorer_heads: the scorer backbone (see ``Scorer``).
      scorer_squares: the scorer also sees ``log1p(x^2)`` of the normalised features, i.e. how
        atypical a patch is for its slide in each dimension, on either side (see ``Scorer``).
      tau_start / tau_end / tau_steps: cosine temperature schedule of the Soft Top-K (in units of the
        bag's score standard deviation, since scores are standardised per bag).
      denoiser: whether training uses the diagonal-attention denoiser after the noise gate.
      score_noise: scale of Gumbel noise added to the (standardised) scores before the Soft Top-K in
        training (0 = off): tokens the scorer ranks low are still selected now and then, so a reader
        can tell the scorer they matter (exploration); inference stays a deterministic Hard Top-K.
      score_noise_steps: 0 keeps the Gumbel scale at ``score_noise`` throughout; > 0 anneals it by cosine
        from ``score_noise`` to 0 over this many steps (explore while the scorer is young, select sharply
        once it has found the evidence).
      gate_floor / gate_floor_steps: in training, the noise gate keeps every token at least
        ``gate_floor`` clean (mask ``alpha + (1 - alpha) * floor``), the floor falling linearly from
        ``gate_floor`` at step 0 to 0 at ``gate_floor_steps`` (0 = off): a continuation from
        "every token partly visible" to the Soft Top-K, so that a reader can answer from evidence a young
        scorer ranks low, and the scorer gets a gradient towards it. Inference is unchanged.
      noise_slots: in training, this many pure-noise tokens (gate mask 0) are inserted among the
        bag's tokens at random places (0 = off): a reader aligned on short bags then also meets the
        noise tokens that fill most of a whole slide in SparseLearn.
      projector_hidden: hidden width of the projector MLP (0 -> the LLM hidden size).
      feature_norm: how the patch features are normalised before the scorer and projector:
        ``"token"`` (per-token standardisation over D only; fine for pretrained encoders such as
        CONCH/UNI) or ``"bag"`` (first each feature standardised across the bag's valid tokens, for
        features dominated by a component shared by every patch, e.g. random-weight encoders).
      llm_seed: seed of a randomly initialised LLM (used when no pretrained folder is given).
      seed: seed of the new modules (scorer, denoiser, projector).
    """

    feature_dim: int
    llm: LLMConfig
    image_token_id: int
    k: int = 32
    candidate_cap: int = 0
    scorer_kind: str = "mlp"
    scorer_hidden: int = 256
    scorer_depth: int = 2
    scorer_heads: int = 8
    scorer_squares: bool = False
    tau_start: float = 2.0
    tau_end: float = 0.1
    tau_steps: int = 2000
    denoiser: bool = True
    score_noise: float = 0.0
    score_noise_steps: int = 0
    noise_slots: int = 0
    gate_floor: float = 0.0
    gate_floor_steps: int = 0
    projector_hidden: int = 0
    feature_norm: str = "token"
    llm_seed: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.feature_dim < 1:
            raise ValueError(f"feature_dim must be >= 1, got {self.feature_dim}")
        if self.score_noise < 0:
            raise ValueError(f"score_noise must be >= 0, got {self.score_noise}")
        if self.score_noise_steps < 0:
            raise ValueError(f"score_noise_steps must be >= 0 (0 = constant), got {self.score_noise_steps}")
        if not 0.0 <= self.gate_floor < 1.0:
            raise ValueError(f"gate_floor must be in [0, 1), got {self.gate_floor}")
        if self.gate_floor > 0 and self.gate_floor_steps < 1:
            raise ValueError(f"gate_floor {self.gate_floor} needs gate_floor_steps >= 1 (the steps it falls to 0 over)")
        if self.noise_slots < 0:
            raise ValueError(f"noise_slots must be >= 0, got {self.noise_slots}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.feature_norm not in FEATURE_NORMS:
            raise ValueError(f"feature_norm must be one of {FEATURE_NORMS}, got {self.feature_norm!r}")
        if self.candidate_cap and self.candidate_cap < self.k:
            raise ValueError(f"candidate_cap {self.candidate_cap} must be 0 (off) or >= k={self.k}")
        if not 0 <= self.image_token_id < self.llm.vocab_size:
            raise ValueError(f"image_token_id {self.image_token_id} is outside the vocabulary (size {self.llm.vocab_size})")

    def replace(self, **changes) -> "SparseWSIConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["llm"] = dataclasses.asdict(self.llm)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SparseWSIConfig":
        d = dict(d)
        llm = dict(d.pop("llm"))
        # JSON turns tuples into lists; the LLM config must stay hashable.
        for key, value in list(llm.items()):
            if isinstance(value, list):
                llm[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        return cls(llm=LLMConfig(**llm), **d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)
