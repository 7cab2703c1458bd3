"""POST /v1/completions: prompts (text or token ids, one or many) in, completions out."""

from dataclasses import dataclass
import time

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from engine import RequestOutput
from engine.sampler import TokenLogprobs
from server.errors import BadRequestError
from server.protocol import (
    MAX_PROMPTS, CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, Usage,
)
from server.serving import ChoiceResult, Generation, ServingState, build_generation, collect, logprob_value, \
    prompt_logprob_entries, reject_unsupported, COMPLETIONS_DEFAULT_MAX_TOKENS
from server.streaming import TextChunks, event_stream_response


async def create_completion(body: CompletionRequest, request: Request) -> Response:
    serving: ServingState = request.app.state.serving
    serving.check_model(body.model)
    reject_unsupported(body, suffix=body.suffix, best_of=body.best_of not in (None, body.n))
    echo = Echo.of(body)
    prompts, texts = await serving.run_tokenizer(tokenize_prompts, serving, body.prompt)
    generation = build_generation(serving, body, serving.tenant(request, body), prompts,
                                  1 if echo is not None and echo.prompt_only else body.max_tokens,
                                  COMPLETIONS_DEFAULT_MAX_TOKENS, body.logprobs, prompt_logprobs_wanted(body),
                                  id_prefix="cmpl")
    if echo is not None:  # only now: build_generation has checked every token id is the model's
        texts = await serving.run_tokenizer(prompt_texts, serving, prompts, texts)
    stream = serving.engine.submit(generation.requests)
    if body.stream:
        include_usage, continuous_usage = body.usage_in_stream()
        formatter = CompletionChunks(serving, generation, body.logprobs, continuous_usage, echo, texts)
        return await event_stream_response(serving.engine, stream, generation, formatter, include_usage)
    with stream:
        choices = await collect(stream, generation, request)
    response = CompletionResponse(
        id=generation.request_id,
        model=serving.model_name,
        choices=[completion_choice(serving, body, choice, echo, generation.prompts, texts) for choice in choices],
        usage=generation.usage(),
    )
    return JSONResponse(response.model_dump())


@dataclass(slots=True, frozen=True)
class Echo:
    """`echo`: each choice's text (and logprobs) starts with its prompt's. With `max_tokens: 0`
    the prompt is all it returns (the engine still runs one token, and drops it, as vLLM does):
    how lm-eval-harness scores a text."""

    prompt_only: bool

    @classmethod
    def of(cls, body: CompletionRequest) -> "Echo | None":
        return cls(prompt_only=body.max_tokens == 0) if body.echo else None


def prompt_logprobs_wanted(body: CompletionRequest) -> int | None:
    """How many alternatives the engine scores each prompt token with: echoed logprobs need
    the prompt's, and vLLM's prompt_logprobs asks for them itself."""
    wanted = [n for n in (body.prompt_logprobs, body.logprobs if body.echo else None) if n is not None]
    return max(wanted) if wanted else None


def completion_choice(serving: ServingState, body: CompletionRequest, choice: ChoiceResult, echo: Echo | None,
                      prompts: list[list[int]], texts: list[str]) -> CompletionChoice:
    text, logprobs, first_token = choice.text, choice.logprobs, None
    if echo is not None:
        text, logprobs = echoed(echo, texts[choice.prompt_index], choice, text, logprobs)
        first_token = prompts[choice.prompt_index][0]
    return CompletionChoice(
        index=choice.index,
        text=text,
        logprobs=None if body.logprobs is None else completion_logprobs(
            serving, logprobs, body.logprobs, first_token=first_token)[0],
        finish_reason=choice.finish_reason,
        prompt_logprobs=None if body.prompt_logprobs is None else prompt_logprob_entries(
            serving, choice.prompt_logprobs, body.prompt_logprobs),
    )


def echoed(echo: Echo, prompt_text: str, choice: ChoiceResult, text: str,
           logprobs: list[TokenLogprobs]) -> tuple[str, list[TokenLogprobs]]:
    """Generated `text` and `logprobs` with the prompt's put in front (the prompt's first token,
    which has no logprob, is left for `completion_logprobs` to put first)."""
    prompt_scores = (choice.prompt_logprobs or [None])[1:]
    if echo.prompt_only:
        return prompt_text, prompt_scores
    return prompt_text + text, prompt_scores + logprobs


def tokenize_prompts(serving: ServingState, prompt) -> tuple[list[list[int]], list[str | None]]:
    """A string, a list of strings, a list of token ids, or a list of those lists: each prompt's
    token ids, and its text where it was sent as text (None where it came as token ids)."""
    if isinstance(prompt, str):
        prompts = [prompt]
    elif not prompt:
        raise BadRequestError("the prompt is empty", param="prompt")
    elif isinstance(prompt[0], int):
        prompts = [prompt]
    else:
        prompts = prompt
    if len(prompts) > MAX_PROMPTS:
        raise BadRequestError(f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}", param="prompt")
    token_ids, texts = [], []
    for item in prompts:
        if isinstance(item, str):
            if not item:
                raise BadRequestError("the prompt is empty", param="prompt")
            token_ids.append(serving.tokenizer.encode(item))
            texts.append(item)
        else:
            token_ids.append(list(item))
            texts.append(None)
    return token_ids, texts


def prompt_texts(serving: ServingState, prompts: list[list[int]], texts: list[str | None]) -> list[str]:
    """What `echo` returns of each prompt: the text as sent, or the token ids decoded."""
    return [serving.tokenizer.decode(ids) if text is None else text for ids, text in zip(prompts, texts)]


def completion_logprobs(serving: ServingState, logprobs: list[TokenLogprobs], number: int, text_offset: int = 0,
                        first_token: int | None = None) -> tuple[CompletionLogprobs, int]:
    """The legacy completions format, with up to `number` alternatives a token; returns it and
    the text offset after its last token. `first_token`, an echoed prompt's first, opens it
    with no logprob: nothing came before it."""
    result = CompletionLogprobs()
    if first_token is not None:
        token = serving.token_text(first_token)
        result.tokens.append(token)
        result.token_logprobs.append(None)
        result.top_logprobs.append(None)
        result.text_offset.append(text_offset)
        text_offset += len(token)
    for entry in logprobs:
        token = serving.token_text(entry.token_id)
        result.tokens.append(token)
        result.token_logprobs.append(logprob_value(entry.logprob))
        top = {serving.token_text(token_id): logprob_value(value) for token_id, value in entry.top[:number]}
        top.setdefault(token, logprob_value(entry.logprob))
        result.top_logprobs.append(top)
        result.text_offset.append(text_offset)
        text_offset += len(token)
    return result, text_offset


class CompletionChunks:
    """Streaming chunks of /v1/completions: one per output that carries text, logprobs or an
    end; with `echo`, a choice's first chunk starts with its prompt."""

    def __init__(self, serving: ServingState, generation: Generation, logprobs: int | None,
                 continuous_usage: bool = False, echo: Echo | None = None, prompt_texts: list[str] = ()):
        self.serving = serving
        self.generation = generation
        self.logprobs = logprobs
        self.continuous_usage = continuous_usage
        self.echo = echo
        self.prompt_texts = prompt_texts
        self.created = int(time.time())
        self.text_offsets: dict[int, int] = {}
        self.echoed: set[int] = set()
        self.text_chunks = TextChunks(lambda index, text: self._response(
            [CompletionChoice(index=index, text=text, logprobs=None, finish_reason=None)], None).model_dump_json())

    def first_chunks(self) -> list[str]:
        return []

    def chunk(self, output: RequestOutput, choice: ChoiceResult) -> str | None:
        text, new_logprobs, first_token = output.new_text, output.new_logprobs, None
        if self.echo is not None:
            if choice.index not in self.echoed:
                self.echoed.add(choice.index)
                text, new_logprobs = echoed(self.echo, self.prompt_texts[choice.prompt_index], choice, text,
                                            new_logprobs)
                first_token = self.generation.prompts[choice.prompt_index][0]
            elif self.echo.prompt_only:
                text, new_logprobs = "", []
        logprobs = None
        if self.logprobs is not None and (new_logprobs or first_token is not None):
            offset = self.text_offsets.get(choice.index, 0)
            logprobs, self.text_offsets[choice.index] = completion_logprobs(
                self.serving, new_logprobs, self.logprobs, offset, first_token)
        if not text and logprobs is None and not output.finished:
            return None
        if logprobs is None and not output.finished and not self.continuous_usage:
            return self.text_chunks(choice.index, text)
        finish_reason = output.finish_reason if output.finished else None
        choices = [CompletionChoice(index=choice.index, text=text, logprobs=logprobs, finish_reason=finish_reason)]
        return self._response(choices, choice.usage() if self.continuous_usage else None).model_dump_json()

    def usage_chunk(self, usage: Usage) -> str:
        return self._response([], usage).model_dump_json()

    def _response(self, choices: list[CompletionChoice], usage: Usage | None) -> CompletionResponse:
        return CompletionResponse(id=self.generation.request_id, created=self.created,
                                  model=self.serving.model_name, choices=choices, usage=usage)
