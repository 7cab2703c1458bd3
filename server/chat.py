"""POST /v1/chat/completions: messages through the tokenizer's chat template, one assistant turn out."""

import json
import time

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from engine import RequestOutput
from engine.sampler import TokenLogprobs
from server.errors import BadRequestError
from server.protocol import (
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
    ChatCompletionResponse, ChatLogprobs, ChatMessage, ChatTemplateFields, TokenLogprob, TopLogprob, Usage,
)
from server.serving import ChoiceResult, Generation, ServingState, build_generation, collect, logprob_value, \
    prompt_logprob_entries, reject_unsupported
from server.streaming import TextChunks, event_stream_response


async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    serving: ServingState = request.app.state.serving
    serving.check_model(body.model)
    reject_unsupported(body, tools=body.tools)
    if body.top_logprobs is not None and not body.logprobs:
        raise BadRequestError("top_logprobs needs logprobs set to true", param="top_logprobs")
    num_top = (body.top_logprobs or 0) if body.logprobs else None
    prompt = await serving.run_tokenizer(apply_chat_template, serving, body.messages, template_options(body))
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    generation = build_generation(serving, body, serving.tenant(request, body), [prompt], max_tokens, None, num_top,
                                  body.prompt_logprobs, id_prefix="chatcmpl")
    stream = serving.engine.submit(generation.requests)
    echoed = echoed_text(body)
    if body.stream:
        include_usage, continuous_usage = body.usage_in_stream()
        formatter = ChatChunks(serving, generation, num_top, continuous_usage, echoed)
        return await event_stream_response(serving.engine, stream, generation, formatter, include_usage)
    with stream:
        choices = await collect(stream, generation, request)
    response = ChatCompletionResponse(
        id=generation.request_id,
        model=serving.model_name,
        choices=[
            ChatChoice(
                index=choice.index,
                message=AssistantMessage(content=echoed + choice.text),
                logprobs=chat_logprobs(serving, choice.logprobs, num_top) if num_top is not None else None,
                finish_reason=choice.finish_reason,
            )
            for choice in choices
        ],
        usage=generation.usage(),
        prompt_logprobs=prompt_logprob_entries(serving, choices[0].prompt_logprobs, body.prompt_logprobs or 0),
    )
    return JSONResponse(response.model_dump())


def echoed_text(body: ChatCompletionRequest) -> str:
    """What `echo` puts before each reply, as vLLM does: the last message, when it is the
    assistant's (the one a reply continues, with `continue_final_message`); else nothing."""
    if not body.echo or not body.messages or body.messages[-1].role != "assistant":
        return ""
    return message_text(body.messages[-1], len(body.messages) - 1)


def message_text(message: ChatMessage, index: int) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    parts = []
    for part in message.content:
        if part.type != "text" or part.text is None:
            raise BadRequestError(f"content parts of type {part.type!r} are not supported; send text",
                                  param=f"messages.{index}.content")
        parts.append(part.text)
    return "\n".join(parts)  # as vLLM joins text parts


def chat_template_input(messages: list[ChatMessage]) -> list[dict]:
    if not messages:
        raise BadRequestError("messages must not be empty", param="messages")
    conversation = []
    for index, message in enumerate(messages):
        rendered = {"role": message.role, "content": message_text(message, index)}
        if message.name is not None:
            rendered["name"] = message.name
        if message.tool_calls is not None:
            rendered["tool_calls"] = [template_tool_call(call) for call in message.tool_calls]
        if message.tool_call_id is not None:
            rendered["tool_call_id"] = message.tool_call_id
        conversation.append(rendered)
    return conversation


def template_tool_call(call: dict) -> dict:
    """A tool call as templates read it: OpenAI sends its arguments as a JSON string, and
    templates (Llama 3.1's, Qwen 2.5's) render them as an object, so a string that parses is
    given parsed, as vLLM gives it."""
    function = call.get("function")
    if isinstance(function, dict) and isinstance(function.get("arguments"), str):
        try:
            return {**call, "function": {**function, "arguments": json.loads(function["arguments"])}}
        except json.JSONDecodeError:
            pass
    return call


# Arguments of `apply_chat_template` that are not template variables: a request may not set them.
RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "tokenize", "chat_template", "tools", "documents", "add_generation_prompt",
    "continue_final_message", "return_dict", "return_tensors", "return_assistant_tokens_mask", "padding",
    "truncation", "max_length", "tokenizer_kwargs", "processor_kwargs"})


def template_options(body: ChatTemplateFields) -> dict:
    """The keyword arguments `apply_chat_template` renders the request's conversation with."""
    if body.add_generation_prompt and body.continue_final_message:
        raise BadRequestError("add_generation_prompt and continue_final_message cannot both be true; set "
                              "add_generation_prompt to false to continue the last message",
                              param="continue_final_message")
    if body.chat_template is not None:
        raise BadRequestError("a chat template cannot be sent with a request; the server's operator sets one with "
                              "--chat-template", param="chat_template")
    if body.continue_final_message and (not body.messages or body.messages[-1].role != "assistant"):
        raise BadRequestError("continue_final_message needs the last message to be the assistant's",
                              param="continue_final_message")
    extra = body.chat_template_kwargs or {}
    reserved = sorted(RESERVED_TEMPLATE_KWARGS & extra.keys())
    if reserved:
        raise BadRequestError(f"chat_template_kwargs may not set {', '.join(reserved)}",
                              param="chat_template_kwargs")
    return {**extra, "add_generation_prompt": body.add_generation_prompt,
            "continue_final_message": body.continue_final_message}


def apply_chat_template(serving: ServingState, messages: list[ChatMessage], options: dict) -> list[int]:
    """The conversation's prompt tokens, rendered with `options` (`template_options`). Blocking
    (a long conversation takes a while): run it on the tokenizer thread."""
    conversation = chat_template_input(messages)
    tokenizer = serving.tokenizer
    text = render_chat_template(tokenizer, conversation, options)
    control_texts = [token.content for token in tokenizer.added_tokens_decoder.values()]
    contents = [message["content"] for message in conversation]
    if serving.settings.allow_special_tokens_in_messages or not any(
            control in content for content in contents for control in control_texts):
        # The template already wrote any special tokens the model expects.
        return tokenizer.encode(text, add_special_tokens=False)
    return encode_with_plain_contents(tokenizer, text, conversation, options)


def render_chat_template(tokenizer, conversation: list[dict], options: dict) -> str:
    try:
        return tokenizer.apply_chat_template(conversation, tokenize=False, **options)
    except Exception as error:  # noqa: BLE001 - a template that rejects the conversation is the client's 400
        raise BadRequestError(f"the chat template rejected these messages: {error}", param="messages") from error


# Private-use code points: no tokenizer gives them meaning and no client text is refused for them.
_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"


def encode_with_plain_contents(tokenizer, text: str, conversation: list[dict], options: dict) -> list[int]:
    """Tokens of the rendered `text` in which special-token text inside a message's content
    (`<|im_end|>`) is encoded as the plain characters it is, and only the template's own
    markup becomes control tokens.

    The template is rendered once more with a marker in place of each content; the text
    between markers is the template's, and each content is encoded apart with special
    tokens split. The pieces must put `text` back together exactly, else the template
    changed the content (trimmed it, say) and we cannot tell its tokens from the user's.
    """
    marked = [{**message, "content": f"{_MARK_OPEN}{index}{_MARK_CLOSE}"}
              for index, message in enumerate(conversation)]
    pieces = render_chat_template(tokenizer, marked, options).split(_MARK_OPEN)
    token_ids = tokenizer.encode(pieces[0], add_special_tokens=False)
    rebuilt = pieces[0]
    for piece in pieces[1:]:
        index, close, template_text = piece.partition(_MARK_CLOSE)
        if not close or not index.isdigit() or int(index) >= len(conversation):
            break
        content = conversation[int(index)]["content"]
        token_ids += tokenizer.encode(content, add_special_tokens=False, split_special_tokens=True)
        token_ids += tokenizer.encode(template_text, add_special_tokens=False)
        rebuilt += content + template_text
    if rebuilt != text:
        raise BadRequestError("a message contains special-token text (such as <|im_end|>) that this model's chat "
                              "template changes, so it cannot be encoded as plain text; remove it",
                              param="messages", code="special_tokens_in_content")
    return token_ids


def chat_logprobs(serving: ServingState, logprobs: list[TokenLogprobs], num_top: int) -> ChatLogprobs:
    def entry(token_id: int, value: float) -> TopLogprob:
        token = serving.token_text(token_id)
        return TopLogprob(token=token, logprob=logprob_value(value), bytes=list(token.encode("utf-8")))

    content = []
    for item in logprobs:
        chosen = entry(item.token_id, item.logprob)
        top = [entry(token_id, value) for token_id, value in item.top[:num_top]]
        content.append(TokenLogprob(**chosen.model_dump(), top_logprobs=top))
    return ChatLogprobs(content=content)


class ChatChunks:
    """Streaming chunks of /v1/chat/completions: the role first, then content deltas, then the end."""

    def __init__(self, serving: ServingState, generation: Generation, num_top: int | None,
                 continuous_usage: bool = False, echoed: str = ""):
        self.serving = serving
        self.generation = generation
        self.num_top = num_top
        self.continuous_usage = continuous_usage
        self.echoed = echoed  # `echo`: the text every reply starts with, sent with the role
        self.created = int(time.time())
        self.text_chunks = TextChunks(
            lambda index, text: self._chunk([ChatChunkChoice(index=index, delta={"content": text})]))

    def first_chunks(self) -> list[str]:
        choices = sorted(self.generation.choices.values(), key=lambda choice: choice.index)
        return [self._chunk([ChatChunkChoice(index=choice.index, delta={"role": "assistant", "content": self.echoed})],
                            self._usage(choice))
                for choice in choices]

    def chunk(self, output: RequestOutput, choice: ChoiceResult) -> str | None:
        logprobs = None
        if self.num_top is not None and output.new_logprobs:
            logprobs = chat_logprobs(self.serving, output.new_logprobs, self.num_top)
        if not output.new_text and logprobs is None and not output.finished:
            return None
        if logprobs is None and not output.finished and not self.continuous_usage:
            return self.text_chunks(choice.index, output.new_text)
        delta = {"content": output.new_text} if output.new_text else {}
        finish_reason = output.finish_reason if output.finished else None
        return self._chunk([ChatChunkChoice(index=choice.index, delta=delta, logprobs=logprobs,
                                            finish_reason=finish_reason)], self._usage(choice))

    def usage_chunk(self, usage: Usage) -> str:
        return self._chunk([], usage)

    def _usage(self, choice: ChoiceResult) -> Usage | None:
        return choice.usage() if self.continuous_usage else None

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        return ChatCompletionChunk(id=self.generation.request_id, created=self.created,
                                   model=self.serving.model_name, choices=choices, usage=usage).model_dump_json()
