"""Runs on a real Spindle server driving an OpenAI-compatible provider (tests/fake_openai.py).

Real gRPC in, real HTTP out: the server process is started with `--provider fake=<FakeOpenAI>`,
assistants use model `fake/gpt-test`, and each test asserts on the run, its events and on the
requests FakeOpenAI received. One server and one FakeOpenAI serve most tests (a server start costs
about a second); the stall test starts its own server with a short stall_timeout.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from fake_openai import (
    ErrorReply,
    FakeOpenAI,
    StreamReply,
    completion,
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
from spindle.v1 import assistant_pb2, common_pb2, message_pb2, run_pb2
from support.server import Databases, ServerProcess
from support.stubs import TERMINAL, Stubs, error_details

EventType = run_pb2.StreamEvent
MODEL = "fake/gpt-test"
SECRET = "sk-test-secret"
ENV = {"SPINDLE_PROVIDER_FAKE_API_KEY": SECRET}
MAX_RETRIES = 2
WEATHER_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
}


def provider_flag(fake: FakeOpenAI, **options: object) -> str:
    settings = {"max_retries": MAX_RETRIES, "initial_backoff": 0.01, "max_backoff": 0.02} | options
    return f"fake={fake.base_url}," + ",".join(f"{key}={value}" for key, value in settings.items())


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


@pytest.fixture(scope="module")
def spindle(
    fake: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory, databases: Databases
) -> Iterator[ServerProcess]:
    """One server for the module; debug logs, so that the secret check sees every line."""
    database = databases.new(tmp_path_factory.mktemp("openai-runs"))
    with socket.socket() as probe:  # a port nobody listens on, for provider `down`
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    flags = [
        *("--provider", provider_flag(fake, stall_timeout=10)),
        *("--provider", f"down=http://127.0.0.1:{closed_port}/v1,max_retries=1,initial_backoff=0.01"),
        *("--log-level", "debug"),
    ]
    process = ServerProcess(database, flags, ENV).start()
    yield process
    process.kill()


@pytest.fixture(scope="module")
def api(spindle: ServerProcess) -> Iterator[Stubs]:
    stubs = Stubs.connect(spindle.address)
    yield stubs
    stubs.close()


@pytest.fixture(autouse=True)
def fresh_fake(fake: FakeOpenAI) -> Iterator[None]:
    fake.reset()
    yield
    assert fake.pending_replies == 0, "a scripted reply was never requested"


# --- Helpers ----------------------------------------------------------------------------------


def weather_tool(name: str = "get_weather") -> common_pb2.Tool:
    tool = common_pb2.Tool()
    tool.function.name = name
    tool.function.description = f"{name} for a city"
    tool.function.parameters.update(WEATHER_PARAMETERS)
    return tool


def make_assistant(api: Stubs, **fields: Any) -> assistant_pb2.Assistant:
    return api.assistant(name="real", model=MODEL, **fields)


def start(api: Stubs, *texts: str, assistant: assistant_pb2.Assistant | None = None, **run: Any) -> str:
    assistant = assistant or make_assistant(api)
    thread = api.thread(*texts)
    return api.run(assistant.id, thread.id, **run).id


def finished(api: Stubs, run_id: str) -> run_pb2.Run:
    """The run once it is terminal or waiting for tool results."""
    run = api.wait(run_id, timeout=15)
    assert run.status in {*TERMINAL, run_pb2.TOOL_CALLS}, "the run did not settle in time"
    return run


def events_until_pause_or_end(api: Stubs, run_id: str) -> list[run_pb2.StreamEvent]:
    """Events up to the TOOL_CALLS event or the terminal one (Listen stays open across a pause)."""
    call = api.runs.Listen(run_pb2.ListenRunRequest(run_id=run_id), timeout=15)
    seen: list[run_pb2.StreamEvent] = []
    try:
        for event in call:
            seen.append(event)
            if event.type == EventType.TOOL_CALLS:
                break
    finally:
        call.cancel()
    return seen


def streamed_text(events: list[run_pb2.StreamEvent]) -> str:
    return "".join(e.message_delta.text for e in events if e.type == EventType.PARTIAL_MESSAGE)


def reply_text(run: run_pb2.Run) -> str:
    return "".join(part.text.text for part in run.reply.content)


def submit(api: Stubs, run_id: str, outputs: dict[str, str]) -> None:
    results = [common_pb2.ToolResult(tool_call_id=key, output=value) for key, value in outputs.items()]
    api.runs.SubmitToolResults(
        run_pb2.SubmitToolResultsRequest(run_id=run_id, tool_results=results), timeout=10
    )


def bodies(fake: FakeOpenAI) -> list[dict[str, Any]]:
    return [request.body for request in fake.requests]


def usage_of(run: run_pb2.Run) -> tuple[int, int, int]:
    return (run.usage.prompt_tokens, run.usage.completion_tokens, run.usage.total_tokens)


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


# --- Streaming, tool calls, usage ---------------------------------------------------------------


def test_text_deltas_stream_as_partial_messages_and_become_the_reply(api: Stubs, fake: FakeOpenAI) -> None:
    fake.enqueue(text_stream("Hel", "lo, ", "world"))

    run_id = start(api, "Say hello")
    run = finished(api, run_id)
    events = api.events(run_id)

    assert run.status == run_pb2.COMPLETED
    assert reply_text(run) == "Hello, world"
    assert streamed_text(events) == "Hello, world"
    assert events[-1].type == EventType.DONE
    assert events[-1].done.message.content[0].text.text == "Hello, world"
    assert usage_of(run) == (12, 3, 15)
    messages = api.messages.List(
        message_pb2.ListMessagesRequest(thread_id=run.thread_id, order=common_pb2.ASC), timeout=10
    ).messages
    assert [m.content[0].text.text for m in messages] == ["Say hello", "Hello, world"]
    (request,) = fake.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {SECRET}"
    assert request.body["model"] == "gpt-test"
    assert request.body["stream"] is True
    assert request.body["stream_options"] == {"include_usage": True}
    assert request.body["messages"] == [user("Say hello")]
    assert not {"tools", "tool_choice", "max_tokens", "temperature", "response_format"} & request.body.keys()


def test_parallel_tool_calls_round_trip_with_the_providers_ids(api: Stubs, fake: FakeOpenAI) -> None:
    fake.enqueue(
        tool_calls_stream(
            [
                ("call_abc", "get_weather", ['{"ci', 'ty": "Par', 'is"}']),
                ("call_def", "get_time", ['{"city": ', '"Oslo"}']),
            ],
            usage=(40, 18),
        ),
        text_stream("Sunny in Paris", ", 14:00 in Oslo", usage=(70, 5)),
    )
    assistant = make_assistant(api, tools=[weather_tool(), weather_tool("get_time")])

    run_id = start(api, "Weather in Paris and time in Oslo?", assistant=assistant)
    paused = finished(api, run_id)

    assert paused.status == run_pb2.TOOL_CALLS
    calls = [(c.id, c.function.name, c.function.arguments) for c in paused.required_tool_calls]
    assert calls == [
        ("call_abc", "get_weather", '{"city": "Paris"}'),
        ("call_def", "get_time", '{"city": "Oslo"}'),
    ]
    first_turn = events_until_pause_or_end(api, run_id)
    deltas = [e.tool_call_delta for e in first_turn if e.type == EventType.TOOL_CALL_DELTA]
    assert {(d.index, d.id, d.name) for d in deltas if d.id} == {
        (0, "call_abc", "get_weather"),
        (1, "call_def", "get_time"),
    }
    for index, (_, _, arguments) in enumerate(calls):
        assert "".join(d.arguments for d in deltas if d.index == index) == arguments
    assert first_turn[-1].type == EventType.TOOL_CALLS
    assert [c.id for c in first_turn[-1].tool_calls.tool_calls] == ["call_abc", "call_def"]
    first = fake.requests[0].body
    assert [tool["function"]["name"] for tool in first["tools"]] == ["get_weather", "get_time"]
    assert first["tools"][0] == {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "get_weather for a city",
            "parameters": WEATHER_PARAMETERS,
        },
    }
    assert first["tool_choice"] == "auto" and "parallel_tool_calls" not in first  # default: parallel

    submit(api, run_id, {"call_def": '{"time": "14:00"}', "call_abc": '{"sky": "sunny"}'})
    done = finished(api, run_id)

    assert done.status == run_pb2.COMPLETED
    assert reply_text(done) == "Sunny in Paris, 14:00 in Oslo"
    second = fake.requests[1].body
    assert second["messages"] == [
        user("Weather in Paris and time in Oslo?"),
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_abc",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                },
                {
                    "id": "call_def",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": '{"city": "Oslo"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_abc", "content": '{"sky": "sunny"}'},
        {"role": "tool", "tool_call_id": "call_def", "content": '{"time": "14:00"}'},
    ]
    assert second["tools"] == first["tools"]
    # Usage is what the provider's usage chunks said, summed over both turns.
    assert usage_of(done) == (40 + 70, 18 + 5, 133)
    events = api.events(run_id)
    turn_usages = [
        (e.usage.prompt_tokens, e.usage.completion_tokens) for e in events if e.type == EventType.USAGE
    ]
    assert turn_usages == [(40, 18), (70, 5)]
    assert (events[-1].done.usage.prompt_tokens, events[-1].done.usage.completion_tokens) == (110, 23)
    steps = api.runs.ListSteps(
        run_pb2.ListRunStepsRequest(run_id=run_id, order=common_pb2.ASC), timeout=10
    ).steps
    assert [(s.type, s.usage.completion_tokens) for s in steps] == [
        (run_pb2.RunStep.TOOL_CALLS, 18),
        (run_pb2.RunStep.MESSAGE_CREATION, 5),
    ]


def test_text_before_tool_calls_goes_back_to_the_model_and_into_the_reply(
    api: Stubs, fake: FakeOpenAI
) -> None:
    said = "Let me check. "
    calls = tool_calls_stream([("call_1", "get_weather", ['{"city": "Oslo"}'])])
    fake.enqueue(
        StreamReply([role_chunk(), text_chunk(said), *calls.chunks[1:]]),
        # Slow enough that the reply's deltas are written while it streams, not all at the end.
        text_stream("It is ", "cold ", "in Oslo.", chunk_delay=0.03),
    )
    assistant = make_assistant(api, tools=[weather_tool()])

    run_id = start(api, "Oslo?", assistant=assistant)
    assert finished(api, run_id).status == run_pb2.TOOL_CALLS
    submit(api, run_id, {"call_1": "-5C"})
    run = finished(api, run_id)

    assert fake.requests[1].body["messages"][1]["content"] == said
    assert reply_text(run) == said + "It is cold in Oslo."
    assert streamed_text(api.events(run_id)) == reply_text(run)


def test_parallel_tool_calls_false_reaches_the_provider(api: Stubs, fake: FakeOpenAI) -> None:
    fake.enqueue(text_stream("ok"))

    finished(
        api,
        start(api, "hi", assistant=make_assistant(api, tools=[weather_tool()]), parallel_tool_calls=False),
    )

    assert fake.requests[0].body["parallel_tool_calls"] is False


def test_without_a_usage_chunk_usage_is_estimated(api: Stubs, fake: FakeOpenAI) -> None:
    fake.enqueue(StreamReply([role_chunk(), text_chunk("abcdefgh"), finish_chunk("stop")]))

    run = finished(api, start(api, "hi"))

    assert run.status == run_pb2.COMPLETED
    assert run.usage.completion_tokens == 2  # 8 bytes at 4 a token
    assert run.usage.prompt_tokens > 0
    assert run.usage.total_tokens == run.usage.prompt_tokens + 2


# --- Every parameter reaches the request --------------------------------------------------------


def test_instructions_messages_and_sampling_reach_the_request(api: Stubs, fake: FakeOpenAI) -> None:
    fake.enqueue(text_stream("ok"))
    options = common_pb2.CompletionOptions(temperature=0.7, top_p=0.9, max_tokens=500)
    assistant = make_assistant(api, instructions="You are terse.", completion_options=options)

    run_id = start(
        api,
        "What is the weather?",
        assistant=assistant,
        additional_instructions="Answer in French.",
        additional_messages=[
            message_pb2.MessageInput(role=message_pb2.ASSISTANT, text="Sunny."),
            message_pb2.MessageInput(text="And tomorrow?"),
        ],
        temperature=0.2,
        max_completion_tokens=64,
    )
    assert finished(api, run_id).status == run_pb2.COMPLETED

    body = fake.requests[0].body
    assert body["messages"] == [
        {"role": "system", "content": "You are terse.\n\nAnswer in French."},
        user("What is the weather?"),
        {"role": "assistant", "content": "Sunny."},
        user("And tomorrow?"),
    ]
    # The run's temperature overrides the assistant's; top_p comes from the assistant.
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.2, 0.9, 64)


def test_run_instructions_replace_the_assistants(api: Stubs, fake: FakeOpenAI) -> None:
    fake.enqueue(text_stream("ok"))
    assistant = make_assistant(api, instructions="You are terse.")

    finished(api, start(api, "hi", assistant=assistant, instructions="You are verbose."))

    assert fake.requests[0].body["messages"][0] == {"role": "system", "content": "You are verbose."}


@pytest.mark.parametrize(
    ("choice", "sent"),
    [
        (common_pb2.ToolChoice(mode=common_pb2.ToolChoice.AUTO), "auto"),
        (common_pb2.ToolChoice(mode=common_pb2.ToolChoice.NONE), "none"),
        (common_pb2.ToolChoice(mode=common_pb2.ToolChoice.REQUIRED), "required"),
        (
            common_pb2.ToolChoice(function_name="get_weather"),
            {"type": "function", "function": {"name": "get_weather"}},
        ),
    ],
    ids=["auto", "none", "required", "function"],
)
def test_tool_choice_reaches_the_request(
    api: Stubs, fake: FakeOpenAI, choice: common_pb2.ToolChoice, sent: object
) -> None:
    fake.enqueue(text_stream("ok"))
    assistant = make_assistant(api, tools=[weather_tool()])

    finished(api, start(api, "hi", assistant=assistant, tool_choice=choice))

    assert fake.requests[0].body["tool_choice"] == sent


@pytest.mark.parametrize(
    ("choice", "first_sent"),
    [
        (
            common_pb2.ToolChoice(function_name="get_weather"),
            {"type": "function", "function": {"name": "get_weather"}},
        ),
        (common_pb2.ToolChoice(mode=common_pb2.ToolChoice.REQUIRED), "required"),
    ],
    ids=["function", "required"],
)
def test_a_forcing_tool_choice_binds_only_the_first_turn(
    api: Stubs, fake: FakeOpenAI, choice: common_pb2.ToolChoice, first_sent: object
) -> None:
    """Sent again with the results, it would make the model call the tool forever."""
    fake.enqueue(
        tool_calls_stream([("call_1", "get_weather", ['{"city": "Oslo"}'])]),
        tool_calls_stream([("call_2", "get_weather", ['{"city": "Bergen"}'])]),
        text_stream("Cold in both."),
    )
    assistant = make_assistant(api, tools=[weather_tool()])

    run_id = start(api, "Oslo, then Bergen?", assistant=assistant, tool_choice=choice)
    assert finished(api, run_id).status == run_pb2.TOOL_CALLS
    submit(api, run_id, {"call_1": "-5C"})
    assert finished(api, run_id).status == run_pb2.TOOL_CALLS
    submit(api, run_id, {"call_2": "-2C"})
    done = finished(api, run_id)

    assert done.status == run_pb2.COMPLETED and reply_text(done) == "Cold in both."
    assert [body["tool_choice"] for body in bodies(fake)] == [first_sent, "auto", "auto"]
    assert done.tool_choice == choice  # the run still says what was asked


def test_none_binds_every_turn(api: Stubs, fake: FakeOpenAI) -> None:
    fake.enqueue(tool_calls_stream([("call_1", "get_weather", ["{}"])]), text_stream("ok"))
    assistant = make_assistant(api, tools=[weather_tool()])
    none = common_pb2.ToolChoice(mode=common_pb2.ToolChoice.NONE)

    run_id = start(api, "hi", assistant=assistant, tool_choice=none)
    assert finished(api, run_id).status == run_pb2.TOOL_CALLS  # a provider that ignored it
    submit(api, run_id, {"call_1": "x"})
    assert finished(api, run_id).status == run_pb2.COMPLETED

    assert [body["tool_choice"] for body in bodies(fake)] == ["none", "none"]


def test_an_empty_stream_is_asked_again_without_streaming(api: Stubs, fake: FakeOpenAI) -> None:
    fake.enqueue(empty_stream(), completion("Sunny.", usage=(30, 2)))
    assistant = make_assistant(api, tools=[weather_tool()])

    run_id = start(api, "Weather?", assistant=assistant)
    done = finished(api, run_id)

    assert done.status == run_pb2.COMPLETED, done.last_error
    assert reply_text(done) == "Sunny." and streamed_text(api.events(run_id)) == "Sunny."
    assert usage_of(done) == (30, 2, 32)
    first, second = bodies(fake)
    assert (first["stream"], second["stream"]) == (True, False)
    assert second["messages"] == first["messages"] and second["tools"] == first["tools"]


def test_a_tool_call_from_the_unstreamed_retry_pauses_the_run(api: Stubs, fake: FakeOpenAI) -> None:
    fake.enqueue(
        empty_stream(done=False),
        completion(
            None, tool_calls=[("call_9", "get_weather", '{"city": "Rome"}')], finish_reason="tool_calls"
        ),
    )
    assistant = make_assistant(api, tools=[weather_tool()])

    paused = finished(api, start(api, "Rome?", assistant=assistant))

    assert paused.status == run_pb2.TOOL_CALLS
    [call] = paused.required_tool_calls
    assert (call.id, call.function.name, call.function.arguments) == (
        "call_9",
        "get_weather",
        '{"city": "Rome"}',
    )
    api.runs.Cancel(run_pb2.CancelRunRequest(run_id=paused.id))


def test_an_answer_empty_twice_fails_the_run_with_empty_response(api: Stubs, fake: FakeOpenAI) -> None:
    fake.enqueue(empty_stream(), completion(""))
    assistant = make_assistant(api, tools=[weather_tool()])

    run_id = start(api, "Weather?", assistant=assistant)
    done = finished(api, run_id)

    assert done.status == run_pb2.FAILED
    assert done.last_error.code == "empty_response"
    assert "empty answer" in done.last_error.message and "fake" in done.last_error.message
    assert not done.HasField("reply")
    assert len(fake.requests) == 2


def weather_schema() -> common_pb2.JsonSchema:
    schema = struct_pb2.Struct()
    schema.update({"type": "object", "properties": {"sky": {"type": "string"}}, "required": ["sky"]})
    return common_pb2.JsonSchema(name="weather", description="The weather", schema=schema, strict=True)


@pytest.mark.parametrize(
    ("response_format", "sent"),
    [
        (common_pb2.ResponseFormat(type=common_pb2.ResponseFormat.TEXT), None),
        (common_pb2.ResponseFormat(type=common_pb2.ResponseFormat.JSON_OBJECT), {"type": "json_object"}),
        (
            common_pb2.ResponseFormat(
                type=common_pb2.ResponseFormat.JSON_SCHEMA, json_schema=weather_schema()
            ),
            {
                "type": "json_schema",
                "json_schema": {
                    "name": "weather",
                    "description": "The weather",
                    "strict": True,
                    "schema": {
                        "type": "object",
                        "properties": {"sky": {"type": "string"}},
                        "required": ["sky"],
                    },
                },
            },
        ),
    ],
    ids=["text", "json_object", "json_schema"],
)
def test_response_format_reaches_the_request(
    api: Stubs, fake: FakeOpenAI, response_format: common_pb2.ResponseFormat, sent: object
) -> None:
    fake.enqueue(text_stream('{"sky": "blue"}'))

    run = finished(api, start(api, "hi", response_format=response_format))

    assert reply_text(run) == '{"sky": "blue"}'
    assert fake.requests[0].body.get("response_format") == sent


def test_max_tokens_is_the_remaining_completion_budget(api: Stubs, fake: FakeOpenAI) -> None:
    fake.enqueue(
        tool_calls_stream([("call_1", "get_weather", ['{"city": "Rome"}'])], usage=(30, 30)),
        text_stream("Warm", usage=(50, 4)),
    )
    assistant = make_assistant(api, tools=[weather_tool()])

    run_id = start(api, "Rome?", assistant=assistant, max_completion_tokens=100)
    finished(api, run_id)
    submit(api, run_id, {"call_1": "25C"})
    run = finished(api, run_id)

    assert run.status == run_pb2.COMPLETED
    assert [body["max_tokens"] for body in bodies(fake)] == [100, 70]
    assert usage_of(run) == (80, 34, 114)


# --- Budgets ------------------------------------------------------------------------------------


def test_length_within_max_completion_tokens_ends_incomplete(api: Stubs, fake: FakeOpenAI) -> None:
    fake.enqueue(text_stream("Once upon", " a time", finish_reason="length", usage=(12, 5)))

    run_id = start(api, "Tell a story", max_completion_tokens=5)
    run = finished(api, run_id)

    assert run.status == run_pb2.INCOMPLETE
    assert run.incomplete_details.reason == "max_completion_tokens"
    assert reply_text(run) == "Once upon a time"  # the partial reply is kept
    assert usage_of(run) == (12, 5, 17)
    assert fake.requests[0].body["max_tokens"] == 5
    events = api.events(run_id)
    assert (events[-1].type, events[-1].status) == (EventType.STATUS, run_pb2.INCOMPLETE)


@pytest.mark.parametrize("budget", [None, 1000], ids=["no-budget", "budget-not-reached"])
def test_length_from_the_providers_own_limit_ends_incomplete_max_tokens(
    api: Stubs, fake: FakeOpenAI, budget: int | None
) -> None:
    fake.enqueue(text_stream("Once upon", finish_reason="length", usage=(12, 300)))
    limit: dict[str, Any] = {} if budget is None else {"max_completion_tokens": budget}

    run = finished(api, start(api, "Tell a long story", **limit))

    assert fake.requests[0].body.get("max_tokens") == budget
    assert run.status == run_pb2.INCOMPLETE
    assert run.incomplete_details.reason == "max_tokens"
    assert reply_text(run) == "Once upon"


def test_a_content_filter_stop_ends_incomplete(api: Stubs, fake: FakeOpenAI) -> None:
    fake.enqueue(text_stream("I can", finish_reason="content_filter"))

    run = finished(api, start(api, "hi"))

    assert run.status == run_pb2.INCOMPLETE
    assert run.incomplete_details.reason == "content_filter"
    assert reply_text(run) == "I can"


def test_tool_calls_cut_by_length_are_not_handed_to_the_caller(api: Stubs, fake: FakeOpenAI) -> None:
    cut = StreamReply(
        [
            role_chunk(),
            tool_call_chunk(0, call_id="call_cut", name="get_weather"),
            tool_call_chunk(0, arguments='{"city": "Par'),
            finish_chunk("length"),
            usage_chunk(20, 8),
        ]
    )
    fake.enqueue(cut)
    assistant = make_assistant(api, tools=[weather_tool()])

    run = finished(api, start(api, "Paris?", assistant=assistant, max_completion_tokens=8))

    assert run.status == run_pb2.INCOMPLETE
    assert run.incomplete_details.reason == "max_completion_tokens"
    assert not run.required_tool_calls
    assert usage_of(run) == (20, 8, 28)


def test_completion_budget_spent_before_a_turn_ends_incomplete(api: Stubs, fake: FakeOpenAI) -> None:
    calls = tool_calls_stream([("call_1", "get_weather", ['{"city": "Oslo"}'])], usage=(40, 18))
    fake.enqueue(StreamReply([role_chunk(), text_chunk("Checking. "), *calls.chunks[1:]]))
    assistant = make_assistant(api, tools=[weather_tool()])

    run_id = start(api, "Oslo?", assistant=assistant, max_completion_tokens=18)
    assert finished(api, run_id).status == run_pb2.TOOL_CALLS
    submit(api, run_id, {"call_1": "cold"})
    run = finished(api, run_id)

    assert run.status == run_pb2.INCOMPLETE
    assert run.incomplete_details.reason == "max_completion_tokens"
    assert len(fake.requests) == 1  # no turn was started without budget
    assert usage_of(run) == (40, 18, 58)
    assert reply_text(run) == "Checking. "  # what the model said before its tool call is kept


def test_a_prompt_that_cannot_fit_ends_incomplete_without_a_request(api: Stubs, fake: FakeOpenAI) -> None:
    assistant = make_assistant(api, instructions="Follow these rules. " * 20)  # ~100 tokens

    run = finished(api, start(api, "hi", assistant=assistant, max_prompt_tokens=50))

    assert run.status == run_pb2.INCOMPLETE
    assert run.incomplete_details.reason == "max_prompt_tokens"
    assert fake.requests == []


def test_tool_definitions_count_toward_the_prompt(api: Stubs, fake: FakeOpenAI) -> None:
    tool = weather_tool()
    tool.function.description = "Looks up the weather. " * 40  # ~220 tokens of tool definition
    assistant = make_assistant(api, tools=[tool])

    run = finished(api, start(api, "hi", assistant=assistant, max_prompt_tokens=100))

    assert run.status == run_pb2.INCOMPLETE
    assert run.incomplete_details.reason == "max_prompt_tokens"
    assert fake.requests == []


def test_max_prompt_tokens_counts_every_turn(api: Stubs, fake: FakeOpenAI) -> None:
    fake.enqueue(tool_calls_stream([("call_1", "get_weather", ['{"city": "Oslo"}'])], usage=(55, 10)))
    assistant = make_assistant(api, tools=[weather_tool()])

    run_id = start(api, "Oslo?", assistant=assistant, max_prompt_tokens=60)
    assert finished(api, run_id).status == run_pb2.TOOL_CALLS
    submit(api, run_id, {"call_1": "cold"})
    run = finished(api, run_id)

    # 55 of 60 prompt tokens are spent; the second turn's prompt does not fit in 5.
    assert run.status == run_pb2.INCOMPLETE
    assert run.incomplete_details.reason == "max_prompt_tokens"
    assert len(fake.requests) == 1
    assert usage_of(run) == (55, 10, 65)


# --- Truncation ---------------------------------------------------------------------------------


def test_last_messages_truncation(api: Stubs, fake: FakeOpenAI) -> None:
    fake.enqueue(text_stream("ok"))
    strategy = common_pb2.TruncationStrategy(
        type=common_pb2.TruncationStrategy.LAST_MESSAGES, last_messages=2
    )
    assistant = make_assistant(api, instructions="Be brief.")

    finished(
        api, start(api, "one", "two", "three", "four", assistant=assistant, truncation_strategy=strategy)
    )

    assert fake.requests[0].body["messages"] == [
        {"role": "system", "content": "Be brief."},
        user("three"),
        user("four"),
    ]


@pytest.mark.parametrize("max_prompt_tokens", [None, 250])
def test_auto_truncation_drops_the_oldest_messages_to_fit(
    api: Stubs, fake: FakeOpenAI, max_prompt_tokens: int | None
) -> None:
    fake.enqueue(text_stream("ok"))
    texts = [str(i) * 400 for i in range(5)]  # about 100 tokens each
    budget: dict[str, Any] = {} if max_prompt_tokens is None else {"max_prompt_tokens": max_prompt_tokens}
    strategy = common_pb2.TruncationStrategy(type=common_pb2.TruncationStrategy.AUTO)

    run = finished(api, start(api, *texts, truncation_strategy=strategy, **budget))

    assert run.status == run_pb2.COMPLETED
    sent = fake.requests[0].body["messages"]
    assert sent == [user(text) for text in (texts if max_prompt_tokens is None else texts[-2:])]


def test_auto_truncation_counts_each_messages_overhead(api: Stubs, fake: FakeOpenAI) -> None:
    fake.enqueue(text_stream("ok"))
    texts = [f"m{i:02}" for i in range(30)]  # one token of text each, plus the message's framing

    finished(api, start(api, *texts, max_prompt_tokens=40))

    sent = fake.requests[0].body["messages"]
    # OpenAI counts 3 tokens of framing per message (and 3 to prime the reply): 30 such messages
    # are ~120 tokens, so only the newest handful fit in 40.
    assert 1 <= len(sent) <= 10
    assert sent == [user(text) for text in texts[-len(sent) :]]


# --- Faults -------------------------------------------------------------------------------------


def assert_no_secret(*items: object) -> None:
    for item in items:
        assert SECRET not in str(item)
        assert "test-secret" not in str(item)


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (401, "authentication_error"),
        (403, "permission_denied"),
        (404, "model_not_found"),
        (400, "invalid_request"),
    ],
)
def test_client_errors_fail_the_run_with_a_clear_error_and_no_secret(
    api: Stubs, fake: FakeOpenAI, spindle: ServerProcess, status: int, code: str
) -> None:
    echo = f"Incorrect API key provided: {SECRET}. Authorization: Bearer {SECRET}"
    fake.enqueue(error_reply(status, echo, "invalid_request_error"))

    run_id = start(api, "hi")
    run = finished(api, run_id)
    events = api.events(run_id)

    assert run.status == run_pb2.FAILED
    assert run.last_error.code == code
    assert "fake" in run.last_error.message
    assert f"HTTP {status}" in run.last_error.message
    assert "Incorrect API key provided" in run.last_error.message  # the provider's own words
    assert (events[-1].type, events[-1].error.code) == (EventType.ERROR, code)
    assert events[-1].error.message == run.last_error.message
    assert len(fake.requests) == 1  # not retried
    assert fake.requests[0].headers["authorization"] == f"Bearer {SECRET}"
    assert_no_secret(run, *events, *spindle.stderr_lines)


def test_transient_errors_are_retried_then_succeed(api: Stubs, fake: FakeOpenAI) -> None:
    fake.enqueue(
        error_reply(429, "slow down", "requests"),
        ErrorReply(503, "<html>Service Unavailable</html>"),
        text_stream("at last"),
    )

    run = finished(api, start(api, "hi"))

    assert run.status == run_pb2.COMPLETED
    assert reply_text(run) == "at last"
    assert len(fake.requests) == 3
    assert all(body == bodies(fake)[0] for body in bodies(fake))


@pytest.mark.parametrize(("status", "code"), [(429, "rate_limit_exceeded"), (500, "server_error")])
def test_transient_errors_fail_the_run_once_retries_are_exhausted(
    api: Stubs, fake: FakeOpenAI, status: int, code: str
) -> None:
    fake.enqueue(*[error_reply(status, "still busy", "server_error")] * (MAX_RETRIES + 1))

    run = finished(api, start(api, "hi"))

    assert run.status == run_pb2.FAILED
    assert run.last_error.code == code
    assert f"gave up after {MAX_RETRIES + 1} attempts" in run.last_error.message
    assert len(fake.requests) == MAX_RETRIES + 1


def test_an_unreachable_provider_fails_the_run_with_connection_error(api: Stubs) -> None:
    run = finished(api, start(api, "hi", model="down/any-model"))

    assert run.status == run_pb2.FAILED
    assert run.last_error.code == "connection_error"
    assert "cannot reach down at http://127.0.0.1:" in run.last_error.message
    assert "gave up after 2 attempts" in run.last_error.message


def test_a_stalled_stream_fails_the_run_with_timeout(
    fake: FakeOpenAI, make_server: Callable[..., ServerProcess]
) -> None:
    server = make_server("--provider", provider_flag(fake, stall_timeout=0.3), env=ENV)
    stubs = Stubs.connect(server.address)
    try:
        fake.enqueue(text_stream("first", "never", stall_after=2))
        run_id = start(stubs, "hi")
        run = finished(stubs, run_id)
        events = stubs.events(run_id)
    finally:
        stubs.close()

    assert run.status == run_pb2.FAILED
    assert run.last_error.code == "timeout"
    assert "0.3s" in run.last_error.message
    assert streamed_text(events) == "first"
    assert fake.requests[0].client_closed.wait(2)
    assert len(fake.requests) == 1  # a stall is not retried


def test_cancel_closes_the_providers_stream(api: Stubs, fake: FakeOpenAI) -> None:
    """The provider's stream stalls after its first chunk and would stay open for 30 s: the run
    can only end CANCELLED, with the fake seeing the client hang up, if Cancel closed it."""
    fake.enqueue(text_stream("first", "never", stall_after=2))
    run_id = start(api, "hi")
    listen = api.runs.Listen(run_pb2.ListenRunRequest(run_id=run_id), timeout=15)
    try:
        for event in listen:  # the first delta arrives while the provider's stream is still open
            if event.type == EventType.PARTIAL_MESSAGE:
                assert (event.message_delta.text, event.status) == ("first", run_pb2.IN_PROGRESS)
                break
    finally:
        listen.cancel()

    api.runs.Cancel(run_pb2.CancelRunRequest(run_id=run_id), timeout=10)
    run = api.wait_for(run_id, {run_pb2.CANCELLED, run_pb2.FAILED, run_pb2.COMPLETED}, timeout=20)

    assert run.status == run_pb2.CANCELLED
    assert fake.requests[0].client_closed.wait(20)  # before the fake's own 30 s stall ends
    events = api.events(run_id)
    assert (events[-1].type, events[-1].status) == (EventType.STATUS, run_pb2.CANCELLED)


# --- Model names --------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["nope/gpt-4o", "fake/"])
def test_an_unknown_provider_is_invalid_argument_at_create(api: Stubs, model: str) -> None:
    with pytest.raises(grpc.RpcError) as at_assistant:
        api.assistant(name="x", model=model)
    assistant = make_assistant(api)
    thread = api.thread("hi")
    with pytest.raises(grpc.RpcError) as at_run:
        api.run(assistant.id, thread.id, model=model)

    for caught in (at_assistant.value, at_run.value):
        assert caught.code() == grpc.StatusCode.INVALID_ARGUMENT
        _, violations = error_details(caught)
        assert [field for field, _ in violations] == ["model"]
        assert "unknown model" in dict(violations)["model"]


def test_a_run_may_pick_another_model_than_its_assistant(api: Stubs, fake: FakeOpenAI) -> None:
    fake.enqueue(text_stream("ok"))
    assistant = api.assistant(name="builtin one", model="builtin")

    run = finished(api, start(api, "hi", assistant=assistant, model="fake/other-model"))

    assert (run.status, run.model) == (run_pb2.COMPLETED, "fake/other-model")
    assert fake.requests[0].body["model"] == "other-model"


def test_the_key_never_reaches_the_servers_log(spindle: ServerProcess) -> None:
    lines = list(spindle.stderr_lines)
    assert len(lines) > 10  # debug logs: a line per call
    assert_no_secret(*lines)
    assert json.loads(lines[-1])  # JSON lines, as configured
