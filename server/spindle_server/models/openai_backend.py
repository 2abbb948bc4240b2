"""The `openai` model backend: any OpenAI-compatible Chat Completions endpoint.

One `OpenAIBackend` serves one provider (OpenAI, vLLM, Ollama, llama.cpp's server, Yandex AI
Studio's compatible API, ...), configured by a `ProviderConfig` that `parse_provider_spec` reads
from a flag value such as `openai=https://api.openai.com/v1,timeout=60`. Calls go through the
official `openai` package, streamed. A stream that brings an empty answer (no text, no tool
call, not cut short) is asked once more without streaming; empty again, it is an
`empty_response` error, never an empty reply.

What a turn yields: `TextDelta` and `ToolCallDelta` as the provider streams them, then at most
one `UsageReport` and exactly one `Finish`, last. Each tool call gets its own index; its id and
name come whole in its first piece (an id is made up if the provider sends none), later pieces
carry argument text only.

Faults come out as `ModelError`. Rate limits (429), server errors (5xx), 408/409 and connection
failures are retried with exponential backoff and jitter, but only while nothing has been
yielded: a turn whose output has started is never streamed twice. A provider that sends nothing
for `stall_timeout` seconds gets its stream closed and a `timeout` error (not retried: a stalled
model usually stalls again, and each wait is long). Messages name the provider and HTTP status
and never contain the API key.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import secrets
from collections.abc import AsyncGenerator, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import httpx2
import structlog
from openai import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    AsyncOpenAI,
    AsyncStream,
    Omit,
)
from openai.types.chat import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionFunctionToolParam,
    ChatCompletionMessageFunctionToolCall,
    ChatCompletionMessageFunctionToolCallParam,
    ChatCompletionMessageParam,
    ChatCompletionToolChoiceOptionParam,
)
from openai.types.chat.chat_completion_chunk import ChoiceDeltaToolCall

from spindle_server import metrics
from spindle_server.models.base import (
    ChatMessage,
    Finish,
    FinishReason,
    FunctionSpec,
    ModelChunk,
    ModelError,
    ModelRequest,
    TextDelta,
    ToolCallDelta,
    UsageReport,
)
from spindle_server.models.provider_spec import ProviderConfig, default_api_key_env

log = structlog.get_logger(__name__)

# The openai client insists on a key; providers without auth get this and no Authorization header.
_NO_KEY = "spindle-no-api-key"
_MAX_DETAIL_CHARS = 300
_TRANSIENT_STATUSES = frozenset({408, 409, 429})


class OpenAIBackend:
    """A `ModelBackend` over one OpenAI-compatible endpoint."""

    def __init__(self, config: ProviderConfig, *, http_client: httpx2.AsyncClient | None = None) -> None:
        self.name = config.name
        self.config = config
        self._client = AsyncOpenAI(
            api_key=config.api_key or _NO_KEY,
            base_url=config.base_url,
            timeout=config.timeout,
            max_retries=0,  # retried in stream(), which knows whether output has started
            http_client=http_client,
        )
        # The client would add OpenAI account headers from OPENAI_ORG_ID / OPENAI_PROJECT_ID;
        # a provider gets only what its own config says.
        self._headers: dict[str, str | Omit] = {"OpenAI-Organization": Omit(), "OpenAI-Project": Omit()}
        if not config.api_key:
            self._headers["Authorization"] = Omit()

    def count_tokens(self, text: str) -> int:
        """Estimate: one token per 4 bytes of UTF-8.

        About 4 characters a token for English (OpenAI's rule of thumb); 2 for Cyrillic and
        Greek, 1.3 for CJK, which BPE vocabularies split finer than English. Erring high keeps
        truncated prompts inside their budget. No tokenizer is shipped: providers differ.
        """
        return math.ceil(len(text.encode("utf-8")) / 4)

    async def aclose(self) -> None:
        await self._client.close()

    @metrics.timed_model_call
    async def stream(self, request: ModelRequest) -> AsyncGenerator[ModelChunk, None]:
        params = self._request_params(request)
        empty: _EmptyAnswer | None = None  # once a streamed answer was empty, calls are unstreamed
        for attempt in range(self.config.max_retries + 1):
            started = False
            try:
                if empty is None:
                    try:
                        async with aclosing(self._stream_once(params)) as chunks:
                            async for chunk in chunks:
                                started = True
                                yield chunk
                        return
                    except _EmptyAnswer as answer:
                        empty = answer  # nothing was yielded: asked again at once (see _EmptyAnswer)
                for chunk in await self._complete_once(params, request.model, empty.usage):
                    yield chunk
                return
            except APIError as exc:
                failure = _Failure.of(exc, self.config, request.model)
            delay = self._retry_delay(attempt, failure) if failure.transient and not started else None
            if delay is None:
                raise failure.final_error(attempts=attempt + 1)
            log.info(
                "model call retry",
                provider=self.name,
                model=request.model,
                code=failure.error.code,
                attempt=attempt + 1,
                delay_s=round(delay, 3),
            )
            await asyncio.sleep(delay)

    async def _stream_once(self, params: dict[str, Any]) -> AsyncGenerator[ModelChunk, None]:
        """One HTTP call; closing this generator closes the HTTP stream."""
        stream = await self._client.chat.completions.create(**params, extra_headers=self._headers)
        translator = _ChunkTranslator()
        async with stream:
            while (chunk := await self._next_chunk(stream)) is not None:
                for item in translator.feed(chunk):
                    yield item
        if translator.is_empty:
            raise _EmptyAnswer(translator.usage)
        for item in translator.finish():
            yield item

    async def _complete_once(
        self, params: dict[str, Any], model: str, earlier_usage: UsageReport | None
    ) -> list[ModelChunk]:
        """One call without streaming, as chunks; an answer empty again is an `empty_response`.
        Its failures are APIErrors, retried like a stream's."""
        single = {key: value for key, value in params.items() if key not in ("stream", "stream_options")}
        completion = await self._client.chat.completions.create(
            **single, stream=False, extra_headers=self._headers
        )
        translator = _ChunkTranslator()
        chunks = translator.feed_completion(completion)
        if translator.is_empty:
            raise ModelError(
                "empty_response",
                f"{self.name} returned an empty answer (no text and no tool calls) for model {model!r},"
                " streamed and again without streaming",
            )
        translator.usage = _sum_usage(earlier_usage, translator.usage)  # the empty try was billed too
        return [*chunks, *translator.finish()]

    async def _next_chunk(self, stream: AsyncStream[ChatCompletionChunk]) -> ChatCompletionChunk | None:
        try:
            async with asyncio.timeout(self.config.stall_timeout):
                return await anext(stream)
        except StopAsyncIteration:
            return None
        except TimeoutError:
            message = f"{self.name} sent nothing for {self.config.stall_timeout:g}s; the stream was closed"
            raise ModelError("timeout", message, retryable=True) from None
        except ValueError:  # a chunk that is not JSON, or not a chat.completion.chunk
            raise ModelError("server_error", f"{self.name} sent a malformed stream chunk") from None

    def _retry_delay(self, attempt: int, failure: _Failure) -> float | None:
        """Seconds to wait before the next attempt, or None to give up."""
        if attempt >= self.config.max_retries:
            return None
        if failure.retry_after is not None:
            return failure.retry_after if failure.retry_after <= self.config.max_backoff else None
        ceiling = min(self.config.max_backoff, self.config.initial_backoff * 2**attempt)
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def _request_params(self, request: ModelRequest) -> dict[str, Any]:
        params: dict[str, Any] = {
            "model": request.model,
            "messages": [_message_param(message) for message in request.messages],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.tools:
            # OpenAI rejects tool_choice and parallel_tool_calls without tools.
            params["tools"] = [_tool_param(tool) for tool in request.tools]
            params["tool_choice"] = _tool_choice_param(request.tool_choice)
            if not request.parallel_tool_calls:
                # Only when off: true is every provider's default, and some models (OpenAI's
                # reasoning ones) reject the field altogether.
                params["parallel_tool_calls"] = False
        if request.temperature is not None:
            params["temperature"] = request.temperature
        if request.top_p is not None:
            params["top_p"] = request.top_p
        if request.max_tokens is not None:
            params[self.config.completion_limit_field] = request.max_tokens
        if request.response_format and request.response_format.get("type") != "text":
            params["response_format"] = _plain_json(request.response_format)
        return params


# --- Request mapping ----------------------------------------------------------------------


def _message_param(message: ChatMessage) -> ChatCompletionMessageParam:
    if message.role == "system":
        return {"role": "system", "content": message.content}
    if message.role == "user":
        return {"role": "user", "content": message.content}
    if message.role == "tool":
        return {"role": "tool", "tool_call_id": message.tool_call_id, "content": message.content}
    if not message.tool_calls:
        return {"role": "assistant", "content": message.content}
    return {
        "role": "assistant",
        # A string, even when empty: llama.cpp's server rejects null here (OpenAI takes both).
        "content": message.content,
        "tool_calls": [_tool_call_param(call.id, call.name, call.arguments) for call in message.tool_calls],
    }


def _tool_call_param(call_id: str, name: str, arguments: str) -> ChatCompletionMessageFunctionToolCallParam:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _tool_param(tool: FunctionSpec) -> ChatCompletionFunctionToolParam:
    parameters = _plain_json(tool.parameters) or {"type": "object", "properties": {}}
    param: ChatCompletionFunctionToolParam = {
        "type": "function",
        "function": {"name": tool.name, "parameters": parameters},
    }
    if tool.description:
        param["function"]["description"] = tool.description
    if tool.strict:  # sent only when set: some servers reject fields they do not know
        param["function"]["strict"] = True
    return param


def _tool_choice_param(choice: str) -> ChatCompletionToolChoiceOptionParam:
    if choice == "auto" or not choice:
        return "auto"
    if choice == "none":
        return "none"
    if choice == "required":
        return "required"
    return {"type": "function", "function": {"name": choice}}


def _plain_json(value: Any) -> Any:
    """Mappings and tuples (as frozen requests hold them) as the dicts and lists JSON wants."""
    if isinstance(value, Mapping):
        return {str(key): _plain_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain_json(item) for item in value]
    return value


# --- Stream translation -------------------------------------------------------------------


class _EmptyAnswer(Exception):
    """A turn that ended with no text and no tool calls, and not cut short.

    Never a real answer: llama.cpp's server, for one, may close a stream with tools and
    tool_choice `auto` without sending a single chunk. Completing the run with an empty reply
    would be a silent wrong result.
    """

    def __init__(self, usage: UsageReport | None) -> None:
        super().__init__("empty answer")
        self.usage = usage


def _sum_usage(first: UsageReport | None, second: UsageReport | None) -> UsageReport | None:
    if first is None or second is None:
        return second or first
    return UsageReport(
        first.prompt_tokens + second.prompt_tokens, first.completion_tokens + second.completion_tokens
    )


class _ChunkTranslator:
    """Chat completion chunks in, ModelChunks out; usage and finish are held for the end."""

    def __init__(self) -> None:
        self._tool_calls = _ToolCallIndexer()
        self._finish_reason: str | None = None
        self.usage: UsageReport | None = None
        self._said_anything = False

    @property
    def is_empty(self) -> bool:
        """No text, no tool call, and no length or content-filter stop to explain it."""
        cut_short = _finish_reason(self._finish_reason, called_tools=False) != "stop"
        return not (self._said_anything or self._tool_calls.count or cut_short)

    def feed(self, chunk: ChatCompletionChunk) -> list[ModelChunk]:
        if chunk.usage is not None:  # some servers repeat it on every chunk; the last one counts
            self.usage = UsageReport(chunk.usage.prompt_tokens or 0, chunk.usage.completion_tokens or 0)
        out: list[ModelChunk] = []
        for choice in chunk.choices:
            if choice.index:
                continue  # n=1 is requested; ignore anything else
            delta = choice.delta
            out.extend(self._text(delta.content, delta.refusal))
            out.extend(self._tool_calls.piece(call) for call in delta.tool_calls or ())
            if choice.finish_reason:
                self._finish_reason = choice.finish_reason
        return out

    def feed_completion(self, completion: ChatCompletion) -> list[ModelChunk]:
        """A whole (unstreamed) completion, as the chunks its stream would have given."""
        if completion.usage is not None:
            usage = completion.usage
            self.usage = UsageReport(usage.prompt_tokens or 0, usage.completion_tokens or 0)
        out: list[ModelChunk] = []
        for choice in completion.choices[:1]:
            message = choice.message
            out.extend(self._text(message.content, message.refusal))
            for call in message.tool_calls or ():
                if isinstance(call, ChatCompletionMessageFunctionToolCall):
                    out.append(self._tool_calls.whole(call.id, call.function.name, call.function.arguments))
            self._finish_reason = choice.finish_reason
        return out

    def _text(self, content: str | None, refusal: str | None) -> list[ModelChunk]:
        # A structured-output refusal is the model's answer too.
        pieces: list[ModelChunk] = [TextDelta(text) for text in (content, refusal) if text]
        self._said_anything = self._said_anything or bool(pieces)
        return pieces

    def finish(self) -> list[ModelChunk]:
        end: list[ModelChunk] = [] if self.usage is None else [self.usage]
        end.append(Finish(_finish_reason(self._finish_reason, called_tools=self._tool_calls.count > 0)))
        return end


def _finish_reason(reason: str | None, *, called_tools: bool) -> FinishReason:
    if reason in ("length", "max_tokens"):
        return "length"
    if reason == "content_filter":
        return "content_filter"
    # OpenAI says "stop" when tool_choice names a function, Ollama often does too, and some
    # servers end without a reason or with their own ("eos", "end_turn"): if the model
    # called tools, the turn ended with tool calls.
    return "tool_calls" if called_tools else "stop"


@dataclass
class _CallSlot:
    index: int
    call_id: str
    named: bool = False


class _ToolCallIndexer:
    """Gives each tool call its own index and an id, whatever the provider's quirks.

    Some servers (older Ollama) send parallel calls all with index 0 but different ids; some
    send no index or no id at all. A new id at a known index starts a new call.
    """

    def __init__(self) -> None:
        self._by_provider_index: dict[int, _CallSlot] = {}
        self._last: _CallSlot | None = None
        self.count = 0

    def piece(self, call: ChoiceDeltaToolCall) -> ToolCallDelta:
        function = call.function
        name = (function.name if function else None) or ""
        arguments = (function.arguments if function else None) or ""
        slot, is_new = self._slot_for(call)
        delta = ToolCallDelta(
            index=slot.index,
            id=slot.call_id if is_new else "",
            name=name if not slot.named else "",
            arguments=arguments,
        )
        slot.named = slot.named or bool(name)
        return delta

    def whole(self, call_id: str, name: str, arguments: str) -> ToolCallDelta:
        """A complete call (from an unstreamed completion) as one piece."""
        self.count += 1
        return ToolCallDelta(self.count - 1, call_id or "call_" + secrets.token_hex(12), name, arguments)

    def _slot_for(self, call: ChoiceDeltaToolCall) -> tuple[_CallSlot, bool]:
        provider_index: int | None = call.index
        slot = self._by_provider_index.get(provider_index) if provider_index is not None else self._last
        if slot is not None and (not call.id or call.id == slot.call_id):
            return slot, False
        slot = _CallSlot(index=self.count, call_id=call.id or "call_" + secrets.token_hex(12))
        self.count += 1
        if provider_index is not None:
            self._by_provider_index[provider_index] = slot
        self._last = slot
        return slot, True


# --- Errors -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Failure:
    """A failed attempt: the error to report and whether another attempt may help."""

    error: ModelError
    transient: bool
    retry_after: float | None = None

    @classmethod
    def of(cls, exc: APIError, config: ProviderConfig, model: str) -> _Failure:
        redact = _Redactor(config.api_key)
        if isinstance(exc, APITimeoutError):
            message = f"{config.name} did not answer within {config.timeout:g}s"
            return cls(ModelError("timeout", message, retryable=True), transient=True)
        if isinstance(exc, APIConnectionError):
            cause = exc.__cause__
            reason = f"{type(cause).__name__}: {cause}" if cause else exc.message
            message = f"cannot reach {config.name} at {config.display_url}: {redact(reason)}"
            return cls(ModelError("connection_error", message, retryable=True), transient=True)
        if isinstance(exc, APIStatusError):
            return cls._from_status(exc.status_code, exc, config, model, exc.request_id)
        # An error event inside a 200 stream; vLLM and llama.cpp put an HTTP status in its code.
        status = _status_in_body(exc.body) or 500
        return cls._from_status(status, exc, config, model, None)

    @classmethod
    def _from_status(
        cls, status: int, exc: APIError, config: ProviderConfig, model: str, request_id: str | None
    ) -> _Failure:
        code, summary = _classify_status(status, exc.code, config, model)
        detail = _Redactor(config.api_key)(_provider_detail(exc))
        message = f"{summary} (HTTP {status}): {detail}"
        if status == 401:
            message += _api_key_hint(config)
        if request_id:
            message += f" [request id {request_id}]"
        transient = (status in _TRANSIENT_STATUSES or status >= 500) and code != "quota_exceeded"
        error = ModelError(code, message, retryable=transient)
        retry_after = _retry_after_seconds(exc.response.headers) if isinstance(exc, APIStatusError) else None
        return cls(error, transient, retry_after)

    def final_error(self, *, attempts: int) -> ModelError:
        if attempts == 1:
            return self.error
        message = f"{self.error.message} (gave up after {attempts} attempts)"
        return ModelError(self.error.code, message, retryable=self.error.retryable)


def _classify_status(
    status: int, provider_code: str | None, config: ProviderConfig, model: str
) -> tuple[str, str]:
    """(our error code, a summary) for an HTTP status and the provider's own error code."""
    name = config.name
    if status == 401:
        return "authentication_error", f"{name} rejected the API key"
    if status == 403:
        return "permission_denied", f"{name} denied access to model {model!r}"
    if status == 404:
        return "model_not_found", (
            f"{name} has no model {model!r}, or {config.display_url} is not an OpenAI-compatible endpoint"
        )
    if status == 408:
        return "timeout", f"{name} timed out the request"
    if status == 409:
        return "conflict", f"{name} reported a conflict"
    if status == 429 and provider_code == "insufficient_quota":  # billing, not a rate: waiting won't help
        return "quota_exceeded", f"{name} says the account's quota is used up"
    if status == 429:
        return "rate_limit_exceeded", f"{name} is rate limiting requests"
    if status >= 500:
        return "server_error", f"{name} failed"
    if provider_code == "context_length_exceeded":
        return "context_length_exceeded", f"{name} says the prompt is longer than model {model!r} allows"
    return "invalid_request", f"{name} rejected the request"


def _api_key_hint(config: ProviderConfig) -> str:
    variable = config.api_key_env or default_api_key_env(config.name)
    if config.api_key:
        return f"; the key was read from ${variable}"
    return f"; no API key is configured (set ${variable})"


def _provider_detail(exc: APIError) -> str:
    """The provider's own error message, one line and short."""
    body = exc.body
    text: Any = body.get("message", json.dumps(body, default=str)) if isinstance(body, Mapping) else body
    if not isinstance(text, str) or not text.strip():
        text = exc.message
    text = " ".join(text.split())
    return text if len(text) <= _MAX_DETAIL_CHARS else text[: _MAX_DETAIL_CHARS - 1] + "…"


def _status_in_body(body: object) -> int | None:
    code = body.get("code") if isinstance(body, Mapping) else None
    if isinstance(code, int) and 400 <= code <= 599:
        return code
    if isinstance(code, str) and code.isdigit() and 400 <= int(code) <= 599:
        return int(code)
    return None


def _retry_after_seconds(headers: httpx2.Headers) -> float | None:
    """Retry-After-Ms or Retry-After (seconds); HTTP dates are rare from APIs and ignored."""
    for header, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        try:
            seconds = float(headers.get(header, "")) * scale
        except ValueError:
            continue
        if math.isfinite(seconds) and seconds >= 0:
            return seconds
    return None


class _Redactor:
    """Removes the API key, and anything that looks like a bearer token or key, from text."""

    _PATTERNS = (
        (re.compile(r"(?i)(bearer\s+)\S+"), r"\1[redacted]"),
        (re.compile(r"\b(sk-|sk_)[A-Za-z0-9_\-*]{6,}"), r"\1[redacted]"),
    )

    def __init__(self, api_key: str) -> None:
        self._api_key = api_key

    def __call__(self, text: str) -> str:
        if self._api_key:
            text = text.replace(self._api_key, "[redacted]")
        for pattern, replacement in self._PATTERNS:
            text = pattern.sub(replacement, text)
        return text
