"""The evaluator's model interface, and a predictor built from the LLM, a projector and a selector.

The evaluator only needs a *predictor*: a callable from a list of :class:`PreparedQuestion`
(slide features, coordinates, prompt) to one generated text per question. Any model plugs in
behind that interface (``sparsewsi.model``'s inference function, an external server, ...).

:class:`LLMSelectorPredictor` is such a predictor assembled from pieces: a
:class:`~sparsewsi.llm.CausalLM` and its tokenizer, a linear projector ``[D, H]`` (features to the
LLM's embedding width), a linear scorer ``[D]`` and a token selector at budget ``k``
(:data:`sparsewsi.selection.baselines.SELECTORS`). ``learned`` selection runs on the device inside
the one jitted program (scores -> ``hard_topk`` -> gather -> project -> splice -> prefill ->
decode); the baselines select on the host and send only the k chosen rows. Questions are batched
and the batch is split across the local devices (data parallel; the model is replicated), so each
host of a multi-host run evaluates its own shard of questions with its own devices.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Callable, Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from sparsewsi.llm import SamplingConfig, generate_tokens, stop_token_ids
from sparsewsi.selection import gather_tokens, hard_topk
from sparsewsi.selection.baselines import SELECTORS, pad_selections, select_indices

# SlideChat's prompt: Qwen chat format without a system block; <image> first in the user turn.
SLIDECHAT_TEMPLATE = "<|im_start|>user\n{image}\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


@dataclasses.dataclass
class PreparedQuestion:
    """One question ready for a model.

    Attributes:
      item_id: the question's id.
      prompt: the user text (question and lettered options), without the image token.
      features: ``[N, D]`` float32 patch features of the slide.
      coords: ``[N, 2]`` level-0 ``(x, y)`` or ``None``.
      evidence: ``[N]`` bool ground-truth evidence tokens (synthetic data only) or ``None``.
    """

    item_id: str
    prompt: str
    features: np.ndarray
    coords: np.ndarray | None = None
    evidence: np.ndarray | None = None


class Predictor(Protocol):
    """``predictor(questions) -> texts``, one generated text per question, in order.

    ``describe()`` returns what the results should record about the model (name, config, selector, k).
    """

    def __call__(self, questions: Sequence[PreparedQuestion]) -> list[str]: ...

    def describe(self) -> dict: ...


def question_seed(item_id: str, seed: int) -> int:
    """A per-question RNG seed (stable across runs, hosts and batch sizes) for random selectors."""
    return (zlib.crc32(item_id.encode()) ^ (seed * 0x9E3779B1)) & 0x7FFFFFFF


def _bucket(n: int, minimum: int) -> int:
    """The next power of two >= max(n, minimum): bounds the number of compiled shapes."""
    return 1 << max(int(n), int(minimum), 1).__sub__(1).bit_length()


def _splice(llm, ids, attn, vis, vis_valid, image_id):
    """Token embeddings of ids [B, T] with the image slots replaced by vis [B, k, H], in order.

    The j-th image slot of a row takes vis[:, j]; a slot whose token is padding (vis_valid False,
    bags with fewer than k tokens) is masked out of attention.
    """
    is_img = ids == image_id
    slot = jnp.clip(jnp.cumsum(is_img, axis=1) - 1, 0, vis.shape[1] - 1)  # [B, T]
    emb = llm.embed_tokens(ids)
    vis_at = jnp.take_along_axis(vis.astype(emb.dtype), slot[..., None], axis=1)
    emb = jnp.where(is_img[..., None], vis_at, emb)
    valid_at = jnp.take_along_axis(vis_valid, slot, axis=1)
    attn = jnp.where(is_img, attn * valid_at.astype(attn.dtype), attn)
    return emb, attn


@functools.partial(jax.jit, static_argnames=("k", "image_id", "sampling"))
def _generate_learned(llm, projector, scorer, feats, mask, ids, attn, rng, *, k, image_id, sampling):
    """feats [B, N, D], mask [B, N] -> (tokens [B, n_new], lengths [B]); top-k by feats @ scorer."""
    scores = jnp.einsum("bnd,d->bn", feats, scorer)
    sel = hard_topk(scores, k, mask)
    vis = gather_tokens(feats, sel.indices) @ projector
    emb, attn = _splice(llm, ids, attn, vis, sel.valid, image_id)
    return generate_tokens(llm, emb, attn, rng, sampling)


@functools.partial(jax.jit, static_argnames=("image_id", "sampling"))
def _generate_selected(llm, projector, feats, valid, ids, attn, rng, *, image_id, sampling):
    """feats [B, k, D] (already selected), valid [B, k] -> (tokens [B, n_new], lengths [B])."""
    vis = feats @ projector
    emb, attn = _splice(llm, ids, attn, vis, valid, image_id)
    return generate_tokens(llm, emb, attn, rng, sampling)


class LLMSelectorPredictor:
    """Selector -> linear projector -> LLM generation, batched over the local devices.

    Args:
      llm: a :class:`~sparsewsi.llm.CausalLM`.
      tokenizer: its tokenizer; must know the ``<image>`` token.
      projector: ``[D, H]`` projector kernel (features to LLM embeddings).
      scorer: ``[D]`` linear scorer for ``learned`` selection (ignored by the baselines).
      selector: one of ``sparsewsi.selection.baselines.SELECTORS``.
      k: token budget; for ``all`` the cap on tokens (every token, evenly sub-sampled to k).
      batch_size: questions per program call; rounded up to a multiple of the local device count.
      max_new_tokens: generation length cap (greedy decoding).
      template: the prompt, with ``{image}`` and ``{prompt}`` fields (SlideChat's by default).
      seed: seed of the random selectors (combined with each question id).
      name: what results record as the model.
    """

    def __init__(self, llm, tokenizer, projector, scorer, *, selector: str = "learned", k: int = 32,
                 batch_size: int = 8, max_new_tokens: int = 32, template: str = SLIDECHAT_TEMPLATE,
                 seed: int = 0, name: str = "llm+linear-projector", min_bag_bucket: int = 64,
                 devices: Sequence[jax.Device] | None = None):
        if selector not in SELECTORS:
            raise ValueError(f"unknown selector {selector!r}; choose from {', '.join(SELECTORS)}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.llm, self.tokenizer = llm, tokenizer
        self.selector, self.k, self.seed, self.name, self.template = selector, int(k), int(seed), name, template
        self.image_id = tokenizer.convert_tokens_to_ids("<image>")
        if self.image_id is None or self.image_id == tokenizer.unk_token_id:
            raise ValueError("the tokenizer has no <image> token")
        self.devices = list(devices or jax.local_devices())
        nd = len(self.devices)
        self.batch_size = -(-max(1, int(batch_size)) // nd) * nd
        self.min_bag_bucket = int(min_bag_bucket)
        self.mesh = jax.sharding.Mesh(np.array(self.devices), ("data",))
        self.batch_sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("data"))
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        self.llm = jax.device_put(llm, replicated)
        self.projector = jax.device_put(jnp.asarray(projector, jnp.float32), replicated)
        self.scorer = jax.device_put(jnp.asarray(scorer, jnp.float32), replicated)
        self.sampling = SamplingConfig(max_new_tokens=int(max_new_tokens), temperature=0.0,
                                       stop_token_ids=stop_token_ids(tokenizer, llm.config),
                                       pad_token_id=int(tokenizer.pad_token_id or 0))

    def describe(self) -> dict:
        return {"name": self.name, "selector": self.selector, "k": self.k, "seed": self.seed,
                "batch_size": self.batch_size, "devices": len(self.devices),
                "max_new_tokens": self.sampling.max_new_tokens, "llm_config": dataclasses.asdict(self.llm.config)}

    def _prompt_ids(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Left-padded ids [B, T] and mask [B, T], the image token repeated k times.

        T is the next power of two >= 64 of the longest prompt: a handful of compiled shapes over a
        whole benchmark (question lengths vary), at most 2x padding on the prompt.
        """
        text = [self.template.format(image="<image>" * self.k, prompt=p) for p in prompts]
        rows = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        for r in rows:
            if sum(t == self.image_id for t in r) != self.k:
                raise ValueError("the prompt must contain the <image> token exactly once (the question text has one)")
        t = _bucket(max(len(r) for r in rows), 64)
        ids = np.full((len(rows), t), self.sampling.pad_token_id, np.int32)
        mask = np.zeros((len(rows), t), np.int32)
        for i, r in enumerate(rows):
            ids[i, t - len(r):] = r
            mask[i, t - len(r):] = 1
        return ids, mask

    def _host_buffer(self, shape: tuple[int, int, int]) -> np.ndarray:
        """A reused float32 host buffer for padded bags [B, N, D].

        Allocating a fresh tens-of-MB array per batch costs more than the program itself on CPU
        (page faults on new memory). Rows past a bag's length keep stale finite values: the mask
        keeps them from being selected, and a pick that falls on padding is masked out of attention.
        """
        if getattr(self, "_buf", None) is None or self._buf.shape != shape:
            self._buf = np.zeros(shape, np.float32)
        return self._buf

    def _host_select(self, q: PreparedQuestion) -> np.ndarray:
        n = q.features.shape[0]
        if self.selector == "all":
            return select_indices("all", n, self.k, cap=self.k)
        return select_indices(self.selector, n, self.k, coords=q.coords, evidence=q.evidence,
                              seed=question_seed(q.item_id, self.seed))

    def __call__(self, questions: Sequence[PreparedQuestion]) -> list[str]:
        """Generated texts for ``questions`` (any number: split into padded batches of ``batch_size``)."""
        out: list[str] = []
        for start in range(0, len(questions), self.batch_size):
            out.extend(self._run_batch(list(questions[start:start + self.batch_size])))
        return out

    def _run_batch(self, qs: list[PreparedQuestion]) -> list[str]:
        real = len(qs)
        qs = qs + [qs[-1]] * (self.batch_size - real)  # pad the batch: one compiled shape
        ids, attn = self._prompt_ids([q.prompt for q in qs])
        put = functools.partial(jax.device_put, device=self.batch_sharding)
        rng = jax.random.key(self.seed)
        if self.selector == "learned":
            n = _bucket(max(q.features.shape[0] for q in qs), max(self.min_bag_bucket, self.k))
            d = qs[0].features.shape[1]
            feats = self._host_buffer((len(qs), n, d))
            mask = np.zeros((len(qs), n), bool)
            for i, q in enumerate(qs):
                feats[i, : q.features.shape[0]] = q.features
                mask[i, : q.features.shape[0]] = True
            tokens, lengths = _generate_learned(self.llm, self.projector, self.scorer, put(feats), put(mask), put(ids),
                                                put(attn), rng, k=self.k, image_id=self.image_id, sampling=self.sampling)
        else:
            sel_idx, valid = pad_selections([self._host_select(q) for q in qs], self.k)
            feats = np.stack([q.features[i] for q, i in zip(qs, sel_idx)]).astype(np.float32)
            tokens, lengths = _generate_selected(self.llm, self.projector, put(feats), put(valid), put(ids), put(attn),
                                                 rng, image_id=self.image_id, sampling=self.sampling)
        tokens, lengths = np.asarray(tokens), np.asarray(lengths)
        texts = self.tokenizer.batch_decode([t[:l] for t, l in zip(tokens, lengths)], skip_special_tokens=True)
        return [t.strip() for t in texts[:real]]


def build_tiny_predictor(feature_dim: int, *, selector: str = "learned", k: int = 8, batch_size: int = 8,
                         max_new_tokens: int = 8, seed: int = 0, weight_scale: float = 20.0,
                         devices=None) -> LLMSelectorPredictor:
    """A randomly initialised tiny LLM + random projector and scorer: real generation, no checkpoint.

    For tests, throughput benchmarks and dry runs of the evaluation pipeline (``sparsewsi eval
    --tiny``); its answers carry no information about the slide. The LLM's matrices are scaled by
    ``weight_scale``: at the default 0.02 init the logits are nearly uniform and every prompt
    decodes to the same repeated token, whereas scaled weights give replies that depend on the
    prompt and the selected features (what batching and selector tests need to see).
    """
    from flax import nnx

    from sparsewsi.llm import build_tiny_tokenizer, create_model, tiny_config

    tok = build_tiny_tokenizer()
    llm = create_model(tiny_config(vocab_size=len(tok)), seed=seed)
    params = nnx.state(llm, nnx.Param)
    nnx.update(llm, jax.tree.map(lambda x: x * weight_scale if x.ndim == 2 else x, params))
    rng = np.random.default_rng(seed)
    h = llm.config.hidden_size
    projector = rng.normal(0.0, 1.0 / np.sqrt(feature_dim), (feature_dim, h)).astype(np.float32)
    scorer = rng.normal(0.0, 1.0, (feature_dim,)).astype(np.float32)
    return LLMSelectorPredictor(llm, tok, projector, scorer, selector=selector, k=k, batch_size=batch_size,
                                max_new_tokens=max_new_tokens, seed=seed, name="tiny-random", devices=devices)


PredictorFn = Callable[[Sequence[PreparedQuestion]], list[str]]


class CheckpointPredictor:
    """Adapter from a trained model (``sparsewsi.model.SparseWSIPredictor``) to the evaluator's interface.

    Pads each batch's bags to a common length (a power of two >= k, so few shapes compile), passes
    coordinates for ``spatial``, evidence flags for ``oracle`` (when every bag of the batch has them)
    and per-question seeds for ``random``, and returns the decoded texts.

    Args:
      predictor: a ``sparsewsi.model.SparseWSIPredictor``.
      selector: ``learned`` or a baseline of ``sparsewsi.selection.baselines.SELECTORS``.
      batch_size: questions per compiled call.
      describe: what the results record about the model (checkpoint path, spec, ...).
    """

    def __init__(self, predictor, *, selector: str = "learned", batch_size: int = 8, seed: int = 0,
                 min_bag_bucket: int = 64, describe: dict | None = None):
        if selector not in SELECTORS:
            raise ValueError(f"unknown selector {selector!r}; choose from {', '.join(SELECTORS)}")
        self.predictor, self.selector, self.batch_size, self.seed = predictor, selector, int(batch_size), int(seed)
        self.min_bag_bucket = int(min_bag_bucket)
        self._describe = dict(describe or {})

    def describe(self) -> dict:
        k = self.predictor.all_tokens_cap if self.selector == "all" else self.predictor.k
        return {"name": "sparsewsi-checkpoint", **self._describe, "selector": self.selector, "k": int(k),
                "batch_size": self.batch_size, "seed": self.seed}

    def __call__(self, questions: Sequence[PreparedQuestion]) -> list[str]:
        out: list[str] = []
        for start in range(0, len(questions), self.batch_size):
            qs = list(questions[start:start + self.batch_size])
            real = len(qs)
            qs = qs + [qs[-1]] * (self.batch_size - real)
            n = _bucket(max(q.features.shape[0] for q in qs), max(self.min_bag_bucket, self.predictor.k))
            d = qs[0].features.shape[1]
            feats = np.zeros((len(qs), n, d), np.float32)
            mask = np.zeros((len(qs), n), bool)
            coords = np.zeros((len(qs), n, 2), np.int64) if all(q.coords is not None for q in qs) else None
            evidence = np.zeros((len(qs), n), bool) if all(q.evidence is not None for q in qs) else None
            for i, q in enumerate(qs):
                m = q.features.shape[0]
                feats[i, :m], mask[i, :m] = q.features, True
                if coords is not None:
                    coords[i, :m] = q.coords
                if evidence is not None:
                    evidence[i, :m] = q.evidence
            seeds = np.array([question_seed(q.item_id, self.seed) for q in qs], np.int64)
            pred = self.predictor.predict(feats, mask, [q.prompt for q in qs], selector=self.selector,
                                          coords=coords, seeds=seeds, seed=self.seed, evidence=evidence)
            out.extend(t.strip() for t in pred.texts[:real])
        return out
