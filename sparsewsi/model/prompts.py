"""Tokenising (question, answer) pairs into the SparseWSI batch contract with a chat template.

A training row is the chat ``[system] user: "<image>\\n{question}"  assistant: "{answer}"``; the loss
is taken on the reply tokens and the end-of-turn marker after it (``loss_mask``). An inference row
(``prompt_only=True``) ends with the assistant header ``<|im_start|>assistant\\n`` and is left-padded,
so every row's last real token is the one generation continues from.

Every row holds exactly one ``<image>`` token, where the model splices in the visual tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from sparsewsi.llm import IMAGE_TOKEN


class PromptError(ValueError):
    """A tokenizer or text that cannot form a valid SparseWSI prompt."""


def image_token_id(tokenizer) -> int:
    """The id of ``<image>``; raises PromptError when the tokenizer does not keep it as one token."""
    ids = tokenizer(IMAGE_TOKEN, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise PromptError(f"the tokenizer splits {IMAGE_TOKEN!r} into {len(ids)} tokens; add it as a special token")
    return int(ids[0])


@dataclasses.dataclass(frozen=True)
class TokenizedChat:
    """One tokenised conversation.

    Attributes:
      input_ids: ``[L]`` int32 token ids.
      loss_mask: ``[L]`` bool, True on the assistant-reply tokens (reply text and the end-of-turn
        marker; not the newline the template writes after the marker).
      image_position: index in ``input_ids`` of the single ``<image>`` token.
      truncated: whether the last reply was cut to fit ``max_tokens``.
    """

    input_ids: np.ndarray
    loss_mask: np.ndarray
    image_position: int
    truncated: bool


def build_messages(user_turns: Sequence[str], assistant_turns: Sequence[str] | None = None, *,
                   system: str | None = None) -> list[dict]:
    """Chat messages with ``<image>`` at the front of the first user turn (SlideChat's order).

    Without ``assistant_turns`` only the first user turn is kept (a generation prompt).
    """
    if not user_turns:
        raise PromptError("a conversation needs at least one user turn")
    if any(IMAGE_TOKEN in u for u in user_turns):
        raise PromptError(f"a user turn already contains {IMAGE_TOKEN!r}: {user_turns[0][:80]!r}")
    first = f"{IMAGE_TOKEN}\n{user_turns[0]}" if user_turns[0] else IMAGE_TOKEN
    messages = [{"role": "system", "content": system}] if system else []
    if assistant_turns is None:
        return messages + [{"role": "user", "content": first}]
    if len(assistant_turns) != len(user_turns):
        raise PromptError(f"{len(user_turns)} user turns but {len(assistant_turns)} replies")
    for i, (u, a) in enumerate(zip(user_turns, assistant_turns)):
        messages.append({"role": "user", "content": first if i == 0 else u})
        messages.append({"role": "assistant", "content": a})
    return messages


def tokenize_chat(tokenizer, messages: list[dict], *, max_tokens: int | None = None,
                  add_generation_prompt: bool = False) -> TokenizedChat:
    """Tokenises ``messages`` with the tokenizer's chat template, marking the reply tokens.

    The conversation is rendered prefix by prefix, so each assistant reply's tokens are known
    exactly (works for any prefix-stable template, e.g. Qwen's ``<|im_start|>`` format).

    Args:
      tokenizer: a transformers tokenizer with ``apply_chat_template`` and a single-token ``<image>``.
      messages: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``; exactly one ``<image>``.
      max_tokens: the longest sequence allowed; a too-long last reply is cut (``truncated``), a
        prompt that does not fit even without its reply raises PromptError.
      add_generation_prompt: end with the assistant header (a generation prompt).
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise PromptError(f"tokenizer {type(tokenizer).__name__} has no chat template")
    image_id = image_token_id(tokenizer)
    ids: list[int] = []
    mask: list[bool] = []
    rendered = ""
    last = len(messages) - 1
    for i, message in enumerate(messages):
        gen = message["role"] != "assistant" and (
            (i < last and messages[i + 1]["role"] == "assistant") or (i == last and add_generation_prompt))
        text = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False, add_generation_prompt=gen)
        if not text.startswith(rendered):
            raise PromptError("the chat template is not prefix-stable (a later turn rewrites earlier text)")
        piece = text[len(rendered):]
        rendered = text
        if message["role"] == "assistant" and piece.endswith("\n"):
            # Learn the reply and its end-of-turn marker, not the newline the template puts after it.
            reply = tokenizer(piece[:-1], add_special_tokens=False)["input_ids"]
            tail = tokenizer("\n", add_special_tokens=False)["input_ids"]
            ids += reply + tail
            mask += [True] * len(reply) + [False] * len(tail)
        else:
            piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
            ids += piece_ids
            mask += [message["role"] == "assistant"] * len(piece_ids)
    truncated = False
    if max_tokens is not None and len(ids) > max_tokens:
        first_target = mask.index(True) if True in mask else len(ids)
        if first_target >= max_tokens:
            raise PromptError(f"the prompt alone is {first_target} tokens, over the limit of {max_tokens}")
        ids, mask, truncated = ids[:max_tokens], mask[:max_tokens], True
    positions = [j for j, t in enumerate(ids) if t == image_id]
    if len(positions) != 1:
        raise PromptError(f"expected exactly one {IMAGE_TOKEN} token, found {len(positions)}")
    return TokenizedChat(np.asarray(ids, np.int32), np.asarray(mask, bool), positions[0], truncated)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple if multiple > 1 else n


def encode_chats(tokenizer, questions: Sequence[str], answers: Sequence[str] | None = None, *,
                 prompt_only: bool = False, max_length: int | None = None, pad_to_multiple_of: int = 16,
                 system: str | None = None) -> dict[str, np.ndarray]:
    """Tokenise a batch of chats into ``input_ids / attention_mask / loss_mask`` ``[B, T]``.

    Args:
      tokenizer: a transformers tokenizer with a chat template and a single-token ``<image>``.
      questions: B user questions (the ``<image>`` placeholder is put in front of each).
      answers: B replies (training); ignored with ``prompt_only``.
      prompt_only: return the ids up to and including the assistant header, left-padded
        (for generation); ``loss_mask`` is then all zero.
      max_length: T; a training row longer than that has its reply truncated (the prompt must fit),
        default: the longest row rounded up to ``pad_to_multiple_of``.
      system: an optional system turn (the template's default otherwise).
    Returns:
      int32 ``input_ids``, ``attention_mask`` and ``loss_mask`` of shape ``[B, T]``.
    """
    if not prompt_only and (answers is None or len(answers) != len(questions)):
        raise PromptError(f"{len(questions)} questions need as many answers for training rows")
    rows, targets = [], []
    for i, q in enumerate(questions):
        try:
            if prompt_only:
                chat = tokenize_chat(tokenizer, build_messages([q], system=system), add_generation_prompt=True)
            else:
                chat = tokenize_chat(tokenizer, build_messages([q], [answers[i]], system=system))
        except PromptError as e:
            raise PromptError(f"row {i}: {e}") from e
        rows.append(chat.input_ids.tolist())
        targets.append(chat.loss_mask.astype(int).tolist())
    longest = max(len(r) for r in rows)
    t = max_length if max_length is not None else _round_up(longest, pad_to_multiple_of)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    b = len(rows)
    input_ids = np.full((b, t), pad, np.int32)
    attention = np.zeros((b, t), np.int32)
    loss_mask = np.zeros((b, t), np.int32)
    for i, (ids, loss) in enumerate(zip(rows, targets)):
        if len(ids) > t:
            prompt_len = len(ids) - sum(loss)
            if prompt_only or prompt_len >= t:
                raise PromptError(f"row {i}: the prompt has {prompt_len} tokens, more than max_length={t}")
            ids, loss = ids[:t], loss[:t]
        n = len(ids)
        sl = slice(t - n, t) if prompt_only else slice(0, n)  # left-pad prompts, right-pad training rows
        input_ids[i, sl] = ids
        attention[i, sl] = 1
        loss_mask[i, sl] = loss
    return {"input_ids": input_ids, "attention_mask": attention, "loss_mask": loss_mask}


def check_batch(batch: dict, image_id: int, *, training: bool = True) -> None:
    """Validates a batch against the contract; raises ValueError naming the field and the problem."""
    required = ["features", "feature_mask", "input_ids", "attention_mask"] + (["loss_mask"] if training else [])
    missing = [k for k in required if k not in batch]
    if missing:
        raise ValueError(f"batch lacks {missing}; it has {sorted(batch)}")
    f, m, ids = np.shape(batch["features"]), np.shape(batch["feature_mask"]), np.shape(batch["input_ids"])
    if len(f) != 3 or m != f[:2]:
        raise ValueError(f"features {f} must be [B, N, D] and feature_mask {m} [B, N]")
    if len(ids) != 2 or ids[0] != f[0]:
        raise ValueError(f"input_ids {ids} must be [B, T] with the batch size of features {f}")
    for key in ("attention_mask", "loss_mask"):
        if key in batch and np.shape(batch[key]) != ids:
            raise ValueError(f"{key} has shape {np.shape(batch[key])}, input_ids {ids}")
    counts = (np.asarray(batch["input_ids"]) == image_id).sum(1)
    bad = np.flatnonzero(counts != 1)
    if len(bad):
        raise ValueError(f"rows {bad[:8].tolist()} hold {counts[bad[:8]].tolist()} <image> tokens (id {image_id}); "
                         "each row needs exactly one")
