"""The front end's half of each output: text and stop strings (issue 10).

The engine loop sends token ids only. Here, on the one thread that hears each iteration's
outputs (the engine thread, or the thread reading the engine process's messages), each
request's tokens are decoded incrementally and searched for its stop strings, as vLLM v1's
front end does: decoding is host work the engine's step need not wait on.

A stop string ends a request here first. Its output is marked finished (`stop`) at the
token that completed the string, the engine is asked to abort it, and whatever the engine
produced for it after that (a token from a step already under way, the abort's own end) is
dropped, so the client, the usage counts and the metrics see the same request the offline
engine would have returned.
"""

from dataclasses import dataclass, replace

from engine import RequestOutput
from engine.detokenizer import RequestText
from scheduler.request import meets_targets
from server.engine_core import EngineRequest


@dataclass(slots=True)
class _Decoding:
    text: RequestText
    slo_ttft_s: float | None
    slo_tpot_s: float | None


class OutputText:
    def __init__(self, tokenizer):
        """`tokenizer` is used from one thread only (see the module's docstring): a Hugging
        Face tokenizer is not safe to share between threads."""
        self.tokenizer = tokenizer
        self._requests: dict[str, _Decoding] = {}

    def start(self, requests: list[EngineRequest]) -> None:
        """Before the requests go to the engine. Touches no tokenizer, so any thread may call it."""
        for request in requests:
            self._requests[request.request_id] = _Decoding(
                RequestText.start(self.tokenizer, request.prompt_token_ids, request.sampling_params),
                request.slo_ttft_s, request.slo_tpot_s)

    def forget(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self._requests.pop(request_id, None)

    def clear(self) -> None:
        self._requests.clear()

    def process(self, outputs: list[RequestOutput]) -> tuple[list[RequestOutput], list[str]]:
        """The outputs with their text, those of requests a stop string already ended left out;
        and the requests a stop string ended now, for the engine to abort."""
        kept, stopped = [], []
        for output in outputs:
            decoding = self._requests.get(output.request_id)
            if decoding is None:
                continue
            kept.append(output)
            if output.new_token_ids:
                self._decode(output, decoding)
                if decoding.text.stopped and not output.finished:
                    stopped.append(output.request_id)
                    self._finish_at_stop(output, decoding)
            if output.finished:
                del self._requests[output.request_id]
        return kept, stopped

    @staticmethod
    def _decode(output: RequestOutput, decoding: _Decoding) -> None:
        token_ids = output.new_token_ids
        pieces = []
        for index, token_id in enumerate(token_ids):
            pieces.append(decoding.text.add(token_id, output.finished and index == len(token_ids) - 1))
            if decoding.text.stopped:
                num_dropped = len(token_ids) - index - 1
                if num_dropped:
                    output.new_token_ids = token_ids[:index + 1]
                    output.new_logprobs = output.new_logprobs[:index + 1]
                    output.times = replace(output.times, num_output_tokens=output.times.num_output_tokens - num_dropped)
                output.finish_reason = "stop"
                break
        output.new_text = "".join(pieces)

    @staticmethod
    def _finish_at_stop(output: RequestOutput, decoding: _Decoding) -> None:
        times = output.times
        output.finished = True
        output.times = replace(times, finished_time=times.last_token_time, within_slo=meets_targets(
            times.arrival_time, times.first_token_time, times.last_token_time, times.num_output_tokens,
            decoding.slo_ttft_s, decoding.slo_tpot_s))
