"""A stream that falls behind the engine answers what is waiting in one write, each request's
outputs merged into one chunk, and an error still comes after what came before it. A chunk of
text alone is what the response model would write, byte for byte."""

import asyncio
import json
from types import SimpleNamespace

from engine import RequestOutput
from scheduler.request import RequestTimes
from server.async_engine import OutputStream
from server.chat import ChatChunks
from server.completions import CompletionChunks
from server.errors import EngineError
from server.protocol import ChatChunkChoice, CompletionChoice
from server.serving import ChoiceResult, Generation
from server.streaming import DONE_EVENT, TextChunks, merge_outputs, stream_events


def output(request_id: str, text: str, finished: bool = False, finish_reason: str | None = None,
           error: str | None = None, num_tokens: int = 1) -> RequestOutput:
    times = RequestTimes("", 0.0, 3, num_tokens, 0.1, 0.2, 0.3, 0.3 if finished else None, False)
    return RequestOutput(request_id, list(range(num_tokens)), text, finished, times, finish_reason, error=error)


def test_consecutive_outputs_of_a_request_merge_in_first_seen_order():
    merged = merge_outputs([output("a", "x"), output("b", "1"), output("a", "y"), output("b", "2", True, "length"),
                            output("a", "z", True, "stop")])
    assert [(o.request_id, o.new_text, o.new_token_ids, o.finished, o.finish_reason) for o in merged] == [
        ("a", "xyz", [0, 0, 0], True, "stop"), ("b", "12", [0, 0], True, "length")]


def test_a_failed_output_is_not_merged_into_what_came_before():
    merged = merge_outputs([output("a", "x"), output("a", "y"), output("a", "", True, "error", "boom")])
    assert [(o.new_text, o.finish_reason) for o in merged] == [("xy", None), ("", "error")]


class Releases:
    """Where an OutputStream reports its close (the AsyncEngine's part, not under test here)."""

    def __init__(self):
        self.released = []

    def _release(self, stream):
        self.released.append(stream)


def events_of(queued: list, request_ids: list[str]) -> list[str]:
    async def run():
        stream = OutputStream(Releases(), request_ids)
        for item in queued:  # all there before the stream is read: the reader fell behind
            stream.push(item)
        choices = {rid: ChoiceResult(i, 3) for i, rid in enumerate(request_ids)}
        generation = Generation("cmpl-1", [[1, 2, 3]], [], choices)
        formatter = CompletionChunks(SimpleNamespace(model_name="m"), generation, logprobs=None)
        return [piece async for piece in stream_events(stream, generation, formatter, include_usage=True)]

    return asyncio.run(run())


def data_of(pieces: list[str]) -> list[str]:
    return [line[len("data: "):] for piece in pieces for line in piece.split("\n") if line.startswith("data: ")]


def test_what_waits_goes_out_in_one_write_with_one_chunk_per_choice():
    pieces = events_of([output("a", "Hel"), output("b", "Wor"), output("a", "lo", True, "length"),
                        output("b", "ld", True, "stop")], ["a", "b"])
    assert len(pieces) == 3  # the merged chunks, the usage, [DONE]
    chunks = [json.loads(data) for data in data_of(pieces[:1])]
    assert [(c["choices"][0]["index"], c["choices"][0]["text"], c["choices"][0]["finish_reason"]) for c in chunks] == [
        (0, "Hello", "length"), (1, "World", "stop")]
    usage = json.loads(data_of(pieces[1:2])[0])["usage"]
    assert usage["completion_tokens"] == 4
    assert pieces[-1] == DONE_EVENT


def test_an_error_after_waiting_outputs_comes_after_their_text():
    pieces = events_of([output("a", "Hel"), output("a", "lo"), EngineError("the engine stopped")], ["a"])
    data = data_of(pieces)
    assert json.loads(data[0])["choices"][0]["text"] == "Hello"
    assert json.loads(data[1])["error"]["message"] == "the engine stopped"
    assert data[2] == "[DONE]"


def chat_stream(request_ids: list[str], continuous_usage: bool = False):
    """A chat stream's formatter and events, read as a client would, with nothing queued yet."""
    stream = OutputStream(Releases(), request_ids)
    choices = {rid: ChoiceResult(i, 3) for i, rid in enumerate(request_ids)}
    generation = Generation("chatcmpl-1", [[1, 2, 3]], [], choices)
    formatter = ChatChunks(SimpleNamespace(model_name="m"), generation, None, continuous_usage)
    return stream, stream_events(stream, generation, formatter, include_usage=True)


def test_the_role_chunk_waits_for_the_first_output_and_goes_out_with_it():
    # vLLM's benchmark client times the first token from the first chunk with choices in it.
    async def run():
        stream, events = chat_stream(["a"])
        first = asyncio.ensure_future(events.__anext__())
        for _ in range(10):
            await asyncio.sleep(0)
        assert not first.done()  # the prompt is still being computed: nothing to send yet
        stream.push(output("a", "Hi"))
        return data_of([await first])

    role, content = [json.loads(data)["choices"][0]["delta"] for data in asyncio.run(run())]
    assert role == {"role": "assistant", "content": ""}
    assert content == {"content": "Hi"}


def test_continuous_usage_counts_each_chunks_tokens_so_far():
    async def run():
        stream, events = chat_stream(["a"], continuous_usage=True)
        stream.push(output("a", "Hel", num_tokens=2))
        pieces = [await events.__anext__()]  # the role and the first text, in one write
        stream.push(output("a", "lo", True, "length"))
        return data_of(pieces + [piece async for piece in events])

    chunks = [json.loads(data) for data in asyncio.run(run())[:-1]]
    assert [(chunk["usage"]["prompt_tokens"], chunk["usage"]["completion_tokens"]) for chunk in chunks] == [
        (3, 0), (3, 2), (3, 3), (3, 3)]  # the role, each text chunk, and the usage chunk at the end
    assert chunks[-1]["choices"] == []


TRICKY_TEXTS = [" hello", 'a "quoted" \\ back\nslash\t\x01\x1f', "é中文😀", "\u2028\u2029", "ITERSERVE_TEXT_MARK"]


def test_a_text_only_chunk_is_byte_for_byte_the_response_models_dump():
    serving = SimpleNamespace(model_name=TextChunks.MARK)  # a name may be anything, even the mark
    choices = {"cmpl-1-0": ChoiceResult(0, 3), "cmpl-1-1": ChoiceResult(1, 3)}
    generation = Generation("cmpl-1", [[1, 2, 3]], [], choices)
    completions = CompletionChunks(serving, generation, logprobs=None)
    chat = ChatChunks(serving, generation, num_top=None)
    for text in TRICKY_TEXTS:
        for request_id, choice in choices.items():
            out = output(request_id, text)
            assert completions.chunk(out, choice) == completions._response(
                [CompletionChoice(index=choice.index, text=text, logprobs=None, finish_reason=None)],
                None).model_dump_json()
            assert chat.chunk(out, choice) == chat._chunk([ChatChunkChoice(index=choice.index,
                                                                           delta={"content": text})])
    # The last chunk, with its finish_reason, still comes from the model itself.
    last = json.loads(completions.chunk(output("cmpl-1-1", "!", True, "length"), choices["cmpl-1-1"]))
    assert last["choices"] == [{"index": 1, "text": "!", "logprobs": None, "finish_reason": "length",
                                "prompt_logprobs": None}]
