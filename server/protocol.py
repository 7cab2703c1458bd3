"""Request and response bodies of the OpenAI-compatible API, as pydantic models.

Requests accept OpenAI's fields plus vLLM's common extensions (top_k, min_p,
repetition_penalty, stop_token_ids, ignore_eos, min_tokens, ...) and our `priority`.
Unknown fields are ignored, as OpenAI's and vLLM's servers do, so newer clients keep
working; fields we cannot honour are rejected by the handlers with a 400.
Ranges are checked where the value is used (`SamplingParams.validate`), so the
messages match the offline API's.
"""

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator, model_validator

MAX_N = 16  # choices per prompt
MAX_PROMPTS = 64  # prompts in one completions request
MAX_LOGPROBS = 20
# OpenAI's roles; any other string would be rendered into the prompt as a turn of its own.
ROLES = ("system", "user", "assistant", "tool", "developer")


class APIRequest(BaseModel):
    """A request body: unknown fields ignored, and every string in it valid Unicode.

    JSON may escape a lone surrogate (`"\\ud800"`); Python decodes it into a str that
    no tokenizer, and no UTF-8 response echoing it, can encode. Refusing it here makes
    it a 400 for every field at once instead of a 500 wherever it is first encoded.
    """

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data):
        """OpenAI documents its optional fields as nullable, and SDKs and wrappers send `null`
        for what a caller left unset: an explicit null takes the field's default, as vLLM's
        server gives it, instead of failing a field that is not Optional here."""
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, value):
        _check_unicode(value)
        return value


def _check_unicode(value) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(f"the text is not valid Unicode: a lone surrogate at character {error.start}") from None
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_unicode(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(key)
            _check_unicode(item)


class StreamOptions(APIRequest):
    # Sending stream_options asks for usage unless it says otherwise, as vLLM reads it.
    include_usage: bool = True
    continuous_usage_stats: bool = False  # vLLM's: the running usage on every chunk too


class GenerationRequest(APIRequest):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    # Bounded here because the engine turns them into int64 tensors or generator seeds;
    # an overflow inside a step would fail every request batched with this one.
    top_k: int | None = Field(None, le=2**31 - 1)
    min_p: float | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[StrictInt] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[str, float] | None = None
    # vLLM's: the logprob of each prompt token (and this many alternatives), for scoring a text.
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: dict | None = None  # OpenAI's on chat, vLLM's extension on completions
    user: str | None = None
    priority: int | None = None  # lower runs first under --scheduling-policy priority; default: the tenant's
    # vLLM's extension: requests share cached prefixes only with requests of the same salt.
    cache_salt: str | None = Field(None, min_length=1)
    # Seconds from arrival: unfinished by then, the request ends with a 408 (or an error event).
    timeout: float | None = Field(None, gt=0, allow_inf_nan=False)
    # Targets for --scheduling-policy slo (default: the tenant's): time to first token, time per output token.
    slo_ttft_ms: float | None = Field(None, gt=0, allow_inf_nan=False)
    slo_tpot_ms: float | None = Field(None, gt=0, allow_inf_nan=False)
    # vLLM's extensions that constrain what is generated (server/serving.py, structured_output).
    # allowed_token_ids and bad_words are refused (a 400), not ignored as unknown fields are:
    # unconstrained text would pass for constrained.
    guided_json: object = None
    guided_regex: object = None
    guided_choice: object = None
    guided_grammar: object = None
    structured_outputs: object = None
    allowed_token_ids: object = None
    bad_words: object = None

    def usage_in_stream(self) -> tuple[bool, bool]:
        """Whether a stream ends with a usage chunk, and whether every chunk carries the usage so far."""
        options = self.stream_options
        if options is None:
            return False, False
        return options.include_usage, options.include_usage and options.continuous_usage_stats


class CompletionRequest(GenerationRequest):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ContentPart(APIRequest):
    type: str
    text: str | None = None


class ChatMessage(APIRequest):
    role: Literal[ROLES]
    content: StrictStr | list[ContentPart] | None = None
    name: str | None = None
    # An earlier turn's tool use, as OpenAI writes it: passed to the chat template, which
    # renders it if it knows how (this server runs no tools itself).
    tool_calls: list[dict] | None = None
    tool_call_id: str | None = None


class ChatTemplateFields(APIRequest):
    """How the conversation is rendered, as vLLM takes it: `continue_final_message` extends the
    last (assistant) message instead of opening a new turn; `chat_template_kwargs` are the
    template's own variables (Qwen3's `enable_thinking`, say)."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict | None = None
    chat_template: str | None = None  # vLLM's, off there by default too: refused (--chat-template sets one)


class ChatCompletionRequest(GenerationRequest, ChatTemplateFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict] | None = None
    echo: bool = False  # vLLM's: a reply continuing an assistant message starts with that message


class TokenizeRequest(ChatTemplateFields):
    model: str | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(APIRequest):
    model: str | None = None
    tokens: list[StrictInt]


# -- responses --------------------------------------------------------------------


def _now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> "Usage":
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class CompletionLogprobs(BaseModel):
    # An echoed prompt's first token has nothing before it: None for its logprob and alternatives.
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """One token of a prompt position, in vLLM's `prompt_logprobs` (keyed by token id)."""

    logprob: float
    rank: int | None
    decoded_token: str


# One entry per prompt token: None for the first, then the token's own and the best alternatives.
PromptLogprobs = list[dict[str, PromptLogprob] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    prompt_logprobs: PromptLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] = Field(default_factory=list)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's: the one prompt every choice continues


class ChatChunkChoice(BaseModel):
    index: int
    delta: dict[str, str]  # {"role": ...} first, then {"content": ...}; {} on a bare final chunk
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "iterserve"
    root: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
