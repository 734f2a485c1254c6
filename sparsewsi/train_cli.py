"""``sparsewsi train``: train SparseWSI from an ml_collections config file.

    sparsewsi train --config configs/tiny.py --workdir runs/tiny
    sparsewsi train --config configs/stage2_vqa.py:lora --workdir runs/s2 --set optim.lr=1e-4 --set batch_size=16

Multi-host: ``--distributed on`` calls ``jax.distributed.initialize()`` (auto-detects TPU pods and
SLURM), or give ``--coordinator host:port --num-processes N --process-id I``; ``auto`` (default)
initialises when the environment shows several processes (SLURM_NTASKS > 1, TPU worker list, or a
JAX coordinator address). Every process runs the same command; process 0 writes metrics.

Data (``config.data.source``): ``synthetic`` (built in), or ``tfds``: a prepared ``data_pipelines``
dataset (``config.data.path`` = the builder's data path), read through ``data_pipelines.pipeline``.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import logging
import os
import pathlib
import sys

log = logging.getLogger("sparsewsi.train")

# `sparsewsi train ... --config.optim.lr=1e-4` is rewritten to `--set optim.lr=1e-4` by sparsewsi.cli.
ACCEPTS_CONFIG_OVERRIDES = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="config file, optionally with an argument: configs/x.py:arg")
    parser.add_argument("--workdir", required=True, help="checkpoints, metrics and model.json go here (resumes)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set optim.lr=1e-4 or --config.optim.lr=1e-4 (repeatable)")
    parser.add_argument("--distributed", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--coordinator", default=None, help="host:port of process 0 (explicit multi-process set-up)")
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--process-id", type=int, default=None)


def load_config(spec: str):
    """``path/to/config.py[:arg]`` -> ``get_config(arg)``."""
    path, _, arg = spec.partition(":")
    file = pathlib.Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file {file} does not exist")
    mod_spec = importlib.util.spec_from_file_location(f"sparsewsi_config_{file.stem}", file)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{file} defines no get_config(arg)")
    return module.get_config(arg)


def apply_overrides(config, overrides: list[str]):
    """``a.b=value`` -> config.a.b = value, parsed as a Python literal when possible, checked against the field."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            if p not in node:
                raise KeyError(f"--set {key}: the config has no field {p!r}")
            node = node[p]
        if leaf not in node:
            raise KeyError(f"--set {key}: the config has no field {leaf!r} (fields: {sorted(node.keys())})")
        old = node[leaf]
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        node[leaf] = value
    return config


def maybe_initialize_distributed(args) -> None:
    import jax

    if args.distributed == "off":
        return
    explicit = args.coordinator is not None
    env_multi = (int(os.environ.get("SLURM_NTASKS", "1")) > 1 or bool(os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","))
                 or "JAX_COORDINATOR_ADDRESS" in os.environ)
    if explicit:
        if args.num_processes is None or args.process_id is None:
            raise ValueError("--coordinator needs --num-processes and --process-id")
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
    elif args.distributed == "on" or env_multi:
        jax.distributed.initialize()
    else:
        return
    log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


class _PipelineAdapter:
    """data_pipelines batches -> the trainer's contract.

    Bad items arrive with every mask False and no ``<image>``: they get an ``<image>`` at position 0
    (still fully masked, zero loss) so the batch stays well-formed. With ``fixed_shapes`` (always on
    multi-host runs: every host must feed the same shapes) bags and texts are padded to the largest
    bucket.
    """

    def __init__(self, iterator, image_id: int, pad_n: int | None, pad_t: int | None, pad_id: int):
        self.it, self.image_id, self.pad_n, self.pad_t, self.pad_id = iterator, image_id, pad_n, pad_t, pad_id

    def __iter__(self):
        return self

    def __next__(self):
        import numpy as np

        b = next(self.it)
        out = {"features": b["features"], "feature_mask": b["feature_mask"].astype(bool),
               "input_ids": b["input_ids"].astype(np.int32), "attention_mask": b["attention_mask"].astype(np.int32),
               "loss_mask": b["loss_mask"].astype(np.int32)}
        bad = ~b["example_valid"].astype(bool)
        if bad.any():
            out["input_ids"] = out["input_ids"].copy()
            out["input_ids"][bad] = self.pad_id
            out["input_ids"][bad, 0] = self.image_id
        if self.pad_n:
            n = out["features"].shape[1]
            out["features"] = np.pad(out["features"], ((0, 0), (0, self.pad_n - n), (0, 0)))
            out["feature_mask"] = np.pad(out["feature_mask"], ((0, 0), (0, self.pad_n - n)))
        if self.pad_t:
            t = out["input_ids"].shape[1]
            for k in ("input_ids", "attention_mask", "loss_mask"):
                out[k] = np.pad(out[k], ((0, 0), (0, self.pad_t - t)),
                                constant_values=self.pad_id if k == "input_ids" else 0)
        return out

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)

    @property
    def skipped(self):
        return getattr(self.it, "skipped", {})


def make_batches(config, spec):
    """The batch iterator named by ``config.data``."""
    import jax

    from sparsewsi.model import load_tokenizer
    from sparsewsi.training import ArrayIterator, synthetic_examples

    d = config.data
    tokenizer = load_tokenizer(spec)
    if d.source == "synthetic":
        examples = synthetic_examples(tokenizer, d.num_examples, num_tokens=d.num_tokens,
                                      feature_dim=spec.model.feature_dim, evidence_tokens=d.evidence_tokens,
                                      num_classes=d.num_classes, seed=d.seed)
        return ArrayIterator(examples, config.batch_size, seed=config.seed, process_index=jax.process_index(),
                             process_count=jax.process_count())
    if d.source == "tfds":
        # The only place sparsewsi meets data_pipelines: the command line wires it in.
        from data_pipelines.pipeline import InputPipeline, PipelineConfig

        if config.batch_size % jax.process_count():
            raise ValueError(f"batch_size {config.batch_size} is not divisible by {jax.process_count()} processes")
        kw = dict(batch_size=config.batch_size // jax.process_count(), feature_dim=spec.model.feature_dim,
                  csv_feature_columns=spec.model.feature_dim, seed=config.seed)
        if d.get("max_patches"):
            kw["max_patches"] = int(d.max_patches)
        if d.get("patch_buckets"):
            kw["patch_buckets"] = tuple(d.patch_buckets)
        if d.get("token_buckets"):
            kw["token_buckets"] = tuple(d.token_buckets)
        if d.get("worker_count"):
            kw["worker_count"] = int(d.worker_count)
        pcfg = PipelineConfig(**kw)
        pipe = InputPipeline(d.path, d.split, tokenizer, pcfg, features_root=d.get("features_root") or None)
        fixed = d.get("fixed_shapes", False) or jax.process_count() > 1
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return _PipelineAdapter(iter(pipe), spec.model.image_token_id,
                                max(pcfg.patch_buckets) if fixed else None, max(pcfg.token_buckets) if fixed else None,
                                int(pad_id))
    raise ValueError(f"config.data.source {d.source!r}: expected 'synthetic' or 'tfds'")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        config = apply_overrides(load_config(args.config), args.set)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"sparsewsi train: {e}", file=sys.stderr)
        return 2
    maybe_initialize_distributed(args)

    from sparsewsi.training import NonFiniteLossError, spec_from_config, train

    spec = spec_from_config(config)
    batches = make_batches(config, spec)
    try:
        out = train(config, batches, args.workdir, spec=spec)
    except NonFiniteLossError as e:
        print(f"sparsewsi train: {e}", file=sys.stderr)
        return 3
    hist = out["history"]
    if hist:
        log.info("finished at step %d, loss %.4f", hist[-1]["step"], hist[-1]["loss"])
    skipped = getattr(batches, "skipped", None)
    if skipped:
        log.warning("bad items skipped by the input pipeline: %s", dict(skipped))
    return 0
