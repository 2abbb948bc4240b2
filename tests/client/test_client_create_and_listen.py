"""``create_and_stream`` creates and streams a run in one call, CreateAndListen, where the server
has it, and falls back to Create + ListenBatches where it does not.

Against the real server, directly and through `NoCreateAndListenProxy`, a real gRPC server in
front of it that routes every method but CreateAndListen (an older server: grpc answers
UNIMPLEMENTED). The calls made are counted by real interceptors on the client's channel and by
the proxy. A stream lost before its first message is retried with the same request_id (one run);
a stream broken after it resumes on ListenBatches from the next index.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from client_faults import (
    AsyncCountStreams,
    AsyncCountUnary,
    AsyncDropStreamStarts,
    CountStreams,
    CountUnary,
    DropStreamStarts,
)
from client_support import NoCreateAndListenProxy, Restarter

import spindle
from support.faults import Holds
from support.server import ServerProcess

RUNS = "/spindle.v1.RunService/"
ONE_CALL = RUNS + "CreateAndListen"


def contiguous(events: list[spindle.RunEvent]) -> bool:
    return [e.index for e in events] == list(range(len(events))) and events[-1].is_terminal


def test_create_and_stream_makes_one_call(server: ServerProcess, echo: spindle.Assistant) -> None:
    streams, unary = CountStreams(), CountUnary()
    with spindle.Client(server.address, timeout=20, interceptors=[streams, unary]) as client:
        thread = client.threads.create(messages=["in one call"])
        events: list[spindle.RunEvent] = []
        texts: list[str] = []
        result = client.runs.create_and_stream(
            thread_id=thread,
            assistant_id=echo,
            on_event=events.append,
            on_text=lambda delta, _: texts.append(delta),
            timeout=60,
        )
        runs = list(client.runs.list(thread_id=thread))
    assert result.is_succeeded and result.text == "You said: in one call" == "".join(texts)
    assert contiguous(events) and [run.id for run in runs] == [result.run_id]
    assert streams.record.calls == {ONE_CALL: 1}  # no ListenBatches, no Listen
    assert RUNS + "Create" not in unary.record.calls and RUNS + "Get" not in unary.record.calls


async def test_async_create_and_stream_makes_one_call(server: ServerProcess, echo: spindle.Assistant) -> None:
    streams, unary = AsyncCountStreams(), AsyncCountUnary()
    async with spindle.AsyncClient(server.address, timeout=20, interceptors=[streams, unary]) as client:
        thread = await client.threads.create(messages=["in one async call"])
        events: list[spindle.RunEvent] = []
        result = await client.runs.create_and_stream(
            thread_id=thread, assistant_id=echo, on_event=events.append, timeout=60
        )
    assert result.is_succeeded and result.text == "You said: in one async call"
    assert contiguous(events)
    assert streams.record.calls == {ONE_CALL: 1}
    assert RUNS + "Create" not in unary.record.calls


def test_an_older_server_gets_create_then_listen_batches(
    server: ServerProcess, echo: spindle.Assistant
) -> None:
    with NoCreateAndListenProxy(server.address) as proxy, spindle.Client(proxy.address, timeout=20) as client:
        results = [
            client.runs.create_and_stream(
                thread_id=client.threads.create(messages=[text]), assistant_id=echo, timeout=60
            )
            for text in ("old one", "old two")
        ]
    assert [r.text for r in results] == ["You said: old one", "You said: old two"]
    assert proxy.count("CreateAndListen") == 1  # the UNIMPLEMENTED answer is remembered
    assert proxy.count("Create") == 2 and proxy.count("ListenBatches") == 2


async def test_async_an_older_server_gets_create_then_listen_batches(
    server: ServerProcess, echo: spindle.Assistant
) -> None:
    with NoCreateAndListenProxy(server.address) as proxy:
        async with spindle.AsyncClient(proxy.address, timeout=20) as client:
            results = [
                await client.runs.create_and_stream(
                    thread_id=await client.threads.create(messages=[text]), assistant_id=echo, timeout=60
                )
                for text in ("old one", "old two")
            ]
    assert [r.text for r in results] == ["You said: old one", "You said: old two"]
    assert proxy.count("CreateAndListen") == 1
    assert proxy.count("Create") == 2 and proxy.count("ListenBatches") == 2


def test_a_stream_lost_before_its_first_event_is_retried_as_the_same_run(
    server: ServerProcess, echo: spindle.Assistant
) -> None:
    """The server made the run and began to stream it; the client saw nothing (UNAVAILABLE). The
    call is made again with the same request_id: the same run, streamed from index 0."""
    dropped = DropStreamStarts("CreateAndListen")
    with spindle.Client(server.address, timeout=20, interceptors=[dropped]) as client:
        thread = client.threads.create(messages=["lost once"])
        events: list[spindle.RunEvent] = []
        result = client.runs.create_and_stream(
            thread_id=thread, assistant_id=echo, on_event=events.append, timeout=60
        )
        runs = list(client.runs.list(thread_id=thread))
    assert result.text == "You said: lost once" and contiguous(events)
    assert [run.id for run in runs] == [result.run_id]
    first, again = dropped.record.requests
    assert first.request_id and again.request_id == first.request_id


async def test_async_a_stream_lost_before_its_first_event_is_retried_as_the_same_run(
    server: ServerProcess, echo: spindle.Assistant
) -> None:
    dropped = AsyncDropStreamStarts("CreateAndListen")
    async with spindle.AsyncClient(server.address, timeout=20, interceptors=[dropped]) as client:
        thread = await client.threads.create(messages=["lost once, async"])
        result = await client.runs.create_and_stream(thread_id=thread, assistant_id=echo, timeout=60)
        runs = [run async for run in client.runs.list(thread_id=thread)]
    assert result.text == "You said: lost once, async"
    assert [run.id for run in runs] == [result.run_id]
    first, again = dropped.record.requests
    assert first.request_id and again.request_id == first.request_id


def test_a_stream_broken_mid_run_resumes_with_listen_batches(restartable: Restarter) -> None:
    """The run pauses for a tool; the tool restarts the server under the open CreateAndListen
    stream; the stream resumes on ListenBatches from the next index to the end."""
    counter = CountStreams()

    def f() -> str:
        restartable.restart()
        restartable.join()  # down and up again: the open stream is gone
        return "ok"

    with spindle.Client(restartable.address, timeout=10, interceptors=[counter]) as client:
        assistant = client.assistants.create(name="one-call", tools=[spindle.FunctionTool("f", "f", {})])
        thread = client.threads.create(messages=["/tool f {}\nafter the tool"])
        events: list[spindle.RunEvent] = []
        result = client.runs.create_and_stream(
            thread_id=thread, assistant_id=assistant, tools={"f": f}, on_event=events.append, timeout=120
        )
    assert result.is_succeeded and contiguous(events)
    assert events[-1].text.startswith("Tool results: f returned")
    assert (
        counter.record.calls.get(ONE_CALL) == 1 and counter.record.calls.get(RUNS + "ListenBatches", 0) >= 1
    )


HELD_CREATE = "engine.before_create_insert"


def test_with_no_timeout_a_create_that_never_answers_fails_at_the_clients_per_call_timeout(
    make_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """``timeout=None`` is no limit on the run, but not on its creation: the call waits for its
    first message as long as Create would have (the client's per-call timeout), here a Create held
    before its insert until the test ends."""
    holds = Holds(tmp_path / "holds")
    server = make_server(env=holds.env(HELD_CREATE))
    with spindle.Client(server.address, timeout=20) as setup:
        assistant = setup.assistants.create(name="echo")
        thread = setup.threads.create(messages=["never created"])
    failures: list[BaseException] = []

    def stream() -> None:
        with spindle.Client(server.address, timeout=1.0) as client:
            try:
                client.runs.create_and_stream(thread_id=thread, assistant_id=assistant, timeout=None)
            except BaseException as error:  # handed to the test's thread
                failures.append(error)

    caller = threading.Thread(target=stream, daemon=True)
    caller.start()
    holds.wait_reached(HELD_CREATE)
    caller.join(timeout=60)  # a failure bound: without the per-call timeout it never ends
    holds.release(HELD_CREATE)
    assert not caller.is_alive(), "create_and_stream(timeout=None) still waits for a held Create"
    assert len(failures) == 1 and isinstance(failures[0], spindle.DeadlineExceeded)


async def test_async_with_no_timeout_a_create_that_never_answers_fails_at_the_clients_per_call_timeout(
    make_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    holds = Holds(tmp_path / "holds")
    server = make_server(env=holds.env(HELD_CREATE))
    async with spindle.AsyncClient(server.address, timeout=20) as setup:
        assistant = await setup.assistants.create(name="echo")
        thread = await setup.threads.create(messages=["never created, async"])
    async with spindle.AsyncClient(server.address, timeout=1.0) as client:
        call = asyncio.ensure_future(
            client.runs.create_and_stream(thread_id=thread, assistant_id=assistant, timeout=None)
        )
        await asyncio.to_thread(holds.wait_reached, HELD_CREATE)
        try:
            # A failure bound: without the per-call timeout it never ends.
            with pytest.raises(spindle.DeadlineExceeded):
                await asyncio.wait_for(call, timeout=60)
        finally:
            holds.release(HELD_CREATE)
