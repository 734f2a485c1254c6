"""Partition specs for the decoder's parameters and activations, as data (regex -> spec).

Mesh axes: ``data`` and ``fsdp`` split the batch; ``fsdp`` also splits every large weight along its
hidden-size dimension (ZeRO-3 style) and ``tensor`` splits heads / intermediate features / vocabulary
(Megatron style: column-parallel q/k/v/gate/up, row-parallel o/down). A mesh may hold any subset of
these names; an axis that the mesh lacks, or whose size does not divide the dimension, is dropped for
that tensor (it is replicated along it), so one rule set serves every model size and mesh.

Paths are the dotted Hugging Face-style names of the NNX state (``model.layers.0.self_attn.q_proj.kernel``).
"""

from __future__ import annotations

import re
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

Rules = Sequence[tuple[str, tuple]]

DEFAULT_RULES: Rules = (
    (r".*embed_tokens\.embedding", ("tensor", "fsdp")),  # [V, H]
    (r".*(q_proj|k_proj|v_proj|gate_proj|up_proj)\.kernel", ("fsdp", "tensor")),  # [H, out]
    (r".*(q_proj|k_proj|v_proj|gate_proj|up_proj)\.bias", ("tensor",)),
    (r".*(o_proj|down_proj)\.kernel", ("tensor", "fsdp")),  # [in, H]
    (r"lm_head\.kernel", ("fsdp", "tensor")),  # [H, V]
    (r".*\.lora\.a", ("fsdp", None)),  # [in, r]
    (r".*\.lora\.b", (None, "tensor")),  # [r, out]
    (r".*", ()),  # norms, o/down biases, scalars: replicated
)
BATCH_AXES = ("data", "fsdp")


def path_name(path: Sequence) -> str:
    """An NNX state path (tuple of names / indices / pytree keys) -> dotted name."""
    parts = []
    for k in path:
        k = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
        if k == "value":  # the trailing attribute of a Variable leaf
            continue
        parts.append(str(k))
    return ".".join(parts)


def partition_spec(name: str, shape: Sequence[int], mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES) -> P:
    """The first rule whose regex fully matches ``name``, restricted to axes the mesh has and that divide."""
    for pattern, spec in rules:
        if re.fullmatch(pattern, name):
            break
    else:
        raise ValueError(f"no sharding rule matches parameter {name!r}; end the rules with ('.*', ())")
    if len(spec) > len(shape):
        raise ValueError(f"sharding rule {pattern!r} gives {len(spec)} axes for {name!r} of rank {len(shape)}")
    out = []
    for dim, axis in zip(shape, spec):
        axes = (axis,) if isinstance(axis, str) else tuple(axis or ())
        axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)
        size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        out.append(None if not axes or dim % size else (axes[0] if len(axes) == 1 else axes))
    return P(*out)


def state_shardings(state: nnx.State, mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES):
    """A pytree like ``state`` (e.g. ``nnx.state(model)``) with a NamedSharding at every leaf."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, partition_spec(path_name(path), np.shape(x), mesh, rules)), state)


def shard_model(model: nnx.Module, mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES) -> nnx.Module:
    """Move an in-memory model's parameters onto ``mesh`` (for models built in memory; large checkpoints
    should use ``load_hf(..., mesh=mesh)``, which never gathers a whole tensor on one device)."""
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, state_shardings(state, mesh, rules))
    return nnx.merge(graphdef, state)


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int, batch_size: int | None = None) -> NamedSharding:
    """Shard dimension 0 of an activation over the batch axes the mesh has (replicated if they don't divide)."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.shape and mesh.shape[a] > 1)
    size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    if not axes or (batch_size is not None and batch_size % size):
        return NamedSharding(mesh, P())
    return NamedSharding(mesh, P(axes if len(axes) > 1 else axes[0], *([None] * (ndim - 1))))


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices=None) -> jax.sharding.Mesh:
    """A (data, fsdp, tensor) mesh with Auto axis types (the compiler places the activations)."""
    kwargs = {} if devices is None else {"devices": devices}
    return jax.make_mesh((data, fsdp, tensor), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3, **kwargs)
