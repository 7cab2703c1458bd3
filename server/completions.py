"""POST /v1/completions: prompts (text or token ids, one or many) in, completions out."""

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
    reject_unsupported, COMPLETIONS_DEFAULT_MAX_TOKENS
from server.streaming import event_stream_response


async def create_completion(body: CompletionRequest, request: Request) -> Response:
    serving: ServingState = request.app.state.serving
    serving.check_model(body.model)
    reject_unsupported(body, echo=body.echo, suffix=body.suffix, best_of=body.best_of not in (None, body.n))
    prompts = await serving.run_tokenizer(tokenize_prompts, serving, body.prompt)
    generation = build_generation(serving, body, serving.tenant(request, body), prompts, body.max_tokens,
                                  COMPLETIONS_DEFAULT_MAX_TOKENS, body.logprobs, id_prefix="cmpl")
    stream = serving.engine.submit(generation.requests)
    if body.stream:
        include_usage, continuous_usage = body.usage_in_stream()
        formatter = CompletionChunks(serving, generation, body.logprobs is not None, continuous_usage)
        return await event_stream_response(serving.engine, stream, generation, formatter, include_usage)
    with stream:
        choices = await collect(stream, generation, request)
    response = CompletionResponse(
        id=generation.request_id,
        model=serving.model_name,
        choices=[
            CompletionChoice(
                index=choice.index,
                text=choice.text,
                logprobs=completion_logprobs(serving, choice.logprobs)[0] if body.logprobs is not None else None,
                finish_reason=choice.finish_reason,
            )
            for choice in choices
        ],
        usage=generation.usage(),
    )
    return JSONResponse(response.model_dump())


def tokenize_prompts(serving: ServingState, prompt) -> list[list[int]]:
    """A string, a list of strings, a list of token ids, or a list of those lists."""
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
    token_ids = []
    for item in prompts:
        if isinstance(item, str):
            if not item:
                raise BadRequestError("the prompt is empty", param="prompt")
            token_ids.append(serving.tokenizer.encode(item))
        else:
            token_ids.append(list(item))
    return token_ids


def completion_logprobs(serving: ServingState, logprobs: list[TokenLogprobs],
                        text_offset: int = 0) -> tuple[CompletionLogprobs, int]:
    """The legacy completions format; returns it and the text offset after its last token."""
    result = CompletionLogprobs()
    for entry in logprobs:
        token = serving.token_text(entry.token_id)
        result.tokens.append(token)
        result.token_logprobs.append(logprob_value(entry.logprob))
        top = {serving.token_text(token_id): logprob_value(value) for token_id, value in entry.top}
        top.setdefault(token, logprob_value(entry.logprob))
        result.top_logprobs.append(top)
        result.text_offset.append(text_offset)
        text_offset += len(token)
    return result, text_offset


class CompletionChunks:
    """Streaming chunks of /v1/completions: one per output that carries text, logprobs or an end."""

    def __init__(self, serving: ServingState, generation: Generation, with_logprobs: bool,
                 continuous_usage: bool = False):
        self.serving = serving
        self.generation = generation
        self.with_logprobs = with_logprobs
        self.continuous_usage = continuous_usage
        self.created = int(time.time())
        self.text_offsets: dict[int, int] = {}

    def first_chunks(self) -> list[str]:
        return []

    def chunk(self, output: RequestOutput, choice: ChoiceResult) -> str | None:
        logprobs = None
        if self.with_logprobs and output.new_logprobs:
            offset = self.text_offsets.get(choice.index, 0)
            logprobs, self.text_offsets[choice.index] = completion_logprobs(self.serving, output.new_logprobs, offset)
        if not output.new_text and logprobs is None and not output.finished:
            return None
        finish_reason = output.finish_reason if output.finished else None
        choices = [CompletionChoice(index=choice.index, text=output.new_text, logprobs=logprobs,
                                    finish_reason=finish_reason)]
        return self._response(choices, choice.usage() if self.continuous_usage else None).model_dump_json()

    def usage_chunk(self, usage: Usage) -> str:
        return self._response([], usage).model_dump_json()

    def _response(self, choices: list[CompletionChoice], usage: Usage | None) -> CompletionResponse:
        return CompletionResponse(id=self.generation.request_id, created=self.created,
                                  model=self.serving.model_name, choices=choices, usage=usage)
