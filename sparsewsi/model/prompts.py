"""Tokenising (question, answer) pairs into the SparseWSI batch contract with a chat template.

A training row is the chat ``[system] user: "<image>\\n{question}"  assistant: "{answer}"``; the loss
is taken on the reply tokens and the end-of-turn marker after it (``loss_mask``). An inference row
(``prompt_only=True``) ends with the assistant header ``<|im_start|>assistant\\n`` and is left-padded,
so every row's last real token is the one generation continues from.

Every row holds exactly one ``<image>`` token, where the model splices in the visual tokens.
"""

from __future__ import annotations

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


def _messages(question: str, answer: str | None, system: str | None) -> list[dict]:
    if IMAGE_TOKEN in question:
        raise PromptError(f"question already contains {IMAGE_TOKEN!r}: {question[:80]!r}")
    msgs = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": f"{IMAGE_TOKEN}\n{question}"})
    if answer is not None:
        msgs.append({"role": "assistant", "content": answer})
    return msgs


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
    image_id = image_token_id(tokenizer)
    rows, targets = [], []
    for i, q in enumerate(questions):
        prompt = tokenizer.apply_chat_template(_messages(q, None, system), tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if prompt_only:
            ids, loss = list(prompt_ids), [0] * len(prompt_ids)
        else:
            full = tokenizer.apply_chat_template(_messages(q, answers[i], system), tokenize=False)
            if not full.startswith(prompt):
                raise PromptError("the chat template renders the reply turn differently from the generation prompt; "
                                  "cannot locate the answer tokens")
            reply_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
            # The template ends the turn with "<|im_end|>\n": learn the end marker, not the newline after it.
            reply = full[len(prompt):]
            if reply.endswith("\n"):
                reply_ids = tokenizer(reply[:-1], add_special_tokens=False)["input_ids"]
            ids, loss = list(prompt_ids) + list(reply_ids), [0] * len(prompt_ids) + [1] * len(reply_ids)
        if ids.count(image_id) != 1:
            raise PromptError(f"row {i}: {ids.count(image_id)} <image> tokens after tokenisation (expected 1)")
        rows.append(ids)
        targets.append(loss)
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
