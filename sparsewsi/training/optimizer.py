"""Optimizer from config data: regex parameter groups (frozen or a learning-rate scale), AdamW,
warm-up + cosine schedule, global-norm clipping and gradient accumulation.

``param_groups`` is an ordered list of ``(regex, scale)``; the FIRST rule whose regex fully matches a
dotted parameter name decides: ``None`` freezes it (it never enters the optimizer or the gradient),
a float multiplies the base learning-rate schedule. E.g. stage 1::

    [("llm\\..*", None), (".*", 1.0)]                         # train scorer/denoiser/projector only

stage 2 with LoRA::

    [(".*\\.lora\\..*", 1.0), ("llm\\..*", None), (".*", 1.0)]

A rule may carry a third entry, the optimizer step from which its group learns (its learning rate is 0
before it; Adam's moments still gather). E.g. hold an aligned reader still while a new scorer finds
what it reads, then fine-tune it gently::

    [("llm\\..*", 0.1, 100), (".*", 1.0)]
"""

from __future__ import annotations

import re
from typing import Sequence

import optax


def rule_of(name: str, rules: Sequence[tuple]) -> tuple[float | None, int]:
    """(learning-rate scale or None = frozen, start step) of a parameter: the first rule whose regex fully
    matches ``name``; raises if no rule matches or the matching rule is malformed."""
    for rule in rules:
        if len(rule) not in (2, 3):
            raise ValueError(f"param_groups rule {tuple(rule)!r}: expected (regex, scale) or (regex, scale, start_step)")
        if re.fullmatch(rule[0], name):
            start = int(rule[2]) if len(rule) == 3 and rule[2] is not None else 0
            if start < 0:
                raise ValueError(f"param_groups rule {tuple(rule)!r}: the start step must be >= 0")
            return (None if rule[1] is None else float(rule[1])), start
    raise ValueError(f"no param_groups rule matches parameter {name!r}; end the rules with ('.*', ...)")


def group_of(name: str, rules: Sequence[tuple]) -> float | None:
    """The learning-rate scale of a parameter (None = frozen); raises if no rule matches."""
    return rule_of(name, rules)[0]


def start_of(name: str, rules: Sequence[tuple]) -> int:
    """The optimizer step from which a parameter learns (a rule's optional third entry; default 0)."""
    return rule_of(name, rules)[1]


def trainable_names(names, rules) -> list[str]:
    return [n for n in names if group_of(n, rules) is not None]


def lr_schedule(base_lr: float, warmup_steps: int, total_steps: int, end_ratio: float = 0.0) -> optax.Schedule:
    """Linear warm-up from 0 to ``base_lr`` then cosine decay to ``base_lr * end_ratio`` at ``total_steps``."""
    if total_steps <= warmup_steps:
        raise ValueError(f"total_steps {total_steps} must exceed warmup_steps {warmup_steps}")
    return optax.warmup_cosine_decay_schedule(0.0, base_lr, warmup_steps, total_steps, base_lr * end_ratio)


def make_optimizer(params: dict, rules, *, lr: float, warmup_steps: int, total_steps: int,
                   end_lr_ratio: float = 0.0, weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999,
                   clip_norm: float | None = 1.0, accumulate_steps: int = 1):
    """AdamW per group (learning-rate scale, start step) over the trainable flat ``params``.

    Returns (tx, schedule): ``schedule(optimizer_step)`` is the base learning rate (scale 1). With
    ``accumulate_steps > 1`` the update is applied every that many micro-steps (optax.MultiSteps)
    on the mean gradient; the schedule and the start steps count applied updates.
    """
    base = lr_schedule(lr, warmup_steps, total_steps, end_lr_ratio)
    scales, starts = {}, {}
    for n in params:
        scales[n], starts[n] = rule_of(n, rules)
    frozen = sorted(n for n, s in scales.items() if s is None)
    if frozen:
        raise ValueError(f"make_optimizer got frozen parameters {frozen[:3]}: pass only trainable ones")

    def label(scale, start):
        return f"lr_x{scale:g}" + (f"_from{start}" if start else "")

    groups = {}
    for scale, start in sorted({(scales[n], starts[n]) for n in params}):
        sched = (lambda s, t0: (lambda count: base(count) * s * (count >= t0)))(scale, start)
        groups[label(scale, start)] = optax.adamw(sched, b1=b1, b2=b2, weight_decay=weight_decay)
    labels = {n: label(scales[n], starts[n]) for n in params}
    tx = optax.multi_transform(groups, labels)
    if clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
    if accumulate_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accumulate_steps)
    return tx, base
