"""LoRA adapters on the decoder's projections, trainable-parameter masks, and merging for export.

``apply_lora(model, LoRAConfig(rank=8, alpha=16, target_modules=r".*\\.(q_proj|v_proj)"))`` attaches
``y += dropout(x) @ a @ b * alpha / rank`` to every ``Linear`` whose dotted path (the Hugging Face
module name, e.g. ``model.layers.3.self_attn.q_proj``) fully matches the regex. ``b`` starts at zero,
so the adapted model starts equal to the base model.

What trains is decided by regexes over dotted parameter paths (``...q_proj.lora.a``), as data:

* ``trainable_filter(patterns)``: an NNX filter for ``nnx.Optimizer(model, tx, wrt=...)`` / ``nnx.grad``;
* ``freeze_except(tx, patterns)``: an optax transformation that zeroes the updates of every other
  parameter (``optax.masked`` alone would pass their raw gradients through unchanged);
* ``trainable_mask(state, patterns)``: the boolean pytree itself.

``merge_lora(model)`` folds the adapters into the kernels (in place); export merges on the fly.
Adapters are created on the default device: call ``sharding.shard_model`` afterwards on a mesh.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sparsewsi.llm.model import Linear
from sparsewsi.llm.sharding import path_name

LORA_PATTERNS = (r".*\.lora\..*",)


class LoRAParam(nnx.Param):
    """A LoRA adapter weight (so ``wrt=LoRAParam`` selects exactly the adapters)."""


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # Regex over dotted module paths (fully matched); the default adapts every attention and MLP projection.
    target_modules: str = r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    seed: int = 0


class LoRA(nnx.Module):
    """x [..., in] -> dropout(x) @ a [in, r] @ b [r, out] * scale."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float, *,
                 param_dtype, rngs: nnx.Rngs):
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        bound = 1.0 / math.sqrt(in_features)  # PEFT's kaiming_uniform(a=sqrt(5)) bound for A
        self.a = LoRAParam(jax.random.uniform(rngs.params(), (in_features, rank), param_dtype, -bound, bound))
        self.b = LoRAParam(jnp.zeros((rank, out_features), param_dtype))
        self.scale = alpha / rank
        # Deterministic until the trainer calls model.train(); inference never drops.
        self.dropout = (nnx.Dropout(dropout, deterministic=True, rngs=rngs) if dropout > 0 else nnx.data(None))

    def __call__(self, x):
        if self.dropout is not None:
            x = self.dropout(x)
        return jnp.dot(jnp.dot(x, self.a[...].astype(x.dtype)), self.b[...].astype(x.dtype)) * self.scale

    def delta(self) -> jax.Array:
        """The kernel update a @ b * scale [in, out], in float32."""
        return jnp.dot(self.a[...].astype(jnp.float32), self.b[...].astype(jnp.float32)) * self.scale


def lora_targets(model: nnx.Module, target_modules: str) -> list[tuple[str, Linear]]:
    """(dotted path, Linear) of every projection whose path fully matches ``target_modules``."""
    return [(path_name(p), node) for p, node in nnx.iter_graph(model)
            if isinstance(node, Linear) and re.fullmatch(target_modules, path_name(p))]


def apply_lora(model: nnx.Module, config: LoRAConfig = LoRAConfig()) -> nnx.Module:
    """Attach LoRA adapters (in place) and return the model. Raises if nothing matches or adapters exist."""
    targets = lora_targets(model, config.target_modules)
    if not targets:
        names = [path_name(p) for p, n in nnx.iter_graph(model) if isinstance(n, Linear)][:6]
        raise ValueError(f"LoRA target_modules {config.target_modules!r} matches no projection; "
                         f"paths look like {names}")
    adapted = [name for name, lin in targets if lin.lora is not None]
    if adapted:
        raise ValueError(f"{adapted[0]} (and {len(adapted) - 1} more) already has a LoRA adapter; "
                         "merge_lora first to stack another")
    key = jax.random.key(config.seed)
    for i, (name, lin) in enumerate(targets):
        # One Rngs per adapter: no random state is shared between modules.
        rngs = nnx.Rngs(params=jax.random.fold_in(key, 2 * i), dropout=jax.random.fold_in(key, 2 * i + 1))
        lin.lora = LoRA(lin.in_features, lin.out_features, config.rank, config.alpha, config.dropout,
                        param_dtype=lin.kernel[...].dtype, rngs=rngs)
    return model


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Fold every adapter into its kernel (kernel += a @ b * scale) and remove it, in place."""
    for _, lin in nnx.iter_graph(model):
        if isinstance(lin, Linear) and lin.lora is not None:
            k = lin.kernel[...]
            lin.kernel[...] = (k.astype(jnp.float32) + lin.lora.delta()).astype(k.dtype)
            lin.lora = None
    return model


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(re.fullmatch(p, name) for p in patterns)


def trainable_filter(patterns: Sequence[str] = LORA_PATTERNS):
    """An NNX filter: Params whose dotted path fully matches one of ``patterns``."""
    patterns = tuple(patterns)
    return nnx.All(nnx.Param, lambda path, _: _matches(path_name(path), patterns))


def trainable_mask(params, patterns: Sequence[str] = LORA_PATTERNS):
    """A boolean pytree shaped like ``params`` (an NNX state or its pure dict): True where it trains."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _matches(path_name(path), patterns), params)


def freeze_except(tx: optax.GradientTransformation, patterns: Sequence[str] = LORA_PATTERNS):
    """``tx`` on the parameters matching ``patterns``; zero updates (and no optimizer state) elsewhere."""
    labels = lambda params: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda path, _: "train" if _matches(path_name(path), patterns) else "freeze", params)
    return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
