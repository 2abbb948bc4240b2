"""The client follows runs through ListenBatches and falls back to Listen where it is absent.

Against the real server, directly (ListenBatches) and through `ListenOnlyProxy`, a real gRPC
server in front of it that routes every method but ListenBatches (an older server, or a proxy
that does not know the method: grpc answers UNIMPLEMENTED). Both paths must yield the same
events one by one; the fallback is asked once per client; a stream cut mid-run resumes on
ListenBatches from the last index + 1.
"""

from __future__ import annotations

import dataclasses

from client_faults import AsyncCountStreams, CountStreams
from client_support import ListenOnlyProxy, Restarter

import spindle
from support.server import ServerProcess

BATCHES = "/spindle.v1.RunService/ListenBatches"
LISTEN = "/spindle.v1.RunService/Listen"
WORDS = " ".join(f"w{i}" for i in range(300))


def same(events: list[spindle.RunEvent]) -> list[tuple[spindle.RunEvent, object]]:
    """Events comparable across streams: RunData compares by identity, so by its fields' repr."""
    return [(dataclasses.replace(e, run=None), repr(e.run)) for e in events]


def contiguous(events: list[spindle.RunEvent]) -> bool:
    return [e.index for e in events] == list(range(len(events))) and events[-1].is_terminal


def test_both_paths_yield_the_same_events_in_order(server: ServerProcess, echo: spindle.Assistant) -> None:
    """Live through ListenBatches, then replayed through ListenBatches (the whole log in one
    message) and through Listen behind the proxy: the same events, each one alone, in order."""
    counter = CountStreams()
    with (
        spindle.Client(server.address, timeout=20, interceptors=[counter]) as client,
        ListenOnlyProxy(server.address) as proxy,
        spindle.Client(proxy.address, timeout=20) as old,
    ):
        thread = client.threads.create(messages=[WORDS])
        run = client.runs.create(thread_id=thread, assistant_id=echo)
        live = list(run.listen(timeout=60))
        replayed = list(client.runs.get(run.id).listen(timeout=60))
        listened = list(old.runs.get(run.id).listen(timeout=60))
    assert contiguous(live) and live[-1].text == f"You said: {WORDS}"
    assert same(replayed) == same(live) and same(listened) == same(live)
    assert counter.record.calls.get(BATCHES) == 2 and LISTEN not in counter.record.calls
    assert proxy.count("ListenBatches") == 1 and proxy.count("Listen") == 1


def test_a_server_without_listen_batches_is_asked_once(
    server: ServerProcess, echo: spindle.Assistant
) -> None:
    with ListenOnlyProxy(server.address) as proxy, spindle.Client(proxy.address, timeout=20) as client:
        first = client.runs.create(thread_id=client.threads.create(messages=["one"]), assistant_id=echo)
        events = list(first.listen(timeout=60))
        second = client.runs.create(thread_id=client.threads.create(messages=["two"]), assistant_id=echo)
        again = list(second.listen(timeout=60))
        third = client.runs.create(thread_id=client.threads.create(messages=["three"]), assistant_id=echo)
        result = third.wait(timeout=60)
    assert contiguous(events) and events[-1].text == "You said: one"
    assert contiguous(again) and again[-1].text == "You said: two"
    assert result.is_succeeded and result.text == "You said: three"
    assert proxy.count("ListenBatches") == 1  # the UNIMPLEMENTED answer is remembered
    assert proxy.count("Listen") >= 2  # wait() may find the run done before it needs a stream


async def test_async_client_falls_back_once_and_yields_the_same_events(
    server: ServerProcess, echo: spindle.Assistant
) -> None:
    counter = AsyncCountStreams()
    with ListenOnlyProxy(server.address) as proxy:
        async with (
            spindle.AsyncClient(server.address, timeout=20, interceptors=[counter]) as client,
            spindle.AsyncClient(proxy.address, timeout=20) as old,
        ):
            thread = await client.threads.create(messages=[WORDS])
            run = await client.runs.create(thread_id=thread, assistant_id=echo)
            batched = [event async for event in run.listen(timeout=60)]
            listened = [event async for event in (await old.runs.get(run.id)).listen(timeout=60)]
            again = [event async for event in (await old.runs.get(run.id)).listen(timeout=60)]
            result = await (await old.runs.get(run.id)).wait(timeout=60)
    assert contiguous(batched) and batched[-1].text == f"You said: {WORDS}"
    assert same(listened) == same(batched) and same(again) == same(batched)
    assert result.text == batched[-1].text
    assert counter.record.calls.get(BATCHES) == 1 and LISTEN not in counter.record.calls
    assert proxy.count("ListenBatches") == 1 and proxy.count("Listen") == 2


def test_listen_batches_resumes_mid_run_after_the_server_restarts(restartable: Restarter) -> None:
    """The run pauses for a tool result; the server restarts under the open stream (UNAVAILABLE);
    the result is submitted; the listen goes on through ListenBatches from the next index."""
    counter = CountStreams()
    with spindle.Client(restartable.address, timeout=10, interceptors=[counter]) as client:
        assistant = client.assistants.create(name="batches", tools=[spindle.FunctionTool("f", "f", {})])
        thread = client.threads.create(messages=["/tool f {}\nafter the tool"])
        run = client.runs.create(thread_id=thread, assistant_id=assistant)
        events: list[spindle.RunEvent] = []
        for event in run.listen(timeout=120):
            events.append(event)
            if event.type is spindle.EventType.TOOL_CALLS:
                assert event.tool_calls
                restartable.restart()
                restartable.join()  # down and up again: the open stream is gone
                run.submit_tool_results({event.tool_calls[0].id: "ok"}, timeout=60)
    assert contiguous(events) and events[-1].type is spindle.EventType.DONE
    paused = next(i for i, e in enumerate(events) if e.type is spindle.EventType.TOOL_CALLS)
    assert events[paused + 1 :], "events after the restart arrived"
    assert events[-1].text.startswith("Tool results: f returned")
    assert counter.record.calls.get(BATCHES, 0) >= 2 and LISTEN not in counter.record.calls
