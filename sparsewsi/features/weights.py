"""Import PyTorch (timm / open_clip / CONCH) state dicts into :class:`~sparsewsi.features.encoders.PatchEncoder`.

The mapping is a table ``our parameter path -> (torch key, transform)``:

* conv kernels ``(D, 3, P, P)`` -> ``(P, P, 3, D)``; linear weights transposed;
* timm's fused ``qkv`` stays fused (our Attention splits after the projection, like timm);
* ``torch.nn.MultiheadAttention`` in the attentional pooler: ``q/k/v_proj_weight`` (or a fused
  ``in_proj_weight`` when key and query widths match) and thirds of ``in_proj_bias``;
* LayerNorm ``weight`` -> ``scale``; LayerScale ``gamma``, ``cls_token``, ``reg_token``,
  ``pos_embed``, ``query`` and ``proj_contrast`` copied as they are.

Key prefixes are detected: a bare timm ViT (``cls_token``), a CONCH/CoCa vision tower
(``trunk.cls_token`` + ``attn_pool_contrast.*``) or a whole CONCH checkpoint (``visual.trunk.*``;
its text tower and caption pooler are ignored). Every problem is reported at once: missing keys,
unexpected keys in the encoder's scope, and shape mismatches, each with the file it came from.

Files: ``.safetensors`` (read without torch when the dtype allows), or torch pickles loaded with
``torch.load(weights_only=True)`` (never a full unpickle).
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsewsi.features.encoders import PatchEncoder


class WeightImportError(ValueError):
    """A state dict does not fit the encoder; the message lists every problem."""


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Tensors of a weights file as float32 numpy arrays, by name.

    Raises:
      WeightImportError: unreadable file or a pickle that is not a plain tensor dict.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightImportError(f"{path}: no such weights file")
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            out = {}
            try:
                with safe_open(path, framework="numpy") as f:
                    for k in f.keys():
                        out[k] = np.asarray(f.get_tensor(k), np.float32)
                return out
            except (TypeError, ValueError):  # bfloat16 etc.: numpy cannot hold it, go through torch
                import torch

                with safe_open(path, framework="pt") as f:
                    return {k: f.get_tensor(k).float().numpy() for k in f.keys()}
        import torch

        obj = torch.load(path, map_location="cpu", weights_only=True)
    except WeightImportError:
        raise
    except Exception as err:
        raise WeightImportError(f"{path}: cannot read weights ({type(err).__name__}: {err})") from err
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise WeightImportError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        if hasattr(v, "detach"):
            out[str(k)] = v.detach().float().cpu().numpy()
    return out


def _detect_prefixes(sd: Mapping[str, np.ndarray]) -> tuple[str, str]:
    """(trunk prefix, pooler/head prefix) of a state dict."""
    for trunk, head in (("", ""), ("trunk.", ""), ("visual.trunk.", "visual."), ("model.", "")):
        if f"{trunk}cls_token" in sd:
            return trunk, head
    return "", ""


def _mapping(model: PatchEncoder, trunk: str, head: str, sd: Mapping[str, np.ndarray]):
    """Yield (our path, torch key, transform) for every parameter of ``model``."""
    T = lambda a: a.T  # noqa: E731  torch Linear (out, in) -> ours (in, out)
    same = lambda a: a  # noqa: E731
    cfg = model.cfg
    yield ("patch_embed", "kernel"), f"{trunk}patch_embed.proj.weight", lambda a: a.transpose(2, 3, 1, 0)
    yield ("patch_embed", "bias"), f"{trunk}patch_embed.proj.bias", same
    yield ("cls_token",), f"{trunk}cls_token", same
    if cfg.num_reg_tokens:
        yield ("reg_token",), f"{trunk}reg_token", same
    yield ("pos_embed",), f"{trunk}pos_embed", same

    def ln(path, key):
        yield path + ("scale",), f"{key}.weight", same
        yield path + ("bias",), f"{key}.bias", same

    def lin(path, key):
        yield path + ("kernel",), f"{key}.weight", T
        yield path + ("bias",), f"{key}.bias", same

    for i in range(cfg.depth):
        b = f"{trunk}blocks.{i}"
        yield from ln(("blocks", i, "norm1"), f"{b}.norm1")
        yield from lin(("blocks", i, "attn", "qkv"), f"{b}.attn.qkv")
        yield from lin(("blocks", i, "attn", "proj"), f"{b}.attn.proj")
        yield from ln(("blocks", i, "norm2"), f"{b}.norm2")
        yield from lin(("blocks", i, "mlp", "fc1"), f"{b}.mlp.fc1")
        yield from lin(("blocks", i, "mlp", "fc2"), f"{b}.mlp.fc2")
        if cfg.layer_scale is not None:
            yield ("blocks", i, "ls1", "gamma"), f"{b}.ls1.gamma", same
            yield ("blocks", i, "ls2", "gamma"), f"{b}.ls2.gamma", same
    yield from ln(("norm",), f"{trunk}norm")
    if cfg.pool == "attn":
        p = f"{head}attn_pool_contrast"
        d = cfg.pool_dim
        yield ("attn_pool", "query"), f"{p}.query", same
        yield from ln(("attn_pool", "ln_q"), f"{p}.ln_q")
        yield from ln(("attn_pool", "ln_k"), f"{p}.ln_k")
        fused = f"{p}.attn.in_proj_weight" in sd
        for j, name in enumerate(("q", "k", "v")):
            if fused:
                yield ("attn_pool", f"{name}_proj", "kernel"), f"{p}.attn.in_proj_weight", (lambda a, j=j: a[j * d:(j + 1) * d].T)
            else:
                yield ("attn_pool", f"{name}_proj", "kernel"), f"{p}.attn.{name}_proj_weight", T
            yield ("attn_pool", f"{name}_proj", "bias"), f"{p}.attn.in_proj_bias", (lambda a, j=j: a[j * d:(j + 1) * d])
        yield from lin(("attn_pool", "out_proj"), f"{p}.attn.out_proj")
        yield from ln(("ln_contrast",), f"{head}ln_contrast")
        yield ("proj_contrast",), f"{head}proj_contrast", same


# Keys in a checkpoint that belong to parts we do not build (classifier heads, CoCa caption pooler,
# the text tower of a whole CONCH checkpoint).
IGNORED = (r"(.*\.)?head\.(weight|bias)$", r"(visual\.)?attn_pool_caption\..*", r"(visual\.)?ln_caption\..*",
           r"(.*\.)?fc_norm\.(weight|bias)$")


def _match(model: PatchEncoder, sd: Mapping[str, np.ndarray], ignore: tuple[str, ...]):
    """(assignments [(path, array)], problems [str]) for copying ``sd`` into ``model``."""
    trunk, head = _detect_prefixes(sd)
    flat = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    missing, shape_errors, used, assign = [], [], set(), []
    for path, key, fn in _mapping(model, trunk, head, sd):
        want = tuple(flat[path].shape)
        if key not in sd:
            missing.append(key)
            continue
        used.add(key)
        value = fn(np.asarray(sd[key]))
        if tuple(value.shape) != want:
            shape_errors.append(f"{key}: file {tuple(np.shape(sd[key]))} -> {tuple(value.shape)}, "
                                f"model expects {want} at {'.'.join(map(str, path))}")
            continue
        assign.append((path, value))
    scope = (trunk, head) if head else (trunk,)
    pats = [re.compile(p) for p in ignore]
    unexpected = sorted(k for k in sd if k not in used and k.startswith(scope) and not any(p.fullmatch(k) for p in pats)
                        and not (head == "visual." and not k.startswith("visual.")))
    problems = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shape_errors)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items) - 8} more)" if len(items) > 8 else "")
            problems.append(f"{len(items)} {title}: {shown}")
    return assign, problems, trunk


def check_state_dict(model: PatchEncoder, sd: Mapping[str, np.ndarray], *, ignore: tuple[str, ...] = IGNORED) -> list[str]:
    """Problems (missing / unexpected / mis-shaped) of loading ``sd`` into ``model``; [] if it fits.

    Works on an abstract model (``nnx.eval_shape``) and on zero-stride arrays, so a full-size
    checkpoint layout can be checked without allocating it.
    """
    return _match(model, sd, ignore)[1]


def load_state_dict(model: PatchEncoder, sd: Mapping[str, np.ndarray], *, source: str = "state dict",
                    ignore: tuple[str, ...] = IGNORED) -> PatchEncoder:
    """Copy ``sd`` into ``model`` (in place) and return it; nothing is changed on error.

    Raises:
      WeightImportError: listing missing keys, unexpected keys within the encoder's prefix, and
        tensors whose shape (after the transform) differs from ours.
    """
    assign, problems, trunk = _match(model, sd, ignore)
    if problems:
        raise WeightImportError(f"{source}: weights do not fit encoder {model.cfg.name!r} "
                                f"(key prefix {trunk!r}); " + "; ".join(problems))
    params = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(params)
    for path, value in assign:
        node = pure
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = jnp.asarray(value, jnp.float32)
    nnx.replace_by_pure_dict(params, pure)
    nnx.update(model, params)
    return model


def load_weights(model: PatchEncoder, path: str | os.PathLike) -> tuple[PatchEncoder, str]:
    """Load a weights file into ``model``; returns (model, sha256 of the file)."""
    sd = read_state_dict(path)
    load_state_dict(model, sd, source=os.fspath(path))
    return model, file_sha256(path)


def export_state_dict(model: PatchEncoder) -> dict[str, np.ndarray]:
    """Our parameters in the bare timm layout (trunk keys unprefixed, pooler under ``attn_pool_contrast``).

    Used to write test checkpoints and to round-trip; inverse of :func:`load_state_dict` for
    separate q/k/v pooler weights.
    """
    params = nnx.state(model, nnx.Param)
    flat = {tuple(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(params)}
    out: dict[str, np.ndarray] = {}
    biases: dict[str, list] = {}
    for path, key, _ in _mapping(model, "", "", {}):
        v = flat[path]
        if path[-1] == "kernel" and path[0] == "patch_embed":
            v = v.transpose(3, 2, 0, 1)
        elif path[-1] == "kernel":
            v = v.T
        if key.endswith("in_proj_bias"):
            biases.setdefault(key, []).append(v)
            continue
        out[key] = np.ascontiguousarray(v)
    for key, parts in biases.items():
        out[key] = np.concatenate(parts)
    return out
