"""The async twins: AsyncClient and AsyncRun against the real server."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from client_faults import AsyncBreakStreams, AsyncCountUnary, AsyncDropResponses

import spindle
from spindle import RunStatus
from support.server import ServerProcess


async def start(client: spindle.AsyncClient, text: str, assistant: spindle.Assistant) -> spindle.AsyncRun:
    thread = await client.threads.create(messages=[text])
    return await client.runs.create(thread_id=thread, assistant_id=assistant)


async def test_resources_and_paging(aclient: spindle.AsyncClient) -> None:
    assistant = await aclient.assistants.create(name="async", instructions="hi")
    assert (await aclient.assistants.get(assistant.id)) == assistant
    assert (await aclient.assistants.update(assistant, name="renamed")).name == "renamed"
    thread = await aclient.threads.create(messages=[f"m{i}" for i in range(5)])
    assert (await aclient.threads.update(thread, name="t")).name == "t"
    texts = [m.text async for m in aclient.messages.list(thread, order="asc", page_size=2)]
    assert texts == [f"m{i}" for i in range(5)]
    message = await aclient.messages.create(thread, "more")
    assert (await aclient.messages.get(message.id)).text == "more"
    assert assistant.id in [a.id async for a in aclient.assistants.list(limit=30)]
    assert thread.id in [t.id async for t in aclient.threads.list(limit=30)]
    await aclient.threads.delete(thread)
    await aclient.assistants.delete(assistant)
    with pytest.raises(spindle.NotFound) as caught:
        await aclient.threads.get(thread.id)
    assert caught.value.reason == "THREAD_NOT_FOUND"


async def test_await_run_and_async_iteration(aclient: spindle.AsyncClient, echo: spindle.Assistant) -> None:
    run = await start(aclient, "async hello", echo)
    result = await run
    assert result.is_succeeded and result.text == "You said: async hello"
    events = [event async for event in run]
    assert [e.index for e in events] == list(range(len(events))) and events[-1].is_terminal
    assert events[-1].text == result.text
    assert (await run.get_status()) is RunStatus.COMPLETED
    assert (await aclient.runs.get_last_by_thread(run.thread_id)).id == run.id
    assert [r.id async for r in aclient.runs.list(thread_id=run.thread_id)] == [run.id]
    assert [s.type async for s in run.steps()] == ["message_creation"]
    assert (await aclient.runs.wait(run.id, timeout=5)).status is RunStatus.COMPLETED
    replay = [e.index async for e in aclient.runs.listen(run.id, events_start_idx=1)]
    assert replay == [e.index for e in events[1:]]


async def test_async_errors_and_timeout(aclient: spindle.AsyncClient, echo: spindle.Assistant) -> None:
    thread = await aclient.threads.create()
    with pytest.raises(spindle.InvalidArgument) as caught:
        await aclient.runs.create(thread_id=thread, assistant_id=echo, top_p=3)
    assert [v.field for v in caught.value.field_violations] == ["top_p"]
    run = await start(aclient, "/sleep 5\nslow", echo)
    with pytest.raises(spindle.RunTimeoutError) as timed_out:
        await run.wait(timeout=0.3)
    assert timed_out.value.run is run and run.status.is_running
    await timed_out.value.run.cancel()
    assert (await run.wait(timeout=20)).status is RunStatus.CANCELLED


async def test_async_pause_and_parallel_tools(
    aclient: spindle.AsyncClient, weather: spindle.Assistant
) -> None:
    text = '/tool get_weather {"city": "Paris"}\n/tool get_time {"city": "Rome"}'
    run = await aclient.runs.create_and_poll(
        thread_id=(await aclient.threads.create(messages=[text])), assistant_id=weather
    )
    assert run.status is RunStatus.TOOL_CALLS and not run.result.is_finished
    barrier = asyncio.Barrier(2)  # passes only when both calls run at once

    async def get_weather(city: str) -> str:
        await asyncio.wait_for(barrier.wait(), 10)
        return f"sun in {city}"

    async def get_time(city: str) -> str:
        await asyncio.wait_for(barrier.wait(), 10)
        return f"noon in {city}"

    result = await run.run_until_done([get_weather, get_time], timeout=20)
    assert result.text == "Tool results: get_weather returned sun in Paris; get_time returned noon in Rome"


async def test_async_plain_functions_run_in_threads(
    aclient: spindle.AsyncClient, weather: spindle.Assistant
) -> None:
    import threading

    barrier = threading.Barrier(2, timeout=10)

    def get_weather(city: str) -> str:
        barrier.wait()
        return city.lower()

    text = '/tool get_weather {"city": "A"}\n/tool get_weather {"city": "B"}'
    thread = await aclient.threads.create(messages=[text])
    deltas: list[str] = []
    result = await aclient.runs.create_and_stream(
        thread_id=thread,
        assistant_id=weather,
        tools={"get_weather": get_weather},
        on_text=lambda d, _: deltas.append(d),
    )
    assert result.text == "Tool results: get_weather returned a; get_weather returned b"
    assert "".join(deltas) == result.text
    run = await aclient.runs.get(result.run_id)
    steps = [s async for s in run.steps(order="asc")]
    assert [c.output for c in steps[0].tool_calls] == ["a", "b"]


async def test_async_submit_and_poll(aclient: spindle.AsyncClient, weather: spindle.Assistant) -> None:
    run = await start(aclient, '/tool get_time {"city": "Quito"}', weather)
    paused = await run.stream()
    assert paused.is_paused and paused.tool_calls is not None
    again = await aclient.runs.submit_tool_results_and_poll(
        run.id, [{"tool_call_id": paused.tool_calls[0].id, "output": "7am"}]
    )
    assert again.status is RunStatus.COMPLETED and again.reply is not None
    assert again.reply.text == "Tool results: get_time returned 7am"


async def test_async_retry_keeps_the_request_id(server: ServerProcess, echo: spindle.Assistant) -> None:
    drop = AsyncDropResponses("RunService/Create", fail_first=2)
    async with spindle.AsyncClient(server.address, interceptors=[drop]) as client:
        thread = await client.threads.create(messages=["async retry"])
        run = await client.runs.create(thread_id=thread, assistant_id=echo)
        ids = {request.request_id for request in drop.record.requests}
        assert len(drop.record.requests) == 3 and len(ids) == 1
        assert [r.id async for r in client.runs.list(thread_id=thread)] == [run.id]
        same = await client.runs.create(thread_id=thread, assistant_id=echo, request_id=ids.pop())
        assert same.id == run.id


async def test_async_wait_falls_back_to_polling(server: ServerProcess, echo: spindle.Assistant) -> None:
    broken, counter = AsyncBreakStreams(), AsyncCountUnary()
    async with spindle.AsyncClient(server.address, interceptors=[broken, counter]) as client:
        run = await start(client, "/sleep 0.5\nasync polled", echo)
        result = await run.wait(timeout=20, poll_interval=0.05)
    assert result.text == "You said: /sleep 0.5\nasync polled"
    assert broken.record.streams()["ListenBatches"] >= 1
    assert counter.record.calls["/spindle.v1.RunService/Get"] >= 2


async def test_async_wait_polls_when_the_stream_is_refused_for_good(
    server: ServerProcess, echo: spindle.Assistant
) -> None:
    broken, counter = AsyncBreakStreams(grpc.StatusCode.RESOURCE_EXHAUSTED), AsyncCountUnary()
    async with spindle.AsyncClient(server.address, interceptors=[broken, counter]) as client:
        run = await start(client, "/sleep 0.5\nasync refused", echo)
        result = await run.wait(timeout=20, poll_interval=0.05)
    assert result.text == "You said: /sleep 0.5\nasync refused"
    assert broken.record.streams() == {"ListenBatches": 1, "Listen": 0}
    assert counter.record.calls["/spindle.v1.RunService/Get"] >= 2


async def test_async_failing_tool_leaves_no_call_running(
    aclient: spindle.AsyncClient, weather: spindle.Assistant
) -> None:
    """Like the sync twin: when one call of a pause fails, the others finish before the error."""
    finished: list[str] = []

    async def get_weather(city: str) -> str:
        raise RuntimeError(f"no data for {city}")

    async def get_time(city: str) -> str:
        await asyncio.sleep(0.2)
        finished.append(city)
        return "noon"

    text = '/tool get_weather {"city": "Paris"}\n/tool get_time {"city": "Rome"}'
    run = await start(aclient, text, weather)
    with pytest.raises(spindle.ToolExecutionError) as caught:
        await run.run_until_done([get_weather, get_time], timeout=20)
    assert caught.value.tool_call.name == "get_weather"
    assert finished == ["Rome"]  # not still sleeping in an orphaned task
    await run.cancel()


async def test_async_stream_awaits_async_callbacks(
    aclient: spindle.AsyncClient, echo: spindle.Assistant
) -> None:
    """The async twin's callbacks may be ``async def`` (awaited), not only plain functions."""
    texts: list[str] = []
    events: list[int] = []

    async def on_text(delta: str, text: str) -> None:
        texts.append(text)

    async def on_event(event: spindle.RunEvent) -> None:
        events.append(event.index)

    run = await start(aclient, "async callbacks", echo)
    result = await run.stream(on_text=on_text, on_event=on_event, timeout=20)
    assert result.is_succeeded and texts[-1] == result.text == "You said: async callbacks"
    assert events == list(range(len(events))) and events


async def test_async_poll(aclient: spindle.AsyncClient, echo: spindle.Assistant) -> None:
    run = await start(aclient, "polled the openai way", echo)
    polled = await aclient.runs.poll(run.id, timeout=20)
    assert polled.status is RunStatus.COMPLETED and polled.result.text == "You said: polled the openai way"
