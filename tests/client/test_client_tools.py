"""Tool handling: OpenAI-style polling helpers, the streaming helper, and the tools={...} runner."""

from __future__ import annotations

import asyncio
import contextvars
import threading

import pytest
from client_faults import CountUnary

import spindle
from spindle import RunStatus
from support.server import ServerProcess

TWO_CITIES = '/tool get_weather {"city": "Paris"}\n/tool get_weather {"city": "Rome"}'


def test_create_and_poll_then_submit_and_poll(client: spindle.Client, weather: spindle.Assistant) -> None:
    thread = client.threads.create(messages=[TWO_CITIES])
    run = client.runs.create_and_poll(thread_id=thread.id, assistant_id=weather.id, timeout=20)
    assert run.status is RunStatus.TOOL_CALLS
    outputs = {call.id: call.parse_arguments()["city"].upper() for call in run.required_tool_calls}
    run = client.runs.submit_tool_results_and_poll(run.id, outputs, timeout=20)
    assert run.status is RunStatus.COMPLETED
    assert run.reply is not None
    assert run.reply.text == "Tool results: get_weather returned PARIS; get_weather returned ROME"


def test_run_until_done_runs_parallel_calls_concurrently(
    client: spindle.Client, weather: spindle.Assistant
) -> None:
    # Each call waits for the other at a barrier: it only passes if both run at the same time.
    barrier = threading.Barrier(2, timeout=10)
    seen: list[str] = []

    def get_weather(city: str) -> dict[str, str]:
        barrier.wait()
        seen.append(city)
        return {"city": city, "sky": "clear"}

    thread = client.threads.create(messages=[TWO_CITIES])
    result = client.runs.create_and_run(
        thread_id=thread, assistant_id=weather, tools={"get_weather": get_weather}, timeout=30
    )
    assert result.is_succeeded and sorted(seen) == ["Paris", "Rome"]
    assert result.text is not None and '"city": "Paris"' in result.text and '"city": "Rome"' in result.text


def test_two_rounds_of_tools(client: spindle.Client, weather: spindle.Assistant) -> None:
    thread = client.threads.create(messages=['/tool get_time {"city": "Oslo"}'])
    run = client.runs.create(thread_id=thread, assistant_id=weather)
    assert run.run_until_done([get_time], timeout=20).text == "Tool results: get_time returned 09:00 in Oslo"
    client.messages.create(thread, '/tool get_time {"city": "Lima"}')
    run = client.runs.create(thread_id=thread, assistant_id=weather)
    result = run.run_until_done({"get_time": get_time}, timeout=20)
    assert result.text == "Tool results: get_time returned 09:00 in Lima"


def get_time(city: str) -> str:
    return f"09:00 in {city}"


def test_stream_calls_back_and_answers_tools(client: spindle.Client, weather: spindle.Assistant) -> None:
    texts: list[tuple[str, str]] = []
    events: list[spindle.RunEvent] = []
    pauses: list[tuple[spindle.ToolCall, ...]] = []
    thread = client.threads.create(messages=[TWO_CITIES])
    result = client.runs.create_and_stream(
        thread_id=thread,
        assistant_id=weather,
        on_text=lambda delta, text: texts.append((delta, text)),
        on_event=events.append,
        on_tool_calls=pauses.append,
        tools={"get_weather": lambda city: f"sun in {city}"},
        timeout=20,
    )
    assert result.is_succeeded
    assert result.text == "Tool results: get_weather returned sun in Paris; get_weather returned sun in Rome"
    assert texts[-1][1] == result.text and "".join(delta for delta, _ in texts) == result.text
    assert len(pauses) == 1 and [c.name for c in pauses[0]] == ["get_weather", "get_weather"]
    types = [e.type for e in events]
    assert spindle.EventType.TOOL_CALL_DELTA in types and types[-1] is spindle.EventType.DONE
    assert [e.index for e in events] == list(range(len(events)))  # one stream across the pause


def test_stream_without_tools_returns_the_pause(client: spindle.Client, weather: spindle.Assistant) -> None:
    thread = client.threads.create(messages=['/tool get_weather {"city": "Kyiv"}'])
    run = client.runs.create(thread_id=thread, assistant_id=weather)
    paused = run.stream(timeout=20)
    assert paused.is_paused and not paused.is_finished and paused.tool_calls is not None
    finished = run.submit_tool_results_and_poll({paused.tool_calls[0].id: "snow"}, timeout=20)
    assert finished.text == "Tool results: get_weather returned snow"


def test_a_failing_tool_raises_and_keeps_the_run(client: spindle.Client, weather: spindle.Assistant) -> None:
    def get_weather(city: str) -> str:
        raise RuntimeError(f"no data for {city}")

    thread = client.threads.create(messages=['/tool get_weather {"city": "Nowhere"}'])
    run = client.runs.create(thread_id=thread, assistant_id=weather)
    with pytest.raises(spindle.ToolExecutionError) as caught:
        run.run_until_done({"get_weather": get_weather}, timeout=20)
    assert caught.value.run is run and caught.value.tool_call.name == "get_weather"
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert run.get_status() is RunStatus.TOOL_CALLS
    with pytest.raises(spindle.ToolExecutionError, match="no function"):
        run.run_until_done({"other": get_time}, timeout=20)
    run.cancel()


def test_declare_tools_from_functions(client: spindle.Client, echo: spindle.Assistant) -> None:
    def lookup(term: str) -> str:
        """Look a term up."""
        return term[::-1]

    thread = client.threads.create(messages=['/tool lookup {"term": "abc"}'])
    result = client.runs.create_and_run(
        thread_id=thread, assistant_id=echo, tools=[lookup], declare_tools=True, timeout=20
    )
    assert result.text == "Tool results: lookup returned cba"
    run = client.runs.get(result.run_id)
    assert [t.name for t in run.tools] == ["lookup"] and run.tools[0].description == "Look a term up."


def test_the_sync_runner_awaits_async_tool_functions(
    client: spindle.Client, weather: spindle.Assistant
) -> None:
    """An ``async def`` tool given to the sync client is run to its result, not sent as
    "<coroutine object ...>"."""

    async def get_weather(city: str) -> str:
        await asyncio.sleep(0)
        return f"rain in {city}"

    for text in ('/tool get_weather {"city": "Bergen"}', TWO_CITIES):  # one call, and parallel calls
        thread = client.threads.create(messages=[text])
        result = client.runs.create_and_run(
            thread_id=thread, assistant_id=weather, tools=[get_weather], timeout=20
        )
        assert result.text is not None and "coroutine" not in result.text
        assert result.text.startswith("Tool results: get_weather returned rain in ")


REQUEST_USER: contextvars.ContextVar[str] = contextvars.ContextVar("REQUEST_USER", default="nobody")


def test_tools_see_the_callers_context_variables_also_in_parallel(
    client: spindle.Client, weather: spindle.Assistant
) -> None:
    """One call runs in the caller's thread, several in worker threads: both see the caller's
    contextvars (as asyncio.to_thread gives the async twin's functions), e.g. a request's user."""

    def get_weather(city: str) -> str:
        return f"{city} for {REQUEST_USER.get()}"

    token = REQUEST_USER.set("alice")
    try:
        thread = client.threads.create(messages=[TWO_CITIES])
        result = client.runs.create_and_run(
            thread_id=thread, assistant_id=weather, tools=[get_weather], timeout=20
        )
    finally:
        REQUEST_USER.reset(token)
    assert (
        result.text
        == "Tool results: get_weather returned Paris for alice; get_weather returned Rome for alice"
    )


def test_stream_keeps_its_calls_within_its_timeout(server: ServerProcess, weather: spindle.Assistant) -> None:
    """The streaming helper's own calls (reading the run at a pause and at the end, submitting the
    results) get what is left of its ``timeout``, not the client's longer per-call default."""
    counter = CountUnary()
    with spindle.Client(server.address, timeout=600, interceptors=[counter]) as client:
        thread = client.threads.create(messages=[TWO_CITIES])
        run = client.runs.create(thread_id=thread, assistant_id=weather)
        result = run.stream(tools={"get_weather": lambda city: city}, timeout=30)
        assert result.is_succeeded
    for method in ("Get", "SubmitToolResults"):
        sent = counter.timeouts[method]
        assert sent and all(t is not None and t <= 30 for t in sent), (method, sent)


def test_poll_an_existing_run_the_openai_way(client: spindle.Client, weather: spindle.Assistant) -> None:
    thread = client.threads.create(messages=['/tool get_time {"city": "Baku"}'])
    created = client.runs.create(thread_id=thread, assistant_id=weather)
    run = client.runs.poll(created.id, timeout=20)
    assert run.status is RunStatus.TOOL_CALLS and run.required_tool_calls[0].name == "get_time"
    client.runs.submit_tool_results(run, {run.required_tool_calls[0].id: "dawn"})
    done = client.runs.poll(run, timeout=20)
    assert done.status is RunStatus.COMPLETED and done.result.parts == (
        "Tool results: get_time returned dawn",
    )
    last = list(done.listen(timeout=20))[-1]
    assert last.parts == done.result.parts and last.text == done.result.text


async def test_the_sync_runner_awaits_async_tools_inside_a_running_loop(
    client: spindle.Client, weather: spindle.Assistant
) -> None:
    """A notebook runs an event loop in the thread that uses the sync client: an ``async def``
    tool still runs to its result (on a loop of its own)."""

    async def get_time(city: str) -> str:
        await asyncio.sleep(0)
        return f"dusk in {city}"

    thread = client.threads.create(messages=['/tool get_time {"city": "Lima"}'])
    result = client.runs.create_and_run(thread_id=thread, assistant_id=weather, tools=[get_time], timeout=20)
    assert result.text == "Tool results: get_time returned dusk in Lima"


def test_stream_does_not_answer_a_pause_twice(client: spindle.Client, weather: spindle.Assistant) -> None:
    """``on_tool_calls`` answered the pause itself: ``tools`` must not answer it again (a second
    SubmitToolResults would fail: the run is no longer paused)."""
    called: list[str] = []
    thread = client.threads.create(messages=['/tool get_weather {"city": "Nice"}'])
    run = client.runs.create(thread_id=thread, assistant_id=weather)

    def answer(calls: tuple[spindle.ToolCall, ...]) -> None:
        run.submit_tool_results({call.id: "by hand" for call in calls})

    def get_weather(city: str) -> str:
        called.append(city)
        return "by tools"

    result = run.stream(on_tool_calls=answer, tools=[get_weather], timeout=20)
    assert result.text == "Tool results: get_weather returned by hand" and called == []
