"""Server-sent events exactly as OpenAI clients read them.

Each chunk is one `data: {json}` event; with `stream_options.include_usage` a last
chunk with `choices: []` carries the usage; `data: [DONE]` ends every stream. An
error after the stream has started cannot change the status code any more, so it
is sent as a `data:` event carrying the error envelope, then `[DONE]` (the openai
client raises it as an `APIError`).
"""

from dataclasses import replace
import json
import logging
from typing import AsyncIterator, Callable, Protocol

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from engine import RequestOutput
from server.async_engine import AsyncEngine, OutputStream
from server.errors import APIError, EngineError
from server.protocol import Usage
from server.serving import ChoiceResult, Generation, failure

logger = logging.getLogger(__name__)

DONE_EVENT = "data: [DONE]\n\n"


def event(data: str) -> str:
    return f"data: {data}\n\n"


class TextChunks:
    """A stream's chunks that carry nothing but new text, each exactly as the response model
    would dump it: the text's JSON spliced into one dump per choice made with a marker for the
    text. Most chunks of a stream are these, and the model's dump cost 4.4 µs of our ~15 µs of
    work per streamed token; the splice about 1 µs (BENCHMARKS.md, session 15)."""

    MARK = "ITERSERVE_TEXT_MARK"

    def __init__(self, dump: Callable[[int, str], str]):
        self.dump = dump  # (choice index, text) -> the chunk's JSON
        self.templates: dict[int, tuple[str, str]] = {}

    def __call__(self, index: int, text: str) -> str:
        template = self.templates.get(index)
        if template is None:
            # From the right: what follows the text in a chunk (finish_reason, usage) is never
            # the client's, what comes before it (the model's name) may be anything.
            before, after = self.dump(index, self.MARK).rsplit(json.dumps(self.MARK), 1)
            template = self.templates[index] = (before, after)
        return template[0] + json.dumps(text, ensure_ascii=False) + template[1]


class ChunkFormatter(Protocol):
    def first_chunks(self) -> list[str]: ...
    def chunk(self, output: RequestOutput, choice: ChoiceResult) -> str | None: ...
    def usage_chunk(self, usage: Usage) -> str: ...


async def stream_events(stream: OutputStream, generation: Generation, formatter: ChunkFormatter,
                        include_usage: bool) -> AsyncIterator[str]:
    try:
        # The opening chunks (chat's role) wait for the engine's first output, as vLLM sends
        # them: clients such as vLLM's benchmark time the first token from the first chunk.
        opening = [event(chunk) for chunk in formatter.first_chunks()]
        async for output in stream:
            # What else is here already goes out in the same write, each request's outputs as one chunk.
            events, error = format_outputs(merge_outputs([output, *stream.take_ready()]), generation, formatter)
            if opening:
                events, opening = opening + events, []
            if events:
                yield "".join(events)
            if error is not None:
                raise error
        if include_usage:
            yield event(formatter.usage_chunk(generation.usage()))
    except APIError as error:
        yield event(json.dumps(error.envelope()))
    except Exception as error:  # noqa: BLE001 - the client still deserves an envelope and [DONE]
        logger.exception("streaming %s failed", generation.request_id)
        yield event(json.dumps(EngineError(f"internal error: {type(error).__name__}").envelope()))
    yield DONE_EVENT


def format_outputs(outputs: list[RequestOutput], generation: Generation,
                   formatter: ChunkFormatter) -> tuple[list[str], APIError | None]:
    """The events for `outputs`, up to the first that failed, and its error."""
    events = []
    for output in outputs:
        choice = generation.choices[output.request_id]
        choice.add(output)
        error = failure(output.finish_reason, output.error)
        if error is not None:
            return events, error
        chunk = formatter.chunk(output, choice)
        if chunk is not None:
            events.append(event(chunk))
    return events, None


def merge_outputs(outputs: list[RequestOutput]) -> list[RequestOutput]:
    """Each request's consecutive outputs as one, in the order the requests first appear (as
    vLLM's front end merges the deltas a slow reader has not taken yet). An output that failed
    stays on its own, after what came before it."""
    position: dict[str, int] = {}  # request id -> where its output being merged into stands
    result: list[RequestOutput] = []
    for output in outputs:
        index = position.get(output.request_id)
        last = result[index] if index is not None else None
        if last is None or last.finished or failure(output.finish_reason, output.error) is not None:
            position[output.request_id] = len(result)
            result.append(output)
            continue
        result[index] = replace(output, new_token_ids=last.new_token_ids + output.new_token_ids,
                                new_text=last.new_text + output.new_text,
                                new_logprobs=last.new_logprobs + output.new_logprobs,
                                prompt_logprobs=last.prompt_logprobs or output.prompt_logprobs)
    return result


async def event_stream_response(engine: AsyncEngine, stream: OutputStream, generation: Generation,
                                formatter: ChunkFormatter, include_usage: bool) -> "EventStreamResponse":
    """The streaming response for a submitted generation. Where the engine may still refuse a
    request as it queues it (AsyncEngine.refuses_at_queueing), wait for that first, so the
    refusal is an HTTP status rather than an error event after a 200."""
    if engine.refuses_at_queueing:
        try:
            await stream.queued()
        except APIError:
            stream.close()
            raise
    return EventStreamResponse(stream_events(stream, generation, formatter, include_usage), stream)


class EventStreamResponse(StreamingResponse):
    """An SSE response that always closes its output stream, even if the body never started.

    Closing aborts unfinished engine requests, so a client that disconnects (Starlette
    then cancels the body iterator) frees its KV blocks within one engine step.
    """

    def __init__(self, content: AsyncIterator[str], output_stream: OutputStream):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.output_stream = output_stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.output_stream.close()
