"""Replays of a finished run's log: listeners read it in blocks that the server reads once for
all of them, from any start index, and end at the terminal event; a listener that goes away
while others wait on the same read does not fail them; a listener in step with a live run
reads no block at all."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from spindle.v1 import common_pb2, run_pb2
from support.faults import ENV, Holds
from support.observe import open_listens, wait_until
from support.server import ServerProcess
from support.stubs import Stubs

MakeServer = Callable[..., ServerProcess]
BLOCK_READ = "broadcast.block_read"
# Coalescing off: one event per word, so the log spans three blocks of 256 (the server's BLOCK).
WORDS = " ".join(f"w{i}" for i in range(700))


def finished_run(stubs: Stubs) -> run_pb2.Run:
    run = stubs.start(WORDS)
    # Wait rides the feed's status wake-ups only: it reads no block of the log.
    finished = stubs.runs.Wait(run_pb2.WaitRunRequest(run_id=run.id), timeout=60)
    assert finished.status == run_pb2.COMPLETED
    return finished


def test_replays_from_any_start_index_at_once(make_server: MakeServer) -> None:
    server = make_server("--coalesce-ms", "0")
    stubs = Stubs.connect(server.address)
    run = finished_run(stubs)
    full = stubs.events(run.id)
    assert [e.index for e in full] == list(range(len(full)))
    assert full[-1].type == run_pb2.StreamEvent.DONE and len(full) > 512
    last = len(full) - 1
    # Block edges, inside blocks, the terminal event and past it, all listening at once.
    starts = [0, 1, 255, 256, 257, 300, 511, 512, 513, last - 1, last, last + 1, last + 50]
    with ThreadPoolExecutor(len(starts)) as pool:
        replays = list(pool.map(lambda start: stubs.events(run.id, start), starts))
    for start, events in zip(starts, replays, strict=True):
        assert events == full[start:], f"the replay from {start} differs from the log"


def test_a_listener_leaving_does_not_fail_the_read_others_share(
    make_server: MakeServer, tmp_path: Path
) -> None:
    holds = Holds(tmp_path / "holds")
    server = make_server("--coalesce-ms", "0", "--metrics-port", "0", env=holds.env(BLOCK_READ))
    for nth in range(2, 20):
        holds.release(BLOCK_READ, nth)  # only the first block read is held
    stubs = Stubs.connect(server.address)
    run = finished_run(stubs)

    # A starts the read of block 0 and is held there.
    leaving = stubs.runs.Listen(run_pb2.ListenRunRequest(run_id=run.id), timeout=60)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(next, leaving)
        holds.wait_reached(BLOCK_READ, 1)
        # B wants the same block: it waits on A's read (it is subscribed, with no await between
        # that and waiting on the read, once the server counts it).
        staying = pool.submit(stubs.events, run.id, 10, 60)
        wait_until(lambda: open_listens(server) == 2, "both listeners subscribed")
        leaving.cancel()  # A goes away while B waits on the read A started
        wait_until(lambda: open_listens(server) == 1, "the leaving listener's stream ended")
        holds.release(BLOCK_READ, 1)
        events = staying.result(timeout=60)
        try:
            first.result(timeout=60)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.CANCELLED
    full = stubs.events(run.id)
    assert events == full[10:]
    # Block 0 was read once for A and B, then blocks 256 and 512 for B; the last listener's feed
    # (the first was dropped with its listeners) read the three again: six reads, not seven.
    assert holds.is_reached(BLOCK_READ, 6)
    assert not holds.is_reached(BLOCK_READ, 7)


def test_listen_batches_carries_the_same_events_replayed_and_live(make_server: MakeServer) -> None:
    server = make_server("--coalesce-ms", "0")
    stubs = Stubs.connect(server.address)

    def batched(run_id: str, start: int = 0) -> list[run_pb2.StreamEvent]:
        request = run_pb2.ListenRunRequest(run_id=run_id, events_start_idx=start)
        batches = list(stubs.runs.ListenBatches(request, timeout=60))
        assert all(batch.events for batch in batches), "an empty batch"
        return [event for batch in batches for event in batch.events]

    # Live: batches follow the run as it streams, then end after its terminal event.
    live = stubs.start("/sleep 0.5 " + " ".join(f"w{i}" for i in range(40)))
    live_events = batched(live.id)
    assert live_events == stubs.events(live.id)
    assert live_events[-1].type == run_pb2.StreamEvent.DONE
    # Replay of a log of three blocks from several starts: the batches hold exactly Listen's events.
    run = finished_run(stubs)
    full = stubs.events(run.id)
    replayed = batched(run.id)
    assert replayed == full
    assert len(list(stubs.runs.ListenBatches(run_pb2.ListenRunRequest(run_id=run.id), timeout=60))) < 10
    for start in (1, 256, len(full) - 1, len(full) + 3):
        assert batched(run.id, start) == full[start:]


def test_batches_split_before_one_mebibyte_and_a_larger_event_goes_alone() -> None:
    from spindle_server.api.runs import BATCH_BYTES, frame_batches

    def event(index: int, size: int) -> bytes:
        delta = run_pb2.StreamEvent(index=index, type=run_pb2.StreamEvent.PARTIAL_MESSAGE)
        delta.message_delta.text = "x" * size
        return delta.SerializeToString()

    wires = [event(0, 10), event(1, 600_000), event(2, 600_000), event(3, 2 * BATCH_BYTES), event(4, 5)]
    batches = [run_pb2.StreamEventBatch.FromString(data) for data in frame_batches(wires)]
    assert [[e.index for e in batch.events] for batch in batches] == [[0, 1], [2], [3], [4]]
    assert [e.SerializeToString() for batch in batches for e in batch.events] == wires


def test_a_listener_in_step_with_a_live_run_reads_no_block_of_the_log(
    make_server: MakeServer, tmp_path: Path
) -> None:
    """A listener that has every published event waits for the next publish and sends what it
    brings from the feed's tail, without asking the store: before, every wake-up read a block of
    the log past the tail's end (and the run's status) for each event of a live run."""
    holds = Holds(tmp_path / "holds")
    env = {ENV: f"{BLOCK_READ}={holds.action()};listen.idle={holds.action()}"}
    server = make_server("--coalesce-ms", "0", env=env)
    holds.release_all(BLOCK_READ, 100)  # block reads pass, counted
    for nth in range(2, 100):
        holds.release("listen.idle", nth)  # only the first wait is held
    stubs = Stubs.connect(server.address)
    assistant = stubs.tool_assistant("lookup")
    run = stubs.run(assistant.id, stubs.thread("/tool lookup {}").id)
    paused = stubs.wait(run.id)
    assert paused.status == run_pb2.TOOL_CALLS
    with ThreadPoolExecutor(1) as pool:
        received = pool.submit(stubs.events, run.id, 0, 60)
        # The log so far came from the store, or from the feed Create held if it is still held
        # (its tail has every event): either way the listener is now about to wait.
        holds.wait_reached("listen.idle", 1)
        before = block_reads(holds)
        words = " ".join(f"r{i}" for i in range(40))  # one event per word (coalescing off)
        result = common_pb2.ToolResult(tool_call_id=paused.required_tool_calls[0].id, output=words)
        stubs.runs.SubmitToolResults(run_pb2.SubmitToolResultsRequest(run_id=run.id, tool_results=[result]))
        holds.release("listen.idle", 1)
        events = received.result(timeout=60)
    # The live part (every event after TOOL_CALLS) came from the feed's tail: no block read.
    assert block_reads(holds) == before
    assert events == stubs.events(run.id) and events[-1].type == run_pb2.StreamEvent.DONE
    assert sum(e.type == run_pb2.StreamEvent.PARTIAL_MESSAGE for e in events) >= 40


def block_reads(holds: Holds) -> int:
    """How many block reads the server has made (each arrival at the point leaves a file)."""
    count = 0
    while holds.is_reached(BLOCK_READ, count + 1):
        count += 1
    return count
