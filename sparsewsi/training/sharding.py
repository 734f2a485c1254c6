"""Mesh from config, shardings of the train state and batches, and host -> global batch transfer."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from sparsewsi.llm import batch_sharding, make_mesh


def mesh_from_config(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> jax.sharding.Mesh:
    """A (data, fsdp, tensor) mesh over all devices; one axis may be -1 (= whatever is left)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {sizes}: at most one axis may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh {sizes}: {len(devices)} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh data x fsdp x tensor = {sizes} needs {int(np.prod(sizes))} devices; "
                         f"there are {len(devices)}")
    return make_mesh(*sizes, devices=np.asarray(devices).reshape(-1))


def opt_state_shardings(abstract_opt_state, param_sh: dict, mesh):
    """Optimizer-state leaves keyed by a parameter name (Adam moments) follow that parameter; others replicate."""
    replicated = NamedSharding(mesh, P())

    def pick(path, leaf):
        for k in reversed(path):
            name = getattr(k, "key", None)
            if isinstance(name, str) and name in param_sh:
                sh = param_sh[name]
                return sh if len(sh.spec) <= len(np.shape(leaf)) else replicated
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def batch_shardings(batch: dict, mesh, global_batch: int) -> dict:
    return {k: batch_sharding(mesh, np.ndim(v), global_batch) for k, v in batch.items()}


def to_global(batch: dict, shardings: dict) -> dict:
    """Process-local numpy batch -> global jax arrays (works for one or many processes)."""
    return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v)) for k, v in batch.items()}
