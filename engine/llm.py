"""Offline API: `LLM(...).generate(prompts, sampling_params)` runs a batch to completion."""

import time
from typing import Sequence

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.outputs import Completion
from scheduler import SamplingParams

Prompt = str | list[int]


class LLM:
    def __init__(self, model: str | None = None, **config):
        self.engine = LLMEngine(EngineConfig(model=model, **config))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[Completion]:
        """Each request's whole output, in the order of `prompts`."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")
        # Validate every prompt before queueing any, so a bad one leaves nothing half-queued.
        token_ids = [self.engine.tokenize(p) if isinstance(p, str) else list(p) for p in prompts]
        for ids in token_ids:
            self.engine.check_prompt(ids)
        order = [self.engine.add_request(ids, params) for ids, params in zip(token_ids, sampling_params)]
        completions = {request_id: Completion(request_id, ids) for request_id, ids in zip(order, token_ids)}
        while self.engine.has_unfinished_requests():
            outputs = self.engine.step()
            if not outputs:
                # A static or dynamic batch may be filling up: wait for it instead of spinning.
                time.sleep(self.engine.scheduler.seconds_until_launch())
            for output in outputs:
                completions[output.request_id].add(output)
        return [completions[request_id] for request_id in order]

    def chat(
        self,
        conversations: list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[Completion]:
        prompts = [self.engine.apply_chat_template(messages) for messages in conversations]
        return self.generate(prompts, sampling_params)
