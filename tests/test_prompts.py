"""Chat-template tokenisation shared by training batches, the grain pipeline and evaluation prompts."""

import numpy as np
import pytest

from sparsewsi.llm import IMAGE_TOKEN, build_tiny_tokenizer
from sparsewsi.model.prompts import PromptError, build_messages, encode_chats, tokenize_chat


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def test_multi_turn_loss_covers_each_reply_and_its_end_marker(tokenizer):
    messages = build_messages(["What is shown?", "Grade?"], ["Tumour cells.", "Grade 2."])
    chat = tokenize_chat(tokenizer, messages)
    ids, mask = chat.input_ids, chat.loss_mask
    assert ids[chat.image_position] == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    # contiguous runs of loss tokens, decoded
    runs, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(int(i))
        elif current:
            runs.append(tokenizer.decode(current)), current.clear()
    assert runs == ["Tumour cells.<|im_end|>", "Grade 2.<|im_end|>"]
    # The image goes to the front of the first user turn only.
    assert messages[0]["content"].startswith(f"{IMAGE_TOKEN}\n") and IMAGE_TOKEN not in messages[2]["content"]


def test_generation_prompt_ends_with_the_assistant_header(tokenizer):
    chat = tokenize_chat(tokenizer, build_messages(["Which letter?"]), add_generation_prompt=True)
    assert tokenizer.decode(chat.input_ids).endswith("<|im_start|>assistant\n")
    assert not chat.loss_mask.any()


def test_encode_chats_rows_equal_tokenize_chat(tokenizer):
    questions, answers = ["Q one?", "A much longer second question?"], ["A. yes", "B. no"]
    batch = encode_chats(tokenizer, questions, answers, pad_to_multiple_of=8)
    for row, (q, a) in enumerate(zip(questions, answers)):
        chat = tokenize_chat(tokenizer, build_messages([q], [a]))
        n = len(chat.input_ids)
        np.testing.assert_array_equal(batch["input_ids"][row, :n], chat.input_ids)  # right-padded
        np.testing.assert_array_equal(batch["loss_mask"][row, :n], chat.loss_mask.astype(np.int32))
        assert batch["attention_mask"][row].sum() == n
    prompts = encode_chats(tokenizer, questions, prompt_only=True)
    assert (prompts["attention_mask"][:, -1] == 1).all()  # left-padded: generation continues from the end


def test_truncation_and_errors(tokenizer):
    messages = build_messages(["Q?"], ["a very long answer " * 20])
    full = tokenize_chat(tokenizer, messages)
    cut = tokenize_chat(tokenizer, messages, max_tokens=len(full.input_ids) - 5)
    assert cut.truncated and len(cut.input_ids) == len(full.input_ids) - 5
    with pytest.raises(PromptError, match="prompt alone"):
        tokenize_chat(tokenizer, messages, max_tokens=5)
    with pytest.raises(PromptError, match="already contains"):
        build_messages([f"{IMAGE_TOKEN} twice"])
    with pytest.raises(PromptError, match="replies"):
        build_messages(["a", "b"], ["only one"])
