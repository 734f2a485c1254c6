"""Chat-template prompt building and tokenisation with loss and ``<image>`` masks.

Works with any Hugging Face tokenizer that has a chat template and an ``<image>`` token (e.g. the
Qwen ``<|im_start|>`` template SlideChat uses). The conversation is rendered prefix by prefix, so
each assistant reply's tokens are known exactly: those tokens (reply text and the end-of-turn
marker the template adds) are the ones the loss is taken on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

IMAGE_TOKEN = "<image>"


class PromptError(ValueError):
    """A tokenizer that cannot build the prompts, or a conversation that cannot fit."""


@dataclasses.dataclass(frozen=True)
class TokenizedChat:
    """One tokenised conversation.

    Attributes:
      input_ids: ``[L]`` int32 token ids.
      loss_mask: ``[L]`` bool, True on assistant-reply tokens (the training targets).
      image_position: index in ``input_ids`` of the single ``<image>`` token, where the visual
        tokens go.
      truncated: whether the last reply was cut to fit ``max_tokens``.
    """

    input_ids: np.ndarray
    loss_mask: np.ndarray
    image_position: int
    truncated: bool


def build_messages(user_turns: Sequence[str], assistant_turns: Sequence[str], *, with_answers: bool = True) -> list[dict]:
    """Chat messages with ``<image>`` at the front of the first user turn (SlideChat's order).

    With ``with_answers=False`` only the first user turn is kept (an evaluation prompt).
    """
    if not user_turns:
        raise PromptError("a conversation needs at least one user turn")
    first = f"{IMAGE_TOKEN}\n{user_turns[0]}" if user_turns[0] else IMAGE_TOKEN
    if not with_answers:
        return [{"role": "user", "content": first}]
    if len(assistant_turns) != len(user_turns):
        raise PromptError(f"{len(user_turns)} user turns but {len(assistant_turns)} replies")
    messages = []
    for i, (u, a) in enumerate(zip(user_turns, assistant_turns)):
        messages.append({"role": "user", "content": first if i == 0 else u})
        messages.append({"role": "assistant", "content": a})
    return messages


def image_token_id(tokenizer) -> int:
    """The id of ``<image>`` in ``tokenizer``; raises PromptError when it is not a single token."""
    ids = tokenizer(IMAGE_TOKEN, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise PromptError(f"the tokenizer splits {IMAGE_TOKEN!r} into {len(ids)} tokens; add it as a special token")
    return int(ids[0])


def tokenize_chat(tokenizer, messages: list[dict], *, max_tokens: int, add_generation_prompt: bool = False) -> TokenizedChat:
    """Tokenise ``messages`` with the tokenizer's chat template.

    Args:
      tokenizer: a transformers tokenizer with ``apply_chat_template``.
      messages: ``[{"role": "user"|"assistant", "content": str}, ...]``; exactly one ``<image>``.
      max_tokens: the longest sequence allowed; a too-long last reply is cut (``truncated``),
        a prompt that does not fit even without its reply raises PromptError.
      add_generation_prompt: end with the assistant header (evaluation prompts).

    Returns:
      TokenizedChat with ``input_ids`` ``[L]``, ``loss_mask`` ``[L]``, ``L <= max_tokens``.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise PromptError(f"tokenizer {type(tokenizer).__name__} has no chat template")
    image_id = image_token_id(tokenizer)
    ids: list[int] = []
    mask: list[bool] = []
    rendered = ""
    last = len(messages) - 1
    for k, message in enumerate(messages):
        gen = message["role"] == "user" and (k < last or add_generation_prompt)
        text = tokenizer.apply_chat_template(messages[: k + 1], tokenize=False, add_generation_prompt=gen)
        if not text.startswith(rendered):
            raise PromptError("the chat template is not prefix-stable (a later turn rewrites earlier text)")
        piece = tokenizer(text[len(rendered):], add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        mask.extend([message["role"] == "assistant"] * len(piece))
        rendered = text
    truncated = False
    if len(ids) > max_tokens:
        first_target = mask.index(True) if True in mask else len(ids)
        if first_target >= max_tokens:
            raise PromptError(f"the prompt alone is {first_target} tokens, over the limit of {max_tokens}")
        ids, mask, truncated = ids[:max_tokens], mask[:max_tokens], True
    positions = [i for i, t in enumerate(ids) if t == image_id]
    if len(positions) != 1:
        raise PromptError(f"expected exactly one {IMAGE_TOKEN} token, found {len(positions)}")
    return TokenizedChat(np.asarray(ids, np.int32), np.asarray(mask, bool), positions[0], truncated)
