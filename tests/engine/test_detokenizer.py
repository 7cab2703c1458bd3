"""Incremental text equals a full decode, and never shows half a character."""

import pytest
from transformers import AutoTokenizer

from engine.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello, world! This is plain ASCII.",
    "Ünïcödé façade — naïve café 🙂🚀 and 日本語のテキスト, 한국어.",
    "  leading spaces\nand\ttabs\n\nand a final emoji 👩‍👩‍👧",
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    return AutoTokenizer.from_pretrained(smollm2_path)


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_text_equals_full_decode(tokenizer, text):
    prompt = tokenizer.encode("Say something:")
    output = tokenizer.encode(text, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, prompt)
    pieces = [detokenizer.add(token) for token in output]
    pieces.append(detokenizer.flush())
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == tokenizer.decode(output)


def test_multibyte_characters_are_held_until_complete(tokenizer):
    output = tokenizer.encode("🚀", add_special_tokens=False)
    assert len(output) > 1, "the emoji spans several byte-level tokens"
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    pieces = [detokenizer.add(token) for token in output]
    assert pieces[:-1] == [""] * (len(output) - 1)
    assert pieces[-1] == "🚀"


def test_special_tokens_are_skipped(tokenizer):
    eos = tokenizer.eos_token_id
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    text = "".join(detokenizer.add(t) for t in tokenizer.encode("done", add_special_tokens=False) + [eos])
    assert text == "done"
