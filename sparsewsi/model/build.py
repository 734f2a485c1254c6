"""How a SparseWSI model is built, as data (``ModelSpec``), so a checkpoint can rebuild it.

The spec records where the frozen pieces come from (a Hugging Face LLM folder, or a randomly
initialised LLM from a seed) and the LoRA adapters; the trained parameters live in the checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

from sparsewsi import llm as llm_lib
from sparsewsi.model.config import SparseWSIConfig
from sparsewsi.model.sparsewsi import SparseWSI

TINY_TOKENIZER = "builtin:tiny"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the model structure and its frozen weights.

    Attributes:
      model: the SparseWSI hyper-parameters (including the LLM config).
      llm_path: Hugging Face folder of the pretrained LLM; None -> random LLM from ``model.llm_seed``.
      tokenizer: a tokenizer folder, or ``builtin:tiny`` for ``sparsewsi.llm.build_tiny_tokenizer``;
        None -> ``llm_path``.
      lora_rank / lora_alpha / lora_targets: LoRA adapters on the LLM (rank 0 = none).
    """

    model: SparseWSIConfig
    llm_path: str | None = None
    tokenizer: str | None = None
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: str = llm_lib.LoRAConfig.target_modules

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        return json.dumps(d, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelSpec":
        d = json.loads(text)
        d["model"] = SparseWSIConfig.from_dict(d["model"])
        return cls(**d)


def open_tokenizer(source: str | None, vocab_size: int = 384):
    """A tokenizer folder, or the built-in tiny tokenizer for None / ``builtin:tiny`` (never downloads)."""
    if source is None or source == TINY_TOKENIZER:
        return llm_lib.build_tiny_tokenizer(vocab_size=vocab_size)
    return llm_lib.load_tokenizer(source)


def load_tokenizer(spec: ModelSpec):
    """The spec's tokenizer."""
    return open_tokenizer(spec.tokenizer or spec.llm_path, spec.model.llm.vocab_size)


def build_model(spec: ModelSpec, mesh=None) -> SparseWSI:
    """The model with its frozen weights loaded (LLM from ``llm_path`` or seeded init) and LoRA attached.

    With a mesh, the LLM is loaded straight into its shards and the rest is sharded by the default rules.
    """
    cfg = spec.model
    if spec.llm_path is not None:
        folder = pathlib.Path(spec.llm_path)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder}: not a Hugging Face model folder (no config.json)")
        llm = llm_lib.load_hf(folder, config=cfg.llm, mesh=mesh)
    else:
        llm = llm_lib.create_model(cfg.llm, seed=cfg.llm_seed)
    if spec.lora_rank:
        llm_lib.apply_lora(llm, llm_lib.LoRAConfig(rank=spec.lora_rank, alpha=spec.lora_alpha,
                                                   target_modules=spec.lora_targets))
    model = SparseWSI(cfg, llm)
    if mesh is not None:
        from sparsewsi.model.params import shard_params
        shard_params(model, mesh)
    return model


def llm_config_from(llm_path: str | os.PathLike | None, *, dtype: str = "float32", param_dtype: str = "float32",
                    tiny: dict[str, Any] | None = None) -> llm_lib.LLMConfig:
    """The LLM config: read from ``llm_path``'s config.json, or a tiny random config (``tiny`` overrides)."""
    if llm_path is not None:
        return llm_lib.load_config(llm_path, dtype=dtype, param_dtype=param_dtype)
    return llm_lib.tiny_config(dtype=dtype, param_dtype=param_dtype, **(tiny or {}))
