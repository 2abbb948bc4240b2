"""Fan-out of committed run events to Listen and Wait, without per-listener queues.

A feed per watched run keeps a bounded tail of recent events; every listener keeps only its
own position and reads from the tail (or from the store when it has fallen behind the tail).
Publishing wakes the waiters once; a listener that does not read slows only itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager

from spindle.v1 import run_pb2

TAIL_LIMIT = 512

# Events that come with a change of the run's status; the deltas in between do not.
_STATUS_EVENTS = frozenset(
    {
        run_pb2.StreamEvent.STATUS,
        run_pb2.StreamEvent.TOOL_CALLS,
        run_pb2.StreamEvent.DONE,
        run_pb2.StreamEvent.ERROR,
    }
)


def _next(future: asyncio.Future[None] | None) -> asyncio.Future[None]:
    if future is None or future.done():
        return asyncio.get_running_loop().create_future()
    return future


def _resolve(future: asyncio.Future[None] | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)


class RunFeed:
    __slots__ = ("_changed", "_status_changed", "_tail", "_tail_start", "subscribers")

    def __init__(self) -> None:
        self._tail: list[run_pb2.StreamEvent] = []
        self._tail_start = 0
        self._changed: asyncio.Future[None] | None = None
        self._status_changed: asyncio.Future[None] | None = None
        self.subscribers = 0

    def changed(self) -> asyncio.Future[None]:
        """A future resolved at the next publish; take it *before* reading, then await it."""
        self._changed = _next(self._changed)
        return self._changed

    def status_changed(self) -> asyncio.Future[None]:
        """Like changed(), but only for events that change the run's status (Wait needs no
        wake-up, and no store read, for every streamed delta)."""
        self._status_changed = _next(self._status_changed)
        return self._status_changed

    def publish(self, events: Sequence[run_pb2.StreamEvent]) -> None:
        for event in events:
            if self._tail and event.index != self._tail_start + len(self._tail):
                # Out of line (should not happen): restart the tail rather than keep a gap.
                self._tail.clear()
            if not self._tail:
                self._tail_start = event.index
            self._tail.append(event)
        if len(self._tail) > TAIL_LIMIT:
            drop = len(self._tail) - TAIL_LIMIT
            del self._tail[:drop]
            self._tail_start += drop
        _resolve(self._changed)
        if any(event.type in _STATUS_EVENTS for event in events):
            _resolve(self._status_changed)

    def cached(self, start: int) -> list[run_pb2.StreamEvent] | None:
        """Events from `start` if the tail holds it; None if the store must be read."""
        end = self._tail_start + len(self._tail)
        if self._tail and self._tail_start <= start < end:
            return self._tail[start - self._tail_start :]
        return None


class EventHub:
    def __init__(self) -> None:
        self._feeds: dict[str, RunFeed] = {}

    def publish(self, events: Sequence[run_pb2.StreamEvent]) -> None:
        """Store callback, after commit: events of one or more runs, in index order per run."""
        by_run: dict[str, list[run_pb2.StreamEvent]] = {}
        for event in events:
            by_run.setdefault(event.run_id, []).append(event)
        for run_id, run_events in by_run.items():
            feed = self._feeds.get(run_id)
            if feed is not None:
                feed.publish(run_events)

    def watched(self) -> Collection[str]:
        """The runs with live subscribers (Listen and Wait): a live view, `in` is a dict lookup.
        A store shared by replicas reads another replica's commits only for these; a subscriber
        reads the store from its own position after subscribing, so whatever was committed
        before (and not read here) it reads itself."""
        return self._feeds.keys()

    @contextmanager
    def subscribe(self, run_id: str) -> Iterator[RunFeed]:
        feed = self._feeds.get(run_id)
        if feed is None:
            feed = self._feeds[run_id] = RunFeed()
        feed.subscribers += 1
        try:
            yield feed
        finally:
            feed.subscribers -= 1
            if feed.subscribers == 0:
                del self._feeds[run_id]
