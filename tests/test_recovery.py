"""Crash safety and restarts: SIGKILL mid-run, graceful SIGTERM, persistence, single owner."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from spindle.v1 import assistant_pb2, common_pb2, message_pb2, run_pb2, thread_pb2
from spindle_server.engine import transitions
from support.server import ServerProcess, open_store
from support.stubs import Stubs

EventType = run_pb2.StreamEvent
MakeServer = Callable[..., ServerProcess]
# Failure bound for a killed server's run to end after the restart. The restarted server recovers
# it at start: SQLite because the file had one owner, PostgreSQL because it is the same replica
# (ServerProcess keeps its --replica-id). Another replica taking over a dead one's runs after the
# lease: tests/test_replicas_postgres.py.
RECOVERY_BOUND = 120.0


def wait_for_deltas(stubs: Stubs, run_id: str, count: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        call = stubs.runs.Listen(run_pb2.ListenRunRequest(run_id=run_id), timeout=timeout)
        seen = 0
        for event in call:
            seen += event.type == EventType.PARTIAL_MESSAGE
            if seen >= count:
                call.cancel()
                return
    raise AssertionError("the run did not stream")


def assert_one_terminal_event_last(events: list[run_pb2.StreamEvent]) -> None:
    assert [e.index for e in events] == list(range(len(events)))
    terminal = [
        i
        for i, e in enumerate(events)
        if e.type in (EventType.DONE, EventType.ERROR)
        or (
            e.type == EventType.STATUS
            and e.status in (run_pb2.CANCELLED, run_pb2.EXPIRED, run_pb2.INCOMPLETE)
        )
    ]
    assert terminal == [len(events) - 1], terminal


def test_killed_server_run_is_retried_at_restart(make_server: MakeServer) -> None:
    server = make_server()
    stubs = Stubs.connect(server.address)
    words = " ".join(f"w{i}" for i in range(60))
    run = stubs.start(f"/sleep 3 {words}")
    wait_for_deltas(stubs, run.id, 3)
    stubs.close()
    server.kill()  # SIGKILL: no chance to clean up

    server.start()  # same database
    stubs = Stubs.connect(server.address)
    try:
        done = stubs.wait(run.id, timeout=RECOVERY_BOUND)
        assert done.status == run_pb2.COMPLETED
        assert done.attempt == 2
        assert done.reply.content[0].text.text == f"You said: /sleep 3 {words}"
        events = stubs.events(run.id)
        assert_one_terminal_event_last(events)
        discards = [i for i, e in enumerate(events) if e.status_change.discard_partial_message]
        assert len(discards) == 1
        # What a listener rebuilds (deltas after the discard) is exactly the reply.
        after = "".join(
            e.message_delta.text for e in events[discards[0] :] if e.type == EventType.PARTIAL_MESSAGE
        )
        assert after == done.reply.content[0].text.text
        messages = stubs.messages.List(message_pb2.ListMessagesRequest(thread_id=run.thread_id)).messages
        assert len(messages) == 2  # one question, one reply: nothing doubled
        assert any(e.get("event") == "run_recovered" for e in server.log_events())
    finally:
        stubs.close()


def test_run_fails_cleanly_when_attempts_are_used_up(make_server: MakeServer) -> None:
    server = make_server("--max-attempts", "1")
    stubs = Stubs.connect(server.address)
    run = stubs.start("/sleep 5 " + " ".join(["x"] * 50))
    wait_for_deltas(stubs, run.id, 2)
    stubs.close()
    server.kill()
    server.start()
    stubs = Stubs.connect(server.address)
    try:
        done = stubs.wait(run.id, timeout=RECOVERY_BOUND)
        assert done.status == run_pb2.FAILED
        assert done.last_error.code == "server_error" and "interrupted" in done.last_error.message
        assert_one_terminal_event_last(stubs.events(run.id))
    finally:
        stubs.close()


def test_cancelling_run_of_a_killed_server_ends_cancelled(make_server: MakeServer) -> None:
    """A cancel committed just before the crash: the next start finishes it as CANCELLED."""
    server = make_server()
    stubs = Stubs.connect(server.address)
    run = stubs.start("/sleep 30 " + " ".join(["x"] * 50))
    wait_for_deltas(stubs, run.id, 1)
    stubs.close()
    server.kill()
    asyncio.run(_mark_cancelling(server, run.id))  # the state a crash right after Cancel leaves

    server.start()
    stubs = Stubs.connect(server.address)
    try:
        done = stubs.wait(run.id, timeout=RECOVERY_BOUND)
        assert done.status == run_pb2.CANCELLED
        events = stubs.events(run.id)
        assert_one_terminal_event_last(events)
        assert [e.status for e in events if e.type == EventType.STATUS][-2:] == [
            run_pb2.CANCELLING,
            run_pb2.CANCELLED,
        ]
    finally:
        stubs.close()


async def _mark_cancelling(server: ServerProcess, run_id: str) -> None:
    store = open_store(server.database)
    await store.start()
    try:
        await store.mutate_run(run_id, transitions.request_cancel(time.time(), None))
    finally:
        await store.close()


def test_everything_survives_a_restart(make_server: MakeServer) -> None:
    server = make_server()
    stubs = Stubs.connect(server.address)
    assistant = stubs.assistant(name="kept", instructions="remember", labels={"k": "v"})
    thread = stubs.thread("first words")
    run = stubs.run(assistant.id, thread.id)
    done = stubs.wait(run.id)
    events = stubs.events(run.id)
    steps = stubs.runs.ListSteps(run_pb2.ListRunStepsRequest(run_id=run.id)).steps
    stubs.close()
    assert server.stop() == 0

    server.start()
    stubs = Stubs.connect(server.address)
    try:
        assert stubs.assistants.Get(assistant_pb2.GetAssistantRequest(assistant_id=assistant.id)) == assistant
        assert stubs.threads.Get(thread_pb2.GetThreadRequest(thread_id=thread.id)) == thread
        assert stubs.runs.Get(run_pb2.GetRunRequest(run_id=run.id)) == done
        assert stubs.events(run.id) == events
        assert list(stubs.runs.ListSteps(run_pb2.ListRunStepsRequest(run_id=run.id)).steps) == list(steps)
        listed = stubs.messages.List(
            message_pb2.ListMessagesRequest(thread_id=thread.id, order=common_pb2.ASC)
        )
        assert [m.content[0].text.text for m in listed.messages] == ["first words", "You said: first words"]
    finally:
        stubs.close()


def refuses_new_calls(stubs: Stubs, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            stubs.assistant(name="too late")
        except grpc.RpcError:
            return True
        time.sleep(0.05)
    return False


def test_sigterm_drains_then_requeues_the_run(make_server: MakeServer) -> None:
    server = make_server("--grace-period", "1.5")
    stubs = Stubs.connect(server.address)
    health = health_pb2_grpc.HealthStub(stubs.channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=30)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    run = stubs.start("/sleep 4 " + " ".join(["x"] * 50))
    wait_for_deltas(stubs, run.id, 1)
    assert server.process is not None
    server.process.terminate()
    # A health watcher hears NOT_SERVING before the server stops taking calls.
    assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert refuses_new_calls(stubs)  # while it drains
    assert server.process.wait(timeout=15) == 0
    stubs.close()
    events = [e.get("event") for e in server.log_events()]
    assert "stopping" in events and "stopped" in events

    server.start()
    stubs = Stubs.connect(server.address)
    try:
        requeued = stubs.events(run.id, timeout=60)
        statuses = [
            (e.status, e.status_change.discard_partial_message)
            for e in requeued
            if e.type == EventType.STATUS
        ]
        assert (run_pb2.PENDING, True) in statuses  # handed back at shutdown, not lost
        assert requeued[-1].type == EventType.DONE
        assert_one_terminal_event_last(requeued)
    finally:
        stubs.close()


def test_sigterm_lets_a_short_run_finish(make_server: MakeServer) -> None:
    server = make_server("--grace-period", "10")
    stubs = Stubs.connect(server.address)
    run = stubs.start("/sleep 1 " + " ".join(["x"] * 20))
    listener = stubs.runs.Listen(run_pb2.ListenRunRequest(run_id=run.id), timeout=30)
    first = next(listener)
    assert server.process is not None
    server.process.terminate()
    rest = list(listener)  # the open Listen sees the run end within the grace period
    assert [first, *rest][-1].type == EventType.DONE
    assert server.process.wait(timeout=15) == 0
    stubs.close()


@pytest.mark.sqlite_only("the SQLite file has one owner; PostgreSQL takes several replicas")
def test_a_second_server_on_the_same_database_is_refused(make_server: MakeServer) -> None:
    server = make_server()
    second = subprocess.run(
        [sys.executable, "-m", "spindle_server", "--port", "0", "--database", str(server.sqlite_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert second.returncode == 1
    assert "owned by another running server" in second.stderr
