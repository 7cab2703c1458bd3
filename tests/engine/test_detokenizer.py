"""Incremental text equals a full decode, and never shows half a character: through the fast
tokenizer's DecodeStream, through the window of Python-side decodes, and when the stream fails
part way and the window takes over."""

import pytest
from transformers import AutoTokenizer

from engine import detokenizer as detokenizer_module
from engine.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello, world! This is plain ASCII.",
    "Ünïcödé façade — naïve café 🙂🚀 and 日本語のテキスト, 한국어.",
    "  leading spaces\nand\ttabs\n\nand a final emoji 👩‍👩‍👧",
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    return AutoTokenizer.from_pretrained(smollm2_path)


class FailingStream:
    """A DecodeStream that fails on its `fail_at`-th step, as one can on an invalid prefix."""

    def __init__(self, stream, fail_at: int):
        self.stream, self.steps, self.fail_at = stream, 0, fail_at

    def step(self, tokenizer, token_id):
        self.steps += 1
        if self.steps == self.fail_at:
            raise Exception("Invalid prefix encountered")
        return self.stream.step(tokenizer, token_id)


@pytest.fixture(params=["stream", "window", "stream failing"])
def make(request, monkeypatch):
    if request.param == "stream failing":
        # Past the prompt's tail (at most 5 tokens primed), a few tokens into the output.
        real = detokenizer_module._decode_stream
        monkeypatch.setattr(detokenizer_module, "_decode_stream", lambda *args: FailingStream(real(*args), 8))

    def make(tokenizer, prompt):
        assert detokenizer_module._decode_stream(tokenizer, True) is not None, "SmolLM2's fast tokenizer streams"
        return IncrementalDetokenizer(tokenizer, prompt, use_stream=request.param != "window")
    return make


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_text_equals_full_decode(tokenizer, make, text):
    prompt = tokenizer.encode("Say something:")
    output = tokenizer.encode(text, add_special_tokens=False)
    detokenizer = make(tokenizer, prompt)
    pieces = [detokenizer.add(token) for token in output]
    pieces.append(detokenizer.flush())
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == tokenizer.decode(output)


def test_multibyte_characters_are_held_until_complete(tokenizer, make):
    output = tokenizer.encode("🚀", add_special_tokens=False)
    assert len(output) > 1, "the emoji spans several byte-level tokens"
    detokenizer = make(tokenizer, [])
    pieces = [detokenizer.add(token) for token in output]
    assert pieces[:-1] == [""] * (len(output) - 1)
    assert pieces[-1] == "🚀"


def test_special_tokens_are_skipped(tokenizer, make):
    eos = tokenizer.eos_token_id
    detokenizer = make(tokenizer, [])
    text = "".join(detokenizer.add(t) for t in tokenizer.encode("done", add_special_tokens=False) + [eos])
    assert text == "done"
