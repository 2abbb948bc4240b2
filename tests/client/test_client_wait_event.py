"""`wait()` ends on a terminal event that carries the finished run, with no Get after it.

Against the real server. The run is held just before its terminal write (fault point
`engine.before_turn_end_write`) and let go only once the wait's first Get has its answer (from
the client's interceptor), so that Get always sees a live run and the stream always brings the
end: the calls a wait makes are then exactly known. `OldEventsProxy` relays every method but
clears `done.run` from the events, as a server older than that field sends them: the wait then
still reads the run with one more Get.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from client_support import ListenOnlyProxy

import spindle
from spindle._run_base import _FIELDS
from spindle.v1 import run_pb2
from support.faults import Holds
from support.server import ServerProcess
from support.stubs import Stubs

POINT = "engine.before_turn_end_write"


def method_name(details: Any) -> str:
    method = details.method  # bytes in grpc.aio's call details
    return (method.decode() if isinstance(method, bytes) else method).rsplit("/", 1)[-1]


class ReleaseAfterGet(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Once armed: records each call's method, and lets the held run end as soon as the first
    Get has its answer (after ``first``, e.g. a Cancel, has been done)."""

    def __init__(self, holds: Holds, first: Callable[[], object] = lambda: None) -> None:
        self.holds = holds
        self.first = first
        self.methods: list[str] | None = None  # None: not armed

    def arm(self) -> None:
        self.methods = []

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        outcome = continuation(details, request)
        self._seen(method_name(details), outcome.result)
        return outcome

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        self._seen(method_name(details), lambda: None)
        return continuation(details, request)

    def _seen(self, method: str, answered: Callable[[], object]) -> None:
        if self.methods is None:
            return
        self.methods.append(method)
        if self.methods == ["Get"]:
            answered()  # the Get has its answer (a live run): now the run may end
            self.first()
            self.holds.release(POINT)


class AsyncReleaseAfterGet(grpc.aio.UnaryUnaryClientInterceptor):
    """The grpc.aio twin of :class:`ReleaseAfterGet`; grpc.aio files an interceptor under one
    kind only, so the streams are seen by :attr:`streams`, which shares ``methods``."""

    def __init__(self, holds: Holds) -> None:
        self.holds = holds
        self.methods: list[str] | None = None
        self.streams = _AsyncStreamsSeen(self)

    def arm(self) -> None:
        self.methods = []

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        call = await continuation(details, request)
        if self.methods is not None:
            self.methods.append(method_name(details))
            if self.methods == ["Get"]:
                await call
                self.holds.release(POINT)
        return call


class _AsyncStreamsSeen(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, owner: AsyncReleaseAfterGet) -> None:
        self.owner = owner

    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        if self.owner.methods is not None:
            self.owner.methods.append(method_name(details))
        return await continuation(details, request)


class OldEventsProxy(ListenOnlyProxy):
    """Relays every method, streams included, and clears `done.run` from the events: what a
    server older than that field sends."""

    STREAMS = frozenset(
        {
            "/spindle.v1.RunService/Listen",
            "/spindle.v1.RunService/ListenBatches",
            "/spindle.v1.RunService/CreateAndListen",
        }
    )
    ABSENT = frozenset()

    def _stream(self, method: str, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        batched = not method.endswith("/Listen")
        for raw in super()._stream(method, request, context):
            message: Any = (run_pb2.StreamEventBatch if batched else run_pb2.StreamEvent).FromString(raw)
            for event in message.events if batched else (message,):
                if event.HasField("done"):
                    event.done.ClearField("run")
            yield message.SerializeToString()


def held_server(make_server: Callable[..., ServerProcess], tmp_path: Path) -> tuple[ServerProcess, Holds]:
    holds = Holds(tmp_path / "holds")
    return make_server(env=holds.env(POINT)), holds


def held_run_waited(
    client: spindle.Client, holds: Holds, counter: ReleaseAfterGet
) -> tuple[spindle.Run, spindle.RunResult]:
    """A run held before its completion write, then waited for (its first Get lets it go)."""
    assistant = client.assistants.create(name="echo")
    run = client.runs.create(thread_id=client.threads.create(messages=["hi"]), assistant_id=assistant)
    holds.wait_reached(POINT)
    counter.arm()
    return run, run.wait(timeout=30)


def fields(run: spindle.Run | spindle.AsyncRun) -> dict[str, object]:
    return {name: getattr(run, name) for name in _FIELDS}


def test_wait_takes_the_finished_run_from_done(
    make_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """A completed run's wait makes 2 calls (its first Get, one ListenBatches stream; no Get
    after DONE) and ends with the run a Get returns."""
    server, holds = held_server(make_server, tmp_path)
    counter = ReleaseAfterGet(holds)
    with spindle.Client(server.address, timeout=20, interceptors=[counter]) as client:
        run, result = held_run_waited(client, holds, counter)
        assert counter.methods == ["Get", "ListenBatches"]
        assert result.status is spindle.RunStatus.COMPLETED and result.text == "You said: hi"
        assert fields(run) == fields(client.runs.get(run.id))


def test_wait_on_a_server_without_done_run_reads_it_with_get(
    make_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """Behind a proxy that clears `done.run` (an older server), DONE only triggers a Get: 3 calls,
    the same run in the end."""
    server, holds = held_server(make_server, tmp_path)
    counter = ReleaseAfterGet(holds)
    with (
        OldEventsProxy(server.address) as proxy,
        spindle.Client(proxy.address, timeout=20, interceptors=[counter]) as client,
    ):
        run, result = held_run_waited(client, holds, counter)
        assert counter.methods == ["Get", "ListenBatches", "Get"]
        assert proxy.count("ListenBatches") == 1
        assert result.status is spindle.RunStatus.COMPLETED
        assert fields(run) == fields(client.runs.get(run.id))


def test_wait_takes_the_cancelled_run_from_its_status_event(
    make_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """A run cancelled (on another connection) once the wait's first Get has seen it live, held
    before its completion write, ends CANCELLED with a terminal STATUS that carries the run: the
    wait needs no Get after it either."""
    server, holds = held_server(make_server, tmp_path)
    other = Stubs.connect(server.address)
    try:
        cancel = functools.partial(other.runs.Cancel, timeout=10)
        counter = ReleaseAfterGet(holds, lambda: cancel(run_pb2.CancelRunRequest(run_id=run.id)))
        with spindle.Client(server.address, timeout=20, interceptors=[counter]) as client:
            assistant = client.assistants.create(name="echo")
            run = client.runs.create(thread_id=client.threads.create(messages=["hi"]), assistant_id=assistant)
            holds.wait_reached(POINT)
            counter.arm()
            result = run.wait(timeout=30)
            assert counter.methods == ["Get", "ListenBatches"]
            assert result.status is spindle.RunStatus.CANCELLED
            assert fields(run) == fields(client.runs.get(run.id))
    finally:
        other.close()


async def test_await_takes_the_finished_run_from_done(
    make_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """The async twin: 2 calls, the run a Get returns."""
    server, holds = held_server(make_server, tmp_path)
    counter = AsyncReleaseAfterGet(holds)
    async with spindle.AsyncClient(
        server.address, timeout=20, interceptors=[counter, counter.streams]
    ) as client:
        assistant = await client.assistants.create(name="echo")
        thread = await client.threads.create(messages=["hi"])
        run = await client.runs.create(thread_id=thread, assistant_id=assistant)
        holds.wait_reached(POINT)
        counter.arm()
        result = await run.wait(timeout=30)
        assert counter.methods == ["Get", "ListenBatches"]
        assert result.status is spindle.RunStatus.COMPLETED and result.text == "You said: hi"
        assert fields(run) == fields(await client.runs.get(run.id))
