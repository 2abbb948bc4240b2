"""The API under stress: request_id when the caller goes away mid-call, the cost
of Wait while its run streams, and end-to-end checks of store-level edges."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from spindle.v1 import common_pb2, run_pb2, thread_pb2
from spindle_server.api import idempotency
from spindle_server.api.runs import RunServicer
from spindle_server.broadcast import EventHub
from spindle_server.engine import events
from spindle_server.store.base import PageQuery, RequestKey
from spindle_server.store.sqlite import SqliteStore
from support.stubs import Stubs

PROJECT = "p"


async def test_a_caller_that_goes_away_does_not_let_a_retry_act_twice(store: SqliteStore) -> None:
    """A store write, once queued, commits whether or not its caller still waits, and its answer
    with it: the client's retry with the same request_id gets that answer and does not make a
    second thread."""
    gate = asyncio.Event()
    started = asyncio.Event()
    made: list[str] = []

    async def perform(record: RequestKey | None) -> thread_pb2.Thread:
        started.set()
        await gate.wait()
        thread = thread_pb2.Thread(id=f"thread_{len(made) + 1}")
        made.append(thread.id)
        await store.insert_thread(PROJECT, thread, [], record=record)
        return thread

    request = thread_pb2.CreateThreadRequest(name="once", request_id="create-1")

    def call() -> Any:
        return idempotency.once(store, PROJECT, "threads.create", request, thread_pb2.Thread, perform)

    first = asyncio.ensure_future(call())
    await asyncio.wait_for(started.wait(), 10)
    first.cancel()  # the client's deadline passed, or it disconnected
    with pytest.raises(asyncio.CancelledError):
        await first
    gate.set()  # the write commits anyway
    retried = await asyncio.wait_for(call(), 15)
    stored = await store.list_threads(PROJECT, PageQuery(limit=10))
    assert [t.id for t in stored.items] == [retried.id]


class _ReadCountingStore:
    def __init__(self) -> None:
        self.reads = 0
        self.read = asyncio.Event()
        self.status = run_pb2.IN_PROGRESS

    async def get_run(self, project: str, run_id: str) -> run_pb2.Run:
        self.reads += 1
        self.read.set()
        return run_pb2.Run(id=run_id, status=self.status)


class _Context:
    def time_remaining(self) -> float | None:
        return None


async def test_wait_does_not_reread_the_run_for_every_streamed_delta() -> None:
    """Deltas cannot end a Wait; re-reading the run for each of them costs every waiter one
    store read per event (hundreds a second per waiter on a fast stream)."""
    store = _ReadCountingStore()
    hub = EventHub()
    servicer = RunServicer(store, None, hub, None)  # type: ignore[arg-type]
    request = run_pb2.WaitRunRequest(run_id="run_1")
    request.timeout.FromSeconds(60)
    waiting = asyncio.ensure_future(servicer.Wait(request, _Context()))
    await asyncio.wait_for(store.read.wait(), 10)
    for index in range(2, 102):
        delta = events.message_delta("word ")
        delta.run_id, delta.index = "run_1", index
        hub.publish([delta])
        for _ in range(5):
            await asyncio.sleep(0)  # the waiter reacts (or not)
    store.status = run_pb2.COMPLETED
    finished = events.status_change(run_pb2.Run(id="run_1", status=run_pb2.COMPLETED))
    finished.run_id, finished.index = "run_1", 102
    hub.publish([finished])
    result = await asyncio.wait_for(waiting, 10)
    assert result.status == run_pb2.COMPLETED
    assert store.reads <= 3, store.reads


def test_a_run_resumed_after_tool_calls_is_on_its_first_attempt(stubs: Stubs) -> None:
    assistant = stubs.tool_assistant("f")
    run = stubs.run(assistant.id, stubs.thread("/tool f {}").id)
    paused = stubs.wait(run.id)
    assert paused.status == run_pb2.TOOL_CALLS and paused.attempt == 1
    results = [common_pb2.ToolResult(tool_call_id=c.id, output="ok") for c in paused.required_tool_calls]
    stubs.runs.SubmitToolResults(run_pb2.SubmitToolResultsRequest(run_id=run.id, tool_results=results))
    done = stubs.wait(run.id)
    assert done.status == run_pb2.COMPLETED
    assert done.attempt == 1  # a new turn is not a retry: max_attempts counts interruptions


def test_cancel_of_a_finished_run_returns_it_unchanged(stubs: Stubs) -> None:
    done = stubs.wait(stubs.start("quick").id)
    assert done.status == run_pb2.COMPLETED
    again = stubs.runs.Cancel(run_pb2.CancelRunRequest(run_id=done.id))
    assert again == done  # updated_at included


def test_list_runs_by_a_label_key_with_a_quote(stubs: Stubs) -> None:
    run = stubs.start("labelled", labels={'say "hi"': "yes"})
    found = stubs.runs.List(run_pb2.ListRunsRequest(thread_id=run.thread_id, labels={'say "hi"': "yes"}))
    assert [r.id for r in found.runs] == [run.id]
