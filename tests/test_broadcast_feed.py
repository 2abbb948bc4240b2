"""The feed's shared block reads: who may join a read in flight, steered with events."""

from __future__ import annotations

import asyncio

from spindle.v1 import run_pb2
from spindle_server.broadcast import RunFeed


async def test_a_fresh_read_does_not_join_a_read_that_began_before_a_commit() -> None:
    """A listener that learned from the store that the run ended (its status read saw the
    commit) before the commit's publish reached the feed must not take the answer of a block
    read that began before that commit: it would see no end and stop short of the last events."""
    log: list[run_pb2.StreamEvent] = []
    began = asyncio.Event()
    release = asyncio.Event()

    async def load(start: int, limit: int) -> list[run_pb2.StreamEvent]:
        snapshot = list(log[start : start + limit])  # the read's snapshot, taken now
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
