"""Listen: replay then live with no gap or duplicate, many listeners, slow and vanishing ones."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from spindle.v1 import common_pb2, run_pb2
from support.server import ServerProcess
from support.stubs import Stubs

EventType = run_pb2.StreamEvent


def indexes(events: list[run_pb2.StreamEvent]) -> list[int]:
    return [e.index for e in events]


def assert_complete_log(events: list[run_pb2.StreamEvent], start: int = 0) -> None:
    assert indexes(events) == list(range(start, start + len(events)))
    terminal = [e for e in events if e.type in (EventType.DONE, EventType.ERROR)]
    assert len(terminal) <= 1
    assert terminal == [] or terminal[0] is events[-1]


def test_listen_live_from_the_start(stubs: Stubs) -> None:
    run = stubs.start("/sleep 1 " + " ".join(f"w{i}" for i in range(40)))
    events = stubs.events(run.id)
    assert_complete_log(events)
    assert events[-1].type == EventType.DONE
    deltas = [e for e in events if e.type == EventType.PARTIAL_MESSAGE]
    assert len(deltas) > 5  # streamed, not all at once
    assert "".join(e.message_delta.text for e in deltas) == events[-1].done.message.content[0].text.text


def test_join_mid_run_hands_over_without_gap_or_duplicate(stubs: Stubs) -> None:
    """Listeners joining while the run streams, from several start indexes: replay, then live."""
    run = stubs.start("/sleep 2 " + " ".join(f"w{i}" for i in range(100)))
    joined: list[tuple[int, list[run_pb2.StreamEvent]]] = []

    def join(start: int) -> None:
        joined.append((start, stubs.events(run.id, start)))

    threads = []
    for start in (0, 2, 3, 5, 8):
        time.sleep(0.3)  # join at different moments of the stream
        thread = threading.Thread(target=join, args=(start,))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join(30)
    full = stubs.events(run.id)
    assert_complete_log(full)
    assert len(joined) == 5
    for start, events in joined:
        assert_complete_log(events, start=start)
        assert [e.SerializeToString() for e in events] == [e.SerializeToString() for e in full[start:]]


def test_reconnect_from_last_index_plus_one(stubs: Stubs) -> None:
    run = stubs.start("/sleep 1.5 " + " ".join(f"w{i}" for i in range(60)))
    first: list[run_pb2.StreamEvent] = []
    call = stubs.runs.Listen(run_pb2.ListenRunRequest(run_id=run.id), timeout=30)
    for event in call:
        first.append(event)
        if len(first) == 4:
            call.cancel()  # the client goes away mid-stream
            break
    rest = stubs.events(run.id, first[-1].index + 1)
    combined = first + rest
    assert_complete_log(combined)
    assert combined[-1].type == EventType.DONE
    # Disconnecting never cancels the run.
    assert stubs.runs.Get(run_pb2.GetRunRequest(run_id=run.id)).status == run_pb2.COMPLETED


def test_listen_to_a_finished_run_replays_and_ends(stubs: Stubs) -> None:
    run = stubs.start("done already")
    stubs.wait(run.id)
    events = stubs.events(run.id)
    assert_complete_log(events)
    assert stubs.events(run.id, len(events) - 1) == events[-1:]
    assert stubs.events(run.id, len(events) + 10) == []


def test_listen_stays_open_across_tool_calls(stubs: Stubs) -> None:
    assistant = stubs.tool_assistant("lookup")
    run = stubs.run(assistant.id, stubs.thread("/tool lookup {}").id)
    received: list[run_pb2.StreamEvent] = []
    listener = threading.Thread(target=lambda: received.extend(stubs.events(run.id)))
    listener.start()
    paused = stubs.wait(run.id)
    assert paused.status == run_pb2.TOOL_CALLS
    time.sleep(0.2)
    assert listener.is_alive()  # still listening while the run waits
    stubs.runs.SubmitToolResults(
        run_pb2.SubmitToolResultsRequest(
            run_id=run.id,
            tool_results=[common_pb2.ToolResult(tool_call_id=paused.required_tool_calls[0].id, output="42")],
        )
    )
    listener.join(20)
    assert not listener.is_alive()
    assert_complete_log(received)
    kinds = [e.type for e in received]
    assert kinds.index(EventType.TOOL_CALLS) < kinds.index(EventType.DONE) == len(kinds) - 1


def test_many_listeners_see_the_same_log(stubs: Stubs) -> None:
    run = stubs.start("/sleep 1 " + " ".join(f"w{i}" for i in range(50)))
    with ThreadPoolExecutor(max_workers=40) as pool:
        logs = list(pool.map(lambda _: stubs.events(run.id), range(40)))
    reference = [e.SerializeToString() for e in logs[0]]
    assert_complete_log(logs[0])
    for log in logs[1:]:
        assert [e.SerializeToString() for e in log] == reference


def test_listen_unknown_run_is_not_found(stubs: Stubs) -> None:
    with pytest.raises(grpc.RpcError) as missing:
        stubs.events("run_000000000000000000000000")
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


def test_frozen_listeners_are_not_buffered_by_the_server(make_server) -> None:  # type: ignore[no-untyped-def]
    """Listeners that never read: the server pulls no more than flow control lets through.

    Each listener keeps only a position in the shared log; the server writes to it only as fast
    as HTTP/2 flow control allows. The access log counts the events each Listen handed to gRPC:
    for a frozen reader that is less than the run's log, however long the log grows.
    """
    server: ServerProcess = make_server("--log-level", "debug")
    stubs = Stubs.connect(server.address)
    # No BDP probing: the stream window stays at 64 KiB, as with a slow reader on a slow link.
    options = [("grpc.http2.bdp_probe", 0)]
    frozen_channels = [grpc.insecure_channel(server.address, options=options) for _ in range(5)]
    try:
        word = "x" * 100
        run = stubs.start("/sleep 1 " + " ".join([word] * 2_400))  # a ~240 KB reply
        frozen = []
        for channel in frozen_channels * 10:
            call = channel.unary_stream(
                "/spindle.v1.RunService/Listen",
                request_serializer=run_pb2.ListenRunRequest.SerializeToString,
                response_deserializer=run_pb2.StreamEvent.FromString,
            )(run_pb2.ListenRunRequest(run_id=run.id), timeout=120)
            frozen.append(call)  # never iterated: the client reads nothing
        done = stubs.wait(run.id, timeout=60)
        assert done.status == run_pb2.COMPLETED  # frozen listeners did not hold the run back
        total = len(stubs.events(run.id))
        late = list(frozen[0])  # a frozen listener that wakes up still gets every event
        assert_complete_log(late)
        assert late[-1].type == EventType.DONE
        for call in frozen[1:]:
            call.cancel()
        deadline = time.monotonic() + 10
        handed: list[int] = []
        while time.monotonic() < deadline and len(handed) < len(frozen) - 1:
            handed = [
                int(e["messages"])  # type: ignore[call-overload]
                for e in server.log_events()
                if e.get("method") == "/spindle.v1.RunService/Listen" and e.get("code") == "CANCELLED"
            ]
            time.sleep(0.1)
        assert len(handed) == len(frozen) - 1
        assert max(handed) < total, (handed, total)
        # A stream read to its end is logged OK with every message it sent (Listen and
        # ListenBatches write with ctx.write: the count comes from the handler, not a generator).
        batches = list(stubs.runs.ListenBatches(run_pb2.ListenRunRequest(run_id=run.id), timeout=60))
        assert [e.index for b in batches for e in b.events] == list(range(total))
        expected = {"Listen": len(late), "ListenBatches": len(batches)}
        logged: dict[str, list[int]] = {}
        while time.monotonic() < deadline + 10 and any(
            n not in logged.get(m, []) for m, n in expected.items()
        ):
            logged = {}
            for e in server.log_events():
                if e.get("code") == "OK" and str(e.get("method", "")).startswith(
                    "/spindle.v1.RunService/Listen"
                ):
                    method = str(e["method"]).rsplit("/", 1)[1]
                    logged.setdefault(method, []).append(int(e["messages"]))  # type: ignore[call-overload]
            time.sleep(0.1)
        assert all(n in logged.get(m, []) for m, n in expected.items()), (logged, expected)
    finally:
        for channel in frozen_channels:
            channel.close()
        stubs.close()


def test_a_burst_of_listeners_is_served(server: ServerProcess, stubs: Stubs) -> None:
    """1500 Listen calls opened at once on one run (beyond grpc's default pending limits)."""
    run = stubs.start("/sleep 1.5 " + " ".join(f"w{i}" for i in range(30)))

    async def listen_all() -> list[list[int]]:
        channels = [grpc.aio.insecure_channel(server.address) for _ in range(3)]
        try:

            async def one(channel: grpc.aio.Channel) -> list[int]:
                call = channel.unary_stream(
                    "/spindle.v1.RunService/Listen",
                    request_serializer=run_pb2.ListenRunRequest.SerializeToString,
                    response_deserializer=run_pb2.StreamEvent.FromString,
                )(run_pb2.ListenRunRequest(run_id=run.id), timeout=60)
                return [event.index async for event in call]

            return await asyncio.gather(*(one(channels[i % 3]) for i in range(1500)))
        finally:
            for channel in channels:
                await channel.close()

    logs = asyncio.run(listen_all())
    expected = [e.index for e in stubs.events(run.id)]
    wrong = [log for log in logs if log != expected]
    assert not wrong, f"{len(wrong)} wrong; expected {expected}; got {wrong[0]}"


def get_run(stubs: Stubs, run_id: str) -> run_pb2.Run:
    return stubs.runs.Get(run_pb2.GetRunRequest(run_id=run_id), timeout=10)


def test_done_carries_the_run_as_stored(stubs: Stubs) -> None:
    """DONE's `done.run` is the run exactly as the completing transaction stored it (status,
    completed_at, usage, reply, updated_at): what a Get right after returns, so a waiter needs
    no Get after the event. Replayed or live, the event is the one in the log."""
    run = stubs.start("carry the run")
    stubs.wait(run.id)
    done = stubs.events(run.id)[-1]
    stored = get_run(stubs, run.id)
    assert done.type == EventType.DONE and done.done.HasField("run")
    assert stored.status == run_pb2.COMPLETED and stored.completed_at.seconds
    assert done.done.run == stored
    assert done.done.message == stored.reply and done.done.usage == stored.usage


def test_a_terminal_status_carries_the_run_as_stored(stubs: Stubs) -> None:
    """A run cancelled mid-reply ends with a STATUS event whose `status_change.run` is the run as
    stored (CANCELLED, cancelled_at, updated_at): equal to Get's."""
    run = stubs.start("/sleep 30\na reply that will not finish")
    stubs.wait_for(run.id, {run_pb2.IN_PROGRESS})
    stubs.runs.Cancel(run_pb2.CancelRunRequest(run_id=run.id), timeout=10)
    final = stubs.wait(run.id)
    assert final.status == run_pb2.CANCELLED
    last = stubs.events(run.id)[-1]
    assert last.type == EventType.STATUS and last.status == run_pb2.CANCELLED
    assert last.status_change.run == get_run(stubs, run.id)
