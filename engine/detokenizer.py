"""Incremental detokenization that never emits half a character.

Decoding token by token is wrong twice over: byte-level BPE splits one UTF-8
character across tokens, and SentencePiece drops a token's leading space when it
is decoded alone. So each step decodes a short window that starts a few tokens
back, and emits only the text past what that window's prefix already produced,
holding back while the text ends in an incomplete character (U+FFFD).
"""

from dataclasses import dataclass, field

# Prompt tokens kept as left context for the first output tokens (as vLLM does).
CONTEXT_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"


@dataclass(slots=True)
class IncrementalDetokenizer:
    tokenizer: object
    prompt_token_ids: list[int]
    skip_special_tokens: bool = True
    token_ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0

    def __post_init__(self):
        self.token_ids = list(self.prompt_token_ids[-CONTEXT_TOKENS:])
        self.read_offset = len(self.token_ids)

    def add(self, token_id: int) -> str:
        """Take one new token; return the text it completes (possibly empty)."""
        self.token_ids.append(token_id)
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        text = self._decode(self.prefix_offset, len(self.token_ids))
        if len(text) > len(prefix_text) and not text.endswith(REPLACEMENT_CHAR):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.token_ids)
            return text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """Whatever is held back, once the sequence has ended."""
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        text = self._decode(self.prefix_offset, len(self.token_ids))
        self.prefix_offset = self.read_offset = len(self.token_ids)
        return text[len(prefix_text):] if len(text) > len(prefix_text) else ""

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self.token_ids[start:end], skip_special_tokens=self.skip_special_tokens)
