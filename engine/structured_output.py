"""Structured outputs: each constrained request's grammar, and the mask it puts on its logits.

A request's `StructuredOutput` (a JSON schema, any JSON object, a regex, a choice of strings,
an EBNF grammar) is compiled against the tokenizer's vocabulary by xgrammar, the library vLLM
and SGLang use for the same job: it knows which tokens each grammar state allows, as a bitmask
over the vocabulary, in microseconds per step. A matcher per request follows the tokens it
is given; before each sampling its mask sets every token that cannot continue the output to
-inf, and once the grammar is complete only the end-of-sequence tokens remain.

JSON is compiled without free whitespace (", " and ": " between items, nothing else), so a
small model cannot wander off into endless newlines inside an object, which the any-whitespace
grammar lets it do. xgrammar is imported on the first constrained request: the server pays its
start-up (about a second) only if a client asks.
"""

from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
import functools
import json
import re

import torch

from scheduler import InvalidRequestError, Request, StructuredOutput

GRAMMAR_CACHE_BYTES = 256 * 1024 * 1024


class StructuredOutputs:
    """The grammars of the engine's constrained requests, by request id: compiling, then
    matching the tokens each request samples.

    A constraint is turned into a grammar when its request arrives, which is quick (a few
    milliseconds) and finds every malformed schema, regex or grammar, so those are refused at
    the door. Compiling the grammar against the vocabulary is the slow part, from microseconds
    to minutes (xgrammar is cubic in a JSON object's optional properties: 2,000 of them took
    37 s on one core), so it runs on a thread of its own, which xgrammar lets run beside the
    engine's (it releases the GIL); the engine schedules the request once it is done, and
    requests without a constraint never wait on it."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: frozenset[int]):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the model's: its logits may have more rows than the tokenizer has tokens
        self.eos_token_ids = sorted(eos_token_ids)
        self._compiler = None
        self._compile_thread: ThreadPoolExecutor | None = None
        self._compiling: dict[str, Future] = {}
        self._matchers: dict[str, object] = {}

    def __contains__(self, request_id: str) -> bool:
        """Whether the request has a grammar, compiling or compiled."""
        return request_id in self._matchers or request_id in self._compiling

    @property
    def num_compiling(self) -> int:
        return len(self._compiling)

    def start(self, request_id: str, grammar) -> None:
        """Compile `grammar` (from `grammar()`) for the request on the compile thread; its matcher
        comes out of `take_compiled`."""
        if self._compile_thread is None:
            self._compile_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="iterserve-grammar")
        self._compiling[request_id] = self._compile_thread.submit(self._get_compiler().compile_grammar, grammar)

    def take_compiled(self, timeout_s: float | None = 0.0) -> list[tuple[str, str | None]]:
        """Matchers for the requests whose grammars have compiled, waiting up to `timeout_s`
        (None: for ever) for the first when none has; each as (request id, None), or (request
        id, why) where the compile failed."""
        if not self._compiling:
            return []
        done, _ = wait(self._compiling.values(), timeout=timeout_s, return_when=FIRST_COMPLETED)
        import xgrammar

        compiled = []
        for request_id, future in list(self._compiling.items()):
            if future not in done:
                continue
            del self._compiling[request_id]
            try:
                self._matchers[request_id] = xgrammar.GrammarMatcher(future.result())
                compiled.append((request_id, None))
            except Exception as error:  # noqa: BLE001 - the request fails, not the engine
                compiled.append((request_id, f"its grammar did not compile: {reason(error)}"))
        return compiled

    def grammar(self, constraint: StructuredOutput):
        """The constraint as xgrammar's Grammar, before it is compiled against the vocabulary."""
        try:
            return converted(constraint.kind, constraint.spec)
        except InvalidRequestError as error:
            raise InvalidRequestError(f"{constraint.param}: {error}", param=constraint.param) from None
        except (RuntimeError, ValueError) as error:  # xgrammar's parse and conversion errors
            raise InvalidRequestError(f"{constraint.param} does not compile to a grammar: {reason(error)}",
                                      param=constraint.param) from None

    def _get_compiler(self):
        if self._compiler is None:
            import xgrammar

            info = xgrammar.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                           stop_token_ids=self.eos_token_ids)
            # One thread: the compile thread is one more beside the torch threads already. Its
            # cache makes a repeated grammar free; bounded, since every client can send new ones
            # (a compiled 20,000-value enum holds 26 MB).
            self._compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_limit_bytes=GRAMMAR_CACHE_BYTES)
        return self._compiler

    def release(self, request_id: str) -> None:
        """Forget the request's grammar (a compile still running finishes, unread)."""
        self._matchers.pop(request_id, None)
        self._compiling.pop(request_id, None)

    def accept(self, request_id: str, token_id: int) -> bool:
        """Advance the request's matcher by the token it sampled; False if the grammar refuses it."""
        return self._matchers[request_id].accept_token(token_id)

    def is_complete(self, request_id: str) -> bool:
        """Whether the grammar has ended (it accepted an end-of-sequence token)."""
        return self._matchers[request_id].is_terminated()

    def apply_masks(self, logits: torch.Tensor, requests: list[Request]) -> None:
        """Set to -inf, in place, every token that cannot continue the output of each row whose
        request has a matcher. `logits` is float32, [len(requests), vocab]."""
        import xgrammar

        rows = [row for row, request in enumerate(requests) if request.request_id in self._matchers]
        if not rows:
            return
        bitmask = xgrammar.allocate_token_bitmask(len(requests), self.vocab_size)
        for row in rows:
            self._matchers[requests[row].request_id].fill_next_token_bitmask(bitmask, row)
        xgrammar.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True),
                                             vocab_size=self.vocab_size, indices=rows)


# A request's choices and prompts all carry the same constraint, and each is a request of its
# own: the grammar is made once for them, not once each on the engine's thread.
@functools.lru_cache(maxsize=64)
def converted(kind: str, spec: str):
    """xgrammar's Grammar for a constraint of `kind` (StructuredOutput.KINDS) and `spec`."""
    import xgrammar

    if kind == "json":
        return xgrammar.Grammar.from_json_schema(spec, any_whitespace=False)
    if kind == "json_object":
        return xgrammar.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False)
    if kind == "regex":
        return xgrammar.Grammar.from_regex(spec)
    if kind == "choice":
        return xgrammar.Grammar.from_ebnf(choice_grammar(spec))
    return xgrammar.Grammar.from_ebnf(spec)


def reason(error: Exception) -> str:
    """xgrammar's message without its C++ log prefix ("[02:09:25] /project/cpp/x.cc:94: ")."""
    lines = str(error).strip().splitlines()
    message = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", lines[0]) if lines else type(error).__name__
    return message.removeprefix("Check failed: (error.empty()) is false: ")


def choice_grammar(spec: str) -> str:
    """An EBNF grammar whose sentences are exactly the strings of `spec`, a JSON list."""
    try:
        choices = json.loads(spec)
    except ValueError:
        choices = None
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise InvalidRequestError("the choice must be a list of non-empty strings")
    # EBNF's string literals take JSON's escapes for quotes, backslashes and control characters.
    return "root ::= " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)
