"""The pure train step and its sharded, donated, compiled-once jit wrapper.

``state = {"params": {name: array} (trained), "opt_state": ..., "step": int32 micro-step}``; the
frozen parameters travel as a separate flat dict that the step reads but never returns, so they stay
bit-identical by construction and get no gradient computation of their own.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import optax

from sparsewsi.model.params import ParamSplit

log = logging.getLogger(__name__)


def make_train_step(split: ParamSplit, tx: optax.GradientTransformation, schedule, *, seed: int,
                    accumulate_steps: int = 1):
    """A pure ``train_step(state, frozen, batch) -> (state, metrics)``.

    The noise of the VP gate is drawn from ``fold_in(key(seed), micro_step)``: the same step always
    sees the same noise, so a resumed run continues exactly. The temperature follows the optimizer
    step (micro-step // accumulate_steps).
    """

    def loss_fn(params, frozen, batch, opt_step, key):
        model = split.merge(params, frozen)
        return model.training_loss(batch, opt_step, key)

    def train_step(state, frozen, batch):
        step = state["step"]
        opt_step = step // accumulate_steps
        key = jax.random.fold_in(jax.random.key(seed), step)
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], frozen, batch, opt_step, key)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(opt_step), **aux}
        return {"params": params, "opt_state": opt_state, "step": step + 1}, metrics

    return train_step


def init_state(params: dict, tx: optax.GradientTransformation) -> dict:
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}


def memory_report(compiled) -> str:
    """A one-line summary of a compiled program's memory analysis (where the backend provides one)."""
    try:
        m = compiled.memory_analysis()
    except Exception as e:  # some backends do not implement it
        return f"memory analysis unavailable: {e}"
    if m is None:
        return "memory analysis unavailable on this backend"
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
              "generated_code_size_in_bytes")
    return ", ".join(f"{f.replace('_size_in_bytes', '')}={getattr(m, f, 0) / 2**20:.1f} MiB" for f in fields)
