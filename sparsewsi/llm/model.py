"""An NNX decoder for the Qwen2 / Qwen2.5 and Llama families whose parameter paths mirror Hugging Face.

``CausalLM`` holds ``model.embed_tokens``, ``model.layers[i].self_attn.{q,k,v,o}_proj``,
``model.layers[i].mlp.{gate,up,down}_proj``, ``model.layers[i].{input,post_attention}_layernorm``,
``model.norm`` and (untied only) ``lm_head``: the Hugging Face module tree, so import and export are
a rename plus a transpose (our kernels are ``[in, out]``; PyTorch weights are ``[out, in]``).

Shapes: B batch, T query tokens, S key slots (T without a cache, the cache length with one),
H hidden size, V vocabulary, nH / nKV query / key-value heads, d head dim.

Masks and positions: ``attention_mask`` marks real tokens (1) and padding (0) over the *keys*:
``[B, T]`` without a cache, ``[B, S]`` over the whole cache with one. Padding may sit anywhere
(left or right); positions default to ``cumsum(mask) - 1``, which is what Hugging Face uses for
left-padded batches, so a padded row gives the same logits as the unpadded sequence.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsewsi.llm.config import LLMConfig

Array = jax.Array
KVCache = tuple  # tuple over layers of (k [B, S, nKV, d], v [B, S, nKV, d])


def rope_inv_freq(config: LLMConfig) -> np.ndarray:
    """Rotary inverse frequencies [d / 2] in float32, for the default, linear and llama3 rope types."""
    d = config.head_dim
    inv_freq = (1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))).astype(np.float32)
    params = dict(config.rope_scaling)
    rope_type = params.get("rope_type", "default")
    if rope_type == "linear":
        inv_freq = inv_freq / np.float32(params["factor"])
    elif rope_type == "llama3":
        factor = float(params["factor"])
        low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old_ctx = float(params["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_ctx / high) & ~(wavelen > old_ctx / low)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rope_cos_sin(config: LLMConfig, position_ids: Array, dtype) -> tuple[Array, Array]:
    """position_ids [B, T] -> (cos, sin) [B, T, d], computed in float32 like Hugging Face."""
    inv_freq = jnp.asarray(rope_inv_freq(config))
    freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def _rotate_half(x: Array) -> Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """x [B, T, heads, d], cos/sin [B, T, d] -> rotated x (the non-interleaved 'rotate half' layout)."""
    return x * cos[:, :, None, :] + _rotate_half(x) * sin[:, :, None, :]


class Linear(nnx.Module):
    """y = x @ kernel + bias (+ a LoRA update when an adapter is attached). kernel [in, out]."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool, dtype, param_dtype, rngs: nnx.Rngs,
                 std: float = 0.02):
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype
        self.kernel = nnx.Param(std * jax.random.normal(rngs.params(), (in_features, out_features), param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else nnx.data(None)
        self.lora = nnx.data(None)  # a sparsewsi.llm.lora.LoRA adapter, attached by apply_lora

    def __call__(self, x: Array) -> Array:
        x = x.astype(self.dtype)
        y = jnp.dot(x, self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora is not None:
            y = y + self.lora(x).astype(self.dtype)
        return y


class Embedding(nnx.Module):
    """The token-embedding table ``embedding [V, H]`` (Hugging Face ``embed_tokens.weight``)."""

    def __init__(self, num_embeddings: int, features: int, *, dtype, param_dtype, rngs: nnx.Rngs, std: float = 0.02):
        self.dtype = dtype
        self.embedding = nnx.Param(std * jax.random.normal(rngs.params(), (num_embeddings, features), param_dtype))

    def __call__(self, ids: Array) -> Array:
        """ids [B, T] int -> embeddings [B, T, H]."""
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def attend(self, h: Array) -> Array:
        """Tied output head: h [B, T, H] -> logits [B, T, V]."""
        return jnp.dot(h.astype(self.dtype), self.embedding[...].astype(self.dtype).T)


class RMSNorm(nnx.Module):
    """weight * x / rms(x), normalised in float32 and cast back before the scale (as Hugging Face does)."""

    def __init__(self, features: int, eps: float, *, param_dtype):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((features,), param_dtype))

    def __call__(self, x: Array) -> Array:
        dtype = x.dtype
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(dtype) * xf.astype(dtype)


class Attention(nnx.Module):
    """Grouped-query self-attention with rotary embeddings and an optional KV cache."""

    def __init__(self, config: LLMConfig, *, rngs: nnx.Rngs):
        c = config
        kw = dict(dtype=c.jnp_dtype, param_dtype=c.jnp_param_dtype, rngs=rngs)
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = Linear(c.hidden_size, c.num_attention_heads * c.head_dim, use_bias=c.qkv_bias, **kw)
        self.k_proj = Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, use_bias=c.qkv_bias, **kw)
        self.v_proj = Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, use_bias=c.qkv_bias, **kw)
        self.o_proj = Linear(c.num_attention_heads * c.head_dim, c.hidden_size, use_bias=c.o_bias, **kw)

    def __call__(self, x: Array, cos: Array, sin: Array, mask: Array, cache=None, cache_index=None):
        """x [B, T, H], cos/sin [B, T, d], mask [B, T, S] bool (True = may attend).

        With ``cache = (k, v)`` ([B, S, nKV, d] each) the new keys/values are written at slot
        ``cache_index`` and attention runs over all S slots. Returns (y [B, T, H], new cache or None).
        """
        b, t, _ = x.shape
        g = self.num_heads // self.num_kv_heads
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        new_cache = None
        if cache is not None:
            k_cache, v_cache = cache
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, cache_index, 0, 0))
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, cache_index, 0, 0))
            new_cache = (k, v)
        q = q.reshape(b, t, self.num_kv_heads, g, self.head_dim)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(q.dtype), preferred_element_type=jnp.float32)
        scores = scores * (self.head_dim ** -0.5)
        # A finite minimum (not -inf) keeps fully padded query rows finite instead of NaN.
        scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
        y = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(q.dtype)).reshape(b, t, self.num_heads * self.head_dim)
        return self.o_proj(y), new_cache


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LLMConfig, *, rngs: nnx.Rngs):
        c = config
        kw = dict(use_bias=c.mlp_bias, dtype=c.jnp_dtype, param_dtype=c.jnp_param_dtype, rngs=rngs)
        self.gate_proj = Linear(c.hidden_size, c.intermediate_size, **kw)
        self.up_proj = Linear(c.hidden_size, c.intermediate_size, **kw)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, **kw)

    def __call__(self, x: Array) -> Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, config: LLMConfig, *, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=config.jnp_param_dtype)
        self.self_attn = Attention(config, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps,
                                                param_dtype=config.jnp_param_dtype)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x, cos, sin, mask, cache=None, cache_index=None):
        h, new_cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_index)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, new_cache


class DecoderModel(nnx.Module):
    """The Hugging Face ``model`` submodule: embeddings, decoder layers and the final norm."""

    def __init__(self, config: LLMConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype=config.jnp_dtype,
                                      param_dtype=config.jnp_param_dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(config, rngs=rngs) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=config.jnp_param_dtype)

    def __call__(self, inputs_embeds: Array, attention_mask: Array | None = None, position_ids: Array | None = None,
                 cache: KVCache | None = None, cache_index: Array | int | None = None):
        """inputs_embeds [B, T, H] -> (normed hidden states [B, T, H], new cache or None)."""
        c = self.config
        b, t, _ = inputs_embeds.shape
        s = t if cache is None else cache[0][0].shape[1]
        if cache is not None and cache_index is None:
            raise ValueError("a KV cache needs cache_index (the slot of the first new token)")
        start = 0 if cache is None else cache_index
        if attention_mask is None:
            attention_mask = jnp.ones((b, s), jnp.int32)
        if attention_mask.shape != (b, s):
            raise ValueError(f"attention_mask has shape {attention_mask.shape}; expected {(b, s)} "
                             f"({'the cache length' if cache is not None else 'the input length'} over keys)")
        key_valid = attention_mask.astype(bool)
        if position_ids is None:
            all_pos = jnp.maximum(jnp.cumsum(key_valid.astype(jnp.int32), axis=-1) - 1, 0)
            position_ids = jax.lax.dynamic_slice_in_dim(all_pos, start, t, axis=1) if cache is not None else all_pos
        q_slot = start + jnp.arange(t)
        causal = q_slot[:, None] >= jnp.arange(s)[None, :]  # [T, S]
        mask = causal[None] & key_valid[:, None, :]  # [B, T, S]
        cos, sin = rope_cos_sin(c, position_ids, c.jnp_dtype)
        x = inputs_embeds.astype(c.jnp_dtype)
        new_cache = []
        for i, layer in enumerate(self.layers):
            x, layer_cache = layer(x, cos, sin, mask, None if cache is None else cache[i], start)
            new_cache.append(layer_cache)
        return self.norm(x), (tuple(new_cache) if cache is not None else None)


class CausalLM(nnx.Module):
    """Qwen2ForCausalLM / LlamaForCausalLM in NNX.

    ``model(input_ids)`` or ``model(inputs_embeds=...)`` returns float32 logits ``[B, T, V]``; with a
    ``cache`` it returns ``(logits, new_cache)``. ``model.embed_tokens`` is the token table, so callers
    can embed text, splice other embeddings (e.g. visual tokens) in, and pass ``inputs_embeds``.
    """

    def __init__(self, config: LLMConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.model = DecoderModel(config, rngs=rngs)
        if config.tie_word_embeddings:
            self.lm_head = nnx.data(None)
        else:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, use_bias=False, dtype=config.jnp_dtype,
                                  param_dtype=config.jnp_param_dtype, rngs=rngs)

    @property
    def embed_tokens(self) -> Embedding:
        return self.model.embed_tokens

    def logits(self, hidden: Array) -> Array:
        """hidden [..., H] (after the final norm) -> float32 logits [..., V]."""
        out = self.model.embed_tokens.attend(hidden) if self.lm_head is None else self.lm_head(hidden)
        return out.astype(jnp.float32)

    def hidden_states(self, input_ids: Array | None = None, *, inputs_embeds: Array | None = None,
                      attention_mask: Array | None = None, position_ids: Array | None = None,
                      cache: KVCache | None = None, cache_index=None):
        """As ``__call__`` but returns the final normed hidden states [B, T, H] instead of logits."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids [B, T] or inputs_embeds [B, T, H]")
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)
        return self.model(inputs_embeds, attention_mask, position_ids, cache, cache_index)

    def __call__(self, input_ids: Array | None = None, *, inputs_embeds: Array | None = None,
                 attention_mask: Array | None = None, position_ids: Array | None = None,
                 cache: KVCache | None = None, cache_index=None):
        h, new_cache = self.hidden_states(input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                          position_ids=position_ids, cache=cache, cache_index=cache_index)
        logits = self.logits(h)
        return logits if cache is None else (logits, new_cache)


def init_cache(config: LLMConfig, batch: int, length: int, dtype=None) -> KVCache:
    """An empty KV cache: per layer (k, v) zeros [B, S, nKV, d] in the compute dtype."""
    dtype = dtype or config.jnp_dtype
    shape = (batch, length, config.num_key_value_heads, config.head_dim)
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.num_hidden_layers))


def create_model(config: LLMConfig, seed: int = 0) -> CausalLM:
    """A randomly initialised model (normal(0, 0.02) kernels, unit norms, zero biases)."""
    return CausalLM(config, rngs=nnx.Rngs(seed))


def abstract_model(config: LLMConfig) -> CausalLM:
    """The model's structure with ``jax.ShapeDtypeStruct`` leaves: nothing is allocated."""
    return nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0)))
