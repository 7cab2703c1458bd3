"""Incremental detokenization that never emits half a character.

Decoding token by token is wrong twice over: byte-level BPE splits one UTF-8
character across tokens, and SentencePiece drops a token's leading space when it
is decoded alone. So each step decodes a short window that starts a few tokens
back, and emits only the text past what that window's prefix already produced,
holding back while the text ends in an incomplete character (U+FFFD).

A fast (Rust) tokenizer does the same in its own `DecodeStream`, seven times faster
per token than two Python-side decodes (this is the server's per-token host work, as
in vLLM v1); the window is the fallback for other tokenizers, for those whose decode
cleans up spaces afterwards (which the stream does not), and for a request whose
stream fails.
"""

from dataclasses import dataclass, field
import logging

logger = logging.getLogger(__name__)

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
    use_stream: bool = True  # False: windows only
    stream: object = None  # the fast tokenizer's DecodeStream, from the first token on

    def __post_init__(self):
        self.token_ids = list(self.prompt_token_ids[-CONTEXT_TOKENS:])
        self.read_offset = len(self.token_ids)

    def add(self, token_id: int) -> str:
        """Take one new token; return the text it completes (possibly empty)."""
        if self.stream is None and self.use_stream:
            # Made here, not when the request is made: the tokenizer is used only on the thread
            # that decodes (a server's front end creates requests on another).
            self._start_stream()
        self.token_ids.append(token_id)
        if self.stream is not None:
            piece = self._step(token_id)
            if piece is not False:
                if piece:  # the offsets follow, so the window can take over at any token
                    self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
                return piece or ""
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

    def _start_stream(self) -> None:
        self.stream = _decode_stream(self.tokenizer, self.skip_special_tokens)
        if self.stream is None:
            self.use_stream = False
            return
        # Primed with the prompt's tail, as the window is: a first token's leading space.
        for token_id in self.token_ids:
            if self._step(token_id) is False:
                return

    def _step(self, token_id: int) -> str | None | bool:
        """The stream's text for one more token (None: held back), or False once it failed and
        the window has taken over."""
        try:
            return self.stream.step(self.tokenizer._tokenizer, token_id)
        except Exception as error:  # noqa: BLE001 - e.g. "Invalid prefix": the window still decodes right
            logger.debug("DecodeStream failed (%s); decoding this request by windows", error)
            self.stream, self.use_stream = None, False
            return False


def _decode_stream(tokenizer, skip_special_tokens: bool):
    """A DecodeStream for a fast tokenizer whose decode adds nothing of its own, else None."""
    if getattr(tokenizer, "_tokenizer", None) is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None
    try:
        from tokenizers.decoders import DecodeStream
    except ImportError:  # a tokenizers release before it
        return None
    return DecodeStream(skip_special_tokens=skip_special_tokens)


@dataclass(slots=True)
class RequestText:
    """One request's output text: decoded token by token, searched for its stop strings, and
    released short of any tail that could still become one. The engine keeps one per request
    for the offline API; the server's front end keeps them itself (issue 10), so the engine
    process never decodes text."""

    detokenizer: IncrementalDetokenizer
    stop: list[str]
    include_stop_str_in_output: bool = False
    min_tokens: int = 0  # stop strings count only once more tokens than this have come (as vLLM)
    num_tokens: int = 0
    text: str = ""
    num_released: int = 0
    stopped: bool = False  # a stop string was found: the request ends at this token

    @classmethod
    def start(cls, tokenizer, prompt_token_ids: list[int], params) -> "RequestText":
        """`params`: the request's SamplingParams."""
        return cls(IncrementalDetokenizer(tokenizer, prompt_token_ids, params.skip_special_tokens),
                   list(params.stop), params.include_stop_str_in_output, params.min_tokens)

    def add(self, token_id: int, last: bool) -> str:
        """Take the next token (`last` when the engine ended the request on it) and return the
        text that can go to the client now; `stopped` is set if a stop string ended it here."""
        new_from = len(self.text)
        self.text += self.detokenizer.add(token_id)
        self.num_tokens += 1
        if last:
            self.text += self.detokenizer.flush()
        if self.stop and self.num_tokens > self.min_tokens and self._truncate_at_stop(new_from):
            self.stopped = True
        if last or self.stopped:
            released = len(self.text)
        else:
            # Hold back a tail that could be the start of a stop string.
            held = max((len(s) for s in self.stop), default=1) - 1
            released = max(self.num_released, len(self.text) - held)
        new_text = self.text[self.num_released:released]
        self.num_released = released
        return new_text

    def _truncate_at_stop(self, new_from: int) -> bool:
        """Cut the text at the first stop string that ends in what this token added (text from
        `new_from` on): one that ended earlier was either found then or came within min_tokens.
        Such a match starts in the held-back tail, never in text already released."""
        found = [(index, s) for s in self.stop if (index := self.text.find(s, max(0, new_from - len(s) + 1))) >= 0]
        if not found:
            return False
        index, stop = min(found)
        self.text = self.text[: index + len(stop) if self.include_stop_str_in_output else index]
        return True
