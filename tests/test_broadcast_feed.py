"""The run feed: shared block reads (who may join a read in flight, steered with events), framing
made once for every listener, and each listener's own wake-up."""

from __future__ import annotations

import asyncio

import pytest

from spindle.v1 import run_pb2
from spindle_server.broadcast import RunFeed


async def test_a_fresh_read_does_not_join_a_read_that_began_before_a_commit() -> None:
    """A listener that learned from the store that the run ended (its status read saw the
    commit) before the commit's publish reached the feed must not take the answer of a block
    read that began before that commit: it would see no end and stop short of the last events."""
    log: list[run_pb2.StreamEvent] = []
    began = asyncio.Event()
    release = asyncio.Event()

    async def load(start: int, limit: int) -> list[bytes]:
        snapshot = [event.SerializeToString() for event in log[start : start + limit]]  # taken now
        began.set()
        await release.wait()
        return snapshot

    feed = RunFeed()
    early = asyncio.ensure_future(feed.read(0, load))
    await began.wait()
    # The run's end commits now; its publish has not reached the feed yet.
    log.append(run_pb2.StreamEvent(run_id="run_1", index=0, type=run_pb2.StreamEvent.DONE))
    joined = asyncio.ensure_future(feed.read(0, load))
    fresh = asyncio.ensure_future(feed.read(0, load, fresh=True))
    release.set()
    assert list(await early) == [] and list(await joined) == []  # a wake-up's read may join
    assert [event.index for event in await fresh] == [0]
    assert feed.final == 0


async def test_listeners_in_step_share_one_framed_batch() -> None:
    """ListenBatches frames each event once, at publish: a listener given one new event sends
    the feed's own bytes (the same object for every listener, no per-listener copy), and a
    backlog joins the framed events into the StreamEventBatch that carries them all."""
    from spindle_server.api.runs import frame_batches, join_batches

    async def no_store(start: int, limit: int) -> list[bytes]:
        raise AssertionError("the tail holds every event")

    events = [
        run_pb2.StreamEvent(run_id="run_1", index=index, type=run_pb2.StreamEvent.PARTIAL_MESSAGE)
        for index in range(3)
    ]
    for index, event in enumerate(events):
        event.message_delta.text = f"word{index}"
    feed = RunFeed()
    feed.publish(events)
    wires = [event.SerializeToString() for event in events]
    (one,) = join_batches(await feed.read(2, no_store, framed=True))
    (again,) = join_batches(await feed.read(2, no_store, framed=True))
    assert one is again  # shared, not rebuilt per listener
    assert list(run_pb2.StreamEventBatch.FromString(one).events) == events[2:]
    (backlog,) = join_batches(await feed.read(0, no_store, framed=True))
    assert list(run_pb2.StreamEventBatch.FromString(backlog).events) == events
    assert [backlog] == list(frame_batches(wires))  # the same bytes as framing each wire anew
    assert list(await feed.read(1, no_store, wire=True)) == wires[1:]


async def test_a_listener_cancelled_while_waiting_leaves_the_others_waiting() -> None:
    """Each listener waits on a future of its own (no shared future, no shield): one that goes
    away mid-wait (its call cancelled) takes its future back, and the next publish still wakes
    every other listener once."""
    feed = RunFeed()
    started = asyncio.Event()

    async def listener() -> int:
        waiter = feed.changed()
        assert feed.changed(waiter) is waiter  # unresolved: the same one, not a second
        wakes = 0
        try:
            started.set()
            await waiter
            wakes += 1
        finally:
            feed.forget(waiter)
        return wakes

    gone = asyncio.ensure_future(listener())
    await started.wait()
    started.clear()
    staying = asyncio.ensure_future(listener())
    await started.wait()
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert len(feed._waiters) == 1  # the cancelled listener's future left with it
    feed.publish([run_pb2.StreamEvent(run_id="run_1", index=0, type=run_pb2.StreamEvent.STATUS)])
    assert await staying == 1
    assert not feed._waiters  # woken futures are not kept


async def test_the_tails_end_answers_empty_until_the_recheck_or_a_fresh_read() -> None:
    """A listener at the end of the tail has every event this feed was told of: it gets nothing
    to send without a store read. The store is asked again only where the tail may be short of
    the log: after the safety-net recheck fired (another process's commits) until the next
    publish, and for a fresh read (the caller saw the run end in the store)."""
    reads: list[int] = []

    async def load(start: int, limit: int) -> list[bytes]:
        reads.append(start)
        return []

    feed = RunFeed()
    assert feed.cached(0) is None  # nothing published yet: the log is the store's
    feed.publish([run_pb2.StreamEvent(run_id="run_1", index=index) for index in (5, 6)])
    assert list(await feed.read(6, load)) == [feed.cached(6)[0]]  # type: ignore[index]
    assert feed.cached(7) == () and list(await feed.read(7, load, wire=True)) == []
    assert feed.cached(8) is None  # past the end: a gap only the store can fill
    assert reads == []
    assert list(await feed.read(7, load, fresh=True)) == [] and reads == [0]
    feed._recheck_now()  # the safety net fired: the store may hold more than the tail
    assert feed.cached(7) is None
    await feed.read(7, load)
    assert reads == [0, 0]
    feed.publish([run_pb2.StreamEvent(run_id="run_1", index=7)])
    assert feed.cached(8) == () and reads == [0, 0]
    feed.close()
