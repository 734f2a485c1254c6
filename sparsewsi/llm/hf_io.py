"""Hugging Face checkpoint folders: import into the NNX decoder (sharded, lazily) and export back.

Import reads ``config.json`` and the safetensors weights (one ``model.safetensors`` or shards listed
in ``model.safetensors.index.json``). The safetensors header is parsed here and each file is
memory-mapped, so ``jax.make_array_from_callback`` reads only the slice each device holds: a large
model goes straight into its shards and is never materialised whole on one device. bfloat16 is read
through ``ml_dtypes`` (numpy itself has no bfloat16).

Export writes sharded safetensors + index, ``config.json``, ``generation_config.json`` and copies the
tokenizer files, without torch; ``transformers.AutoModelForCausalLM.from_pretrained`` loads it. LoRA
adapters are merged into the exported kernels on the fly (the in-memory model is not changed).
The folder is written under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import struct
import tempfile
from typing import Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from sparsewsi.llm.config import LLMConfig, load_config
from sparsewsi.llm.model import CausalLM, Linear, abstract_model
from sparsewsi.llm.sharding import DEFAULT_RULES, Rules, partition_spec

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "tokenizer.model")
# Buffers some exporters save that carry no learned weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

_ST_TO_NP = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
             "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_NP_TO_ST = {np.dtype(v): k for k, v in _ST_TO_NP.items()}


class CheckpointError(ValueError):
    """A checkpoint folder or file does not match what the model expects."""


# ---------------------------------------------------------------------------------------- safetensors
class SafetensorsFile:
    """A read-only, memory-mapped safetensors file: ``f.keys()``, ``f.shape(name)``, ``f.array(name)``."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        try:
            with open(self.path, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                size = self.path.stat().st_size
                if n > size - 8:
                    raise CheckpointError(f"{self.path}: header length {n} exceeds the file size {size}")
                header = json.loads(fh.read(n))
        except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path}: not a safetensors file ({e})") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self._base = 8 + n
        self._entries = header
        for name, e in header.items():
            if e.get("dtype") not in _ST_TO_NP:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {e.get('dtype')!r}")
            begin, end = e["data_offsets"]
            want = int(np.prod(e["shape"], dtype=np.int64)) * np.dtype(_ST_TO_NP[e["dtype"]]).itemsize
            if end - begin != want or self._base + end > size:
                raise CheckpointError(f"{self.path}: tensor {name!r} has inconsistent offsets (file truncated?)")
        self._mm = np.memmap(self.path, dtype=np.uint8, mode="r") if size > self._base else None

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(_ST_TO_NP[self._entries[name]["dtype"]])

    def array(self, name: str) -> np.ndarray:
        """A zero-copy, read-only view of the tensor (slicing it reads only the touched pages)."""
        e = self._entries[name]
        begin, end = e["data_offsets"]
        raw = self._mm[self._base + begin:self._base + end] if end > begin else np.zeros(0, np.uint8)
        return raw.view(_ST_TO_NP[e["dtype"]]).reshape(e["shape"])


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    """Write ``tensors`` to ``path`` in the safetensors format (atomically: temp file + rename)."""
    path = pathlib.Path(path)
    header, offset, arrays = {}, 0, []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype not in _NP_TO_ST:
            raise ValueError(f"{path}: cannot store dtype {arr.dtype} of tensor {name!r} in safetensors")
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        header[name] = {"dtype": _NP_TO_ST[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data section to 8 bytes
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(struct.pack("<Q", len(blob)))
            fh.write(blob)
            for arr in arrays:
                fh.write(memoryview(arr.reshape(-1).view(np.uint8)))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def open_checkpoint(folder: str | os.PathLike) -> dict[str, SafetensorsFile]:
    """Map every tensor name of a checkpoint folder to the (open) safetensors file that holds it."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: checkpoint folder does not exist")
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({e!r})") from None
        files = {}
        for fname in sorted(set(weight_map.values())):
            if not (folder / fname).is_file():
                raise CheckpointError(f"{index_path}: lists shard {fname!r}, which is missing from {folder}")
            files[fname] = SafetensorsFile(folder / fname)
        out = {}
        for name, fname in weight_map.items():
            if name not in files[fname].keys():
                raise CheckpointError(f"{index_path}: says {name!r} is in {fname}, but that file lacks it")
            out[name] = files[fname]
        return out
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        others = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
        hint = f" (found {others}; convert PyTorch pickles to safetensors first)" if others else ""
        raise CheckpointError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")
    if len(shards) > 1 and not (folder / SINGLE_FILE).is_file():
        raise CheckpointError(f"{folder}: {len(shards)} safetensors files but no {INDEX_FILE}")
    f = SafetensorsFile(folder / SINGLE_FILE if (folder / SINGLE_FILE).is_file() else shards[0])
    return {name: f for name in f.keys()}


# ------------------------------------------------------------------------------------- name mapping
def hf_name(path: tuple) -> tuple[str, bool]:
    """Our state path -> (Hugging Face tensor name, whether the tensor is transposed between the two)."""
    *module, leaf = [str(p) for p in path]
    if leaf == "kernel":
        return ".".join(module + ["weight"]), True
    if leaf == "embedding":
        return ".".join(module + ["weight"]), False
    return ".".join(module + [leaf]), False


def _base_param_paths(model_or_abstract) -> list[tuple[tuple, tuple, np.dtype]]:
    """(path, shape, dtype) of every base (non-LoRA) parameter."""
    flat = nnx.to_flat_state(nnx.state(model_or_abstract, nnx.Param))
    return [(tuple(p), tuple(v.shape), v.dtype) for p, v in flat if "lora" not in p]


# -------------------------------------------------------------------------------------------- import
def load_hf(folder: str | os.PathLike, *, dtype: str | None = None, param_dtype: str | None = None,
            mesh: jax.sharding.Mesh | None = None, rules: Rules = DEFAULT_RULES,
            config: LLMConfig | None = None) -> CausalLM:
    """Load a Hugging Face Qwen2 / Llama checkpoint folder into a :class:`CausalLM`.

    Args:
      folder: holds ``config.json`` and the safetensors weights.
      dtype, param_dtype: compute and storage dtypes ("float32" / "bfloat16"); default float32.
      mesh: shard every parameter over this mesh following ``rules``; each device reads only its slice.
        Without a mesh everything goes to the default device.
      config: overrides ``config.json`` (e.g. a config already parsed and adjusted by the caller).

    Raises CheckpointError listing every missing, unexpected or mis-shaped tensor (with its file).
    """
    folder = pathlib.Path(folder)
    cfg = config or load_config(folder, dtype=dtype, param_dtype=param_dtype)
    tensors = open_checkpoint(folder)
    graphdef, abstract_state = nnx.split(abstract_model(cfg))
    flat = nnx.to_flat_state(abstract_state)

    expected = {}
    for path, var in flat:
        name, transpose = hf_name(path)
        expected[name] = (tuple(path), transpose, var)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(n for n in set(tensors) - set(expected)
                        if not n.endswith(_IGNORED_SUFFIXES) and not (cfg.tie_word_embeddings and n == "lm_head.weight"))
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): "
                        f"{', '.join(f'{n} (in {tensors[n].path.name})' for n in unexpected[:20])}"
                        f"{' ...' if len(unexpected) > 20 else ''}")
    for name, (path, transpose, var) in sorted(expected.items()):
        if name in tensors:
            want = tuple(reversed(var.shape)) if transpose else tuple(var.shape)
            got = tensors[name].shape(name)
            if got != want:
                problems.append(f"tensor {name} in {tensors[name].path.name} has shape {list(got)}, "
                                f"expected {list(want)} from config.json")
    if problems:
        raise CheckpointError(f"{folder}: checkpoint does not match its config ({cfg.model_type}, "
                              f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}):\n  " + "\n  ".join(problems))

    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    new_flat = []
    for path, var in flat:
        name, transpose = hf_name(path)
        src = tensors[name].array(name)
        target_dtype = var.dtype
        sharding = single if mesh is None else jax.sharding.NamedSharding(
            mesh, partition_spec(".".join(str(p) for p in path), var.shape, mesh, rules))

        def read(index, src=src, transpose=transpose, target_dtype=target_dtype):
            # index: the slices of *our* layout that this device holds; read just those bytes.
            block = src[tuple(reversed(index))].T if transpose else src[index]
            return np.ascontiguousarray(block).astype(target_dtype)

        new_flat.append((path, var.replace(value=jax.make_array_from_callback(tuple(var.shape), sharding, read))))
    return nnx.merge(graphdef, nnx.from_flat_state(new_flat))


# -------------------------------------------------------------------------------------------- export
def hf_tensors(model: CausalLM, dtype=None) -> Iterator[tuple[str, tuple[tuple[int, ...], np.dtype], callable]]:
    """Yield (HF name, (shape, dtype), fetch) for each exported tensor; ``fetch()`` returns the numpy array.

    LoRA adapters are merged into their kernels here; tied models omit ``lm_head.weight``.
    """
    linears = {tuple(str(p) for p in path): node for path, node in nnx.iter_graph(model) if isinstance(node, Linear)}
    for path, shape, pdtype in _base_param_paths(model):
        name, transpose = hf_name(path)
        out_dtype = np.dtype(dtype or pdtype)
        owner = linears.get(tuple(str(p) for p in path[:-1]))
        node_attr = path[-1]

        def fetch(owner=owner, node_attr=node_attr, path=path, transpose=transpose, out_dtype=out_dtype):
            var = _get_path(model, path)
            x = var[...]
            if node_attr == "kernel" and owner is not None and owner.lora is not None:
                x = (x.astype(jnp.float32) + owner.lora.delta().astype(jnp.float32)).astype(x.dtype)
            x = np.asarray(jax.device_get(_gather(x)))
            return np.ascontiguousarray(x.T if transpose else x).astype(out_dtype)

        yield name, ((tuple(reversed(shape)) if transpose else shape), out_dtype), fetch


def _get_path(model, path):
    node = model
    for p in path:
        node = node[p] if isinstance(p, int) else getattr(node, p)
    return node


def _gather(x: jax.Array) -> jax.Array:
    """A host-local copy of a (possibly multi-host sharded) array."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return multihost_utils.process_allgather(x, tiled=True)
    return x


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[:-len(unit)]) * mult)
    return int(s)


def save_hf(model: CausalLM, folder: str | os.PathLike, *, source: str | os.PathLike | None = None,
            tokenizer=None, dtype: str | None = None, max_shard_size: int | str = "5GB",
            generation_config: dict | None = None, overwrite: bool = False) -> pathlib.Path:
    """Export ``model`` as a Hugging Face checkpoint folder loadable by ``AutoModelForCausalLM``.

    Args:
      source: the folder the model was imported from: its ``config.json`` fields that this decoder
        does not model are kept, and its tokenizer files and ``generation_config.json`` are copied.
      tokenizer: a transformers tokenizer to ``save_pretrained`` into the folder (instead of copying).
      dtype: "float32" / "bfloat16" for the stored tensors (default: the model's parameter dtype).
      max_shard_size: bytes (or "5GB"-style) per safetensors shard; several shards get an index.
      overwrite: replace an existing non-empty folder (otherwise that is an error).
    """
    folder = pathlib.Path(folder)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(f"{folder}: already exists and is not empty (pass overwrite=True to replace it)")
    cfg: LLMConfig = model.config
    if dtype is not None:
        cfg = cfg.replace(param_dtype=dtype)
    np_dtype = np.dtype(cfg.jnp_param_dtype)
    source = pathlib.Path(source) if source is not None else None
    base = {}
    if source is not None and (source / "config.json").is_file():
        base = json.loads((source / "config.json").read_text())

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        entries = list(hf_tensors(model, np_dtype))
        limit = _parse_size(max_shard_size)
        shards, current, size = [], [], 0
        for entry in entries:
            nbytes = int(np.prod(entry[1][0], dtype=np.int64)) * np_dtype.itemsize
            if current and size + nbytes > limit:
                shards.append(current)
                current, size = [], 0
            current.append(entry)
            size += nbytes
        shards.append(current)
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            fname = SINGLE_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            arrays = {name: fetch() for name, _, fetch in shard}
            write_safetensors(tmp / fname, arrays)
            total += sum(a.nbytes for a in arrays.values())
            weight_map.update({name: fname for name in arrays})
        if len(shards) > 1:
            _write_json(tmp / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
        _write_json(tmp / "config.json", cfg.to_hf_dict(base))
        gen = generation_config
        if gen is None and source is not None and (source / "generation_config.json").is_file():
            gen = json.loads((source / "generation_config.json").read_text())
        if gen is None:
            gen = {"bos_token_id": cfg.bos_token_id, "pad_token_id": cfg.pad_token_id, "do_sample": False,
                   "eos_token_id": list(cfg.eos_token_ids) if len(cfg.eos_token_ids) > 1 else cfg.eos_token_id}
        _write_json(tmp / "generation_config.json", gen)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        elif source is not None:
            for name in TOKENIZER_FILES:
                if (source / name).is_file():
                    shutil.copy2(source / name, tmp / name)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _write_json(path: pathlib.Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
