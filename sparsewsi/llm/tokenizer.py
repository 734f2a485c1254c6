"""Tokenizers from checkpoint folders (through transformers) and the Qwen chat template."""

from __future__ import annotations

import os
import pathlib

# The Qwen2 / Qwen2.5-Instruct template: <|im_start|>role\ncontent<|im_end|>\n, default system turn.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
IMAGE_TOKEN = "<image>"


def load_tokenizer(folder: str | os.PathLike):
    """A transformers fast tokenizer from a local folder (never downloads); Qwen template if it has none."""
    from transformers import AutoTokenizer

    folder = pathlib.Path(folder)
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"{folder}: no tokenizer.json or tokenizer_config.json")
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if not getattr(tok, "chat_template", None) and "<|im_start|>" in tok.get_vocab():
        tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok
