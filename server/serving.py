"""What completions and chat share: the served model, request translation, result collection.

A handler validates its body, turns it into `EngineRequest`s (one per prompt and
choice), submits them, and then either streams (server/streaming.py) or collects
the outputs here into one `ChoiceResult` per choice.
"""

import asyncio
from concurrent.futures import ThreadPoolExecutor
import dataclasses
from dataclasses import dataclass, field
import functools
import json
import time
import uuid

from fastapi import Request

from engine import RequestOutput
from engine.sampler import TokenLogprobs
from scheduler import InvalidRequestError, SamplingParams, StructuredOutput
from scheduler.tenants import Tenant, Tenants
from server.async_engine import AsyncEngine, OutputStream
from server.engine_core import EngineInfo, EngineRequest
from server.errors import APIError, BadRequestError, EngineError, ModelNotFoundError, RequestTimeoutError
from server.metrics import EngineMetrics
from server.protocol import GenerationRequest, PromptLogprob, PromptLogprobs, Usage

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's and vLLM's default for /v1/completions
# JSON has no -inf; vLLM reports this floor instead.
MIN_LOGPROB = -9999.0


@dataclass(slots=True)
class ServerSettings:
    served_model_name: str
    model_aliases: tuple[str, ...] = ()  # other names a request may give it
    api_key: str | None = None
    max_queued_requests: int | None = 1024
    max_body_bytes: int = 2 * 1024 * 1024
    metrics_compat: str | None = None  # "vllm" also exports vLLM's metric names
    shutdown_timeout_s: float = 30.0
    # Off by default, so one tenant cannot time another's prompts through prefix-cache hits.
    share_prefix_cache: bool = False
    # Off by default, so a user cannot write turns of their own (`<|im_end|><|im_start|>system`).
    allow_special_tokens_in_messages: bool = False
    chat_template: str | None = None  # Jinja, in place of the model's own (--chat-template)
    tenants: Tenants = field(default_factory=Tenants.default_only)


@dataclass(slots=True)
class ServingState:
    """Everything a handler needs, built once at start-up and kept on `app.state.serving`."""

    settings: ServerSettings
    info: EngineInfo  # the engine's facts: max_model_len, vocabulary, model path, KV cache
    engine: AsyncEngine
    metrics: EngineMetrics
    # The server's own tokenizer: the engine thread detokenizes with the engine's, and a
    # Hugging Face tokenizer is not safe to share between threads.
    tokenizer: object
    token_texts: dict[int, str] = field(default_factory=dict)
    # Tokenizing or templating a megabyte takes about a second; on the event loop that
    # would stall every other client's stream. One thread, so the tokenizer is never
    # used by two requests at once (the fast tokenizer releases the GIL while it works).
    tokenizer_thread: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="iterserve-tokenizer"))

    @property
    def model_name(self) -> str:
        return self.settings.served_model_name

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name and model not in self.settings.model_aliases:
            raise ModelNotFoundError(f"the model `{model}` does not exist; this server serves `{self.model_name}`",
                                     param="model")

    async def run_tokenizer(self, function, *args, **kwargs):
        """`function(*args, **kwargs)` on the tokenizer thread; its exceptions reach the caller."""
        call = functools.partial(function, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self.tokenizer_thread, call)

    def tenant(self, request: Request, body: GenerationRequest) -> Tenant:
        """The API key's tenant (the gate put it in the request's state), else the one `user` names."""
        return self.settings.tenants.resolve(getattr(request.state, "tenant", None), body.user)

    def cache_salt(self, body: GenerationRequest, tenant: Tenant) -> str:
        """Requests share prefix-cache blocks only when their salts are equal (kvcache.hashing):
        each tenant (an API key's, or the default) and each `user` within it has a cache of its
        own unless the operator shares it; a request's `cache_salt` narrows it further."""
        parts = [] if self.settings.share_prefix_cache else [tenant.name, body.user or ""]
        return "\0".join(parts + [body.cache_salt]) if body.cache_salt else "\0".join(parts)

    def token_text(self, token_id: int) -> str:
        text = self.token_texts.get(token_id)
        if text is None:
            text = self.token_texts[token_id] = self.tokenizer.decode([token_id])
        return text


@dataclass(slots=True)
class ChoiceResult:
    """One choice, accumulated from its engine request's outputs."""

    index: int
    num_prompt_tokens: int
    prompt_index: int = 0  # which of the request's prompts it continues
    text: str = ""
    num_tokens: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    def add(self, output: RequestOutput) -> None:
        if output.prompt_logprobs is not None:
            self.prompt_logprobs = output.prompt_logprobs
        self.text += output.new_text
        self.num_tokens += len(output.new_token_ids)
        self.logprobs.extend(output.new_logprobs)
        if output.finished:
            self.finish_reason = output.finish_reason
            self.error = output.error

    def usage(self) -> Usage:
        """This choice's usage so far (a stream's continuous usage, per choice as vLLM counts it)."""
        return Usage.of(self.num_prompt_tokens, self.num_tokens)


@dataclass(slots=True)
class Generation:
    """One HTTP request's engine requests, and which choice each one fills."""

    request_id: str
    prompts: list[list[int]]
    requests: list[EngineRequest]
    choices: dict[str, ChoiceResult]  # by engine request id

    def usage(self) -> Usage:
        prompt_tokens = sum(len(prompt) for prompt in self.prompts)
        completion_tokens = sum(choice.num_tokens for choice in self.choices.values())
        return Usage.of(prompt_tokens, completion_tokens)


# vLLM's extensions that constrain what is generated and that this server cannot honour.
UNSUPPORTED_CONSTRAINTS = ("allowed_token_ids", "bad_words")


def reject_unsupported(body: GenerationRequest, **fields) -> None:
    """400 for fields a client set that this server cannot honour (rather than ignoring them)."""
    constraints = {name: getattr(body, name) is not None for name in UNSUPPORTED_CONSTRAINTS}
    for name, unsupported in {**fields, **constraints}.items():
        if unsupported:
            raise BadRequestError(f"{name} is not supported by this server", param=name)
    if body.stream_options is not None and not body.stream:
        raise BadRequestError("stream_options is only allowed when stream is true", param="stream_options")
    if body.prompt_logprobs is not None and body.stream:
        raise BadRequestError("prompt_logprobs are not available when stream is true", param="prompt_logprobs")


def structured_output(body: GenerationRequest) -> StructuredOutput | None:
    """The one constraint a request puts on its output, from whichever field it used: OpenAI's
    `response_format` (json_object, json_schema), vLLM's `structured_outputs` ({"json": ...},
    {"regex": ...}, {"choice": [...]}, {"grammar": ...}, {"json_object": true}), or vLLM's older
    `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`. InvalidRequestError
    when a field is malformed or more than one constraint is given."""
    found: list[StructuredOutput] = []
    response_format = body.response_format
    if response_format is not None:
        kind = response_format.get("type")
        if kind == "json_object":
            found.append(StructuredOutput("json_object", param="response_format"))
        elif kind == "json_schema":
            named = response_format.get("json_schema")
            schema = named.get("schema") if isinstance(named, dict) else None
            if not isinstance(schema, dict):
                raise InvalidRequestError("response_format json_schema needs json_schema.schema, a JSON schema object",
                                          param="response_format")
            found.append(StructuredOutput("json", json.dumps(schema), param="response_format"))
        elif kind != "text":
            raise InvalidRequestError(f"response_format type must be text, json_object or json_schema, got {kind!r}",
                                      param="response_format")
    guided = {"json": body.guided_json, "regex": body.guided_regex, "choice": body.guided_choice,
              "grammar": body.guided_grammar}
    for kind, value in guided.items():
        if value is not None:
            found.append(constraint(kind, value, f"guided_{kind}"))
    if body.structured_outputs is not None:
        options = body.structured_outputs
        if not isinstance(options, dict):
            raise InvalidRequestError("structured_outputs must be an object", param="structured_outputs")
        if options.get("json_object"):
            found.append(StructuredOutput("json_object", param="structured_outputs"))
        for kind in ("json", "regex", "choice", "grammar"):
            if options.get(kind) is not None:
                found.append(constraint(kind, options[kind], "structured_outputs"))
        unknown = set(options) & {"structural_tag"}
        if unknown:
            raise InvalidRequestError(f"structured_outputs {sorted(unknown)[0]} is not supported by this server",
                                      param="structured_outputs")
    if len(found) > 1:
        raise InvalidRequestError(f"a request takes one structured output; this one gives "
                                  f"{', '.join(sorted({c.param for c in found}))} with {len(found)} constraints",
                                  param=found[1].param)
    return found[0] if found else None


def constraint(kind: str, value: object, param: str) -> StructuredOutput:
    """One of vLLM's constraint fields as the engine takes it; a JSON schema may come as an
    object or as its text, a choice as a list of strings."""
    if kind == "json":
        try:
            text = value if isinstance(value, str) else json.dumps(value)
            if not isinstance(json.loads(text), dict):
                raise ValueError("not an object")
        except (ValueError, TypeError):
            raise InvalidRequestError(f"{param} must be a JSON schema object", param=param) from None
        except RecursionError:
            raise InvalidRequestError(f"{param}: the schema nests too deep", param=param) from None
        return StructuredOutput("json", text, param=param)
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise InvalidRequestError(f"{param} must be a list of non-empty strings", param=param)
        return StructuredOutput("choice", json.dumps(value), param=param)
    if not isinstance(value, str) or not value:
        raise InvalidRequestError(f"{param} must be a non-empty string", param=param)
    return StructuredOutput(kind, value, param=param)


def sampling_params(body: GenerationRequest, max_tokens: int | None, num_prompt_tokens: int, max_model_len: int,
                    default_max_tokens: int | None, logprobs: int | None,
                    prompt_logprobs: int | None) -> SamplingParams:
    """The engine's parameters for one prompt; raises InvalidRequestError (a 400) on bad values,
    naming the field the client sent (chat's max_completion_tokens, or max_tokens)."""
    max_tokens_param = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) is not None \
        else "max_tokens"
    remaining = max_model_len - num_prompt_tokens
    if max_tokens is None:
        max_tokens = remaining if default_max_tokens is None else min(default_max_tokens, remaining)
        if max_tokens < 1:
            raise InvalidRequestError(
                f"this model's maximum context length is {max_model_len} tokens; the prompt has "
                f"{num_prompt_tokens}, which leaves no room for output", param="prompt", code="context_length_exceeded")
    elif num_prompt_tokens + max_tokens > max_model_len:
        raise InvalidRequestError(
            f"this model's maximum context length is {max_model_len} tokens; you requested "
            f"{num_prompt_tokens + max_tokens} ({num_prompt_tokens} in the prompt, {max_tokens} for the "
            f"completion): shorten the prompt or lower {max_tokens_param}", param=max_tokens_param,
            code="context_length_exceeded")
    given = {name: getattr(body, name) for name in (
        "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")}
    return SamplingParams(
        max_tokens=max_tokens,
        seed=body.seed,
        stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
        stop_token_ids=list(body.stop_token_ids or []),
        ignore_eos=body.ignore_eos,
        min_tokens=body.min_tokens,
        skip_special_tokens=body.skip_special_tokens,
        include_stop_str_in_output=body.include_stop_str_in_output,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        logit_bias=token_biases(body.logit_bias),
        structured_output=structured_output(body),
        **{name: value for name, value in given.items() if value is not None},
    )


def token_biases(logit_bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's logit_bias, keyed by token ids written as strings, as the engine takes it."""
    if not logit_bias:
        return None
    try:
        return {int(token): bias for token, bias in logit_bias.items()}
    except ValueError:
        raise InvalidRequestError("logit_bias keys must be token ids", param="logit_bias") from None


def build_generation(serving: ServingState, body: GenerationRequest, tenant: Tenant, prompts: list[list[int]],
                     max_tokens: int | None, default_max_tokens: int | None, logprobs: int | None,
                     prompt_logprobs: int | None, id_prefix: str) -> Generation:
    """Validate every prompt and choice before any is queued, so a bad one leaves nothing behind."""
    arrival_time = time.monotonic()
    request_id = f"{id_prefix}-{uuid.uuid4().hex}"
    cache_salt = serving.cache_salt(body, tenant)
    priority = tenant.priority if body.priority is None else body.priority
    deadline = None if body.timeout is None else arrival_time + body.timeout
    slo_ttft_s = seconds(body.slo_ttft_ms if body.slo_ttft_ms is not None else tenant.slo_ttft_ms)
    slo_tpot_s = seconds(body.slo_tpot_ms if body.slo_tpot_ms is not None else tenant.slo_tpot_ms)
    requests, choices = [], {}
    for prompt_index, prompt in enumerate(prompts):
        serving.info.check_prompt(prompt)
        params = sampling_params(body, max_tokens, len(prompt), serving.max_model_len, default_max_tokens, logprobs,
                                 prompt_logprobs)
        serving.info.check_logit_bias(params)
        for sample_index in range(body.n):
            # As vLLM does for n > 1: choice i samples with seed + i, so the choices differ
            # and the whole response is still reproducible.
            if params.seed is not None:
                params = dataclasses.replace(params, seed=body.seed + sample_index)
            engine_id = f"{request_id}-{prompt_index}-{sample_index}"
            requests.append(EngineRequest(engine_id, prompt, params, arrival_time, priority, tenant.name,
                                          cache_salt, deadline, slo_ttft_s, slo_tpot_s))
            choices[engine_id] = ChoiceResult(prompt_index * body.n + sample_index, len(prompt), prompt_index)
    return Generation(request_id, prompts, requests, choices)


def seconds(milliseconds: float | None) -> float | None:
    return None if milliseconds is None else milliseconds / 1000


async def collect(stream: OutputStream, generation: Generation, request: Request) -> list[ChoiceResult]:
    """Every choice's final result; aborts (through the stream's owner) if the client goes away."""
    consumer = asyncio.ensure_future(_consume(stream, generation))
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not consumer.done():
            consumer.cancel()
    if not consumer.done() or consumer.cancelled():
        raise ClientDisconnected()
    choices = consumer.result()
    for choice in choices:
        error = failure(choice.finish_reason, choice.error)
        if error is not None:
            raise error
    return choices


def failure(finish_reason: str | None, message: str | None) -> APIError | None:
    """The error a finished engine request stands for, if it did not end normally."""
    if finish_reason == "error":
        return EngineError(message or "the engine failed this request")
    if finish_reason == "timeout":
        return RequestTimeoutError("the request timed out before it finished (its `timeout`, or the server's "
                                   "queue timeout)")
    return None


async def _consume(stream: OutputStream, generation: Generation) -> list[ChoiceResult]:
    async for output in stream:
        generation.choices[output.request_id].add(output)
    return sorted(generation.choices.values(), key=lambda choice: choice.index)


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read, so the next ASGI message is the disconnect (or never comes).
    while (await request.receive())["type"] != "http.disconnect":
        pass


class ClientDisconnected(Exception):
    """The client went away before its response was ready; its requests were aborted."""


def logprob_value(value: float) -> float:
    return max(value, MIN_LOGPROB)


def prompt_logprob_entries(serving: ServingState, scored: list[TokenLogprobs | None] | None,
                           number: int) -> PromptLogprobs | None:
    """vLLM's `prompt_logprobs`: for each prompt token after the first, its own logprob and
    rank, then the `number` likeliest tokens (ranked 1, 2, ...) where they are others."""
    if scored is None:
        return None
    entries: PromptLogprobs = []
    for entry in scored:
        if entry is None:
            entries.append(None)
            continue
        tokens = {str(entry.token_id): PromptLogprob(logprob=logprob_value(entry.logprob), rank=entry.rank,
                                                     decoded_token=serving.token_text(entry.token_id))}
        for rank, (token_id, value) in enumerate(entry.top[:number], start=1):
            tokens.setdefault(str(token_id), PromptLogprob(logprob=logprob_value(value), rank=rank,
                                                           decoded_token=serving.token_text(token_id)))
        entries.append(tokens)
    return entries
