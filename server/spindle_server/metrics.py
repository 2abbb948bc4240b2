"""Prometheus metrics: every definition, the run-life observer and the HTTP endpoint.

Recording sites stay one line each and cheap: a gRPC call adds to plain numbers its method's
RpcStats holds (made once, at registration), exported by a collector at scrape time; the
other label children are resolved once (per provider, per status) and cached.
The metrics live in prometheus_client's default registry, which also carries the process
collectors (memory, CPU, open files) that operators expect next to them.

Several replicas on one PostgreSQL: every figure is the replica's own (sum them across replicas:
calls it answered, Listen streams it holds, model calls it made, its commits, and the runs whose
end it wrote), except spindle_runs_active, which counts the shared table and so is the same
global figure on every replica (take one replica's, or max, never the sum).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sqlite3
import threading
import time
from bisect import bisect_left
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterable, Sequence
from contextlib import aclosing
from itertools import accumulate
from pathlib import Path
from typing import Any, Protocol, TypeVar
from wsgiref.simple_server import WSGIServer

from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import (
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    Metric,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from spindle.v1 import run_pb2
from spindle_server.engine.events import is_terminal
from spindle_server.models.base import ModelChunk, ModelError, ModelRequest
from spindle_server.store.base import ACTIVE_STATUSES, TERMINAL_STATUSES

# No `*_created` series: a timestamp per label set that Prometheus does not need.
disable_created_metrics()

# Seconds: sub-millisecond key lookups up to calls that wait (Wait, Listen) for minutes.
_CALL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0, 120.0, 600.0)
# Seconds: a run or a model call takes from a fraction of a second to many minutes.
_RUN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0)
# Writes per commit: the writer takes at most store.sqlite_db.MAX_BATCH (256) at once.
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

RUNS_ENDED = Counter("spindle_runs_ended", "Runs that reached a terminal status, by that status", ["status"])
RUN_SECONDS = Histogram(
    "spindle_run_duration_seconds",
    "Time from a run's creation to its terminal status",
    buckets=_RUN_BUCKETS,
)
FIRST_EVENT_SECONDS = Histogram(
    "spindle_run_time_to_first_event_seconds",
    "Time from a run's creation to its first model output (text, tool call or reply) in the event log",
    buckets=_RUN_BUCKETS,
)
LISTEN_STREAMS = Gauge("spindle_listen_streams", "Listen streams open now")
MODEL_CALL_SECONDS = Histogram(
    "spindle_model_call_duration_seconds",
    "Time of one model call (request to end of its stream, retries included), by provider",
    ["provider"],
    buckets=_RUN_BUCKETS,
)
MODEL_ERRORS = Counter(
    "spindle_model_call_errors", "Model calls that failed, by provider and error code", ["provider", "code"]
)
STORE_COMMIT_SECONDS = Histogram(
    "spindle_store_commit_duration_seconds",
    "Time of one batch transaction of the store's writer (BEGIN to COMMIT, fsync included)",
    buckets=_CALL_BUCKETS,
)
STORE_BATCH_WRITES = Histogram(
    "spindle_store_commit_batch_size", "Writes committed together in one transaction", buckets=_BATCH_BUCKETS
)


# ---- RPCs (api/interceptor.py) -----------------------------------------------------------------

_RPCS_HELP = "gRPC calls answered, by full method name and status code"
_RPC_SECONDS_HELP = (
    "Time from a call's arrival to its answer (for Listen, the stream's whole life), by method"
)
_RPC_BOUNDS = (*_CALL_BUCKETS, math.inf)
_RPC_LE = tuple(floatToGoString(bound) for bound in _RPC_BOUNDS)


class RpcStats:
    """One method's calls by status code and its latency histogram, as plain numbers: recorded
    on the event loop only (the interceptor's one thread), so no lock, no label lookup and no
    prometheus_client value objects per call (about 3 us a call less than a Counter and a
    Histogram child); `RpcCollector` exports them as spindle_rpcs_total and
    spindle_rpc_duration_seconds at scrape time."""

    __slots__ = ("buckets", "codes", "method", "seconds")

    def __init__(self, method: str) -> None:
        self.method = method
        self.codes: dict[str, int] = {}
        self.buckets = [0] * len(_RPC_BOUNDS)  # per bucket, not cumulative (as prometheus_client)
        self.seconds = 0.0

    def record(self, code: str, seconds: float) -> None:
        codes = self.codes
        codes[code] = codes.get(code, 0) + 1
        self.buckets[bisect_left(_RPC_BOUNDS, seconds)] += 1
        self.seconds += seconds


class RpcCollector:
    """Exports every method's RpcStats. A scrape reads them from its own thread while calls
    go on: each figure is whole (the GIL), and the histogram's count is its buckets' sum, so
    count and buckets always agree (the sum may be one call behind, as prometheus_client's
    own histograms may)."""

    def __init__(self) -> None:
        self._methods: dict[str, RpcStats] = {}

    def stats(self, method: str) -> RpcStats:
        """The method's figures, made once (at registration) and kept: bounded label sets."""
        found = self._methods.get(method)
        if found is None:
            found = self._methods[method] = RpcStats(method)
        return found

    def describe(self) -> Iterable[Metric]:
        return [
            CounterMetricFamily("spindle_rpcs", _RPCS_HELP, labels=["method", "code"]),
            HistogramMetricFamily("spindle_rpc_duration_seconds", _RPC_SECONDS_HELP, labels=["method"]),
        ]

    def collect(self) -> Iterable[Metric]:
        calls = CounterMetricFamily("spindle_rpcs", _RPCS_HELP, labels=["method", "code"])
        latency = HistogramMetricFamily("spindle_rpc_duration_seconds", _RPC_SECONDS_HELP, labels=["method"])
        for method, stats in list(self._methods.items()):
            buckets = stats.buckets[:]  # one C-level copy: a consistent set of buckets
            if not any(buckets):
                continue  # registered but never called: no series, as before
            for code, count in list(stats.codes.items()):
                calls.add_metric([method, code], count)
            cumulative = list(accumulate(buckets))
            latency.add_metric([method], list(zip(_RPC_LE, cumulative, strict=True)), stats.seconds)
        return [calls, latency]


RPCS = RpcCollector()
REGISTRY.register(RPCS)


def rpc_stats(method: str) -> RpcStats:
    return RPCS.stats(method)


def record_rpc(method: str, code: str, seconds: float) -> None:
    RPCS.stats(method).record(code, seconds)


# ---- store (store/sqlite_db.py, on the writer thread) ------------------------------------------


def record_commit(began: float, writes: int) -> None:
    """One batch commit that started at `began` (time.perf_counter())."""
    STORE_COMMIT_SECONDS.observe(time.perf_counter() - began)
    STORE_BATCH_WRITES.observe(writes)


class CacheCounts:
    """Lookups in the SQLite store's cache of run bodies (store/sqlite_cache.py), as plain
    numbers added to on the event loop (no lock, no value object per Get), exported at scrape
    time by `CacheCollector`."""

    __slots__ = ("hits", "misses")

    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0


class CacheCollector:
    def __init__(self, counts: CacheCounts) -> None:
        self._counts = counts

    def describe(self) -> Iterable[Metric]:
        return self.collect()

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(
            "spindle_store_run_cache_lookups",
            "Run bodies looked up in the SQLite store's memory (RunService.Get), by result:"
            " hit, or miss (not kept, or a write in flight: read from the file)",
            labels=["result"],
        )
        family.add_metric(["hit"], self._counts.hits)
        family.add_metric(["miss"], self._counts.misses)
        return [family]


RUN_CACHE = CacheCounts()
REGISTRY.register(CacheCollector(RUN_CACHE))


# ---- model calls (models/*_backend.py) ---------------------------------------------------------


class _NamedBackend(Protocol):
    @property
    def name(self) -> str: ...


B = TypeVar("B", bound=_NamedBackend)
StreamMethod = Callable[[B, ModelRequest], AsyncGenerator[ModelChunk, None]]


def timed_model_call(stream: StreamMethod[B]) -> StreamMethod[B]:
    """Decorates a backend's `stream`: its duration by provider, and its ModelError codes.
    A call abandoned by its consumer (a cancelled run) is neither a success nor an error."""

    async def timed(self: B, request: ModelRequest) -> AsyncGenerator[ModelChunk, None]:
        began = time.perf_counter()
        try:
            async with aclosing(stream(self, request)) as chunks:
                async for chunk in chunks:
                    yield chunk
        except ModelError as exc:
            MODEL_ERRORS.labels(self.name, exc.code).inc()
            MODEL_CALL_SECONDS.labels(self.name).observe(time.perf_counter() - began)
            raise
        MODEL_CALL_SECONDS.labels(self.name).observe(time.perf_counter() - began)

    return timed


# ---- runs (the store's events listener) --------------------------------------------------------

_EventType = run_pb2.StreamEvent
_FIRST_OUTPUT = frozenset(
    {_EventType.PARTIAL_MESSAGE, _EventType.TOOL_CALL_DELTA, _EventType.TOOL_CALLS, _EventType.DONE}
)
_ENDED: dict[int, Counter] = {
    status: RUNS_ENDED.labels(name)
    for name, status in run_pb2.RunStatus.items()
    if status in TERMINAL_STATUSES
}
# Runs followed at once; past it new runs go unmeasured (not unbounded memory) until some end.
MAX_TRACKED_RUNS = 100_000


def _seconds(stamp: Timestamp) -> float:
    return stamp.seconds + stamp.nanos * 1e-9


class RunObserver:
    """Follows runs through the events every commit publishes (Store.add_events_listener).

    A run's creation time comes from its STATUS events (they carry the run). Only runs whose
    first event (index 0, written by Create) this process saw are timed to their first output:
    a run taken over after a restart has had output before. Its terminal event gives the end
    count and the duration. Events carry the time the store wrote them, so both figures are
    what a client reading the log would measure.
    """

    def __init__(self) -> None:
        self._created: dict[str, float] = {}  # run id -> creation time, until its end is seen
        self._awaiting_output: set[str] = set()  # created here, no output event yet

    def __call__(self, events: Sequence[run_pb2.StreamEvent]) -> None:
        for event in events:
            kind = event.type
            if kind == _EventType.PARTIAL_MESSAGE or kind == _EventType.TOOL_CALL_DELTA:
                if event.run_id in self._awaiting_output:
                    self._first_output(event)
                continue  # the bulk of events: one set lookup
            if (
                kind == _EventType.STATUS
                and event.run_id not in self._created
                and len(self._created) < MAX_TRACKED_RUNS
            ):
                self._created[event.run_id] = _seconds(event.status_change.run.created_at)
                if event.index == 0:
                    self._awaiting_output.add(event.run_id)
            if kind in _FIRST_OUTPUT and event.run_id in self._awaiting_output:
                self._first_output(event)
            if is_terminal(event):
                self._ended(event)

    def _first_output(self, event: run_pb2.StreamEvent) -> None:
        self._awaiting_output.discard(event.run_id)
        created = self._created.get(event.run_id)
        if created is not None:
            FIRST_EVENT_SECONDS.observe(max(_seconds(event.created_at) - created, 0.0))

    def _ended(self, event: run_pb2.StreamEvent) -> None:
        _ENDED[event.status].inc()
        self._awaiting_output.discard(event.run_id)
        created = self._created.pop(event.run_id, None)
        if created is not None:
            RUN_SECONDS.observe(max(_seconds(event.created_at) - created, 0.0))


# ---- runs active now (read from the database at each scrape) ---------------------------------

_ACTIVE_NAMES = {status: name for name, status in run_pb2.RunStatus.items() if status in ACTIVE_STATUSES}
_ACTIVE_HELP = "Runs not finished yet, by status (PENDING, IN_PROGRESS, TOOL_CALLS, CANCELLING)"


class ActiveRuns:
    """`spindle_runs_active{status}`, counted by the database when Prometheus scrapes.

    Not kept from events: runs queued or waiting for tools before this process started would
    be missed until they moved. A count over the status index is cheap, and scrapes are rare.
    Runs on prometheus_client's HTTP thread, with a read-only connection of its own.
    """

    def __init__(self, database: Path) -> None:
        self._uri = database.resolve().as_uri() + "?mode=ro"

    def describe(self) -> Iterable[Metric]:
        return [GaugeMetricFamily("spindle_runs_active", _ACTIVE_HELP, labels=["status"])]

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily("spindle_runs_active", _ACTIVE_HELP, labels=["status"])
        try:
            counts = self._count()
        except sqlite3.Error:
            return []  # no figure rather than a wrong one (the scrape still answers)
        for status, name in _ACTIVE_NAMES.items():
            family.add_metric([name], counts.get(status, 0))
        return [family]

    def _count(self) -> dict[int, int]:
        with contextlib.closing(sqlite3.connect(self._uri, uri=True, timeout=1.0)) as connection:
            marks = ",".join("?" * len(_ACTIVE_NAMES))
            rows = connection.execute(
                f"SELECT status, COUNT(*) FROM runs WHERE status IN ({marks}) GROUP BY status",
                tuple(_ACTIVE_NAMES),
            )
            return {status: count for status, count in rows}


ACTIVE_READ_FAILURES = Counter(
    "spindle_runs_active_read_failures",
    "Scrapes whose count of active runs from the shared database failed (no gauge in that scrape)",
)
# Every replica's scrape counts the same shared table: one count serves the scrapes this close.
SHARED_ACTIVE_TTL = 1.0
SHARED_ACTIVE_TIMEOUT = 2.0
CountActive = Callable[[], Coroutine[Any, Any, dict[int, int]]]


class SharedActiveRuns:
    """`spindle_runs_active{status}` from a database shared by replicas (PostgreSQL): the same
    global figure on every replica, counted at scrape time by the store on the server's event
    loop (its pool), kept for `ttl` seconds so that N replicas times M scrapers do not each count.
    A count that fails or takes longer than `timeout` is counted in
    spindle_runs_active_read_failures_total and leaves the gauge out of that scrape."""

    def __init__(
        self,
        count: CountActive,
        loop: asyncio.AbstractEventLoop,
        ttl: float = SHARED_ACTIVE_TTL,
        timeout: float = SHARED_ACTIVE_TIMEOUT,
    ) -> None:
        self._count = count
        self._loop = loop
        self._ttl = ttl
        self._timeout = timeout
        self._lock = threading.Lock()  # prometheus_client serves scrapes on several threads
        self._cached: tuple[float, dict[int, int]] | None = None

    def describe(self) -> Iterable[Metric]:
        return [GaugeMetricFamily("spindle_runs_active", _ACTIVE_HELP, labels=["status"])]

    def collect(self) -> Iterable[Metric]:
        counts = self._counts()
        if counts is None:
            return []
        family = GaugeMetricFamily("spindle_runs_active", _ACTIVE_HELP, labels=["status"])
        for status, name in _ACTIVE_NAMES.items():
            family.add_metric([name], counts.get(status, 0))
        return [family]

    def _counts(self) -> dict[int, int] | None:
        with self._lock:
            now = time.monotonic()
            if self._cached is not None and now - self._cached[0] < self._ttl:
                return self._cached[1]
            future = asyncio.run_coroutine_threadsafe(self._count(), self._loop)
            try:
                counts = future.result(timeout=self._timeout)
            except Exception:  # down, slow, or the loop is gone: a failure counted, not raised
                future.cancel()
                ACTIVE_READ_FAILURES.inc()
                return None
            self._cached = (time.monotonic(), counts)
            return counts


# ---- the endpoint ------------------------------------------------------------------------------


class MetricsEndpoint:
    """prometheus_client's HTTP server (a thread of its own) on HOST:PORT; port 0 picks one."""

    def __init__(self, host: str, port: int, database: Path | None) -> None:
        # "[::1]" is how the gRPC flag spells an IPv6 address; a socket wants it bare.
        self._server: WSGIServer
        self._thread: threading.Thread
        self._active: ActiveRuns | SharedActiveRuns | None = None
        if database is not None:
            self._active = ActiveRuns(database)
        if self._active is not None:
            REGISTRY.register(self._active)
        try:
            self._server, self._thread = start_http_server(port, addr=host.strip("[]"))
        except BaseException:
            self._unregister()
            raise
        self.port: int = self._server.server_port

    def add_active_runs(self, collector: SharedActiveRuns) -> None:
        """The active-runs gauge of a shared database, once its store is up."""
        if self._active is None:
            REGISTRY.register(collector)
            self._active = collector

    def _unregister(self) -> None:
        if self._active is not None:
            REGISTRY.unregister(self._active)
            self._active = None

    def close(self) -> None:
        """Blocks until the serving thread is gone (up to its half-second poll interval)."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        self._unregister()
