"""The decoder configuration, parsed from (and written back to) a Hugging Face ``config.json``.

Supported families: Qwen2 / Qwen2.5 (``model_type`` ``qwen2``: biases on q/k/v) and Llama
(``llama``: optional ``attention_bias`` on q/k/v/o, optional ``mlp_bias``). RoPE is read from either
layout: the old one (``rope_theta`` + ``rope_scaling``) or the transformers v5 one
(``rope_parameters``), with the ``default``, ``linear`` and ``llama3`` rope types.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax.numpy as jnp

SUPPORTED_MODEL_TYPES = ("qwen2", "llama")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or one of its options is not implemented by this decoder."""


@dataclasses.dataclass(frozen=True)
class LLMConfig:
    """Hyper-parameters of a Qwen2/Llama decoder (hashable, so it can be a static jit argument)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    model_type: str = "qwen2"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # Extra RoPE parameters as sorted (key, value) pairs, e.g. (("factor", 8.0), ("rope_type", "llama3"), ...).
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    qkv_bias: bool = True
    o_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    dtype: str = "float32"  # activations / compute
    param_dtype: str = "float32"  # stored weights

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {self.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"{name} {getattr(self, name)!r} is not one of {', '.join(_DTYPES)}")
        rope_type = dict(self.rope_scaling).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope_type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")

    @property
    def jnp_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def jnp_param_dtype(self):
        return _DTYPES[self.param_dtype]

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return tuple(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    def replace(self, **changes) -> "LLMConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ Hugging Face config.json
    @classmethod
    def from_hf_dict(cls, d: dict, *, source: str = "config", dtype: str | None = None,
                     param_dtype: str | None = None) -> "LLMConfig":
        """Parse a Hugging Face config dict; ``source`` names the file in error messages."""
        model_type = d.get("model_type")
        archs = d.get("architectures") or []
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"{source}: model_type {model_type!r} (architectures {archs}) is not supported; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        bad_archs = [a for a in archs if a != _ARCHITECTURES[model_type]]
        if bad_archs:
            raise UnsupportedModelError(
                f"{source}: architectures {bad_archs} are not supported for model_type {model_type!r}; "
                f"expected {_ARCHITECTURES[model_type]}")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"{source}: hidden_act {act!r} is not supported (only 'silu')")
        if d.get("use_sliding_window"):
            raise UnsupportedModelError(f"{source}: use_sliding_window=true is not supported")
        if d.get("pretraining_tp", 1) not in (1, None):
            raise UnsupportedModelError(f"{source}: pretraining_tp={d['pretraining_tp']} is not supported")
        try:
            heads = int(d["num_attention_heads"])
            hidden = int(d["hidden_size"])
            rope = dict(d.get("rope_parameters") or {})
            old_scaling = d.get("rope_scaling") or {}
            rope_theta = float(rope.pop("rope_theta", d.get("rope_theta", 10000.0)))
            if not rope:
                rope = dict(old_scaling)
            if "type" in rope and "rope_type" not in rope:  # the oldest layout says "type"
                rope["rope_type"] = rope.pop("type")
            if rope.get("rope_type", "default") == "default":
                rope = {}
            eos = d.get("eos_token_id")
            cfg = cls(
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_hidden_layers=int(d["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or hidden // heads),
                model_type=model_type,
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=tuple(sorted((k, v) for k, v in rope.items() if not isinstance(v, (list, dict)))),
                max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                qkv_bias=True if model_type == "qwen2" else bool(d.get("attention_bias", False)),
                o_bias=False if model_type == "qwen2" else bool(d.get("attention_bias", False)),
                mlp_bias=False if model_type == "qwen2" else bool(d.get("mlp_bias", False)),
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
                pad_token_id=d.get("pad_token_id"),
                dtype=dtype or "float32",
                param_dtype=param_dtype or dtype or "float32",
            )
        except KeyError as e:
            raise ValueError(f"{source}: required field {e.args[0]!r} is missing") from None
        except UnsupportedModelError as e:
            raise UnsupportedModelError(f"{source}: {e}") from None
        return cfg

    def to_hf_dict(self, base: dict | None = None) -> dict:
        """A Hugging Face config dict (transformers v5 layout); ``base`` keeps unrelated fields of the source."""
        d = dict(base or {})
        d.pop("rope_scaling", None)
        d.pop("rope_theta", None)
        d.pop("torch_dtype", None)
        d.update(
            architectures=[_ARCHITECTURES[self.model_type]],
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            hidden_act="silu",
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters={"rope_theta": self.rope_theta, "rope_type": "default", **dict(self.rope_scaling)},
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            pad_token_id=self.pad_token_id,
            dtype=self.param_dtype,
            use_cache=True,
        )
        if self.model_type == "llama":
            if self.qkv_bias != self.o_bias:
                raise ValueError("a Llama config has one attention_bias for q/k/v/o; qkv_bias and o_bias differ")
            d.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        else:
            d.setdefault("use_sliding_window", False)
        return d


def load_config(folder: str | pathlib.Path, *, dtype: str | None = None, param_dtype: str | None = None) -> LLMConfig:
    """Read ``folder/config.json`` into an :class:`LLMConfig` (clear errors for absent or bad files)."""
    path = pathlib.Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json in the checkpoint folder")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return LLMConfig.from_hf_dict(d, source=str(path), dtype=dtype, param_dtype=param_dtype)
