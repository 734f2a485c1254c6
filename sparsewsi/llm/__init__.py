"""The Flax NNX LLM: a Qwen2 / Llama decoder with Hugging Face import/export, LoRA and generation.

Typical use::

    from sparsewsi import llm
    model = llm.load_hf("Qwen2.5-7B-Instruct/", dtype="bfloat16", mesh=llm.make_mesh(fsdp=8))
    tok = llm.load_tokenizer("Qwen2.5-7B-Instruct/")
    ids, texts = llm.generate_text(model, tok, ["Describe the slide."])
"""

from sparsewsi.llm.config import LLMConfig, UnsupportedModelError, load_config
from sparsewsi.llm.generate import SamplingConfig, generate, generate_text, generate_tokens, sample_token, stop_token_ids
from sparsewsi.llm.hf_io import CheckpointError, SafetensorsFile, load_hf, open_checkpoint, save_hf, write_safetensors
from sparsewsi.llm.lora import (LoRA, LoRAConfig, LoRAParam, apply_lora, freeze_except, merge_lora, trainable_filter,
                                trainable_mask)
from sparsewsi.llm.model import CausalLM, abstract_model, create_model, init_cache
from sparsewsi.llm.sharding import DEFAULT_RULES, batch_sharding, make_mesh, partition_spec, shard_model, state_shardings
from sparsewsi.llm.tiny import build_tiny_tokenizer, tiny_config
from sparsewsi.llm.tokenizer import IMAGE_TOKEN, QWEN_CHAT_TEMPLATE, load_tokenizer

__all__ = [
    "LLMConfig", "UnsupportedModelError", "load_config", "SamplingConfig", "generate", "generate_text",
    "generate_tokens", "sample_token", "stop_token_ids", "CheckpointError", "SafetensorsFile", "load_hf",
    "open_checkpoint", "save_hf", "write_safetensors", "LoRA", "LoRAConfig", "LoRAParam", "apply_lora",
    "freeze_except", "merge_lora", "trainable_filter", "trainable_mask", "CausalLM", "abstract_model",
    "create_model", "init_cache", "DEFAULT_RULES", "batch_sharding", "make_mesh", "partition_spec", "shard_model",
    "state_shardings", "build_tiny_tokenizer", "tiny_config", "IMAGE_TOKEN", "QWEN_CHAT_TEMPLATE", "load_tokenizer",
]
