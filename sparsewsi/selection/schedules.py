"""Temperature schedule for the Soft Top-K."""

from __future__ import annotations

import jax.numpy as jnp


def cosine_temperature(step, start: float = 2.0, end: float = 0.1, num_steps: int = 2000):
    """Cosine annealing of tau from ``start`` to ``end`` over ``num_steps``, constant afterwards.

    ``step`` may be a Python int or a traced scalar; returns a float32 scalar.
    """
    if num_steps <= 0:
        raise ValueError(f"cosine_temperature: num_steps must be positive, got {num_steps}")
    if start <= 0 or end <= 0:
        raise ValueError(f"cosine_temperature: temperatures must be positive, got start={start}, end={end}")
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / num_steps, 0.0, 1.0)
    return jnp.asarray(end, jnp.float32) + 0.5 * (start - end) * (1.0 + jnp.cos(jnp.pi * frac))
