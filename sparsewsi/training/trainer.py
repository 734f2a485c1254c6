"""The trainer: ``train(config, batches, workdir)`` reads top to bottom in marked stages.

Config fields (see ``configs/tiny.py`` for a complete example): ``seed``, ``total_steps``,
``batch_size`` (global), ``model.*`` (SparseWSIConfig fields), ``llm.{path, tokenizer, dtype,
param_dtype, tiny}``, ``lora.{rank, alpha, targets}``, ``optim.{lr, warmup_steps, end_lr_ratio,
weight_decay, clip_norm, accumulate_steps, param_groups}``, ``mesh.{data, fsdp, tensor}``,
``checkpoint.{every, keep, async_save}``, ``log_every``, ``progress``, ``tensorboard``, and
optionally ``init_from`` (a workdir whose non-LLM trained parameters start this run: stage 1 -> 2;
with ``init_llm`` its trained LLM weights too).
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import time
from typing import Iterator

import jax
import numpy as np

from sparsewsi.atomic import write_text_atomic
from sparsewsi.model import ModelSpec, ParamSplit, SparseWSIConfig, build_model, check_batch, image_token_id
from sparsewsi.model import llm_config_from, param_shardings
from sparsewsi.model.build import TINY_TOKENIZER, open_tokenizer
from sparsewsi.model.checkpoint import SPEC_FILE
from sparsewsi.training.checkpoint import Checkpointer
from sparsewsi.training.metrics import MetricsWriter
from sparsewsi.training.optimizer import group_of, make_optimizer
from sparsewsi.training.sharding import batch_shardings, mesh_from_config, opt_state_shardings, to_global
from sparsewsi.training.step import init_state, make_train_step, memory_report

log = logging.getLogger(__name__)

MODEL_FIELDS = ("feature_dim", "k", "candidate_cap", "scorer_kind", "scorer_hidden", "scorer_depth", "scorer_heads",
                "scorer_squares", "tau_start", "tau_end", "tau_steps", "denoiser", "projector_hidden", "feature_norm", "score_noise",
                "score_noise_steps", "noise_slots", "gate_floor", "gate_floor_steps", "llm_seed", "seed")


class NonFiniteLossError(FloatingPointError):
    pass


def spec_from_config(config) -> ModelSpec:
    """The ModelSpec described by a training config (reads the tokenizer to find ``<image>``)."""
    llm_path = config.llm.get("path") or None
    tokenizer_src = config.llm.get("tokenizer") or (llm_path if llm_path else TINY_TOKENIZER)
    llm_cfg = llm_config_from(llm_path, dtype=config.llm.dtype, param_dtype=config.llm.param_dtype,
                              tiny=dict(config.llm.get("tiny") or {}))
    image_id = image_token_id(open_tokenizer(tokenizer_src, llm_cfg.vocab_size))
    fields = {f: config.model[f] for f in MODEL_FIELDS if f in config.model}
    model_cfg = SparseWSIConfig(llm=llm_cfg, image_token_id=image_id, **fields)
    lora = config.get("lora") or {}
    return ModelSpec(model=model_cfg, llm_path=llm_path, tokenizer=tokenizer_src, lora_rank=int(lora.get("rank", 0)),
                     lora_alpha=float(lora.get("alpha", 16.0)),
                     lora_targets=lora.get("targets") or ModelSpec.lora_targets)


def _host(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def train(config, batches: Iterator[dict], workdir: str | os.PathLike, *, spec: ModelSpec | None = None,
          devices=None) -> dict:
    """Train (or resume) in ``workdir`` until ``config.total_steps`` micro-steps.

    Args:
      config: an ml_collections ConfigDict (see the module docstring).
      batches: an iterator of process-local batch dicts; with ``get_state``/``set_state`` its position is
        checkpointed and restored.
      spec: overrides the ModelSpec derived from the config (tests use this).
    Returns:
      {"history": [metrics per step], "model": the trained SparseWSI, "state": final train state,
       "frozen": frozen params, "resumed_from": step or None, "split": the ParamSplit}.
    """
    # --- 1. logging and workdir ------------------------------------------------------------------
    workdir = pathlib.Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    spec = spec or spec_from_config(config)
    if is_main:
        if (workdir / SPEC_FILE).is_file() and ModelSpec.from_json((workdir / SPEC_FILE).read_text()) != spec:
            raise ValueError(f"{workdir / SPEC_FILE} describes a different model; use a fresh workdir")
        write_text_atomic(workdir / SPEC_FILE, spec.to_json())
        write_text_atomic(workdir / "config.json", config.to_json_best_effort(indent=1, sort_keys=True)
                      if hasattr(config, "to_json_best_effort") else json.dumps(dict(config), default=str))
    log.info("process %d/%d, %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())

    # --- 2. mesh -----------------------------------------------------------------------------------
    mesh = mesh_from_config(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices=devices)
    log.info("mesh %s", dict(mesh.shape))

    # --- 3. model and optimizer --------------------------------------------------------------------
    # The LLM is read straight into its shards (a 7B model is never gathered on one device).
    model = build_model(spec, mesh=mesh)
    loaded: dict = {}
    if config.get("init_from"):
        # Stage 2 starts from stage 1's new modules; a checkpoint of this run (restored below) overrides it.
        from sparsewsi.model import assign_params
        from sparsewsi.model.checkpoint import resolve, restore_params

        init_dir, init_steps = resolve(config.init_from)
        if not init_steps:
            raise FileNotFoundError(f"init_from {config.init_from}: no checkpoint to start from")
        # The LLM comes from llm.path unless the earlier stage trained it too (``init_llm``: e.g. a
        # randomly initialised or fully fine-tuned LLM, whose trained weights live only in that run).
        with_llm = bool(config.get("init_llm", False))
        loaded = {n: v for n, v in restore_params(init_dir, init_steps[0]).items()
                  if with_llm or not n.startswith("llm.")}
        assign_params(model, loaded)
        log.info("initialised %d tensors from %s step %d", len(loaded), init_dir, init_steps[0])
    rules = [tuple(r) for r in config.optim.param_groups]
    split = ParamSplit(model, lambda name: group_of(name, rules) is not None)
    # Checkpoints hold trained parameters only; frozen ones are rebuilt from the spec (llm.path, seeds),
    # so weights taken from init_from and then frozen would be silently lost on reload.
    lost = sorted(n for n in loaded if n in split.frozen)
    if lost:
        raise ValueError(
            f"init_from {config.init_from} supplies {len(lost)} parameters that optim.param_groups freezes "
            f"(e.g. {lost[0]!r}); this run's checkpoints would not hold them, so it could not be reloaded. "
            "Train them (a small learning-rate scale such as ('llm\\..*', 0.1) keeps them close), or export the "
            "earlier stage's LLM (`sparsewsi export`) and pass it as llm.path without init_llm.")
    opt = config.optim
    tx, schedule = make_optimizer(split.trainable, rules, lr=opt.lr, warmup_steps=opt.warmup_steps,
                                  total_steps=max(config.total_steps // opt.accumulate_steps, opt.warmup_steps + 1),
                                  end_lr_ratio=opt.end_lr_ratio, weight_decay=opt.weight_decay,
                                  clip_norm=opt.clip_norm, accumulate_steps=opt.accumulate_steps)
    n_train = sum(int(np.size(v)) for v in split.trainable.values())
    n_frozen = sum(int(np.size(v)) for v in split.frozen.values())
    log.info("parameters: %d trained, %d frozen", n_train, n_frozen)

    # --- 4. sharding: parameters are placed on the mesh, the optimizer state is created sharded ------
    train_sh = param_shardings(split.trainable, mesh)
    frozen_sh = param_shardings(split.frozen, mesh)
    params = jax.device_put(split.trainable, train_sh)
    frozen = jax.device_put(split.frozen, frozen_sh)
    abstract_state = jax.eval_shape(lambda p: init_state(p, tx), params)
    state_sh = {"params": train_sh, "opt_state": opt_state_shardings(abstract_state["opt_state"], train_sh, mesh),
                "step": jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())}
    state = jax.jit(lambda p: init_state(p, tx), out_shardings=state_sh)(params)

    # --- 5. checkpoint restore ---------------------------------------------------------------------
    ckpt = Checkpointer(workdir, every=config.checkpoint.every, keep=config.checkpoint.keep,
                        async_save=config.checkpoint.async_save)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, state_sh)
    restored = ckpt.restore_latest(abstract)
    resumed_from = None
    if restored is not None:
        state, iter_state, resumed_from = restored
        if iter_state is not None:
            if not hasattr(batches, "set_state"):
                raise ValueError("the checkpoint holds a data iterator state but the iterator has no set_state()")
            batches.set_state(iter_state)
        log.info("resumed from step %d", resumed_from)
    start = int(jax.device_get(state["step"]))

    # --- 6. the update step: jit with shardings and donation, compiled once with its memory analysis --
    step_fn = make_train_step(split, tx, schedule, seed=config.seed, accumulate_steps=opt.accumulate_steps)
    try:
        first = next(batches)
    except StopIteration:
        raise ValueError("the data iterator yields no batch") from None
    check_batch(first, spec.model.image_token_id)
    empty = EmptyBatchGuard(config, batches)
    empty.see(first)
    global_batch = int(np.shape(first["input_ids"])[0]) * jax.process_count()
    first = {k: v for k, v in first.items() if k in _BATCH_KEYS}
    b_sh = batch_shardings(first, mesh, global_batch)
    jitted = jax.jit(step_fn, in_shardings=(state_sh, frozen_sh, b_sh), out_shardings=(state_sh, None),
                     donate_argnums=(0,))
    t0 = time.perf_counter()
    compiled = jitted.lower(state, frozen, to_global(first, b_sh)).compile()
    log.info("train step compiled in %.1f s; %s", time.perf_counter() - t0, memory_report(compiled))

    # --- 7. loop -----------------------------------------------------------------------------------
    writer = MetricsWriter(workdir, resume_step=start, tensorboard=config.get("tensorboard", True))
    history = []
    bar = None
    if is_main and config.get("progress", True):
        from tqdm import tqdm
        bar = tqdm(total=config.total_steps, initial=start, desc="train", dynamic_ncols=True)
    batch = first
    step = start
    try:
        while step < config.total_steps:
            if batch is None:
                try:
                    batch = next(batches)
                except StopIteration:
                    log.info("the data iterator is exhausted after step %d; stopping early", step)
                    ckpt.save(step, state, batches.get_state() if hasattr(batches, "get_state") else None)
                    break
                check_batch(batch, spec.model.image_token_id)
                empty.see(batch)
                batch = {k: v for k, v in batch.items() if k in _BATCH_KEYS}
            t = time.perf_counter()
            gbatch = to_global(batch, b_sh)
            if all(gbatch[k].shape == first_shape for k, first_shape in _shapes(first).items()):
                state, metrics = compiled(state, frozen, gbatch)
            else:  # a batch of another shape (e.g. the last, shorter one): compile for it
                state, metrics = jitted(state, frozen, gbatch)
            metrics = _host(metrics)
            dt = time.perf_counter() - t
            step += 1
            if not math.isfinite(metrics["loss"]) or not math.isfinite(metrics["grad_norm"]):
                raise NonFiniteLossError(f"step {step}: loss {metrics['loss']}, gradient norm {metrics['grad_norm']}; "
                                         f"stopping (last checkpoint is in {ckpt.directory})")
            b = global_batch
            seq = np.shape(batch["input_ids"])[1] - 1 + metrics["visual_tokens"]
            metrics["tokens_per_s"] = b * seq / dt
            metrics["step_time_s"] = dt
            history.append({"step": step, **metrics})
            if step % config.log_every == 0 or step == config.total_steps:
                writer.write(step, metrics)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", tau=f"{metrics['tau']:.3f}")
            if ckpt.should_save(step) or step == config.total_steps:
                ckpt.save(step, state, batches.get_state() if hasattr(batches, "get_state") else None)
            batch = None
    finally:
        if bar is not None:
            bar.close()
        writer.close()
        ckpt.close()
    final_model = split.merge(state["params"], frozen)
    return {"history": history, "model": final_model, "state": state, "frozen": frozen,
            "resumed_from": resumed_from, "split": split, "spec": spec}


class EmptyBatchGuard:
    """Stops a run whose input pipeline keeps delivering batches without one readable example.

    The pipeline keeps a bad item's slot (``example_valid`` False, all masks False) so one missing
    file never stops an epoch; but when every file is missing (a wrong ``data.features_root``) each
    step would train on nothing, with loss 0, and save checkpoints of an untrained model.
    """

    LIMIT = 10  # consecutive batches without a valid example

    def __init__(self, config, batches):
        self.config, self.batches, self.run = config, batches, 0

    def see(self, batch: dict) -> None:
        valid = batch.get("example_valid")
        if valid is None:
            return
        self.run = 0 if np.any(valid) else self.run + 1
        if self.run >= self.LIMIT:
            skipped = dict(getattr(self.batches, "skipped", {}) or {})
            data = self.config.get("data", {}) or {}
            raise ValueError(
                f"the last {self.run} batches held no readable example (skipped so far: {skipped or 'unknown'}); "
                f"check data.features_root ({data.get('features_root')!r}) and data.path ({data.get('path')!r}): "
                "the feature files the prepared dataset names must exist there")


_BATCH_KEYS = ("features", "feature_mask", "input_ids", "attention_mask", "loss_mask")


def _shapes(batch):
    return {k: tuple(np.shape(v)) for k, v in batch.items()}

