"""Fan-out of committed run events to Listen and Wait, without per-listener queues.

A feed per watched run keeps a bounded tail of recent events; every listener keeps only its
own position and reads from the tail (or, behind the tail, from blocks of the store's log that
the feed reads once for all its listeners). Each event is serialized once, at publish or block
read, and its bytes are what every listener sends. Publishing resolves each waiting listener's
own future once (one wake-up each, no shared future to shield); a listener that does not read
slows only itself. A listener in step with the tail is woken by a publish, sends what it
brought and waits again without asking the store (the store is read again only where the tail
may be short of the log). ListenBatches' framing of each event (its tag and length in
a StreamEventBatch) is made once too: a batch is a join of framed events, or one event's framed
bytes as they are, shared by every listener in step.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from spindle.v1 import run_pb2
from spindle_server import faults
from spindle_server.engine.events import is_terminal

TAIL_LIMIT = 512
# Replays read the store in blocks of BLOCK events from a multiple of BLOCK, so listeners replaying
# the same run share each block; a feed keeps blocks up to BLOCK_CACHE_BYTES while it has listeners.
BLOCK = 256
BLOCK_CACHE_BYTES = 8 << 20
# Every commit of this process wakes its listeners; this wake-up is only a safety net (a store
# written by another process), so it is rare.
RECHECK_SECONDS = 30.0
# The fault point a held feed's timer reaches before it lets the feed go (tests hold it there).
HOLD_EXPIRY = "broadcast.hold_expiry"

Loader = Callable[[int, int], Awaitable[list[bytes]]]
"""Reads up to `limit` stored events of the run from index `start`, serialized as stored:
(start, limit) -> their bytes."""
# A block: its events' wire bytes as stored; once a listener of messages (a facade) asked, the
# events parsed; once a ListenBatches listener asked, framed (`frame`).
Block = tuple[list[bytes], list[list[run_pb2.StreamEvent]], list[list[bytes]]]

# Events that come with a change of the run's status; the deltas in between do not.
_STATUS_EVENTS = frozenset(
    {
        run_pb2.StreamEvent.STATUS,
        run_pb2.StreamEvent.TOOL_CALLS,
        run_pb2.StreamEvent.DONE,
        run_pb2.StreamEvent.ERROR,
    }
)


def _next(future: asyncio.Future[None] | None, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
    if future is None or future.done():
        return loop.create_future()
    return future


def _resolve(future: asyncio.Future[None] | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)


class RunFeed:
    """One run's shared log for its listeners: a tail of recent events and, for replays from the
    store, blocks of older ones read once and shared. Each event is kept with its wire bytes,
    serialized once for every listener (each listener only holds its own position)."""

    __slots__ = (
        "_block_bytes",
        "_blocks",
        "_framed",
        "_loading",
        "_loop",
        "_publishes",
        "_recheck",
        "_rechecked",
        "_status_changed",
        "_tail",
        "_tail_start",
        "_waiters",
        "_wires",
        "final",
        "project",
        "subscribers",
    )

    def __init__(self) -> None:
        # Made by a listener on the loop: asking for the running loop costs a getpid() system
        # call each time, once per listener per publish when done in changed().
        self._loop = asyncio.get_running_loop()
        self._tail: list[run_pb2.StreamEvent] = []
        self._wires: list[bytes] = []
        self._framed: list[bytes] = []
        self._tail_start = 0
        # Each waiting listener's own future (a dict: ordered, and a leaving listener's is removed
        # at once), all resolved at the next publish.
        self._waiters: dict[asyncio.Future[None], None] = {}
        self._status_changed: asyncio.Future[None] | None = None
        self._blocks: dict[int, Block] = {}
        self._block_bytes = 0
        # Block reads in flight, with the publish count when each began (see read()).
        self._loading: dict[int, tuple[asyncio.Task[Block], int]] = {}
        self._publishes = 0
        self._recheck: asyncio.TimerHandle | None = None
        # The safety net fired since the last publish: the store may hold events this feed
        # was not told of (another process's commits), so the tail's end is not the log's.
        self._rechecked = False
        self.final: int | None = None  # index of the run's terminal event, once seen
        # The run's project, set by the Create that holds the feed (EventHub.hold) once its
        # insert committed: until its terminal event, the run exists in that project.
        self.project: str | None = None
        self.subscribers = 0

    def changed(self, waiter: asyncio.Future[None] | None = None) -> asyncio.Future[None]:
        """The listener's own future, resolved at the next publish; take it *before* reading, then
        await it (it is the listener's alone: no shield). Pass back the one it last got: while
        unresolved it is the same one. Resolved at least every RECHECK_SECONDS too, by one timer
        for the feed rather than one per listener: an idle listener costs no timer of its own.
        A listener that leaves gives it back with `forget`."""
        if waiter is not None and not waiter.done():
            return waiter
        waiter = self._loop.create_future()
        self._waiters[waiter] = None
        if self._recheck is None:
            self._recheck = self._loop.call_later(RECHECK_SECONDS, self._recheck_now)
        return waiter

    def known(self, project: str) -> bool:
        """The run is known to exist in `project`: its Create holds the feed, until its terminal
        event (a finished run may be deleted by retention)."""
        return self.project == project and self.final is None

    def forget(self, waiter: asyncio.Future[None] | None) -> None:
        if waiter is not None:
            self._waiters.pop(waiter, None)

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, {}
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _recheck_now(self) -> None:
        self._recheck = None
        self._rechecked = True
        self._wake()

    def close(self) -> None:
        """Its last listener left: drop the timer now (it would hold the feed and its tail)."""
        if self._recheck is not None:
            self._recheck.cancel()
            self._recheck = None

    def status_changed(self) -> asyncio.Future[None]:
        """Like changed(), but only for events that change the run's status (Wait needs no
        wake-up, and no store read, for every streamed delta)."""
        self._status_changed = _next(self._status_changed, self._loop)
        return self._status_changed

    def publish(self, events: Sequence[run_pb2.StreamEvent]) -> None:
        self._publishes += 1
        self._rechecked = False
        for event in events:
            if self._tail and event.index != self._tail_start + len(self._tail):
                # Out of line (should not happen): restart the tail rather than keep a gap.
                self._tail.clear()
                self._wires.clear()
                self._framed.clear()
            if not self._tail:
                self._tail_start = event.index
            self._tail.append(event)
            wire = event.SerializeToString()
            self._wires.append(wire)
            self._framed.append(frame(wire))
            self._note_final(event)
        if len(self._tail) > TAIL_LIMIT:
            drop = len(self._tail) - TAIL_LIMIT
            del self._tail[:drop]
            del self._wires[:drop]
            del self._framed[:drop]
            self._tail_start += drop
        self._wake()
        if any(event.type in _STATUS_EVENTS for event in events):
            _resolve(self._status_changed)

    def cached(
        self, start: int, wire: bool = False, *, framed: bool = False, fresh: bool = False
    ) -> Sequence[Any] | None:
        """Events (or their wire bytes, or those framed for a batch) from `start` if the tail
        holds it; None if not. Empty at the tail's end: every event after the tail is published
        here when committed (this process's commits, and another replica's for a watched run),
        so a listener in step waits for the next publish without a store read, unless the
        recheck fired since the last publish, or the caller asks `fresh` (see read())."""
        tail = self._tail
        if tail:
            offset = start - self._tail_start
            if 0 <= offset < len(tail):
                kept = self._framed if framed else self._wires if wire else tail
                return kept[offset:]
            if offset == len(tail) and not (fresh or self._rechecked):
                return ()
        return None

    async def read(
        self, start: int, load: Loader, wire: bool = False, *, framed: bool = False, fresh: bool = False
    ) -> Sequence[Any]:
        """Events (or wire bytes, or `framed` bytes: see `frame`) from `start` on: from the tail,
        else from the block of the store that holds `start`, read by one listener for all (empty
        past the end of the log).
        `fresh`: the caller learned of a commit from the store itself, which may be read before
        that commit's publish reaches this feed: a read in flight may predate it, so not joined."""
        cached = self.cached(start, wire, framed=framed, fresh=fresh)
        if cached is not None:
            return cached
        first = start - start % BLOCK
        block = self._blocks.get(first)
        if block is None:
            loading = self._loading.get(first)
            # Join a read only if nothing was published since it began: its snapshot then holds
            # every event committed before the caller took changed(), so no wake-up is missed.
            if not fresh and loading is not None and loading[1] == self._publishes:
                task = loading[0]
            else:
                task = asyncio.ensure_future(self._load(first, load))
                self._loading[first] = (task, self._publishes)
                task.add_done_callback(self._loaded)
            # shield: a listener that goes away does not cancel the read the others await
            block = await asyncio.shield(task)
        wires, parsed, framings = block
        if framed:
            if not framings:  # made for the first ListenBatches reader of the block, kept for all
                framings.append([frame(data) for data in wires])
                if self._blocks.get(first) is block:
                    self._block_bytes += sum(map(len, framings[0]))
            return framings[0][start - first :]
        if wire:
            return wires[start - first :]
        if not parsed:  # parsed for the first reader of messages (a facade), kept for all
            parsed.append([run_pb2.StreamEvent.FromString(data) for data in wires])
        return parsed[0][start - first :]

    def _loaded(self, task: asyncio.Task[Block]) -> None:
        for first, (loading, _) in list(self._loading.items()):
            if loading is task:
                del self._loading[first]
        if not task.cancelled():
            task.exception()  # retrieved: each listener still waiting got it raised

    async def _load(self, first: int, load: Loader) -> Block:
        if faults.ENABLED:  # tests hold it to see listeners share one read
            await faults.reached("broadcast.block_read")
        # The stored bytes are sent as they are: no event is parsed and serialized again.
        wires = await load(first, BLOCK)
        block: Block = (wires, [], [])
        if wires:
            # The log ends at its terminal event (nothing is appended after it): only a block's
            # last event can be one.
            self._note_final(run_pb2.StreamEvent.FromString(wires[-1]))
        if len(wires) == BLOCK or self.final is not None:
            # Complete for good (full, or holding the end of the log): keep it for the others,
            # the oldest kept ones first out past the byte budget.
            self._blocks[first] = block
            self._block_bytes += _block_size(block)
            while self._block_bytes > BLOCK_CACHE_BYTES and len(self._blocks) > 1:
                oldest = next(iter(self._blocks))
                self._block_bytes -= _block_size(self._blocks.pop(oldest))
        return block

    def _note_final(self, event: run_pb2.StreamEvent) -> None:
        if self.final is None and is_terminal(event):
            self.final = event.index


def _block_size(block: Block) -> int:
    return sum(map(len, block[0])) + sum(len(data) for framed in block[2] for data in framed)


def frame(wire: bytes) -> bytes:
    """An event's bytes as one `events` entry of a StreamEventBatch (field 1, length-delimited):
    a batch message is these joined."""
    return b"\x0a" + _varint(len(wire)) + wire


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class EventHub:
    def __init__(self) -> None:
        self._feeds: dict[str, RunFeed] = {}
        # Feeds held by the Create of their run (`hold`), with the timer that lets each go.
        self._held: dict[str, tuple[RunFeed, asyncio.TimerHandle]] = {}
        self._expiring: set[asyncio.Future[None]] = set()  # held at HOLD_EXPIRY (tests)

    def publish(self, events: Sequence[run_pb2.StreamEvent]) -> None:
        """Store callback, after commit: events of one or more runs, in index order per run."""
        by_run: dict[str, list[run_pb2.StreamEvent]] = {}
        for event in events:
            by_run.setdefault(event.run_id, []).append(event)
        for run_id, run_events in by_run.items():
            feed = self._feeds.get(run_id)
            if feed is not None:
                feed.publish(run_events)
                if feed.final is not None and run_id in self._held:
                    self._release(run_id)

    def watched(self) -> Collection[str]:
        """The runs with live subscribers (Listen and Wait): a live view, `in` is a dict lookup.
        A store shared by replicas reads another replica's commits only for these; a subscriber
        reads the store from its own position after subscribing, so whatever was committed
        before (and not read here) it reads itself."""
        return self._feeds.keys()

    @contextmanager
    def subscribe(self, run_id: str) -> Iterator[RunFeed]:
        feed = self.open(run_id)
        try:
            yield feed
        finally:
            self.leave(run_id, feed)

    def open(self, run_id: str) -> RunFeed:
        """One more subscriber of the run's feed (made if it has none); give it back with `leave`."""
        feed = self._feeds.get(run_id)
        if feed is None:
            feed = self._feeds[run_id] = RunFeed()
        feed.subscribers += 1
        return feed

    def leave(self, run_id: str, feed: RunFeed) -> None:
        feed.subscribers -= 1
        if feed.subscribers == 0:
            del self._feeds[run_id]
            feed.close()

    def hold(self, run_id: str) -> RunFeed:
        """The feed of a run about to be created here, subscribed before its insert commits, so
        that its events from index 0 on are in the tail for the listener that follows Create's
        answer (no read of the store, no project check: see `known`). Let go with `let_go`."""
        return self.open(run_id)

    def let_go(self, run_id: str, feed: RunFeed, project: str | None, seconds: float) -> None:
        """Ends a `hold`: now if `project` is None (the run was not created, or not started
        here), else at its terminal event or after `seconds`, whichever comes first (a feed
        nobody listens to is not kept for long), the run known meanwhile to be in `project`."""
        if project is None or feed.final is not None:
            self.leave(run_id, feed)
            return
        feed.project = project
        self._held[run_id] = (feed, asyncio.get_running_loop().call_later(seconds, self._expire, run_id))

    def _expire(self, run_id: str) -> None:
        if faults.ENABLED and faults.configured(HOLD_EXPIRY):  # tests keep the hold until released
            task = asyncio.ensure_future(self._expire_when_reached(run_id))
            self._expiring.add(task)
            task.add_done_callback(self._expiring.discard)
            return
        self._release(run_id)

    async def _expire_when_reached(self, run_id: str) -> None:
        await faults.reached(HOLD_EXPIRY)
        self._release(run_id)

    def _release(self, run_id: str) -> None:
        held = self._held.pop(run_id, None)
        if held is not None:
            feed, timer = held
            timer.cancel()
            feed.project = None
            self.leave(run_id, feed)
