"""The trainer's checkpoint layout, and ``load_checkpoint`` for evaluation and export.

A trainer workdir holds::

    model.json                      ModelSpec: how to rebuild the model and its frozen weights
    config.json                     the full training config (for the record)
    checkpoints/<step>/state        orbax: {"params": {dotted name: array} (trained only),
                                            "opt_state": ..., "step": int}
    checkpoints/<step>/data         the data iterator's state (JSON), when the iterator has one
    metrics.jsonl, tensorboard/     metrics (process 0)

Only trained parameters are stored; the frozen LLM comes back from its source (``ModelSpec``).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib

import numpy as np

from sparsewsi.model.build import ModelSpec, build_model, load_tokenizer
from sparsewsi.model.params import assign_params

SPEC_FILE = "model.json"
CHECKPOINT_DIR = "checkpoints"
log = logging.getLogger(__name__)


class CheckpointNotFoundError(FileNotFoundError):
    pass


def resolve(path: str | os.PathLike) -> tuple[pathlib.Path, list[int]]:
    """(workdir, candidate steps newest first) for a workdir or a ``checkpoints/<step>`` folder."""
    path = pathlib.Path(path).expanduser().resolve()  # orbax needs absolute paths
    if (path / SPEC_FILE).is_file():
        ckpt = path / CHECKPOINT_DIR
        steps = sorted((int(p.name) for p in ckpt.iterdir() if p.is_dir() and p.name.isdigit()), reverse=True) \
            if ckpt.is_dir() else []
        return path, steps
    if path.name.isdigit() and (path.parent.parent / SPEC_FILE).is_file():
        return path.parent.parent, [int(path.name)]
    raise CheckpointNotFoundError(f"{path}: neither a trainer workdir (no {SPEC_FILE}) nor one of its "
                                  f"{CHECKPOINT_DIR}/<step> folders")


def read_spec(workdir: str | os.PathLike) -> ModelSpec:
    path = pathlib.Path(workdir) / SPEC_FILE
    try:
        return ModelSpec.from_json(path.read_text())
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path}: cannot read the model spec: {e}") from e


def restore_params(workdir: pathlib.Path, step: int) -> dict[str, np.ndarray]:
    """The trained parameters stored at ``step`` (host numpy arrays)."""
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(workdir / CHECKPOINT_DIR) as mngr:
        restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return {k: np.asarray(v) for k, v in restored.state["params"].items()}


def load_export(folder: str | os.PathLike, *, mesh=None, with_tokenizer: bool = True):
    """Rebuild an inference model from a ``sparsewsi export`` folder (HF LLM + selector).

    The LLM comes from ``<folder>/llm`` (LoRA already merged), the scorer and projector from
    ``selector.safetensors`` (PyTorch layout, transposed back). Training-only pieces are left out.
    Returns (model, tokenizer or None, spec), like ``load_checkpoint``.
    """
    from safetensors.numpy import load_file

    from sparsewsi.model.build import llm_config_from
    from sparsewsi.model.config import SparseWSIConfig
    from sparsewsi.model.export import torch_name
    from sparsewsi.model.params import flat_params

    folder = pathlib.Path(folder).expanduser().resolve()
    sel = json.loads((folder / "selector.json").read_text())
    llm_dir = folder / "llm"
    llm_cfg = llm_config_from(str(llm_dir), dtype="float32", param_dtype="float32")
    config = SparseWSIConfig(
        feature_dim=sel["feature_dim"], llm=llm_cfg, image_token_id=sel["image_token_id"], k=sel["k"],
        scorer_kind=sel["scorer_kind"], scorer_hidden=sel["scorer_hidden"], scorer_depth=sel["scorer_depth"],
        scorer_heads=sel["scorer_heads"], scorer_squares=bool(sel.get("scorer_squares", False)),
        projector_hidden=sel["projector_hidden"],
        feature_norm=sel.get("feature_norm", "token"), denoiser=False)
    spec = ModelSpec(model=config, llm_path=str(llm_dir), tokenizer=str(llm_dir))
    model = build_model(spec, mesh=mesh)
    tensors = load_file(str(folder / "selector.safetensors"))
    params, missing = {}, []
    for name, value in flat_params(model).items():
        if not name.startswith(("scorer.", "projector.")):
            continue
        tname, transpose = torch_name(name)
        if tname not in tensors:
            missing.append(tname)
            continue
        params[name] = tensors[tname].T if transpose else tensors[tname]
    if missing:
        raise CheckpointNotFoundError(f"{folder / 'selector.safetensors'}: missing tensors {missing[:8]}")
    assign_params(model, params)
    return model, (load_tokenizer(spec) if with_tokenizer else None), spec


def load_checkpoint(path: str | os.PathLike, *, mesh=None, with_tokenizer: bool = True):
    """Rebuild the model of a trainer workdir and restore its newest readable checkpoint.

    Args:
      path: a workdir (newest valid step; a corrupt newest one falls back to the previous), a
        ``<workdir>/checkpoints/<step>`` folder (exactly that step), or a ``sparsewsi export``
        folder (``selector.json`` + ``llm/``: see ``load_export``).
      mesh: shard the model over this mesh.
    Returns:
      (model, tokenizer or None, spec).
    """
    if (pathlib.Path(path) / "selector.json").is_file():
        return load_export(path, mesh=mesh, with_tokenizer=with_tokenizer)
    workdir, steps = resolve(path)
    spec = read_spec(workdir)
    if not steps:
        raise CheckpointNotFoundError(f"{workdir}: no checkpoint under {CHECKPOINT_DIR}/")
    errors = []
    for step in steps:
        try:
            params = restore_params(workdir, step)
            break
        except Exception as e:  # an incomplete or corrupt step: try the previous one
            log.warning("checkpoint %s/%s/%d is unreadable (%s); trying an older one", workdir, CHECKPOINT_DIR, step, e)
            errors.append(f"step {step}: {e}")
    else:
        raise CheckpointNotFoundError(f"{workdir}: no readable checkpoint ({'; '.join(errors)})")
    model = build_model(spec)
    assign_params(model, params)
    if mesh is not None:
        from sparsewsi.model.params import shard_params
        shard_params(model, mesh)
    return model, (load_tokenizer(spec) if with_tokenizer else None), spec
