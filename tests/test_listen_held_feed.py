"""A run's Create holds its feed from before the insert (EventHub.hold): the listener that
follows the answer gets the run's first events from memory, with no read of the log. The hold
keeps no run of another project visible, and ends at the run's terminal event: a listener after
that reads the log again."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from spindle.v1 import run_pb2
from support.faults import Holds
from support.invariants import History, assert_invariants
from support.server import ServerProcess
from support.stubs import Stubs

MakeServer = Callable[..., ServerProcess]
BLOCK_READ = "broadcast.block_read"  # each read of a block of a run's log from the store
HOLD_EXPIRY = "broadcast.hold_expiry"  # held: a feed's hold lasts until its run's terminal event
SLOW = "/sleep 60\nthe reply of a run that streams for a minute"


def held_server(make_server: MakeServer, holds: Holds, *args: str) -> ServerProcess:
    """Every read of a block of a log from the store is held (until released), and so is the
    expiry of a feed's hold: it lasts until its run's terminal event."""
    return make_server("--coalesce-ms", "0", *args, env=holds.env(BLOCK_READ, HOLD_EXPIRY))


def test_the_listener_after_create_gets_the_first_events_from_memory(
    make_server: MakeServer, tmp_path: Path
) -> None:
    holds = Holds(tmp_path / "holds")
    stubs = Stubs.connect(held_server(make_server, holds).address)
    history = History()
    run = stubs.start(SLOW)
    seen = history.listener(run.id)
    stream = stubs.runs.Listen(run_pb2.ListenRunRequest(run_id=run.id), timeout=60)
    # With every read of the log held, the run's first events come all the same: from the feed
    # its Create held (a listener of a feed made for it would wait on its read of block 0).
    seen.events.extend([next(stream), next(stream)])
    assert [(e.index, e.status) for e in seen.events] == [(0, run_pb2.PENDING), (1, run_pb2.IN_PROGRESS)]
    holds.release_all(BLOCK_READ, 20)  # at the live edge the listener checks the log (held so far)
    for event in stream:
        seen.events.append(event)
        if event.type == run_pb2.StreamEvent.PARTIAL_MESSAGE:
            break
    stubs.runs.Cancel(run_pb2.CancelRunRequest(run_id=run.id), timeout=10)
    seen.events.extend(stream)  # to the terminal event, live
    assert seen.events[-1].status == run_pb2.CANCELLED
    assert stubs.events(run.id) == seen.events
    assert_invariants(stubs, [run.id], history)
    stubs.close()


def test_a_held_run_stays_invisible_to_other_projects(make_server: MakeServer, tmp_path: Path) -> None:
    holds = Holds(tmp_path / "holds")
    server = held_server(make_server, holds, "--api-key", "key-alpha=alpha", "--api-key", "key-beta=beta")
    alpha = Stubs.connect(server.address, "key-alpha")
    beta = Stubs.connect(server.address, "key-beta")
    run = alpha.start(SLOW)
    for method in (beta.runs.Listen, beta.runs.ListenBatches):
        with pytest.raises(grpc.RpcError) as hidden:
            next(iter(method(run_pb2.ListenRunRequest(run_id=run.id), timeout=30)))
        assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
    # Its own project's listener is served from the held feed meanwhile (the log's reads held).
    batches = alpha.runs.ListenBatches(run_pb2.ListenRunRequest(run_id=run.id), timeout=60)
    assert [e.index for e in next(batches).events][:2] == [0, 1]
    batches.cancel()
    holds.release_all(BLOCK_READ, 20)
    alpha.runs.Cancel(run_pb2.CancelRunRequest(run_id=run.id), timeout=10)
    assert_invariants(alpha, [run.id])
    alpha.close()
    beta.close()


def test_a_run_that_ended_before_its_listener_came_is_read_from_the_log(
    make_server: MakeServer, tmp_path: Path
) -> None:
    holds = Holds(tmp_path / "holds")
    stubs = Stubs.connect(held_server(make_server, holds).address)
    run = stubs.start("a short reply")
    assert stubs.wait(run.id).status == run_pb2.COMPLETED
    # The hold ended with the terminal event (its timer is held at HOLD_EXPIRY): the listener
    # reads block 0 of the log, and gets nothing before that read is let go.
    stream = stubs.runs.Listen(run_pb2.ListenRunRequest(run_id=run.id), timeout=60)
    with ThreadPoolExecutor(1) as pool:
        listened = pool.submit(list, stream)
        holds.wait_reached(BLOCK_READ, 1)
        assert not listened.done()
        holds.release_all(BLOCK_READ, 20)
        events = listened.result(timeout=60)
    assert events[-1].type == run_pb2.StreamEvent.DONE
    assert [e.index for e in events] == list(range(len(events)))
    assert_invariants(stubs, [run.id])
    stubs.close()
