"""Export a trained SparseWSI model for PyTorch users (no JAX needed on their side).

Writes, atomically (a temporary folder renamed into place)::

    <out>/llm/                      Hugging Face folder: LoRA merged, tokenizer, config.json
    <out>/selector.safetensors      scorer + projector, PyTorch layout (Linear weight [out, in])
    <out>/selector.json             their hyper-parameters (feature_dim, kind, widths, k, image token)
    <out>/sparsewsi_torch.py        the reference PyTorch module (``SparseWSISelector``)
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile

import numpy as np

from sparsewsi.llm import save_hf, write_safetensors
from sparsewsi.model.params import flat_params
from sparsewsi.model.sparsewsi import SparseWSI

_PREFIXES = ("scorer.", "projector.")


def torch_name(name: str) -> tuple[str, bool]:
    """Flax dotted name -> (PyTorch state-dict name, transpose?)."""
    head, _, leaf = name.rpartition(".")
    if leaf == "kernel":
        return f"{head}.weight", True
    if leaf == "scale":
        return f"{head}.weight", False
    return name, False


def selector_tensors(model: SparseWSI) -> dict[str, np.ndarray]:
    """The scorer and projector weights as PyTorch-layout float32 numpy arrays."""
    out = {}
    for name, value in flat_params(model).items():
        if not name.startswith(_PREFIXES):
            continue
        tname, transpose = torch_name(name)
        arr = np.asarray(value, np.float32)
        out[tname] = np.ascontiguousarray(arr.T if transpose else arr)
    return out


def selector_config(model: SparseWSI) -> dict:
    c = model.config
    return {"feature_dim": c.feature_dim, "scorer_kind": c.scorer_kind, "scorer_hidden": c.scorer_hidden,
            "scorer_depth": c.scorer_depth, "scorer_heads": c.scorer_heads, "scorer_squares": c.scorer_squares,
            "k": c.k,
            "projector_hidden": c.projector_hidden or c.llm.hidden_size, "llm_hidden_size": c.llm.hidden_size,
            "image_token_id": c.image_token_id, "image_token": "<image>", "feature_norm": c.feature_norm}


def export(model: SparseWSI, out: str | os.PathLike, *, tokenizer=None, llm_source: str | None = None,
           dtype: str | None = None, overwrite: bool = False) -> pathlib.Path:
    """Write the export folder (see the module docstring); returns its path."""
    out = pathlib.Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True / --overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp", dir=out.parent))
    try:
        save_hf(model.llm, tmp / "llm", source=llm_source, tokenizer=tokenizer, dtype=dtype)
        write_safetensors(tmp / "selector.safetensors", selector_tensors(model), metadata={"format": "pt"})
        (tmp / "selector.json").write_text(json.dumps(selector_config(model), indent=1))
        shutil.copyfile(pathlib.Path(__file__).with_name("torch_reference.py"), tmp / "sparsewsi_torch.py")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
