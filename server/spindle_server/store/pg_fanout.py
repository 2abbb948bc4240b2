"""Events committed by other replicas, delivered to this replica's listeners.

A transaction that appends events sends `NOTIFY spindle_events, '<run_id> <last_index>'`; the
notification is delivered at commit, so it is only ever a hint that committed rows exist.
Each store keeps one LISTEN connection. On a hint for a run this replica watches, it reads the
events after the last one it published for that run from the table and hands them to the
listeners in index order. Events this replica committed itself go through the same gate
(`publish`), which drops what was already delivered, so whichever path comes first delivers and
the other is a no-op: no duplicates, and a hint that overtakes its own commit's return is fine.

The LISTEN connection is re-opened after any disconnect; notifications sent while it was down
are lost, so each (re)connect is followed by a catch-up read of every watched run.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Collection, Sequence

import asyncpg
import structlog

from spindle.v1 import run_pb2
from spindle_server import faults
from spindle_server.store.base import EventsListener

log = structlog.get_logger(__name__)

CHANNEL = "spindle_events"
READ_BATCH = 512
# A watched run this replica has delivered nothing for: at catch-up, publish its newest events
# (enough to wake Listen and Wait, which then read the store from their own position).
UNKNOWN_CATCHUP = 32
MAX_TRACKED = 100_000  # positions kept; past it they are forgotten (only costs re-reads)
RECONNECT_DELAY = 0.5

# (run_id, first index, limit) -> events in index order
ReadEvents = Callable[[str, int, int], Awaitable[list[run_pb2.StreamEvent]]]
# run_id -> next event index (0 for an unknown run)
ReadNextIndex = Callable[[str], Awaitable[int]]


def hint(run_id: str, last_index: int) -> str:
    return f"{run_id} {last_index}"


class EventFanout:
    def __init__(self, dsn: str, read_events: ReadEvents, read_next_index: ReadNextIndex) -> None:
        self._dsn = dsn
        self._read_events = read_events
        self._read_next_index = read_next_index
        self._listeners: list[EventsListener] = []
        self._watched: Callable[[], Collection[str]] | None = None
        self._next: dict[str, int] = {}  # run_id -> index of the next event to publish
        # run_id -> (lowest, highest) last_index hinted and not yet read; -1: "whatever is there"
        self._hints: dict[str, tuple[int, int]] = {}
        self._catchup = False
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._connection: asyncpg.Connection | None = None
        self.connected = asyncio.Event()  # set while the LISTEN connection is up
        self.connects = 0  # how many times it was (re)established

    def server_pid(self) -> int | None:
        """The backend of the LISTEN connection (tests terminate it)."""
        return None if self._connection is None else int(self._connection.get_server_pid())

    def add_listener(self, listener: EventsListener) -> None:
        self._listeners.append(listener)

    def watch_runs(self, watched: Callable[[], Collection[str]] | None) -> None:
        """`watched()` is the runs that have local listeners; None means every run."""
        self._watched = watched

    def _is_watched(self, run_id: str) -> bool:
        return self._watched is None or run_id in self._watched()

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._listen_loop(), name="pg-listen"),
            asyncio.create_task(self._read_loop(), name="pg-fanout"),
        ]
        # The first connection is made before start() returns, so that no commit after it
        # can go unnoticed; later reconnects happen in the background.
        waiter = asyncio.create_task(self.connected.wait())
        done, _ = await asyncio.wait({waiter, self._tasks[0]}, return_when=asyncio.FIRST_COMPLETED)
        if waiter not in done:
            waiter.cancel()
            self._tasks[0].result()  # raises why the loop ended

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close(timeout=2)
            self._connection = None

    # ---- the one gate every delivery passes ----------------------------------------------

    def publish(self, events: Sequence[run_pb2.StreamEvent]) -> None:
        """Deliver the events not yet delivered, per run, in index order. A run whose events
        do not follow on from what was delivered (a later commit's answer came back first) is
        read from the table instead, which fills the gap."""
        fresh: list[run_pb2.StreamEvent] = []
        for event in events:
            expected = self._next.get(event.run_id)
            if expected is not None and event.index < expected:
                continue  # delivered already (by the other path)
            if expected is not None and event.index > expected:
                self._hint(event.run_id, event.index)
                continue
            fresh.append(event)
            self._next[event.run_id] = event.index + 1
        if not fresh:
            return
        if len(self._next) > MAX_TRACKED:
            self._next.clear()
        for listener in self._listeners:
            try:
                listener(fresh)
            except Exception:
                log.exception("events_listener_failed")

    def _hint(self, run_id: str, last_index: int) -> None:
        low, high = self._hints.get(run_id, (last_index, last_index))
        self._hints[run_id] = (min(low, last_index), max(high, last_index))
        self._wake.set()

    # ---- LISTEN connection -----------------------------------------------------------------

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        run_id, _, last = payload.rpartition(" ")
        with contextlib.suppress(ValueError):
            self._hint(run_id, int(last))

    async def _listen_loop(self) -> None:
        first = True
        while True:
            if faults.ENABLED:
                await faults.reached("pg.listen_connect")
            lost = asyncio.Event()
            try:
                connection = await asyncpg.connect(self._dsn)
                connection.add_termination_listener(lambda _c, lost=lost: lost.set())
                await connection.add_listener(CHANNEL, self._on_notify)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                if first:
                    raise
                log.warning("pg_listen_connect_failed", error=str(exc))
                await asyncio.sleep(RECONNECT_DELAY)
                continue
            first = False
            self._connection = connection
            self.connects += 1
            self.connected.set()
            if self.connects > 1:
                log.info("pg_listen_reconnected")
            # Anything committed while no connection listened was not hinted: read it all.
            self._catchup = True
            self._wake.set()
            await lost.wait()
            self.connected.clear()
            self._connection = None
            log.warning("pg_listen_connection_lost")
            with contextlib.suppress(Exception):
                connection.terminate()

    # ---- reading what was hinted -----------------------------------------------------------

    async def _read_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            hints, self._hints = self._hints, {}
            if self._catchup:
                self._catchup = False
                watched = list(self._watched()) if self._watched is not None else list(self._next)
                for run_id in watched:
                    hints[run_id] = (-1, -1)  # whatever is there
            for run_id, (low, high) in hints.items():
                try:
                    await self._catch_up(run_id, low, high)
                except Exception as exc:  # the database is away: keep the hint for later
                    log.warning("pg_fanout_read_failed", run_id=run_id, error=str(exc))
                    self._hint(run_id, low)
                    self._hint(run_id, high)
                    await asyncio.sleep(RECONNECT_DELAY)

    async def _catch_up(self, run_id: str, low: int, high: int) -> None:
        if not self._is_watched(run_id):
            self._next.pop(run_id, None)  # nobody here follows it: forget, and read nothing
            return
        start = self._next.get(run_id)
        if start is not None and 0 <= high < start:
            return  # delivered already (this replica committed it)
        if start is None:
            # Nothing delivered here yet: from the first hinted commit's last event on (Listen
            # and Wait read the store from their own position; from here on it is gap-free).
            # A catch-up without a hint: the newest few.
            start = low if low >= 0 else max(0, await self._read_next_index(run_id) - UNKNOWN_CATCHUP)
        while True:
            batch = await self._read_events(run_id, start, READ_BATCH)
            if not batch:
                return
            self.publish(batch)
            start = batch[-1].index + 1
            if len(batch) < READ_BATCH:
                return
