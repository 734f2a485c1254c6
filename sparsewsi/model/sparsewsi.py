"""The assembled SparseWSI model: scorer -> token selection -> projector -> LLM.

Shapes: B batch, N tokens per bag (padded), D feature width, T text tokens, H LLM width, M visual
tokens spliced into the prompt (N or the candidate cap in training, k at inference).

Training path (``training_loss``)::

    s     = Scorer(X, mask)                        # [B, N] standardised scores
    (cap) keep the top-M tokens by s (no gradient through the choice), slide order
    (opt) s += score_noise(step) * Gumbel noise    # exploration, training only (optionally annealed)
    alpha = soft_topk(s, k, tau(step), mask)       # [B, M], sum = k
    (opt) a = alpha + (1 - alpha) * floor(step)    # gate floor: early steps keep dropped tokens partly clean
    (opt) + noise_slots tokens with a = 0          # augmentation, training only
    X~    = VPNoiseGate(X, a, key(step))           # per-token standardised, dropped tokens -> noise
    X^    = DiagonalDenoiser(X~, 1 - a)            # residual scaled by the noise level
    V     = Projector(X^)                          # [B, M, H]
    loss  = CE(LLM(splice(text, V)), answer tokens)

Inference path (``select_and_project`` + generation, see ``sparsewsi.model.inference``)::

    idx = hard_topk(Scorer(X), k, mask)            # slide order
    V   = Projector(standardize(X[idx]))           # no noise gate, no denoiser, no Soft Top-K

Features are standardised per token in both paths (the noise gate needs unit-scale features; the
projector must see the same scale at inference); with ``feature_norm="bag"`` each feature is first
standardised across the bag (``input_features``), before the scorer and the projector alike.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sparsewsi.llm import CausalLM, create_model
from sparsewsi.model.config import SparseWSIConfig
from sparsewsi.selection import DiagonalDenoiser, Scorer, VPNoiseGate, cosine_temperature, gather_tokens, hard_topk
from sparsewsi.selection import soft_topk
from sparsewsi.selection.sparselearn import (interleave_noise_slots, standardize_bag, standardize_bag_robust,
                                             standardize_tokens)

Array = jax.Array


class Projector(nnx.Module):
    """Linear -> GELU (exact) -> Linear: features [..., D] -> LLM embeddings [..., H] (float32)."""

    def __init__(self, in_features: int, hidden: int, out_features: int, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(in_features, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, out_features, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.fc2(jax.nn.gelu(self.fc1(x.astype(jnp.float32)), approximate=False))


def splice(text_embeds: Array, input_ids: Array, attention_mask: Array, image_id: int, visual: Array,
           visual_mask: Array) -> tuple[Array, Array, Array]:
    """Replace each row's single ``<image>`` token by M visual tokens.

    Args:
      text_embeds: [B, T, H] embedded prompt; input_ids / attention_mask: [B, T].
      visual: [B, M, H] visual tokens; visual_mask: [B, M] (False = padding, not attended to).
    Returns:
      (embeds [B, T - 1 + M, H], mask [B, T - 1 + M] int32, out_pos [B, T] int32), where ``out_pos[b, i]``
      is the output slot of text token i; the ``<image>`` token maps to the last *valid* visual slot
      (or the text token before it when no visual token is valid), whose hidden state predicts the
      text token after the image.
    """
    b, t, h = text_embeds.shape
    m = visual.shape[1]
    p = jnp.argmax(input_ids == image_id, axis=1).astype(jnp.int32)[:, None]  # [B, 1]
    j = jnp.arange(t - 1 + m, dtype=jnp.int32)[None, :]  # output slots
    is_visual = (j >= p) & (j < p + m)
    text_src = jnp.where(j < p, j, j - m + 1)
    text_src = jnp.clip(text_src, 0, t - 1)
    vis_src = jnp.clip(j - p, 0, m - 1)
    embeds = jnp.where(is_visual[..., None],
                       jnp.take_along_axis(visual.astype(text_embeds.dtype), vis_src[..., None], axis=1),
                       jnp.take_along_axis(text_embeds, text_src[..., None], axis=1))
    mask = jnp.where(is_visual, jnp.take_along_axis(visual_mask.astype(jnp.int32), vis_src, axis=1),
                     jnp.take_along_axis(attention_mask.astype(jnp.int32), text_src, axis=1))
    i = jnp.arange(t, dtype=jnp.int32)[None, :]
    last_valid = jnp.max(jnp.where(visual_mask.astype(bool), jnp.arange(m, dtype=jnp.int32), -1), axis=1)[:, None]
    out_pos = jnp.where(i < p, i, jnp.where(i == p, p + last_valid, i + m - 1))
    return embeds, mask, out_pos


def answer_loss(llm: CausalLM, embeds: Array, mask: Array, out_pos: Array, input_ids: Array,
                loss_mask: Array) -> tuple[Array, Array]:
    """Next-token cross-entropy on answer tokens only.

    Logits are computed only at the T - 1 text slots that predict a text token (never over the M
    visual slots), so the vocabulary projection costs O(T V), not O((T + M) V).
    Returns (mean loss over answer tokens, number of answer tokens).
    """
    hidden, _ = llm.model(embeds, mask)
    src = out_pos[:, :-1]
    h = jnp.take_along_axis(hidden, src[..., None], axis=1)  # [B, T - 1, H]
    logits = llm.logits(h)
    targets = input_ids[:, 1:]
    weights = loss_mask[:, 1:].astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    count = jnp.sum(weights)
    return jnp.sum(ce * weights) / jnp.maximum(count, 1.0), count


class SparseWSI(nnx.Module):
    """The whole model. Attributes: ``scorer``, ``noise_gate``, ``denoiser`` (or None), ``projector``, ``llm``."""

    def __init__(self, config: SparseWSIConfig, llm: CausalLM | None = None, *, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(config.seed)
        d = config.feature_dim
        self.config = config
        self.scorer = Scorer(d, config.scorer_kind, hidden=config.scorer_hidden, depth=config.scorer_depth,
                             num_heads=config.scorer_heads, squares=config.scorer_squares, rngs=rngs)
        self.noise_gate = VPNoiseGate(normalize=True)
        self.denoiser = DiagonalDenoiser(d, rngs=rngs) if config.denoiser else nnx.data(None)
        self.projector = Projector(d, config.projector_hidden or config.llm.hidden_size, config.llm.hidden_size,
                                   rngs=rngs)
        if llm is not None and llm.config != config.llm:
            raise ValueError("the LLM passed in does not match config.llm")
        self.llm = llm if llm is not None else create_model(config.llm, seed=config.llm_seed)

    # ----------------------------------------------------------------------------------- training
    def temperature(self, step) -> Array:
        c = self.config
        return cosine_temperature(step, c.tau_start, c.tau_end, c.tau_steps)

    def score_noise_scale(self, step) -> Array:
        """The Gumbel scale of the training scores at ``step``: ``score_noise``, cosine-annealed to 0 over
        ``score_noise_steps`` when that is > 0 (float32 scalar)."""
        c = self.config
        scale = jnp.asarray(c.score_noise, jnp.float32)
        if c.score_noise_steps > 0:
            frac = jnp.clip(jnp.asarray(step, jnp.float32) / c.score_noise_steps, 0.0, 1.0)
            scale = scale * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        return scale

    def training_loss(self, batch: dict, step, key: Array) -> tuple[Array, dict]:
        """The training objective on one batch (see the module docstring).

        Args:
          batch: ``features [B, N, D]``, ``feature_mask [B, N]``, ``input_ids / attention_mask /
            loss_mask [B, T]``.
          step: optimizer step (traced scalar): sets the temperature.
          key: PRNG key of the noise gate (derive it from the step for reproducible runs).
        Returns:
          (loss, aux) with aux: ``tau``, ``answer_tokens`` and soft-mask statistics.
        """
        c = self.config
        mask = batch["feature_mask"].astype(bool)
        x = self.input_features(batch["features"], mask)
        scores = self.scorer(x, mask)
        tau = self.temperature(step)
        if c.candidate_cap and c.candidate_cap < x.shape[1]:
            cand = hard_topk(jax.lax.stop_gradient(scores), c.candidate_cap, mask)
            x = gather_tokens(x, cand.indices)
            scores = jnp.take_along_axis(scores, cand.indices, axis=1)
            mask = cand.valid
        noise_scale = self.score_noise_scale(step)
        if c.score_noise > 0:  # exploration: Gumbel-perturbed scores (keys kept apart from the gate's)
            key, gumbel_key = jax.random.split(key)
            scores = scores + noise_scale * jax.random.gumbel(gumbel_key, scores.shape, scores.dtype)
        k_eff = min(c.k, x.shape[1])
        alpha = soft_topk(scores, k_eff, tau, mask)
        gate = alpha
        if c.gate_floor > 0:
            # Continuation: the gate lets every token through at least `floor` clean, the floor falling
            # linearly to 0. A young scorer ranks the evidence anywhere; fully noised, it gives the reader
            # nothing to answer from, and the scorer no gradient towards it. (Noise slots stay pure noise.)
            floor = c.gate_floor * jnp.clip(1.0 - jnp.asarray(step, jnp.float32) / max(c.gate_floor_steps, 1), 0.0, 1.0)
            gate = alpha + (1.0 - alpha) * floor
        if c.noise_slots > 0:  # augmentation: the noise tokens a whole slide holds, for readers of short bags
            key, slot_key = jax.random.split(key)
            x, gate, mask = interleave_noise_slots(x, gate, mask, c.noise_slots, slot_key)
        h = self.noise_gate(x, gate, key)
        if self.denoiser is not None:
            h = self.denoiser(h, 1.0 - gate)  # clean tokens pass unchanged, as at inference
        visual = self.projector(h)
        embeds, attn, out_pos = splice(self.llm.embed_tokens(batch["input_ids"]), batch["input_ids"],
                                       batch["attention_mask"], c.image_token_id, visual, mask)
        loss, count = answer_loss(self.llm, embeds, attn, out_pos, batch["input_ids"], batch["loss_mask"])
        top = jax.lax.top_k(jax.lax.stop_gradient(alpha), k_eff)[0]
        aux = {
            "tau": tau,
            "answer_tokens": count,
            # 1.0 when the soft mask is already a hard top-k; k/N when it is flat.
            "mask_topk_mass": jnp.mean(jnp.sum(top, -1) / k_eff),
            "mask_frac_above_half": jnp.mean(jnp.sum(alpha > 0.5, -1) / k_eff),
            "visual_tokens": jnp.asarray(x.shape[1], jnp.float32),
        }
        if c.score_noise > 0:
            aux["score_noise"] = noise_scale
        return loss, aux

    # ------------------------------------------------------------------------------------- shared
    def input_features(self, features: Array, feature_mask: Array | None = None) -> Array:
        """The features the scorer and projector see: [B, N, D] -> [B, N, D] (``config.feature_norm``).

        ``"bag"`` uses statistics of the whole bag, so training (all tokens) and inference (k gathered
        tokens) normalise alike.
        """
        if self.config.feature_norm == "bag":
            return standardize_bag(features, feature_mask)
        if self.config.feature_norm == "bag_robust":
            return standardize_bag_robust(features, feature_mask)
        return features

    def scores(self, features: Array, feature_mask: Array) -> Array:
        """The scorer's standardised scores [B, N] of a bag."""
        mask = feature_mask.astype(bool)
        return self.scorer(self.input_features(features, mask), mask)

    # ---------------------------------------------------------------------------------- inference
    def select(self, features: Array, feature_mask: Array, k: int | None = None):
        """Hard Top-K by the scorer: ``TopK(indices [B, k], valid [B, k])`` in slide order."""
        mask = feature_mask.astype(bool)
        return hard_topk(self.scores(features, mask), k or self.config.k, mask)

    def project_tokens(self, features: Array, indices: Array, feature_mask: Array | None = None) -> Array:
        """Normalise + gather + standardise + project: features [B, N, D], indices [B, M] -> [B, M, H] (LLM dtype)."""
        x = standardize_tokens(gather_tokens(self.input_features(features, feature_mask), indices))
        return self.projector(x).astype(self.config.llm.jnp_dtype)

    def prompt_embeddings(self, features: Array, input_ids: Array, attention_mask: Array, indices: Array,
                          valid: Array, feature_mask: Array | None = None) -> tuple[Array, Array]:
        """The LLM input for a prompt with the selected tokens spliced in: (embeds [B, T-1+M, H], mask)."""
        visual = self.project_tokens(features, indices, feature_mask)
        embeds, mask, _ = splice(self.llm.embed_tokens(input_ids), input_ids, attention_mask,
                                 self.config.image_token_id, visual, valid)
        return embeds, mask
