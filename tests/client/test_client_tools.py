"""Tool handling: OpenAI-style polling helpers, the streaming helper, and the tools={...} runner."""

from __future__ import annotations

import threading

import pytest

import spindle
from spindle import RunStatus

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
