"""OpenAIBackend against a scripted OpenAI-wire-format server on 127.0.0.1 (tests/fake_openai.py)."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from typing import Any

import pytest

from fake_openai import (
    CompletionReply,
    Disconnect,
    ErrorReply,
    FakeOpenAI,
    Reply,
    StreamReply,
    completion,
    delta_chunk,
    empty_stream,
    error_reply,
    finish_chunk,
    role_chunk,
    text_chunk,
    text_stream,
    tool_call_chunk,
    tool_calls_stream,
    usage_chunk,
)
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
    ToolCallSpec,
    UsageReport,
)
from spindle_server.models.openai_backend import OpenAIBackend
from spindle_server.models.provider_spec import ProviderConfig, parse_provider_spec

API_KEY = "sk-test-0123456789abcdef"
MAX_RETRIES = 2


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


def make_config(base_url: str, **overrides: Any) -> ProviderConfig:
    settings: dict[str, Any] = {
        "name": "acme",
        "base_url": base_url,
        "api_key": API_KEY,
        "api_key_env": "ACME_KEY",
        "timeout": 5.0,
        "stall_timeout": 5.0,
        "max_retries": MAX_RETRIES,
        "initial_backoff": 0.001,
        "max_backoff": 0.01,
    }
    return ProviderConfig(**(settings | overrides))


@pytest.fixture
async def backend(fake: FakeOpenAI) -> AsyncIterator[OpenAIBackend]:
    model = OpenAIBackend(make_config(fake.base_url))
    yield model
    await model.aclose()


def user_request(text: str = "Hello", **fields: Any) -> ModelRequest:
    return ModelRequest(model="gpt-test", messages=(ChatMessage("user", text),), **fields)


async def collect(backend: OpenAIBackend, request: ModelRequest | None = None) -> list[ModelChunk]:
    return [chunk async for chunk in backend.stream(request or user_request())]


async def failure(backend: OpenAIBackend, request: ModelRequest | None = None) -> ModelError:
    with pytest.raises(ModelError) as caught:
        await collect(backend, request)
    return caught.value


def assemble_tool_calls(chunks: list[ModelChunk]) -> dict[int, dict[str, str]]:
    calls: dict[int, dict[str, str]] = {}
    for chunk in chunks:
        if isinstance(chunk, ToolCallDelta):
            call = calls.setdefault(chunk.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += chunk.id
            call["name"] += chunk.name
            call["arguments"] += chunk.arguments
    return calls


# --- Streaming ------------------------------------------------------------------------------


async def test_streams_text_then_usage_then_finish(fake: FakeOpenAI, backend: OpenAIBackend) -> None:
    fake.enqueue(text_stream("Hel", "lo", " world", usage=(12, 3)))

    chunks = await collect(backend)

    assert chunks == [
        TextDelta("Hel"),
        TextDelta("lo"),
        TextDelta(" world"),
        UsageReport(prompt_tokens=12, completion_tokens=3),
        Finish("stop"),
    ]
    [sent] = fake.requests
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["authorization"] == f"Bearer {API_KEY}"
    assert sent.body == {
        "model": "gpt-test",
        "messages": [{"role": "user", "content": "Hello"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def test_parallel_tool_calls_are_assembled_from_split_deltas(
    fake: FakeOpenAI, backend: OpenAIBackend
) -> None:
    fake.enqueue(
        tool_calls_stream(
            [
                ("call_weather", "get_weather", ['{"ci', 'ty": "Pa', 'ris"}']),
                ("call_time", "get_time", ['{"tz":', ' "CET"}']),
            ],
            usage=(40, 18),
        )
    )

    chunks = await collect(
        backend, user_request(tools=(FunctionSpec("get_weather"), FunctionSpec("get_time")))
    )

    assert [c for c in chunks if isinstance(c, ToolCallDelta)] == [
        ToolCallDelta(0, id="call_weather", name="get_weather"),
        ToolCallDelta(0, arguments='{"ci'),
        ToolCallDelta(0, arguments='ty": "Pa'),
        ToolCallDelta(0, arguments='ris"}'),
        ToolCallDelta(1, id="call_time", name="get_time"),
        ToolCallDelta(1, arguments='{"tz":'),
        ToolCallDelta(1, arguments=' "CET"}'),
    ]
    calls = assemble_tool_calls(chunks)
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}
    assert calls[1] == {"id": "call_time", "name": "get_time", "arguments": '{"tz": "CET"}'}
    assert chunks[-2:] == [UsageReport(40, 18), Finish("tool_calls")]


async def test_interleaved_tool_call_pieces_keep_their_index(
    fake: FakeOpenAI, backend: OpenAIBackend
) -> None:
    fake.enqueue(
        StreamReply(
            [
                role_chunk(),
                tool_call_chunk(0, call_id="call_a", name="alpha"),
                tool_call_chunk(1, call_id="call_b", name="beta"),
                tool_call_chunk(1, arguments='{"b": '),
                tool_call_chunk(0, arguments='{"a": 1}'),
                tool_call_chunk(1, arguments="2}"),
                finish_chunk("tool_calls"),
                usage_chunk(5, 6),
            ]
        )
    )

    calls = assemble_tool_calls(await collect(backend))

    assert calls == {
        0: {"id": "call_a", "name": "alpha", "arguments": '{"a": 1}'},
        1: {"id": "call_b", "name": "beta", "arguments": '{"b": 2}'},
    }


async def test_quirky_tool_calls_get_their_own_index_and_an_id(
    fake: FakeOpenAI, backend: OpenAIBackend
) -> None:
    # Older Ollama sends parallel calls whole, all at index 0; some servers send no id;
    # and OpenAI says "stop" when tool_choice names a function.
    fake.enqueue(
        StreamReply(
            [
                role_chunk(),
                tool_call_chunk(0, call_id="call_1", name="alpha", arguments="{}"),
                tool_call_chunk(0, call_id="call_2", name="beta", arguments='{"x": 1}'),
                delta_chunk({"tool_calls": [{"index": 2, "function": {"name": "gamma", "arguments": "{}"}}]}),
                finish_chunk("stop"),
                usage_chunk(1, 1),
            ]
        )
    )

    chunks = await collect(backend)

    calls = assemble_tool_calls(chunks)
    assert [calls[i]["name"] for i in (0, 1, 2)] == ["alpha", "beta", "gamma"]
    assert calls[0]["id"] == "call_1"
    assert calls[1] == {"id": "call_2", "name": "beta", "arguments": '{"x": 1}'}
    assert calls[2]["id"].startswith("call_")
    assert chunks[-1] == Finish("tool_calls")


async def test_usage_repeated_on_every_chunk_is_reported_once(
    fake: FakeOpenAI, backend: OpenAIBackend
) -> None:
    running = [usage_chunk(7, n)["usage"] for n in range(3)]
    fake.enqueue(
        StreamReply(
            [
                {**role_chunk(), "usage": running[0]},
                {**text_chunk("a"), "usage": running[1]},
                {**finish_chunk("stop"), "usage": running[2]},
            ]
        )
    )

    chunks = await collect(backend)

    assert chunks == [TextDelta("a"), UsageReport(7, 2), Finish("stop")]


async def test_a_refusal_is_streamed_as_text(fake: FakeOpenAI, backend: OpenAIBackend) -> None:
    fake.enqueue(
        StreamReply([role_chunk(), delta_chunk({"refusal": "I can't help with that."}), finish_chunk("stop")])
    )

    chunks = await collect(backend)

    assert chunks == [TextDelta("I can't help with that."), Finish("stop")]


@pytest.mark.parametrize(
    ("provider_reason", "reason"),
    [
        ("stop", "stop"),
        ("length", "length"),
        ("content_filter", "content_filter"),
        ("tool_calls", "stop"),  # no call arrived: nothing to wait for
        ("eos", "stop"),
        (None, "stop"),
    ],
)
async def test_finish_reasons_are_mapped(
    fake: FakeOpenAI, backend: OpenAIBackend, provider_reason: str | None, reason: FinishReason
) -> None:
    ending = [finish_chunk(provider_reason)] if provider_reason else []
    fake.enqueue(StreamReply([role_chunk(), text_chunk("x"), *ending]))

    chunks = await collect(backend)

    assert chunks[-1] == Finish(reason)


async def test_a_malformed_chunk_is_a_server_error(fake: FakeOpenAI, backend: OpenAIBackend) -> None:
    fake.enqueue(StreamReply([role_chunk(), "data: {not json"]))

    error = await failure(backend)

    assert error.code == "server_error"
    assert "malformed" in error.message


# --- Empty answers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "empty",
    [
        empty_stream(),
        empty_stream(done=False),
        StreamReply([role_chunk(), finish_chunk("stop")]),
        StreamReply([role_chunk(), text_chunk(""), delta_chunk({}, finish_reason=None)]),
    ],
    ids=["no-chunk", "no-chunk-no-done", "role-and-stop", "empty-content-no-reason"],
)
async def test_an_empty_stream_is_asked_again_without_streaming(
    fake: FakeOpenAI, backend: OpenAIBackend, empty: StreamReply
) -> None:
    fake.enqueue(empty, completion("Hello", usage=(12, 2)))

    chunks = await collect(backend)

    assert chunks == [TextDelta("Hello"), UsageReport(12, 2), Finish("stop")]
    first, second = (request.body for request in fake.requests)
    assert (first["stream"], second["stream"]) == (True, False) and "stream_options" not in second
    ignored = ("stream", "stream_options")
    assert {k: v for k, v in first.items() if k not in ignored} == {
        k: v for k, v in second.items() if k not in ignored
    }


async def test_the_empty_streams_usage_is_added_to_the_retrys(
    fake: FakeOpenAI, backend: OpenAIBackend
) -> None:
    fake.enqueue(
        StreamReply([role_chunk(), finish_chunk("stop"), usage_chunk(10, 0)]), completion("Hi", usage=(10, 1))
    )

    chunks = await collect(backend)

    assert chunks == [TextDelta("Hi"), UsageReport(20, 1), Finish("stop")]


async def test_tool_calls_of_the_unstreamed_retry_are_chunks_with_their_ids(
    fake: FakeOpenAI, backend: OpenAIBackend
) -> None:
    calls = [("call_a", "get_weather", '{"city": "Paris"}'), ("", "get_time", "{}")]
    fake.enqueue(empty_stream(), completion(None, tool_calls=calls, finish_reason="tool_calls"))
    tools = (FunctionSpec("get_weather"), FunctionSpec("get_time"))

    chunks = await collect(backend, user_request(tools=tools))

    assert chunks[0] == ToolCallDelta(0, "call_a", "get_weather", '{"city": "Paris"}')
    second = chunks[1]
    assert isinstance(second, ToolCallDelta) and second.id.startswith("call_")  # made up: none sent
    assert (second.index, second.name, second.arguments) == (1, "get_time", "{}")
    assert chunks[2:] == [UsageReport(12, 3), Finish("tool_calls")]


@pytest.mark.parametrize("second", [completion(None), completion("")], ids=["null", "empty-string"])
async def test_an_answer_empty_twice_is_an_empty_response_error(
    fake: FakeOpenAI, backend: OpenAIBackend, second: CompletionReply
) -> None:
    fake.enqueue(empty_stream(), second)

    error = await failure(backend)

    assert error.code == "empty_response"
    assert "acme" in error.message and "empty answer" in error.message
    assert len(fake.requests) == 2


async def test_a_failed_unstreamed_retry_is_the_providers_error(
    fake: FakeOpenAI, backend: OpenAIBackend
) -> None:
    fake.enqueue(empty_stream(), error_reply(400, "bad tools", "invalid_request_error"))

    error = await failure(backend)

    assert error.code == "invalid_request" and "bad tools" in error.message


async def test_a_transient_failure_of_the_unstreamed_retry_is_retried_unstreamed(
    fake: FakeOpenAI, backend: OpenAIBackend
) -> None:
    """llama.cpp's server closes the connection after a stream it ended empty: the pooled
    connection the unstreamed call then reuses may be dead."""
    fake.enqueue(empty_stream(), Disconnect(), completion("ok"))

    chunks = await collect(backend)

    assert chunks[0] == TextDelta("ok")
    assert [request.body["stream"] for request in fake.requests] == [True, False, False]


@pytest.mark.parametrize("reason", ["length", "content_filter"])
async def test_an_empty_answer_cut_short_is_not_retried(
    fake: FakeOpenAI, backend: OpenAIBackend, reason: str
) -> None:
    """A reasoning model may spend max_tokens on hidden reasoning: empty, but explained."""
    fake.enqueue(StreamReply([role_chunk(), finish_chunk(reason), usage_chunk(5, 16)]))

    chunks = await collect(backend)

    assert chunks[-1] == Finish("length" if reason == "length" else "content_filter")
    assert len(fake.requests) == 1


# --- Request mapping ------------------------------------------------------------------------


async def test_every_parameter_reaches_the_request_body(fake: FakeOpenAI, backend: OpenAIBackend) -> None:
    fake.enqueue(text_stream("ok"))
    weather_schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ("city", "days"),
        "additionalProperties": False,
    }
    reply_schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    request = ModelRequest(
        model="gpt-test",
        messages=(
            ChatMessage("system", "Be brief."),
            ChatMessage("user", "Weather in Paris and the time?"),
            ChatMessage(
                "assistant",
                tool_calls=(
                    ToolCallSpec("call_1", "get_weather", '{"city": "Paris", "days": 1}'),
                    ToolCallSpec("call_2", "get_time", "{}"),
                ),
            ),
            ChatMessage("tool", "sunny", tool_call_id="call_1"),
            ChatMessage("tool", "12:00", tool_call_id="call_2"),
            ChatMessage("assistant", "Sunny, noon."),
            ChatMessage("user", "Thanks"),
        ),
        tools=(
            FunctionSpec("get_weather", "Weather by city", weather_schema, strict=True),
            FunctionSpec("get_time"),
        ),
        tool_choice="get_weather",
        parallel_tool_calls=False,
        temperature=0.2,
        top_p=0.9,
        max_tokens=256,
        response_format={"type": "json_schema", "json_schema": {"name": "reply", "schema": reply_schema}},
    )

    await collect(backend, request)

    body = fake.requests[0].body
    assert body == {
        "model": "gpt-test",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris and the time?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'},
                    },
                    {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
            {"role": "assistant", "content": "Sunny, noon."},
            {"role": "user", "content": "Thanks"},
        ],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Weather by city",
                    "parameters": {**weather_schema, "required": ["city", "days"]},
                    "strict": True,
                },
            },
            {
                "type": "function",
                "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
            },
        ],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
        "temperature": 0.2,
        "top_p": 0.9,
        "max_tokens": 256,
        "response_format": {"type": "json_schema", "json_schema": {"name": "reply", "schema": reply_schema}},
    }


@pytest.mark.parametrize("choice", ["auto", "none", "required"])
async def test_tool_choice_modes_are_sent_as_is(
    fake: FakeOpenAI, backend: OpenAIBackend, choice: str
) -> None:
    fake.enqueue(text_stream("ok"))

    await collect(backend, user_request(tools=(FunctionSpec("f"),), tool_choice=choice))

    body = fake.requests[0].body
    assert body["tool_choice"] == choice
    assert "parallel_tool_calls" not in body  # true is the default; sent only when false


async def test_without_tools_no_tool_fields_are_sent(fake: FakeOpenAI, backend: OpenAIBackend) -> None:
    fake.enqueue(text_stream("ok"))

    await collect(backend, user_request(tool_choice="required", parallel_tool_calls=False))

    assert not {"tools", "tool_choice", "parallel_tool_calls"} & fake.requests[0].body.keys()


@pytest.mark.parametrize(
    ("response_format", "sent"),
    [
        ({"type": "text"}, None),
        ({"type": "json_object"}, {"type": "json_object"}),
    ],
)
async def test_response_format(
    fake: FakeOpenAI, backend: OpenAIBackend, response_format: dict[str, Any], sent: dict[str, Any] | None
) -> None:
    fake.enqueue(text_stream("{}"))

    await collect(backend, user_request(response_format=response_format))

    assert fake.requests[0].body.get("response_format") == sent


async def test_max_tokens_field_can_be_max_completion_tokens(fake: FakeOpenAI) -> None:
    fake.enqueue(text_stream("ok"))
    backend = OpenAIBackend(make_config(fake.base_url, max_tokens_field="max_completion_tokens"))
    try:
        await collect(backend, user_request(max_tokens=64))
    finally:
        await backend.aclose()

    body = fake.requests[0].body
    assert body["max_completion_tokens"] == 64
    assert "max_tokens" not in body


def test_max_tokens_field_defaults_by_host() -> None:
    assert (
        ProviderConfig("openai", "https://api.openai.com/v1").completion_limit_field
        == "max_completion_tokens"
    )
    assert ProviderConfig("ollama", "http://localhost:11434/v1").completion_limit_field == "max_tokens"


async def test_without_a_key_no_credentials_are_sent(
    fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The openai package would otherwise pick these up from the environment.
    monkeypatch.setenv("OPENAI_ORG_ID", "org-leak")
    monkeypatch.setenv("OPENAI_PROJECT_ID", "proj-leak")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env-leak-000000")
    fake.enqueue(text_stream("ok"))
    backend = OpenAIBackend(make_config(fake.base_url, api_key=""))
    try:
        await collect(backend)
    finally:
        await backend.aclose()

    headers = fake.requests[0].headers
    assert not {"authorization", "openai-organization", "openai-project"} & headers.keys()


def test_count_tokens_estimates_four_utf8_bytes_a_token() -> None:
    backend = OpenAIBackend(make_config("http://127.0.0.1:9/v1"))
    assert [backend.count_tokens(text) for text in ("", "abcd", "abcde", "привет")] == [0, 1, 2, 3]


# --- Errors and retries ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error_type", "code"),
    [
        (400, "invalid_request_error", "invalid_request"),
        (401, "invalid_request_error", "authentication_error"),
        (403, "permission_denied", "permission_denied"),
        (404, "invalid_request_error", "model_not_found"),
        (422, "invalid_request_error", "invalid_request"),
    ],
)
async def test_client_errors_fail_at_once(
    fake: FakeOpenAI, backend: OpenAIBackend, status: int, error_type: str, code: str
) -> None:
    fake.enqueue(error_reply(status, "The provider says no.", error_type))

    error = await failure(backend)

    assert (error.code, error.retryable) == (code, False)
    assert "acme" in error.message
    assert f"HTTP {status}" in error.message
    assert "The provider says no." in error.message
    assert len(fake.requests) == 1


async def test_404_names_the_model(fake: FakeOpenAI, backend: OpenAIBackend) -> None:
    fake.enqueue(
        error_reply(404, "The model `gpt-test` does not exist.", "invalid_request_error", "model_not_found")
    )

    error = await failure(backend)

    assert "'gpt-test'" in error.message


async def test_401_without_a_key_says_which_variable_to_set(fake: FakeOpenAI) -> None:
    fake.enqueue(error_reply(401, "Missing bearer token", "authentication_error"))
    backend = OpenAIBackend(make_config(fake.base_url, api_key=""))
    try:
        error = await failure(backend)
    finally:
        await backend.aclose()

    assert error.code == "authentication_error"
    assert "no API key is configured (set $ACME_KEY)" in error.message


async def test_context_length_exceeded_keeps_its_code(fake: FakeOpenAI, backend: OpenAIBackend) -> None:
    fake.enqueue(error_reply(400, "Too long.", "invalid_request_error", "context_length_exceeded"))

    error = await failure(backend)

    assert (error.code, error.retryable) == ("context_length_exceeded", False)


async def test_insufficient_quota_is_not_retried(fake: FakeOpenAI, backend: OpenAIBackend) -> None:
    fake.enqueue(
        error_reply(429, "You exceeded your current quota.", "insufficient_quota", "insufficient_quota")
    )

    error = await failure(backend)

    assert (error.code, error.retryable) == ("quota_exceeded", False)
    assert len(fake.requests) == 1


@pytest.mark.parametrize("status", [429, 500, 502, 503])
async def test_transient_errors_are_retried_then_succeed(
    fake: FakeOpenAI, backend: OpenAIBackend, status: int
) -> None:
    fake.enqueue(
        error_reply(status, "busy", "server_error"),
        ErrorReply(status, "<html>Bad Gateway</html>"),
        text_stream("finally"),
    )

    chunks = await collect(backend)

    assert chunks[0] == TextDelta("finally")
    assert len(fake.requests) == 3
    assert all(request.body == fake.requests[0].body for request in fake.requests)


@pytest.mark.parametrize(("status", "code"), [(429, "rate_limit_exceeded"), (500, "server_error")])
async def test_transient_errors_give_up_after_max_retries(
    fake: FakeOpenAI, backend: OpenAIBackend, status: int, code: str
) -> None:
    fake.enqueue(
        *[error_reply(status, "still busy", "server_error")] * (MAX_RETRIES + 1), text_stream("unused")
    )

    error = await failure(backend)

    assert (error.code, error.retryable) == (code, True)
    assert f"gave up after {MAX_RETRIES + 1} attempts" in error.message
    assert len(fake.requests) == MAX_RETRIES + 1


async def test_retry_after_is_honoured(fake: FakeOpenAI, backend: OpenAIBackend) -> None:
    fake.enqueue(
        error_reply(429, "slow down", "requests", headers={"retry-after-ms": "5"}), text_stream("ok")
    )

    assert (await collect(backend))[0] == TextDelta("ok")


async def test_retry_after_beyond_max_backoff_ends_the_retries(
    fake: FakeOpenAI, backend: OpenAIBackend
) -> None:
    fake.enqueue(
        error_reply(429, "come back later", "requests", headers={"retry-after": "3600"}), text_stream("x")
    )

    error = await failure(backend)

    assert error.code == "rate_limit_exceeded"
    assert len(fake.requests) == 1


async def test_dropped_connection_before_a_response_is_retried(
    fake: FakeOpenAI, backend: OpenAIBackend
) -> None:
    fake.enqueue(Disconnect(), text_stream("ok"))

    assert (await collect(backend))[0] == TextDelta("ok")
    assert len(fake.requests) == 2


async def test_unreachable_provider_is_a_connection_error() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    backend = OpenAIBackend(make_config(f"http://127.0.0.1:{port}/v1"))
    try:
        error = await failure(backend)
    finally:
        await backend.aclose()

    assert (error.code, error.retryable) == ("connection_error", True)
    assert f"127.0.0.1:{port}" in error.message


async def test_a_stream_cut_after_output_started_is_not_retried(
    fake: FakeOpenAI, backend: OpenAIBackend
) -> None:
    fake.enqueue(StreamReply([role_chunk(), text_chunk("par"), text_chunk("tial")], drop_after=2))
    fake.enqueue(text_stream("must not be requested"))
    received: list[ModelChunk] = []

    with pytest.raises(ModelError) as caught:
        async for chunk in backend.stream(user_request()):
            received.append(chunk)

    assert received == [TextDelta("par")]
    assert caught.value.code == "connection_error"
    assert len(fake.requests) == 1


async def test_an_error_event_before_output_is_retried(fake: FakeOpenAI, backend: OpenAIBackend) -> None:
    fake.enqueue(
        StreamReply(
            [role_chunk(), {"error": {"message": "overloaded", "type": "server_error", "code": 503}}]
        ),
        text_stream("ok"),
    )

    assert (await collect(backend))[0] == TextDelta("ok")
    assert len(fake.requests) == 2


async def test_an_error_event_after_output_fails_the_turn(fake: FakeOpenAI, backend: OpenAIBackend) -> None:
    fake.enqueue(
        StreamReply([role_chunk(), text_chunk("a"), {"error": {"message": "boom", "type": "server_error"}}])
    )

    error = await failure(backend)

    assert error.code == "server_error"
    assert "boom" in error.message
    assert len(fake.requests) == 1


async def test_no_secret_reaches_any_error(fake: FakeOpenAI, backend: OpenAIBackend) -> None:
    echo = f"Incorrect API key provided: {API_KEY}. Authorization: Bearer {API_KEY}"
    replies: list[Reply] = [
        error_reply(401, echo, "invalid_request_error", "invalid_api_key"),
        error_reply(403, echo, "permission_denied"),
        error_reply(400, echo, "invalid_request_error"),
        ErrorReply(404, echo),
        *[error_reply(429, echo, "requests")] * (MAX_RETRIES + 1),
        *[error_reply(500, echo, "server_error")] * (MAX_RETRIES + 1),
        StreamReply([role_chunk(), text_chunk("a"), {"error": {"message": echo, "type": "server_error"}}]),
    ]
    fake.enqueue(*replies)

    errors = [await failure(backend) for _ in range(7)]

    for error in errors:
        for text in (str(error), repr(error), error.message):
            assert API_KEY not in text
            assert "0123456789abcdef" not in text
        assert error.__cause__ is None
        assert error.__context__ is None
    assert "[redacted]" in errors[0].message


# --- Stalls and cancellation ----------------------------------------------------------------


async def test_a_stalled_stream_times_out_and_is_closed(fake: FakeOpenAI) -> None:
    fake.enqueue(text_stream("first", "never", stall_after=2))
    backend = OpenAIBackend(make_config(fake.base_url, stall_timeout=0.2))
    received: list[ModelChunk] = []
    try:
        with pytest.raises(ModelError) as caught:
            async for chunk in backend.stream(user_request()):
                received.append(chunk)
    finally:
        await backend.aclose()

    assert received == [TextDelta("first")]
    assert (caught.value.code, caught.value.retryable) == ("timeout", True)
    assert await asyncio.to_thread(fake.requests[0].client_closed.wait, 2)


async def test_a_stall_before_any_chunk_is_not_retried(fake: FakeOpenAI) -> None:
    fake.enqueue(text_stream("never", stall_after=0), text_stream("unused"))
    backend = OpenAIBackend(make_config(fake.base_url, stall_timeout=0.2))
    try:
        error = await failure(backend)
    finally:
        await backend.aclose()

    assert error.code == "timeout"
    assert len(fake.requests) == 1


async def test_cancelling_the_consumer_closes_the_http_stream(
    fake: FakeOpenAI, backend: OpenAIBackend
) -> None:
    fake.enqueue(text_stream("first", "never", stall_after=2))
    first_chunk = asyncio.Event()

    async def consume() -> None:
        async for _ in backend.stream(user_request()):
            first_chunk.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first_chunk.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    # Generous bound: the close is immediate; the server polls the socket every 20 ms.
    assert await asyncio.to_thread(fake.requests[0].client_closed.wait, 2)


async def test_closing_the_iterator_early_closes_the_http_stream(
    fake: FakeOpenAI, backend: OpenAIBackend
) -> None:
    fake.enqueue(text_stream("first", "never", stall_after=2))

    async with aclosing(backend.stream(user_request())) as chunks:
        async for chunk in chunks:
            assert chunk == TextDelta("first")
            break

    assert await asyncio.to_thread(fake.requests[0].client_closed.wait, 2)


# --- Provider specs -------------------------------------------------------------------------


def test_spec_with_every_option() -> None:
    config = parse_provider_spec(
        "openai=https://api.openai.com/v1,api_key_env=OPENAI_API_KEY,timeout=30,stall_timeout=15,"
        "max_retries=5,initial_backoff=0.25,max_backoff=8,max_tokens_field=max_tokens",
        {"OPENAI_API_KEY": "sk-from-env-000000"},
    )

    assert config == ProviderConfig(
        name="openai",
        base_url="https://api.openai.com/v1",
        api_key="sk-from-env-000000",
        api_key_env="OPENAI_API_KEY",
        timeout=30.0,
        stall_timeout=15.0,
        max_retries=5,
        initial_backoff=0.25,
        max_backoff=8.0,
        max_tokens_field="max_tokens",
    )
    assert "sk-from-env" not in repr(config)


def test_spec_defaults_read_the_key_from_the_providers_own_variable() -> None:
    config = parse_provider_spec(
        "yandex-ai=https://llm.api.cloud.yandex.net/v1", {"SPINDLE_PROVIDER_YANDEX_AI_API_KEY": "k"}
    )

    assert (config.name, config.api_key, config.api_key_env) == (
        "yandex-ai",
        "k",
        "SPINDLE_PROVIDER_YANDEX_AI_API_KEY",
    )
    assert (config.timeout, config.max_retries, config.max_tokens_field) == (60.0, 3, None)


def test_spec_without_a_key_is_keyless_and_keeps_an_equals_sign_in_the_url() -> None:
    config = parse_provider_spec("azure=https://x.example.com/openai/v1?api-version=2025-01-01,timeout=9", {})

    assert config.base_url == "https://x.example.com/openai/v1?api-version=2025-01-01"
    assert (config.api_key, config.timeout) == ("", 9.0)


@pytest.mark.parametrize(
    ("spec", "complaint"),
    [
        ("openai", "expected NAME=BASE_URL"),
        ("openai=", "expected NAME=BASE_URL"),
        ("openai=https://api.openai.com/v1,api_key=sk-123", "read from the environment"),
        (
            "openai=https://api.openai.com/v1,api_key_env=UNSET_VARIABLE_FOR_TEST",
            "UNSET_VARIABLE_FOR_TEST is not set",
        ),
        ("openai=https://api.openai.com/v1,colour=blue", "unknown option"),
        ("openai=https://api.openai.com/v1,timeout=soon", "not a number"),
        ("openai=https://api.openai.com/v1,timeout=0", "timeout must be a positive number"),
        ("openai=https://api.openai.com/v1,max_retries=-1", "max_retries must be 0 or more"),
        ("openai=https://api.openai.com/v1,max_tokens_field=n_predict", "max_tokens_field"),
        ("builtin=http://localhost:1/v1", "invalid provider name"),
        ("open/ai=http://localhost:1/v1", "invalid provider name"),
        ("local=localhost:8080/v1", "base URL"),
        ("local=http://localhost:port/v1", "base URL"),
    ],
)
def test_bad_specs_are_refused(spec: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint) as caught:
        parse_provider_spec(spec, {})

    assert "sk-123" not in str(caught.value)
