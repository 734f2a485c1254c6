"""Generation with a KV cache: one jit-compiled prefill + ``lax.while_loop`` decode, greedy or sampled.

``generate_tokens`` is a pure, traceable function of (model, inputs_embeds, attention_mask, rng): a
caller can call it inside its own ``jax.jit`` (e.g. token selection + projector + splice + prefill +
decode fused in one program). ``generate`` is the jitted entry point for token ids or embeddings,
and ``generate_text`` adds the tokenizer (chat template, left padding, decoding).

Padding may be left or right: the cache keeps the prompt's slots as given, generated tokens go to
the slots after the prompt, and each row's positions continue from its own count of real tokens.
Rows stop at their first stop token (which is kept in the output); later slots hold ``pad_token_id``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparsewsi.llm.model import CausalLM, init_cache

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Static generation settings (hashable: part of the compiled program)."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 -> greedy (argmax)
    top_p: float = 1.0  # nucleus sampling mass; 1 keeps the whole distribution
    stop_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_token(logits: Array, rng: Array, sampling: SamplingConfig) -> Array:
    """logits [B, V] -> token ids [B]: argmax at temperature 0, else temperature + top-p sampling."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / sampling.temperature
    if sampling.top_p < 1:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the top token always survives).
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = mass_before < sampling.top_p
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits >= threshold, logits, -jnp.inf)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def generate_tokens(model: CausalLM, inputs_embeds: Array, attention_mask: Array, rng: Array,
                    sampling: SamplingConfig) -> tuple[Array, Array]:
    """Prefill on ``inputs_embeds [B, T, H]`` (mask [B, T]) and decode up to ``max_new_tokens``.

    Traceable (no jit inside). Returns (tokens [B, N] int32 padded with ``pad_token_id``,
    lengths [B] int32 = generated tokens per row including the stop token).
    """
    b, t, _ = inputs_embeds.shape
    n = sampling.max_new_tokens
    stop = jnp.asarray(sampling.stop_token_ids or (-1,), jnp.int32)
    mask = attention_mask.astype(jnp.int32)
    kv_mask = jnp.concatenate([mask, jnp.zeros((b, n), jnp.int32)], axis=1)
    cache = init_cache(model.config, b, t + n)
    h, cache = model.hidden_states(inputs_embeds=inputs_embeds, attention_mask=kv_mask, cache=cache, cache_index=0)
    # The last real prompt token of each row (padding may sit on either side).
    last = t - 1 - jnp.argmax(mask[:, ::-1], axis=1)
    logits = model.logits(h[jnp.arange(b), last])
    rng, key = jax.random.split(rng)
    tok = sample_token(logits, key, sampling)
    tokens = jnp.full((b, n), sampling.pad_token_id, jnp.int32).at[:, 0].set(tok)
    done = jnp.isin(tok, stop)
    lengths = jnp.ones((b,), jnp.int32)
    pos = jnp.sum(mask, axis=1)  # position of the token being fed next

    def cond(carry):
        i, *_, done = carry
        return (i < n) & ~jnp.all(done)

    def body(carry):
        i, tok, cache, kv_mask, tokens, lengths, pos, rng, done = carry
        slot = t + i - 1
        kv_mask = jax.lax.dynamic_update_slice(kv_mask, jnp.ones((b, 1), jnp.int32), (0, slot))
        h, cache = model.hidden_states(tok[:, None], attention_mask=kv_mask, position_ids=pos[:, None],
                                       cache=cache, cache_index=slot)
        rng, key = jax.random.split(rng)
        new = sample_token(model.logits(h[:, 0]), key, sampling)
        new = jnp.where(done, sampling.pad_token_id, new)
        tokens = jax.lax.dynamic_update_slice(tokens, new[:, None], (0, i))
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(new, stop)
        return i + 1, new, cache, kv_mask, tokens, lengths, pos + 1, rng, done

    carry = (jnp.int32(1), tok, cache, kv_mask, tokens, lengths, pos, rng, done)
    carry = jax.lax.while_loop(cond, body, carry)
    return carry[4], carry[5]


@functools.partial(jax.jit, static_argnames=("sampling",))
def _generate_jit(model, input_ids, inputs_embeds, attention_mask, rng, sampling):
    if inputs_embeds is None:
        inputs_embeds = model.embed_tokens(input_ids)
    return generate_tokens(model, inputs_embeds, attention_mask, rng, sampling)


def generate(model: CausalLM, input_ids=None, *, inputs_embeds=None, attention_mask=None,
             max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
             stop_token_ids: Sequence[int] | None = None, pad_token_id: int | None = None,
             seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Jit-compiled generation from token ids [B, T] or embeddings [B, T, H] (+ mask [B, T]).

    Returns numpy (tokens [B, max_new_tokens], lengths [B]). Stop tokens default to the config's
    ``eos_token_id``; the pad token defaults to the config's ``pad_token_id`` (else the first stop token, else 0).
    """
    cfg = model.config
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids [B, T] or inputs_embeds [B, T, H]")
    ref = input_ids if input_ids is not None else inputs_embeds
    if attention_mask is None:
        attention_mask = jnp.ones(ref.shape[:2], jnp.int32)
    stops = tuple(int(s) for s in (cfg.eos_token_ids if stop_token_ids is None else stop_token_ids))
    if pad_token_id is None:
        pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else (stops[0] if stops else 0)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=float(temperature), top_p=float(top_p),
                              stop_token_ids=stops, pad_token_id=int(pad_token_id))
    tokens, lengths = _generate_jit(model, None if input_ids is None else jnp.asarray(input_ids, jnp.int32),
                                    inputs_embeds, jnp.asarray(attention_mask, jnp.int32),
                                    jax.random.key(seed), sampling)
    return np.asarray(tokens), np.asarray(lengths)


def generate_text(model: CausalLM, tokenizer, prompts: Sequence[str] | Sequence[Sequence[dict]], *,
                  chat: bool = True, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                  seed: int = 0, pad_to_multiple_of: int = 16) -> tuple[np.ndarray, list[str]]:
    """Generate replies to plain strings or chat message lists; returns (token ids [B, N], texts).

    With ``chat`` the tokenizer's chat template wraps each prompt (a string becomes one user message)
    and adds the assistant header. Prompts are left-padded to a multiple of ``pad_to_multiple_of`` so
    different prompt lengths reuse the compiled program. Stop tokens: the tokenizer's eos, ``<|im_end|>``
    when the vocabulary has it, and the config's eos ids.
    """
    texts = []
    for p in prompts:
        if chat:
            messages = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
            texts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        else:
            if not isinstance(p, str):
                raise ValueError("chat=False needs plain string prompts")
            texts.append(p)
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(texts, padding=True, pad_to_multiple_of=pad_to_multiple_of, return_tensors="np",
                        add_special_tokens=False)
    finally:
        tokenizer.padding_side = old_side
    tokens, _ = generate(model, enc["input_ids"], attention_mask=enc["attention_mask"],
                         max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                         stop_token_ids=stop_token_ids(tokenizer, model.config),
                         pad_token_id=tokenizer.pad_token_id, seed=seed)
    return tokens, tokenizer.batch_decode(tokens, skip_special_tokens=True)


def stop_token_ids(tokenizer, config=None) -> tuple[int, ...]:
    """The ids generation should stop at: tokenizer eos, ``<|im_end|>`` if known, config eos ids."""
    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if im_end is not None and im_end != tokenizer.unk_token_id:
        ids.append(im_end)
    if config is not None:
        ids.extend(config.eos_token_ids)
    return tuple(dict.fromkeys(int(i) for i in ids))
