"""Tiny configurations and a locally built Qwen-style tokenizer for tests, demos and benchmarks.

Nothing is downloaded: the tokenizer is a byte-level BPE trained in memory on a few sentences by the
``tokenizers`` library, wrapped as a transformers ``PreTrainedTokenizerFast`` with the Qwen chat
template and the special tokens ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (eos) and
``<image>`` (the visual-token placeholder).
"""

from __future__ import annotations

import os

from sparsewsi.llm.config import LLMConfig
from sparsewsi.llm.tokenizer import IMAGE_TOKEN, QWEN_CHAT_TEMPLATE

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN)
_CORPUS = (
    "The slide shows invasive ductal carcinoma with a solid growth pattern.",
    "Tumour cells are arranged in nests and cords within a desmoplastic stroma.",
    "No lymphovascular invasion is identified. Margins are clear of tumour.",
    "What is the histological grade of this tumour? The grade is two of three.",
    "Describe the whole slide image. The tissue shows normal glandular architecture.",
    "you are a helpful assistant. user assistant system question answer yes no",
)


def build_tiny_tokenizer(vocab_size: int = 384, save_dir: str | os.PathLike | None = None):
    """A byte-level BPE tokenizer (<= ``vocab_size`` ids, specials first) as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>", IMAGE_TOKEN])
    fast.chat_template = QWEN_CHAT_TEMPLATE
    if save_dir is not None:
        fast.save_pretrained(str(save_dir))
    return fast


def tiny_config(model_type: str = "qwen2", *, vocab_size: int = 384, hidden_size: int = 64,
                intermediate_size: int = 128, num_hidden_layers: int = 2, num_attention_heads: int = 4,
                num_key_value_heads: int = 2, tie_word_embeddings: bool = True, dtype: str = "float32",
                **overrides) -> LLMConfig:
    """A small random-model config (GQA 4:2, head dim 16) matching :func:`build_tiny_tokenizer`'s ids."""
    llama = model_type == "llama"
    return LLMConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, head_dim=hidden_size // num_attention_heads,
        model_type=model_type, tie_word_embeddings=tie_word_embeddings,
        qkv_bias=overrides.pop("qkv_bias", not llama), o_bias=overrides.pop("o_bias", False),
        mlp_bias=overrides.pop("mlp_bias", False), rope_theta=overrides.pop("rope_theta", 10000.0),
        max_position_embeddings=overrides.pop("max_position_embeddings", 512),
        bos_token_id=overrides.pop("bos_token_id", None), eos_token_id=overrides.pop("eos_token_id", 2),
        pad_token_id=overrides.pop("pad_token_id", 0), dtype=dtype, param_dtype=overrides.pop("param_dtype", dtype),
        **overrides)
