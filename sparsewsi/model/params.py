"""Parameters as flat ``{dotted name: array}`` dicts: the currency of optimizers, shardings and checkpoints.

Names are the NNX state paths joined by dots, e.g. ``scorer.backbone.fc1.kernel`` or
``llm.model.layers.0.self_attn.q_proj.lora.a``; regexes over them decide what trains, at which
learning rate, and how it is sharded.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from sparsewsi.llm import DEFAULT_RULES, partition_spec
from sparsewsi.llm.sharding import path_name

# The LLM's rules, re-rooted under ``llm.``; new modules (scorer, denoiser, projector) are small: replicated.
MODEL_RULES = tuple((p if p.startswith(".*") else r"llm\." + p, spec) for p, spec in DEFAULT_RULES)


class ParamSplit:
    """A model split into trainable and frozen parameter groups, with names <-> paths.

    ``trains``: regexes (full match over dotted names; a Param matching any of them trains) or a
    predicate ``name -> bool``. Everything else (frozen Params and non-Param state) is carried unchanged.
    """

    def __init__(self, model: nnx.Module, trains: Sequence[str] | Callable[[str], bool]):
        if callable(trains):
            predicate = trains
        else:
            compiled = [re.compile(p) for p in trains]
            predicate = lambda name: any(c.fullmatch(name) for c in compiled)  # noqa: E731

        def selected(path, value) -> bool:
            return isinstance(value, nnx.Param) and bool(predicate(path_name(path)))

        self.graphdef, trainable, frozen = nnx.split(model, selected, ...)
        self._train_paths = {path_name(p): tuple(p) for p, _ in nnx.to_flat_state(trainable)}
        self._frozen_paths = {path_name(p): tuple(p) for p, _ in nnx.to_flat_state(frozen)}
        if not self._train_paths:
            raise ValueError("no parameter is trainable under the given rules; "
                             f"names look like {sorted(self._frozen_paths)[:5]}")
        self.trainable = {n: v[...] for n, v in _named(trainable)}
        self.frozen = {n: v[...] for n, v in _named(frozen)}

    def merge(self, trainable: dict, frozen: dict) -> nnx.Module:
        """A model from flat dicts (traceable: use inside jit)."""
        flat = [(self._train_paths[n], v) for n, v in trainable.items()]
        flat += [(self._frozen_paths[n], v) for n, v in frozen.items()]
        return nnx.merge(self.graphdef, nnx.from_flat_state(flat))


def _named(state):
    return [(path_name(p), v) for p, v in nnx.to_flat_state(state)]


def flat_params(model: nnx.Module, filter=nnx.Param) -> dict[str, jax.Array]:
    """``{dotted name: array}`` of the model's variables matching ``filter``."""
    return {n: v[...] for n, v in _named(nnx.state(model, filter))}


def assign_params(model: nnx.Module, params: dict[str, np.ndarray], *, strict: bool = True) -> None:
    """Write arrays into the model's variables by dotted name (in place); checks names and shapes."""
    state = nnx.state(model)
    flat = {path_name(p): v for p, v in nnx.to_flat_state(state)}
    unknown = sorted(set(params) - set(flat))
    if unknown:
        raise KeyError(f"{len(unknown)} parameters are not in the model, e.g. {unknown[:5]}")
    for name, value in params.items():
        var = flat[name]
        if tuple(np.shape(value)) != tuple(var[...].shape):
            raise ValueError(f"parameter {name}: shape {np.shape(value)} does not match the model's {var[...].shape}")
        var[...] = jax.numpy.asarray(value, var[...].dtype)


def param_shardings(params: dict, mesh, rules=MODEL_RULES) -> dict[str, NamedSharding]:
    """A NamedSharding per flat parameter from the regex rules."""
    return {n: NamedSharding(mesh, partition_spec(n, np.shape(v), mesh, rules)) for n, v in params.items()}


def shard_params(model: nnx.Module, mesh, rules=MODEL_RULES) -> None:
    """Move every variable of the model onto the mesh following the rules (in place)."""
    state = nnx.state(model)
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        name = path_name(path)
        spec = partition_spec(name, np.shape(var[...]), mesh, rules)
        var[...] = jax.device_put(var[...], NamedSharding(mesh, spec))
