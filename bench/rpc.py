"""RPC speed of the Spindle server, as ratios against a bare grpc.aio echo server (uvloop) measured
in the same run (the machines are shared and noisy: absolute numbers mean little, ratios travel).

Unary rows: h2load (bench/h2load.py) drives the same load shape at Spindle and at the echo server
in turns, window by window; each figure is the median of the windows. Every window is verified
(h2load counts any HTTP 200, gRPC errors included): the DATA bytes must be whole responses, and
Spindle's own metrics must count no call of the method with any status but OK.

The whole-run row needs a streaming Listen, which h2load cannot follow: several Python client
processes (bench/rpc_client.py) run thread + Create + Listen to DONE in loops for the same
window, and the figure is compared with the echo's calls/s at the same number in flight.

Every Spindle row is measured twice where PostgreSQL is installed: on a SQLite server and on a
server whose database is a private PostgreSQL cluster this benchmark starts and stops
(bench/_postgres.py); both take their turns in the same windows as the echo, and PostgreSQL's
processes' CPU is counted apart from the server's.
"""

from __future__ import annotations

import contextlib
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from bench import _mode, _pg_floor, _postgres, h2load, rpc_client
from bench._server import BenchServer, ServedProcess, echo_server
from bench.load import cpu_seconds
from spindle.v1 import (
    assistant_pb2,
    assistant_pb2_grpc,
    message_pb2,
    run_pb2,
    run_pb2_grpc,
    thread_pb2,
    thread_pb2_grpc,
)

ECHO = "/bench.Echo/Echo"
FLOOR = "/bench.Echo/GetRun"  # protobuf in and out, the Run from memory: Get's floor
DURABLE_FLOOR = "/bench.Echo/Append"  # the request committed to SQLite, then echoed: Create's floor
PG_READ_FLOOR = "/bench.Echo/PgGet"  # the Run's row read from PostgreSQL: Get's floor there
PG_DURABLE_FLOOR = "/bench.Echo/PgAppend"  # the request committed to PostgreSQL: Create's floor there
GET = "/spindle.v1.RunService/Get"
CREATE_MESSAGE = "/spindle.v1.MessageService/Create"
# Spindle as an operator runs it: access log at info (errors and slow calls), metrics served.
SERVER_FLAGS = ("--log-level", "info", "--metrics-port", "0")
CLIENT_PROCESSES = 4
CLIENT_CONCURRENCY = 4  # whole runs in flight in each client process


def windows() -> int:
    return _mode.sized(5, 1)


def window_seconds() -> float:
    return _mode.seconds(3.0, 0.25)


def read_load() -> h2load.Load:
    return h2load.Load(connections=1, streams=16, seconds=window_seconds())


def create_loads() -> tuple[h2load.Load, ...]:
    return (
        h2load.Load(connections=1, streams=16, seconds=window_seconds()),
        h2load.Load(connections=4, streams=64, seconds=window_seconds()),
    )


@dataclass(frozen=True)
class Sample:
    """One window: calls (or runs) per second, the server's CPU time per call (or run), and
    PostgreSQL's (all its processes') when the server's database is there."""

    per_second: float
    cpu_us: float
    postgres_cpu_us: float | None = None


@dataclass(frozen=True)
class Row:
    name: str
    store: str  # "SQLite", "PostgreSQL", or "" for the floor (no Spindle in it)
    load: str
    windows: list[Sample]
    baseline: list[Sample]

    @property
    def per_second(self) -> float:
        return statistics.median(w.per_second for w in self.windows)

    @property
    def baseline_per_second(self) -> float:
        return statistics.median(w.per_second for w in self.baseline)

    @property
    def ratio(self) -> float:
        return self.per_second / self.baseline_per_second if self.baseline_per_second else 0.0

    @property
    def cpu_us(self) -> float:
        return statistics.median(w.cpu_us for w in self.windows)

    @property
    def postgres_cpu_us(self) -> float | None:
        figures = [w.postgres_cpu_us for w in self.windows if w.postgres_cpu_us is not None]
        return statistics.median(figures) if figures else None

    @property
    def baseline_cpu_us(self) -> float:
        return statistics.median(w.cpu_us for w in self.baseline)

    @property
    def cpu_ratio(self) -> float:
        """Echo's CPU per call over this one's: the throughput ratio one core would reach if
        the server were alone on it (steadier than calls/s while neighbours load the machine).
        PostgreSQL's processes are not in it: they run beside the server, on other cores."""
        return self.baseline_cpu_us / self.cpu_us if self.cpu_us else 0.0


@dataclass(frozen=True)
class Fixture:
    """What the load calls on, in one Spindle server: a finished run to read, a thread to
    write to, an assistant; and the exact request bytes with the size of their framed answer."""

    assistant_id: str
    run_id: str
    thread_id: str
    get_request: bytes
    get_response: bytes
    create_request: bytes

    @property
    def get_response_frame(self) -> int:
        return len(h2load.grpc_frame(self.get_response))


@dataclass(frozen=True)
class Spindle:
    """A Spindle server under load: its store's name, the process, what the load calls on, and
    the PostgreSQL cluster whose CPU is counted apart (None on SQLite)."""

    store: str
    served: ServedProcess
    fixture: Fixture
    cluster: _postgres.Cluster | None = None
    # Per method: the streams h2load reset at the end of the windows so far (each window at most
    # its in-flight count), less the CANCELLED calls the server has counted.
    cancel_allowance: dict[str, float] = field(default_factory=dict)

    def store_cpu_seconds(self) -> float:
        return self.cluster.cpu_seconds() if self.cluster is not None else 0.0

    def sample(self, per_second: float, calls: float, cpu: float, store_cpu: float) -> Sample:
        """A window's figures from its calls (or runs) and the CPU seconds they took."""
        calls = max(calls, 1)
        postgres_us = store_cpu / calls * 1e6 if self.cluster is not None else None
        return Sample(per_second, cpu / calls * 1e6, postgres_us)


@dataclass(frozen=True)
class EchoFixture:
    """The echo's request: Get's bytes, echoed back by the echo and answered by the floor with
    the Run Spindle answered (`floor_response_frame` bytes framed); and the PostgreSQL floors'
    cluster (None without them), whose read answers that Run's bytes as Spindle answered them."""

    request: bytes
    floor_response_frame: int
    cluster: _postgres.Cluster | None = None
    postgres_read_frame: int = 0


def prepare(address: str) -> Fixture:
    """Creates what the load needs with a real gRPC client, and makes one call of each loaded
    method with the exact bytes h2load will send: the answers must be OK, and give the size of
    a framed response for the windows' check."""
    with grpc.insecure_channel(address) as channel:
        assistant = assistant_pb2_grpc.AssistantServiceStub(channel).Create(
            assistant_pb2.CreateAssistantRequest(name="bench")
        )
        threads = thread_pb2_grpc.ThreadServiceStub(channel)
        runs = run_pb2_grpc.RunServiceStub(channel)
        thread = threads.Create(
            thread_pb2.CreateThreadRequest(messages=[message_pb2.MessageInput(text="hi")])
        )
        run = runs.Create(run_pb2.CreateRunRequest(assistant_id=assistant.id, thread_id=thread.id))
        runs.Wait(run_pb2.WaitRunRequest(run_id=run.id))
        notes = threads.Create(thread_pb2.CreateThreadRequest())
        get_request = run_pb2.GetRunRequest(run_id=run.id).SerializeToString()
        create_request = message_pb2.CreateMessageRequest(thread_id=notes.id, text="note").SerializeToString()
        got = channel.unary_unary(GET)(get_request)
        run_pb2.Run.FromString(got)
        message_pb2.Message.FromString(channel.unary_unary(CREATE_MESSAGE)(create_request))
    return Fixture(assistant.id, run.id, notes.id, get_request, got, create_request)


def prepare_echo(echo_address: str, spindle: Fixture, cluster: _postgres.Cluster | None) -> EchoFixture:
    """The echo answers Get's request bytes back; the floor answers Get's request with the Run
    that Spindle answered (given it once with `Remember`, which also writes it to PostgreSQL
    when the echo has its PostgreSQL floors: `cluster`)."""
    with grpc.insecure_channel(echo_address) as channel:
        assert channel.unary_unary(ECHO)(spindle.get_request) == spindle.get_request
        channel.unary_unary(f"{ECHO.rsplit('/', 1)[0]}/Remember")(spindle.get_response)
        floor = channel.unary_unary(FLOOR)(spindle.get_request)
        assert run_pb2.Run.FromString(floor) == run_pb2.Run.FromString(spindle.get_response)
        if cluster is None:
            return EchoFixture(spindle.get_request, len(h2load.grpc_frame(floor)))
        read = channel.unary_unary(PG_READ_FLOOR)(spindle.get_request)
        assert read == spindle.get_response, "PgGet must answer the Run's bytes as Spindle's Get did"
        assert channel.unary_unary(PG_DURABLE_FLOOR)(spindle.get_request) == spindle.get_request
    return EchoFixture(
        spindle.get_request, len(h2load.grpc_frame(floor)), cluster, len(h2load.grpc_frame(read))
    )


def rpc_counts(metrics_port: int, method: str) -> dict[str, float]:
    """Spindle's own count of `method`'s calls by status code (spindle_rpcs_total)."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    counts: dict[str, float] = {}
    pattern = re.compile(r"^spindle_rpcs_total\{(.*)\} (\S+)$")
    for line in text.splitlines():
        found = pattern.match(line)
        if found is None:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', found.group(1)))
        if labels.get("method") == method:
            counts[labels["code"]] = float(found.group(2))
    return counts


def _spindle_window(
    spindle: Spindle, method: str, request: bytes, load: h2load.Load, frame: int | None = None
) -> Sample:
    """One checked h2load window on Spindle. With `frame` (the size of every framed response,
    when all are alike), the DATA bytes are checked too."""
    served = spindle.served
    metrics_port = int(served.serving["metrics_port"])
    before = rpc_counts(metrics_port, method)
    cpu, store_cpu = cpu_seconds(served.pid), spindle.store_cpu_seconds()
    window = h2load.run(served.address, method, request, load)
    cpu, store_cpu = cpu_seconds(served.pid) - cpu, spindle.store_cpu_seconds() - store_cpu
    if frame is not None:
        window.check(frame)
    after = rpc_counts(metrics_port, method)
    errors = {code: after[code] - before.get(code, 0) for code in after if code != "OK"}
    # h2load resets the streams still in flight when its time is up: the server counts those
    # CANCELLED (the client went away), never more than were in flight. A call cancelled while
    # it waits on the store (a PostgreSQL lock) may be counted only in a later window: the bound
    # is on all the windows so far.
    allowed = spindle.cancel_allowance.get(method, 0) + load.in_flight
    if errors.get("CANCELLED", 0) <= allowed:
        spindle.cancel_allowance[method] = allowed - errors.pop("CANCELLED", 0)
    if any(errors.values()):
        raise RuntimeError(
            f"{method} on {spindle.store} answered errors under load: {errors}; the server's log ends:\n"
            + _log_tail(served)
        )
    answered = after.get("OK", 0) - before.get("OK", 0)
    if answered < window.succeeded:
        raise RuntimeError(f"{method}: h2load counted {window.succeeded} calls, the server {answered}")
    if window.failed or window.errored or window.succeeded == 0:
        raise RuntimeError(f"{method}: {window}")
    return spindle.sample(window.per_second, answered, cpu, store_cpu)


def _log_tail(served: ServedProcess, lines: int = 12) -> str:
    """The last lines of a bench server's log (its errors are logged at info, with their run id
    and detail), for a window that failed."""
    path = getattr(served, "log_path", None)
    if path is None or not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _echo_window(
    echo: ServedProcess,
    request: bytes,
    load: h2load.Load,
    method: str = ECHO,
    frame: int | None = None,
    cluster: _postgres.Cluster | None = None,
) -> Sample:
    """One checked h2load window on the echo server; with `cluster` (a PostgreSQL floor's), that
    cluster's CPU per call too, as for Spindle's PostgreSQL rows."""
    cpu = cpu_seconds(echo.pid)
    store_cpu = cluster.cpu_seconds() if cluster is not None else 0.0
    window = h2load.run(echo.address, method, request, load)
    cpu = cpu_seconds(echo.pid) - cpu
    window.check(len(h2load.grpc_frame(request)) if frame is None else frame)
    postgres_us = None
    if cluster is not None:
        postgres_us = (cluster.cpu_seconds() - store_cpu) / window.succeeded * 1e6
    return Sample(window.per_second, cpu / window.succeeded * 1e6, postgres_us)


def _postgres_floor_window(
    echo: ServedProcess, fixture: EchoFixture, load: h2load.Load, method: str
) -> Sample:
    """A PostgreSQL floor's window: the read answers the Run's bytes, the write echoes."""
    frame = fixture.postgres_read_frame if method == PG_READ_FLOOR else None
    return _echo_window(echo, fixture.request, load, method, frame, fixture.cluster)


def _whole_runs_window(spindle: Spindle, seconds: float, follow: str) -> Sample:
    """Whole runs from CLIENT_PROCESSES client processes started together, each following its
    runs with `follow` (Listen or ListenBatches)."""
    cpu, store_cpu = cpu_seconds(spindle.served.pid), spindle.store_cpu_seconds()
    runs, per_second = _client_runs(spindle.served.address, spindle.fixture.assistant_id, seconds, follow)
    cpu, store_cpu = cpu_seconds(spindle.served.pid) - cpu, spindle.store_cpu_seconds() - store_cpu
    return spindle.sample(per_second, runs, cpu, store_cpu)


def _floor_runs_window(echo: ServedProcess, assistant_id: str, seconds: float) -> Sample:
    """A whole run's calls on the bare echo (bench/rpc_client.py's `floor`), the same clients."""
    cpu = cpu_seconds(echo.pid)
    runs, per_second = _client_runs(echo.address, assistant_id, seconds, "floor")
    return Sample(per_second, (cpu_seconds(echo.pid) - cpu) / max(runs, 1) * 1e6)


def _client_runs(address: str, assistant_id: str, seconds: float, follow: str) -> tuple[int, float]:
    """CLIENT_PROCESSES bench.rpc_client processes started together: runs, and runs/s."""
    # Each process imports grpc first; they then start at once (a smoke run: one, at once).
    start_at = time.time() + _mode.seconds(1.5, 0.0)
    command = [sys.executable, "-m", "bench.rpc_client", address, assistant_id]
    arguments = [str(start_at), str(seconds), str(CLIENT_CONCURRENCY), follow]
    processes = [
        subprocess.Popen([*command, *arguments], stdout=subprocess.PIPE, text=True)
        for _ in range(_mode.sized(CLIENT_PROCESSES, 1))
    ]
    # The server's CPU, read around this, includes the clients' connecting: a little more, never less.
    results = []
    for process in processes:
        out, _ = process.communicate(timeout=seconds + 120)
        if process.returncode != 0:
            raise RuntimeError(f"bench.rpc_client failed ({process.returncode})")
        results.append(json.loads(out))
    runs = sum(r["runs"] for r in results)
    return runs, runs / max(r["seconds"] for r in results)


GET_NAME = "RunService.Get (read)"
CREATE_NAME = "MessageService.Create (durable write)"
DURABLE_FLOOR_NAME = (
    "floor of a durable write: bare grpc.aio method committing its request to SQLite (WAL,"
    " synchronous=FULL, one writer thread, a loop turn's requests in one INSERT), then echoing it"
)
PG_READ_FLOOR_NAME = (
    f"floor of a PostgreSQL read: bare grpc.aio method reading one row through an asyncpg pool of"
    f" {_pg_floor.POOL_MAX} connections (the request parsed, the row's bytes answered)"
)
PG_DURABLE_FLOOR_NAME = (
    "floor of a PostgreSQL durable write: bare grpc.aio method committing its request with one"
    f" INSERT in its own transaction (WAL flushed) through an asyncpg pool of {_pg_floor.POOL_MAX}"
    " connections, then echoing it"
)
PG_FLOOR_NAMES = (PG_READ_FLOOR_NAME, PG_DURABLE_FLOOR_NAME)
WHOLE_NAME = "whole run: thread + Create + Listen to DONE (runs/s, vs echo calls/s)"
WHOLE_BATCHES_NAME = (
    "whole run: thread + Create + ListenBatches to DONE, as the client SDK follows a run"
    " (runs/s, vs echo calls/s)"
)
WHOLE_RUNS = {WHOLE_NAME: "Listen", WHOLE_BATCHES_NAME: "ListenBatches"}
FLOOR_WHOLE_NAME = (
    f"floor of a whole run: its calls on the bare echo (2 unary calls, a stream of {rpc_client.FLOOR_EVENTS}"
    f" {rpc_client.FLOOR_EVENT_BYTES}-byte messages), no work (runs/s, vs echo calls/s)"
)


def measure(spindles: list[Spindle], echo: ServedProcess) -> list[Row]:
    """Every row's windows, in turns: per turn, each load shape on the echo and then on each
    Spindle server, then the whole runs on each; median of the turns."""
    cluster = next((spindle.cluster for spindle in spindles if spindle.cluster is not None), None)
    echo_fixture = prepare_echo(echo.address, spindles[0].fixture, cluster)
    get_load = read_load()
    loads = create_loads()
    echo_loads = sorted({get_load, *loads}, key=lambda x: x.in_flight)
    windows_of: dict[tuple[str, str, h2load.Load | None], list[Sample]] = {}

    def add(what: str, store: str, load: h2load.Load | None, sample: Sample) -> None:
        windows_of.setdefault((what, store, load), []).append(sample)

    # Connections (PostgreSQL's pool opens its connections as the load asks), caches, the first
    # allocations: by count, not time, so a slow first call cannot leave a warm-up window empty.
    warm = h2load.Load(1, 16, _mode.seconds(1.0, 0.2), requests=_mode.sized(2000, 100))
    _echo_window(echo, echo_fixture.request, warm)
    if cluster is not None:
        for method in (PG_READ_FLOOR, PG_DURABLE_FLOOR):
            _postgres_floor_window(echo, echo_fixture, warm, method)
    for spindle in spindles:
        f = spindle.fixture
        _spindle_window(spindle, GET, f.get_request, warm, f.get_response_frame)
        _spindle_window(spindle, CREATE_MESSAGE, f.create_request, warm)
    for _ in range(windows()):
        for load in echo_loads:
            add("echo", "", load, _echo_window(echo, echo_fixture.request, load))
            if load == get_load:
                floor = _echo_window(
                    echo, echo_fixture.request, load, FLOOR, echo_fixture.floor_response_frame
                )
                add("floor", "", load, floor)
            if load in loads:
                add(
                    DURABLE_FLOOR_NAME,
                    "",
                    load,
                    _echo_window(echo, echo_fixture.request, load, DURABLE_FLOOR),
                )
            if cluster is not None:
                if load == get_load:
                    add(
                        PG_READ_FLOOR_NAME,
                        "",
                        load,
                        _postgres_floor_window(echo, echo_fixture, load, PG_READ_FLOOR),
                    )
                if load in loads:
                    sample = _postgres_floor_window(echo, echo_fixture, load, PG_DURABLE_FLOOR)
                    add(PG_DURABLE_FLOOR_NAME, "", load, sample)
            for spindle in spindles:
                f = spindle.fixture
                if load == get_load:
                    sample = _spindle_window(spindle, GET, f.get_request, load, f.get_response_frame)
                    add(GET_NAME, spindle.store, load, sample)
                if load in loads:
                    sample = _spindle_window(spindle, CREATE_MESSAGE, f.create_request, load)
                    add(CREATE_NAME, spindle.store, load, sample)
        add(
            FLOOR_WHOLE_NAME,
            "",
            None,
            _floor_runs_window(echo, spindles[0].fixture.assistant_id, window_seconds()),
        )
        for name, follow in WHOLE_RUNS.items():
            for spindle in spindles:
                add(name, spindle.store, None, _whole_runs_window(spindle, window_seconds(), follow))

    def row(what: str, store: str, load: h2load.Load | None, baseline: h2load.Load) -> Row:
        described = (
            load.describe()
            if load is not None
            else f"{CLIENT_PROCESSES} Python client processes, {CLIENT_CONCURRENCY} runs in flight each"
        )
        return Row(
            what, store, described, windows_of[(what, store, load)], windows_of[("echo", "", baseline)]
        )

    stores = [spindle.store for spindle in spindles]
    in_flight = CLIENT_PROCESSES * CLIENT_CONCURRENCY
    echo_for_whole = next((x for x in echo_loads if x.in_flight == in_flight), get_load)
    rows = [
        Row(
            "floor: bare grpc.aio method with protobuf in and out, answering the same Run from memory",
            "",
            get_load.describe(),
            windows_of[("floor", "", get_load)],
            windows_of[("echo", "", get_load)],
        )
    ]
    # Each PostgreSQL floor next to the PostgreSQL row it is the floor of.
    for store in stores:
        if store == "PostgreSQL":
            rows.append(row(PG_READ_FLOOR_NAME, "", get_load, get_load))
        rows.append(row(GET_NAME, store, get_load, get_load))
    for load in loads:
        rows.append(row(DURABLE_FLOOR_NAME, "", load, load))
        for store in stores:
            if store == "PostgreSQL":
                rows.append(row(PG_DURABLE_FLOOR_NAME, "", load, load))
            rows.append(row(CREATE_NAME, store, load, load))
    rows.append(row(FLOOR_WHOLE_NAME, "", None, echo_for_whole))
    rows += [row(name, store, None, echo_for_whole) for name in WHOLE_RUNS for store in stores]
    return rows


def run_benchmark() -> list[Row]:
    """Against SQLite, and against PostgreSQL where it is installed (else said, and left out)."""
    with contextlib.ExitStack() as stack:
        durable_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="spindle-bench-floor-")))
        cluster = stack.enter_context(_postgres.Cluster()) if _postgres.available() else None
        # The echo's PostgreSQL floors on a database of their own in the same cluster.
        echo = stack.enter_context(echo_server(durable_dir, cluster.database() if cluster else None))
        sqlite = stack.enter_context(BenchServer(*SERVER_FLAGS))
        spindles = [Spindle("SQLite", sqlite, prepare(sqlite.address))]
        if cluster is not None:
            served = stack.enter_context(BenchServer(*SERVER_FLAGS, postgres=cluster.database()))
            spindles.append(Spindle("PostgreSQL", served, prepare(served.address), cluster))
            print(
                f"rpc speed: PostgreSQL {cluster.version()} on 127.0.0.1:{cluster.cluster.port}", flush=True
            )
        else:
            print(
                "rpc speed: PostgreSQL is not installed (apt-get install postgresql): SQLite only", flush=True
            )
        return measure(spindles, echo)


def markdown(rows: list[Row]) -> str:
    lines = [
        "| call | store | load | calls/s | echo calls/s | vs echo | server CPU per call (us) "
        "| PostgreSQL CPU per call (us) | echo's (us) | vs echo, by CPU | calls/s of each window |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        spread = ", ".join(f"{w.per_second:,.0f}" for w in row.windows)
        figures = f"{row.per_second:,.0f} | {row.baseline_per_second:,.0f} | **{row.ratio:.2f}**"
        postgres_us = f"{row.postgres_cpu_us:,.0f}" if row.postgres_cpu_us is not None else ""
        cpu = f"{row.cpu_us:,.0f} | {postgres_us} | {row.baseline_cpu_us:,.0f} | {row.cpu_ratio:.2f}"
        lines.append(f"| {row.name} | {row.store} | {row.load} | {figures} | {cpu} | {spread} |")
    return "\n".join(lines)


def versions() -> str:
    """Python, grpcio, SQLite, PostgreSQL, uvloop and h2load, as the section names them."""
    import platform
    import sqlite3

    import uvloop

    h2 = subprocess.run([h2load.H2LOAD, "--version"], capture_output=True, text=True).stdout.strip()
    postgres = f"PostgreSQL {_postgres.installed_version()}, " if _postgres.available() else ""
    return (
        f"Python {platform.python_version()}, grpcio {grpc.__version__}, SQLite {sqlite3.sqlite_version}, "
        f"{postgres}uvloop {uvloop.__version__}, {h2.removeprefix('h2load ')}"
    )


def machine() -> str:
    import os
    import platform

    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores ({model or platform.machine()}), {platform.system()} {platform.release()}"


METHOD = """\
Unary calls are driven by h2load (nghttp2's load generator, one C process, `bench/h2load.py`):
the same h2load command (connections x streams in flight, a pre-encoded request, `content-type:
application/grpc`, `te: trailers`) runs {seconds:g} s against the Spindle server and then against
a bare grpc.aio echo server on uvloop (`bench/echo_server.py`, one method that returns its bytes:
what any Python gRPC service costs here), in turns, {windows} turns; each figure is the median
of its turns, and each ratio is against the echo's median under the same load. Spindle runs as an
operator runs it: SQLite (synchronous=FULL: a durable write is one committed transaction;
concurrent writes share a commit), builtin model, `--log-level info` (errors and slow calls
logged) and metrics served (`--metrics-port`). h2load counts every HTTP 200 as a success and
gRPC errors are HTTP 200 too, so every window is checked: an error has no body, so h2load's DATA
bytes must be exactly the calls times the framed response (taken from a call with a real gRPC
client before the load; Get and echo), and Spindle's own `spindle_rpcs_total` must count no call
of the method with another status than OK (only CANCELLED, at most the streams in flight when
h2load stops, over the windows so far). A whole run (create a thread, create the run, Listen to
DONE: four calls and the engine's work) needs a stream h2load cannot follow: {processes} Python
client processes drive it (`bench/rpc_client.py`), compared with the echo's calls/s at the same
{in_flight} in flight.
The load column names what drove each row. Server CPU per call (from /proc, the server process
only) is the steadier figure while other work shares the 2 cores: the "by CPU" ratio is what the
throughput ratio would be with a core of its own. Source: `bench/rpc.py`.
"""

METHOD_POSTGRES = """\
The rows marked PostgreSQL are the same loads on a second Spindle server (the same flags) whose
database is a private PostgreSQL cluster the benchmark starts and stops (`bench/_postgres.py`:
initdb in a temporary folder on disk, fsync and synchronous_commit on, so a durable write is a
commit flushed to the WAL, like SQLite's synchronous=FULL; the server's default pool of 10
connections); the echo, the SQLite server and the PostgreSQL server take turns in the same
windows. Its "PostgreSQL CPU" is the whole cluster's (postmaster, backends, and the backends
that ended) over the server's calls: work SQLite does inside the server process, shown apart
because it runs beside the server, on the other core (the "by CPU" ratio leaves it out).
The two PostgreSQL floors are the echo server's methods making one round trip a call to the same
cluster (`bench/_pg_floor.py`, a database of their own, the store's default pool), in the same
windows; their PostgreSQL CPU is the cluster's over the floor's calls the same way.
"""


READING = """\
Reading it: issue 11 asks Get >= 0.85 of the echo, a durable Create >= 0.6 at 16 and at 256 in
flight, whole runs >= 0.15. A Create waits for its transaction's fsync (synchronous=FULL),
shared by the writes that arrived while the commit before it was on disk: the floor of a durable
write (below) measures what that write path costs alone, and the rest of a Create's cost is
Spindle's own work on it. A whole run is four calls plus the
engine's turn and its events to the listener: its server CPU per run is about {calls:.0f} echo
calls' (4.08 -> 3.25 ms per run with this session's engine and store changes, old and new builds
in alternating windows at load 5-6; four durable writes a run instead of seven). Engine and store
are under a fifth of it; most of the rest is gRPC's own work for the run's calls and its
messages (see store-throughput's Profile, which says what each part of a run is). Following the
run with ListenBatches (the client SDK's way) sends fewer messages but costs about the same: a
short reply is a handful of events, mostly written in separate commits. Where Get's remaining
distance to the goal goes, microsecond by microsecond, is in the Profile below.
"""

# Written when the changes were made (measured as it says); `make bench` does not re-run a profile.
PROFILE = """\
**Profile.** `py-spy record --gil --pid N` (and `--native`) on the server under h2load's load
(1 connection, 16 streams), then each suspect measured alone as server CPU per call (from
/proc, the whole process and its main thread) in alternating 2 s windows against the echo and
against the previous build: throughput ratios swung between 0.2 and 2 while neighbours loaded
the shared 2 cores, CPU per call stayed within a few percent. Most of the GIL time is grpc's
own Cython and C (completion queue, eventfd wake-ups, `sendmsg`, and its per-call
`asyncio.wait`), the same for the echo. Earlier rounds: the two `grpc.aio.ServerInterceptor`s
became one wrapper made once per method at registration (`CallInterceptor.registry` in
`api/interceptor.py`), the debug-log decision is taken once, the call's metadata read only when
a key or a logged request id needs it, `gc.freeze()` after start-up, and the store's read
(`SqliteDatabase.read_row`) one autocommit SELECT (`store.get_run` alone 7.6-8.0 -> 5.1-5.4
us): server CPU per Get 1/0.626 -> 1/0.674 of the echo's.

Then the "process-level" cost: the floor handler (protobuf in and out, the Run from memory)
registered inside the Spindle process cost 35-45 us more per call than in a bare process, and
neither grpc's options, the OpenAI endpoint, the imports nor the garbage collector explained it
(each switched off in turn: within the noise). What did: grpc registered methods. The generated
`add_*Servicer_to_server` register every method twice, as a generic handler and with
`add_registered_method_handlers`; grpc.aio serves a registered method with about 35 us more
server CPU than the same handler found through a generic handler (the floor registered both ways
in one process: 328 against 293 us, main thread 229 against 205), and a server with any
registered method costs its other calls too. Changed: the interceptor's registry keeps every
wrapped API method in one dict, the server's first generic handler (`_MethodTable`), and
registers none with grpc; health and reflection are added through a stand-in that forwards only
their generic handler (`server.py`). The floor inside Spindle's process now costs 3-9 us above
the bare one. On the call path itself: the unary wrapper no longer builds a call object, sets
the default project or tests the method name per call (bound once per method; a failing or
logged call still gets them, with its status, ErrorInfo and log line), and the call figures are
plain numbers per method (`metrics.RpcStats`, recorded on the event loop only) exported by a
collector at scrape time with the exposition prometheus_client's Counter and Histogram gave
(`spindle_rpcs_total`, `spindle_rpc_duration_seconds`; about 2-3 us a call less); a well-formed
id is one regular expression match (`validation.require_id`) and an enum's numbers are read once
(`EnumTypeWrapper.values()` built a list a call, visible in Create's samples). Before -> after,
old and new builds in alternating windows (8 each, medians, three runs): server CPU per Get
362 -> 309, 356 -> 305 and 378 -> 339 us against the echo's 244, 250 and 261 (by CPU 0.67-0.70
-> 0.77-0.82); per durable Create at 16 in flight 511 -> 488, 462 -> 412 and 621 -> 502 (0.42-0.54
-> 0.50-0.61), at 256 in flight 369 -> 309 against 231 (0.63 -> 0.75).

The limit for Get: in one run the floor in a bare process cost 239 us, the floor inside
Spindle's process 248 (242 with health and reflection generic too) and Get 295 (main
thread 153, 164, 206). So the 0.85 goal (281 us there)
is about 14 us away, all of it Spindle's per-call Python on the main thread: the wrapper, the id
check, the store's read (about 5 us alone), the Run's parse in the store and its serialization
back by grpc (5-8 us together for the bench's 358-byte Run, in a loop), the metrics (under 1 us),
about 15 us in a tight loop and 2-3 times that among grpc's own work. Then the store's part:
Get answers the stored Run bytes as they are (`Store.get_run_body`, the body column unparsed,
sent through the pass-through serializer Listen uses), without the parse and the serialization:
server CPU per Get 298 -> 286 us (16 alternating windows each, medians), the rest of those 14 us.
What remains above the floor is the wrapper, the id check and the read, about 40 us of Python
among grpc's work. Create: the main thread now costs about what Get's does; the
rest is the store's writer thread (80-145 us of CPU a call on its own thread: the insert, the
commit and the wake-up of the waiting call), which `store/sqlite_db.py` owns.

**Profile, Get's last microseconds.** Measured as server CPU per call (/proc, the whole process
and its main thread) in alternating 2 s h2load windows (1 connection, 16 streams) on the echo,
this build and the previous one, medians of 14-16 windows each, while two other benchmarks ran
(load average 5.5-13): throughput swung, CPU per call held within a few percent. Inside the
server under that load, the Get handler's own thread CPU (`time.thread_time` around it) was
30-34 us a call, of which the SQLite read (execute and fetchall) 18-22 us and the run id's check
4-6 us; the same work costs about 8 us in a tight loop: between grpc's work every line runs with
cold caches. Each suspect switched off alone, in the same windows: the wrapper (handler
registered bare) within the noise; grpc's options as the echo's (none), `grpc.http2.bdp_probe`
off or `grpc.optimization_target` throughput, within the noise; the read replaced by a dict of
bytes, 20-40 us less; the read replaced by `SELECT 1` on the same connection (the same sqlite3
calls and GIL releases, no table, no lock) 6 us above no read; the read done twice, 21 us more;
the read through ctypes holding the GIL, no better (its calls cost more than the GIL's
hand-offs). `strace -c -f`: the read's two `fcntl` (SQLite's WAL read-mark lock and unlock on
the -shm file, 2.3 us a pair in a tight loop on this VM) are the only system calls a Get adds to
the echo's 31 a call. Changed: the read is `SqliteDatabase.read_rows_now`, called at once by
`SqliteStore.get_run_body` (no coroutine below it; the reader pool still when the file is busy,
`tests/test_faults_storage.py` shows a Get doing so) on one kept cursor; Get has no response
serializer (grpc sends the bytes as they are, as the echo does); the run id is one bound regular
expression (`validation.id_test`) and `ApiKeys.needed` an attribute, not a property. The
handler's thread CPU in place went 30-34 -> 21-24 us; in three runs, server CPU per Get 293 ->
287, 289 -> 285 and 324 -> 316 us against the echo's 246, 238 and 270 (by CPU 0.84 -> 0.86, 0.82
-> 0.84 and 0.83 -> 0.85; the main thread 203 -> 191, 202 -> 193 and 219 -> 209 us against 152,
151 and 170; the floor 286 in the third). What is left above the echo, 40-47 us: the
read, 15-20 us in place (SQLite's b-tree and pager code and the two `fcntl`: a WAL reader must
take and drop a POSIX lock while other processes may open the file, as backups, the sqlite3
shell and the tests' read-only checks do; SQLite's unix-excl VFS, which keeps the WAL index in
the heap and makes the read 3.0 us instead of 5-8 in a tight loop, locks every other process
out, so it was left), the request's parse, the wrapper, the id check and the metrics, 3-5 us
(10-15 in place), and the larger response and protobuf request the floor row pays too (the
floor is 0.86-0.97 of the echo by CPU on its own).

**Profile, Get from memory.** The read above was most of what was left, and it could go: one
process owns the file (a `flock` on `<db>.lock`, refused to a second server) and every change
to it goes through the writer thread, so the store keeps the run bodies Get returns
(`store/sqlite_cache.py`, at most 4096 bodies and 8 MiB). The writer marks a batch in flight
before it runs anything and, after its COMMIT and before anyone is told, empties the cache and
bumps a generation; Get answers from memory only with no batch in flight, and a read (in place
or in the pool) is kept only if no batch ran between its start and the keeping (tests/
test_run_cache.py steers each window). A Get from memory is `Store.kept_run_body`, no coroutine,
before the id check, which only a read from the file needs (a kept id was read from the file).
Alternating 2 s h2load windows (1 connection, 16 streams) on the echo, the floor, this build and
main's, medians of 12 windows, load average 5-7: server CPU per Get 275 -> 248 us (echo 230,
floor 231; by CPU 0.84 -> 0.93 of the echo), calls/s 0.83 -> 0.89; in a run of 10 windows with
the cache alone as a third build, 275 (main) -> 248 (cache) -> 245 (and the kept body first),
echo 227. The marking costs every batch two uncontended locks and an empty dict's clear:
in two A/B runs of 8 and 10 windows, a durable Create at 16 in flight cost 410 -> 396 and
442 -> 406 us, a whole run 3.08 -> 3.24 and 3.45 -> 3.47 ms (runs/s 113 -> 125 and 125 -> 132),
all within the windows' spread. Left above the echo, about 18 us: the wrapper's clock and
metrics, the request's parse and the context variables, mostly paid by the floor too. `py-spy
record` (Python frames, 500 Hz, 8 s of h2load's Get load) finds the handler, the wrapper, the
request's parse and the metrics together in under 1% of the samples: the rest is grpc's and
uvloop's own code, as in the echo.
"""

# Written with the change it describes (measured as it says); `make bench` does not re-run it.
PROFILE_CREATE = """\
**Profile, durable Create (SQLite).** CPU per thread (`/proc/PID/task/*/stat`) under h2load's
Create load, the server of this change and main's in alternating 2 s windows with the echo: at
16 in flight the event loop's thread cost 280-290 us a call (the echo's 170), the store's writer
thread 120-130, grpc's poller 40-50. The writer's own SQLite work was the smaller part (a commit
of one message, measured alone: about 140 us of CPU, 55 user and 85 system, most of it the WAL's
`fdatasync`, and about 10 us for each further message in it; 2-3 writes shared a commit at 16 in
flight, by `spindle_store_commit_batch_size`). The rest was the interpreter lock: the writer
let it go and took it back around each statement, five a write (SAVEPOINT, the thread's check,
the active-run check, the INSERT, RELEASE) plus BEGIN and COMMIT, and each take-back waited for
the busy event loop (py-spy `--native`: the writer in `pthread_cond_timedwait` nearly as often
as in `fdatasync`; 2-4 voluntary context switches per call on the writer). Changed
(`store/sqlite.py`, `store/sqlite_db.py`): a message's insert is one statement with the
thread's existence and the active-run rule inside it (`INSERT ... SELECT ... WHERE EXISTS
(thread) AND NOT EXISTS (active run)`; the checks that say why run only for a message it
refused); the messages one batch commits are one multi-row statement of that kind
(`SqliteDatabase.write_row`: consecutive writes with one merge function run together, no
SAVEPOINT, since SQLite undoes a failed statement itself, and a refused message fails alone);
when they are the whole batch that statement runs in autocommit, its own transaction committed
with synchronous=FULL before it returns (no BEGIN and COMMIT); and the event loop hands the
writer each turn's writes as one list (one wake-up a turn). Statements on the writer for a
batch of N Creates: 5N + 2 -> 1. By how much, median server CPU per call of alternating 2 s
windows with main's server and the echo (three runs of 8-10 windows each, load average 2-10):
at 16 in flight 501 -> 454, 494 -> 456 and 501 -> 427 us against the echo's 259, 268 and 265
(by CPU 0.52 -> 0.57, 0.54 -> 0.59, 0.53 -> 0.62; calls/s 0.43 -> 0.52, 0.40 -> 0.38 and 0.46
-> 0.58 of the echo's); the writer thread 133 -> 99, 123 -> 86 and 130 -> 97 us. At 256 in
flight the CPU per call moved within the noise (404 -> 404, 410 -> 388, 411 -> 445 us: 0.65,
0.61 -> 0.65, 0.64 -> 0.59 by CPU) and calls/s rose (0.59 -> 0.64, 0.52 -> 0.54, 0.53 ->
0.62): there many writes already shared each commit's statements. A fourth run at load
average 1-3 (8 windows each) had both builds dearer per call (fewer writes share a commit and
fewer calls a wake-up when the machine is idle): 556 -> 513 us at 16 in flight (0.48 -> 0.52 by
CPU, the writer 149 -> 107 us) and 477 -> 474 at 256 (0.57; calls/s 0.42 -> 0.60). In one 3 s window at 16 in
flight the writer's CPU per call went 136 -> 80 us (user 64 -> 34, system 72 -> 46) and its
voluntary context switches 4.4 -> 2.3 a call; the event loop's thread 290 -> 241 us. What
remains at 16 in flight against the echo: about 95 us on the event loop's thread (the unary
wrapper, the handler's validation and new message, 15-20 us together in a tight loop, the
hand-over to the writer and the wake-up by its answer) and the writer's 80-100 us, nearly all
of it the commit: an `fdatasync` and the WAL's frames for the 2-3 writes that were waiting
(2-5 writes a commit at 16 in flight and 4-30 at 256 in these runs, main's alike, moving with
the machine's load), a cost of synchronous=FULL that only larger group commits would spread
further (a wait for more writes before each commit: not done, since every write of the engine
would wait too).

**Profile, Create's hand-off and answer.** Where the event loop's thread goes above the echo's,
at 16 in flight (6 alternating windows, load average 7): the echo's 151 us a call; Create with
the store's write replaced by a future answered at once, 193-201 (the wrapper, the request's
parse, validation and the new message: the same 40-50 us above the echo as Get's path); Create
with its write, 222. So the hand-over to the writer and the wake-up by its answer cost the
loop's thread about 25 us a call, and the writer about 100 us a call on its own thread. Its wall
time (py-spy `--native --idle`, 20 s): 64% waiting for work, 21% waiting to take the
interpreter lock back after a statement, 12% in `fdatasync`; it holds the lock 2% of the time.
Its CPU is the kernel's: per commit about 10 `pwrite` (5 WAL frames: the messages table, its
two indexes, and `sqlite_sequence`, since the table is AUTOINCREMENT), 6 `fcntl` (the WAL
index's locks), the `fdatasync`, and 2-3 context switches a call (the wake-up by the queue,
and sqlite3 lets the lock go around the step and again around the reset after it). Nothing in
it is O(batch) per write: one list a loop turn, one statement and one `call_soon_threadsafe` a
batch, a future per write (each call's task waits on its own), the statement's text cached by
row count; no validation is done twice (the thread's existence is checked inside the INSERT).
Changed (`api/threads.py`, `store/`): Create answers the message's bytes as the store wrote them
(`Store.insert_message` returns them; no response serializer, as Get), so grpc does not
serialize the same message again; without a request_id the handler awaits the write directly
(no idempotency coroutines), `SqliteDatabase.write_row` returns the write's future (two
coroutines fewer), and the new message gets its timestamp in place and no empty labels map.
The handler in a tight loop: 11.0 -> 9.0 us. A/B against main's server, four runs of 8, 10, 12
and 8 alternating 2 s windows at load average 3-8: server CPU per call at 16 in flight 407 ->
402, 426 -> 448, 449 -> 401 and 396 -> 385 us (the echo's 219, 257, 254, 232), at 256 in flight
328 -> 314, 310 -> 345, 378 -> 347 and 379 -> 337 (228, 253, 254, 243): a few percent, about
the noise of a busy machine (in the last run, the quietest, calls/s 0.60 -> 0.56 of the echo's
at 16 in flight and 0.63 -> 0.68 at 256); a whole run (Listen) 3,328 -> 3,396 us (128 -> 132
runs/s), the same. At 256 in flight each call was cheaper than at 16 in all these runs, for
both builds (more writes share a commit: the writer and grpc's poller 130-150 -> 80-100 us a
call): the last `make bench`'s reverse (387 against 349 us) was not
reproduced; at 256 in flight h2load resets up to 256 streams at the end of each window, whose
Creates commit and are logged CANCELLED without being counted (about 2.5% of a 3 s window's
calls there, 0.2% at 16). What remains is per batch: the writer's wake-ups, the lock's
hand-offs and the commit's `fdatasync`, shared by 2-3 writes at 16 in flight.

**Profile, Create above the floor.** With the floor of a durable write measured beside it,
Create's distance to the goal is its CPU above the floor's (per thread, from
`/proc/PID/task/*/stat`: at 16 in flight the event loop's thread about 205 against 151 us a
call, the writer 126 against 101). Three changes, each measured in alternating 2 s h2load
windows (echo, floor, the old build and the new, in a shuffled order each round; medians; load
average 4-9 while other benchmarks ran). The messages table lost AUTOINCREMENT
(`store/sqlite.py`): seq is a plain rowid, so a commit no longer writes `sqlite_sequence`'s page;
a database of an older version is rebuilt at start in the writer's first transaction with every
seq kept (a seq can now come back after the largest rows are deleted, but messages are deleted
only with their thread, whose id never returns, and every reader of seq reads within one live
thread, where each new row is above all the others: page tokens hold,
`tests/test_store_sqlite_migration.py`). 8 windows: server CPU per call 395 -> 363 us at 16 in
flight (writer 87 -> 78), 293 -> 290 at 256. The handler's own work (`api/threads.py`,
`api/validation.py`): the new message built in place (its text part added, not a ContentPart and
a TextPart made and copied in; created_at's two fields set, not `Timestamp.FromNanoseconds`, which
is Python), a text checked without listing the empty parts, empty labels and request_id neither
checked nor copied: in a tight loop the message and its bytes 7.7 -> 2.0 us, the content's check
2.8 -> 0.3, the whole handler 26 -> 7 us; in place (with the change before, two runs of 10
windows) the event loop's thread 218 -> 194 and 204 -> 188 us at 16 in flight, 208 -> 180 and
180 -> 172 at 256; server CPU per call 379 -> 342 and 360 -> 332 (16), 351 -> 313 and 292 -> 282
(256); calls/s 0.54 -> 0.61 and 0.57 -> 0.62 of the echo's at 16, 0.63 -> 0.68 and 0.68 -> 0.82
at 256. Ids (`ids.py`): 96 random bits put each new message in a random leaf of the messages
table's UNIQUE index on id, which outgrows SQLite's page cache after some 100,000 messages (a
page read from the file and one more WAL frame per message in every commit); an id is now the
creation time in milliseconds, then 52 random bits (still 24 hex characters after the prefix),
so new ids go to the index's end, in the pages the last commits wrote. A commit of 3 messages on
a table of 100,000, alone in a loop: 135-139 -> 102-108 us of CPU. In place, against the build
before it (8 windows, load 9): the writer 68 -> 60 us a call at 16 in flight and 38 -> 28 at 256.
All three against main's build, two runs of 12 windows (load 7-8 and 5-7): server CPU per call
at 16 in flight 349 -> 350 and 376 -> 358 us (the writer 80 -> 78 and 92 -> 79, the loop 202 ->
198 and 214 -> 206), calls/s 0.49 -> 0.53 and 0.50 -> 0.56 of the echo's (the floor 0.80 and
0.75); at 256 in flight 280 -> 256 and 306 -> 304 us, calls/s 0.68 -> 0.82 and 0.68 -> 0.70
(the floor 1.09 and 0.96). By CPU, at 16 in flight, 0.65 and 0.64 of the echo's. At 16 in
flight the rate follows the commits' sharing more than the work per call: a commit is shared by
the writes that reached the writer while the one before was on disk, and a quicker loop hands
them over sooner, in smaller batches (2.1 writes a commit against main's 2.9 in the first run,
by `spindle_store_commit_batch_size`), so the writer paid more commits a call for cheaper work;
the same builds reached 0.61-0.62 of the echo's at 16 in flight in the three earlier runs (load
4-9) and 0.53-0.56 in these two.
Tried and not kept: random bytes for ids taken from the OS 256 ids at a time (0.66 -> 0.64 us an
id in a tight loop: the `getrandom` call is cheap here); the commit's metrics as plain numbers
instead of prometheus_client's histograms (1.5 us a batch). What is left above the floor: about
40-50 us a call on the event loop's thread (the wrapper, the request's parse, the checks, the
message and its bytes, three coroutines where the floor has one, the future and its answer:
about 10 us in a tight loop, two to four times that among grpc's own work) and the writer's
commit, 3 pages against the floor's 1 (the table, the index on id, the thread's index), each a
WAL frame with its checksum.

**Profile, Create: where the message is built.** Bisected with switches in one build, each
server beside main's in alternating 3 s windows (h2load, 1 connection, 16 streams; 10-12 rounds,
load average 2-3): the handler's checks alone skipped moved little; the SQL alone (a plain
INSERT into a table with no index, no thread check) nothing; the writer's cache and metrics
calls nothing; the interpreter's switch interval (0.1, 0.5, 50 ms) nothing. Skipping the build
of the message (a constant body written) took the event loop's thread from 190-254 to 168-217 us
a call and Create from 0.60-0.64 to 0.67-0.73 of the echo, in each of five runs; building it
and writing the constant body cost all of that again, and so did building its bytes by hand
(no protobuf object) or filling one reused message: 2-3 us of work in a tight loop cost the
loop's thread 20-40 us in place, among grpc's own work, where the loop's thread is what runs
out first (it is about 85% busy at 16 in flight, the floor's as much). Changed
(`drafts.py`, `api/threads.py`, `store/`): the handler checks the request and hands the store a
`MessageDraft`; `Store.create_message` builds the message (id, timestamp, bytes) where it costs
least: SQLite on its writer thread, in the merge that writes the batch (`_insert_drafts`),
PostgreSQL inline. Against main (8 rounds, load 2.5): at 16 in flight 0.64 -> 0.69 (paired
0.63 -> 0.71) of the echo, the loop 230 -> 202 us a call, 2.8 -> 4.0 writes a commit; at 4
connections of 64 streams 0.60 -> 0.69 (0.61 -> 0.70), the loop 232 -> 190, 3.0 -> 5.2 writes a
commit. The loop's thread now waits for work (voluntary context switches 0.57 -> 0.94 a call).
"""


def reading_postgres(rows: list[Row]) -> str:
    """PostgreSQL against SQLite, row by row, from this run's figures; and why they differ."""
    pairs = []
    for row in rows:
        if row.store != "PostgreSQL":
            continue
        sqlite = next(r for r in rows if r.name == row.name and r.load == row.load and r.store == "SQLite")
        what = row.name.split(":")[0].split(" (")[0]
        if row.name in WHOLE_RUNS:
            what += f" ({WHOLE_RUNS[row.name]})"
        if sum(r.name == row.name for r in rows) > 2:  # the same call under more than one load
            what += f" at {row.load.removeprefix('h2load, ')}"
        pairs.append(
            f"{what} {row.per_second / sqlite.per_second:.2f} of SQLite's rate (server CPU per call "
            f"{row.cpu_us:,.0f} us against {sqlite.cpu_us:,.0f}, plus {row.postgres_cpu_us or 0:,.0f} us in "
            "PostgreSQL)"
        )
    floors = reading_postgres_floors(rows)
    return "Reading the PostgreSQL rows: " + "; ".join(pairs) + ". " + READING_POSTGRES + floors


def reading_postgres_floors(rows: list[Row]) -> str:
    """What the PostgreSQL floors say about Get's and Create's goals there, from this run's
    figures ("" when the run had none)."""
    reads = [row for row in rows if row.name == PG_READ_FLOOR_NAME]
    writes = [row for row in rows if row.name == PG_DURABLE_FLOOR_NAME]
    if not reads or not writes:
        return ""

    def against(floor: Row, name: str) -> tuple[str, Row]:
        spindle = next(r for r in rows if r.name == name and r.store == "PostgreSQL" and r.load == floor.load)
        said = (
            f"the floor **{floor.ratio:.2f}** of the echo ({floor.cpu_us:,.0f} us of server CPU a call, "
            f"{floor.cpu_ratio:.2f} by CPU, plus {floor.postgres_cpu_us or 0:,.0f} us in PostgreSQL), "
            f"Spindle's {spindle.ratio:.2f} ({spindle.cpu_us:,.0f} us, plus "
            f"{spindle.postgres_cpu_us or 0:,.0f} in PostgreSQL), "
            f"{spindle.ratio / floor.ratio if floor.ratio else 0:.2f} of the floor's rate"
        )
        return said, spindle

    def verdict(floors: list[Row], goal: float, name: str) -> str:
        spindles = [against(floor, name)[1] for floor in floors]
        best = f"Spindle's best figure here {max(row.ratio for row in spindles):.2f}"
        met = ", met by Spindle's row" if all(row.ratio >= goal for row in spindles) else ""
        reached = [floor for floor in floors if floor.ratio >= goal]
        if len(reached) == len(floors):
            gap = statistics.median(
                row.cpu_us - floor.cpu_us for row, floor in zip(spindles, floors, strict=True)
            )
            return (
                f"{goal} is within reach of a grpc.aio service making that round trip here{met}: what "
                f"Spindle adds is its own work on the call, about {gap:,.0f} us of server CPU above the "
                f"floor's ({best})"
            )
        if reached:
            loads = ", ".join(floor.load for floor in reached)
            return f"{goal} is within the floor's reach at {loads} only, beyond it at the other load ({best})"
        return (
            f"{goal} is beyond reach of a grpc.aio service making one PostgreSQL round trip a call "
            "through an asyncpg pool like Spindle's on this machine: the floor itself does not get "
            f"there ({best})"
        )

    read, _ = against(reads[0], GET_NAME)
    slower = [floor for floor in reads + writes if floor.ratio < floor.cpu_ratio]
    waits = (
        "Each call waits for a backend, another process: its wake-up, its answer and the loop's "
        "wake-up on it take turns for the same 2 cores with the load, so "
        + (
            "every floor's rate is further below the echo's than its server CPU per call is."
            if len(slower) == len(reads + writes)
            else f"{len(slower)} of the {len(reads + writes)} floors' rates are further below the "
            "echo's than their server CPU per call is."
        )
    )
    writes_said = "; ".join(f"at {floor.load}: {against(floor, CREATE_NAME)[0]}" for floor in writes)
    return (
        "\nThe floors of a PostgreSQL round trip (`bench/_pg_floor.py`): the echo server's methods "
        f"making one round trip a call through an asyncpg pool of {_pg_floor.POOL_MAX} connections "
        "opened as Spindle's store opens it (no reset query on release), on a database of their own "
        "in the same cluster, and nothing else. A read (the GetRunRequest parsed, `SELECT body FROM "
        "floor_runs WHERE id = $1`, the row's bytes answered: the Run Spindle's Get answers): "
        f"{read}; so {verdict(reads, 0.85, GET_NAME)}. A durable write (one INSERT in its own "
        "transaction, answered once committed with the WAL flushed, then the request echoed; no "
        f"lock, no check, no message built): {writes_said}; so {verdict(writes, 0.6, CREATE_NAME)}. "
        f"{waits}\n"
    )


# Why PostgreSQL differs (measured as it says, with the profile below); the figures above are the run's.
READING_POSTGRES = """\
Every store call is a round trip to a backend (a `write()` to its socket, a wake-up on its
answer, asyncpg's protocol) where SQLite's is a function call in the process. A Get is one
SELECT, one round trip, where SQLite reads in about 5 us. A durable Create is one too: a call
of the store's function `spindle_insert_message` (its own transaction), which locks the thread's
row `FOR SHARE` (so that no run can start on the thread meanwhile, across replicas: a run's start
locks it `FOR UPDATE`), inserts the message with the active-run check inside the INSERT, and
commits, waiting for the WAL's flush (it was four round trips: BEGIN, the lock, the INSERT,
COMMIT; see the Profile). Messages share the lock, so one thread's Creates commit side by side
and PostgreSQL's concurrent commits share WAL flushes. Still, every round trip is between two
processes, each a wake-up of the other: on a machine whose 2 cores have ten runnable
processes, every wake-up waits for a core, and the rate falls with the machine's load much more
than a rate that CPU alone bounds. A whole run is over twenty
round trips on PostgreSQL (see "Replicas on one PostgreSQL"): the server spends more CPU per run
than on SQLite, and PostgreSQL's backends about as much again.
"""

# Written when the PostgreSQL rows were added (measured as it says); `make bench` does not re-run it.
PROFILE_POSTGRES = """\
**Profile, PostgreSQL.** `py-spy record --native --rate 200` for 10 s on the PostgreSQL server
under h2load's Create load (1 connection, 16 streams; durable cluster as above). The event
loop's thread had 70% of the samples (grpc's poller thread most of the rest). Half of the loop
thread's samples (35% of all) were in the store's write (`PostgresStore._write`), and most of
that in sending statements: asyncpg's protocol writing to the backend's socket (uvloop's
`UVStream__try_write`, then libc `write`) was 22% of all samples, a syscall per statement. By
statement: BEGIN 5.4%, the thread's row lock 6.5%, the active-run check 7.0%, the INSERT
(`executemany`) 8.3%, COMMIT 5.1%; the pool's acquire and release under 2% (it resets nothing on
release). Server CPU per Create was 930-1,110 us in these runs against SQLite's 310-500 us, and
PostgreSQL's processes 430-540 us more: about 140 us of the server's CPU per round trip (in a
full run, the Get's one cost 160 us more than SQLite's read). And the Creates queued: h2load
sends one pre-encoded request, so every Create went to the same thread and took its row lock
(`FOR UPDATE`) one at a time: `pg_stat_activity` sampled every 20-50 ms under 16 in flight
showed on average 7 of the pool's 10 backends waiting for the row (`Lock:tuple`) and the one
holding it waiting for the server's next statement 0.5-1.0 of the time; more in flight only
queued longer (1, 16 and 256 in flight: 252, 369 and 165 calls/s in one run). Changed
(`store/postgres.py`): a message takes the thread's row `FOR SHARE` (messages do not conflict
with each other, only with a run's start or the thread's deletion, which keep `FOR UPDATE`;
`tests/test_store_postgres.py` shows a message passing another's lock and a run's start waiting
for it) and checks for an active run inside its INSERT (`INSERT ... SELECT ... WHERE NOT
EXISTS`, one round trip less). In one rpc-speed run against the echo: Create at 16 in flight
0.09 -> 0.28 (server CPU per call 1,027 -> 623 us, PostgreSQL's 441 -> 264 us), at 256 in flight
0.03 -> 0.33 (1,594 -> 630 us, PostgreSQL's 541 -> 262 us).
Then the round trips themselves (`store/pg_schema.py` version 4, `store/postgres.py`): a
message's insert is one call of a PL/pgSQL function, `spindle_insert_message`, which takes the
thread's row `FOR SHARE`, then inserts with the active-run check; each statement of a volatile
function takes a new snapshot under READ COMMITTED, so the check still sees what the lock
waited for. Called alone it is its own transaction, committed with the WAL flushed before its
answer: one round trip instead of four (BEGIN, the lock, the INSERT, COMMIT); with a request_id
it runs inside the idempotent transaction. Against main and the echo, alternating windows (8
each, load average 9-11): server CPU per Create 669 -> 497 us at 16 in flight (by CPU 0.33 ->
0.45 of the echo's 223 us; calls/s 0.25 -> 0.27 of the echo's) and 639 -> 484 at 256 (0.38 ->
0.50; calls/s 0.29 -> 0.34), PostgreSQL's 298 -> 217 and 285 -> 203 us; another run without the
echo (6 each): 635 -> 457 and 622 -> 460 us, PostgreSQL's 261 -> 174 and 267 -> 182. What
remains of the server's CPU per Create above SQLite's is that one round trip and the pool:
asyncpg's acquire and release cost 30-40 us of CPU per call over a bare connection (2,000
sequential `SELECT 1`s each way, 58-73 against 28-36 us), the store's connection wrapper 10-15
more.
"""


def reading_floor(rows: list[Row]) -> str:
    """What the floor of a whole run says about the whole-run rows, from this run's figures."""
    floor = next(row for row in rows if row.name == FLOOR_WHOLE_NAME)
    whole = next(row for row in rows if row.name == WHOLE_NAME and row.store == "SQLite")
    budget = whole.baseline_cpu_us / 0.15 - floor.cpu_us
    return (
        "The limit of the whole-run goal: the floor row is a whole run's calls with nothing behind "
        "them, the thread's and the run's Create echoed and a stream of the messages a short "
        "reply's Listen sends, on the bare echo server and from the same client processes: what "
        "any grpc.aio service with this API pays before it does any work. It reached "
        f"**{floor.ratio:.2f}** of the echo's calls/s ({floor.cpu_us:,.0f} us of server CPU a run, "
        f"{floor.cpu_ratio:.2f} by CPU), so 0.15 is {'within' if floor.ratio >= 0.15 else 'beyond'} "
        "what gRPC itself allows on this machine's throughput with these clients. By CPU, 0.15 would "
        f"leave a whole run {budget:,.0f} us of server CPU for all its own work beyond the floor "
        "(the engine's turn, four durable commits, the events' fan-out, validation); Spindle's "
        f"whole run spends {whole.cpu_us - floor.cpu_us:,.0f} us on it ({whole.cpu_us:,.0f} in all, "
        f"{whole.cpu_us / floor.cpu_us if floor.cpu_us else 0:.1f}x the floor) and reached "
        f"{whole.ratio / floor.ratio if floor.ratio else 0:.2f} of the floor's rate.\n"
    )


def reading_durable_floor(rows: list[Row]) -> str:
    """What the floor of a durable write says about the Create rows, from this run's figures."""
    parts = []
    for floor in (row for row in rows if row.name == DURABLE_FLOOR_NAME):
        create = next(
            row
            for row in rows
            if row.name == CREATE_NAME and row.store == "SQLite" and row.load == floor.load
        )
        parts.append(
            f"At {floor.load}: the floor **{floor.ratio:.2f}** of the echo ({floor.cpu_us:,.0f} us of "
            f"server CPU a call, {floor.cpu_ratio:.2f} by CPU), Spindle's Create {create.ratio:.2f} "
            f"({create.cpu_us:,.0f} us), {create.ratio / floor.ratio if floor.ratio else 0:.2f} of "
            "the floor's rate"
        )
    floors = [row for row in rows if row.name == DURABLE_FLOOR_NAME]
    within = all(row.ratio >= 0.6 for row in floors)
    gap = statistics.median(
        create.cpu_us - floor.cpu_us
        for floor in floors
        for create in rows
        if create.name == CREATE_NAME and create.store == "SQLite" and create.load == floor.load
    )
    verdict = (
        "The goal is within the floor's reach here, so what keeps Create from it is not the durable "
        f"write but Spindle's own work on each call, about {gap:,.0f} us of server CPU above the floor "
        "(the wrapper, the request's validation, the new message and its serialization, the "
        "thread's and the active-run checks inside the INSERT with the messages table's indexes; see "
        "the Profile)."
        if within
        else "The goal is beyond the floor here: no work on top of such a durable write can reach it."
    )
    postgres = (
        " On PostgreSQL the same floor is one INSERT in its own transaction through the store's pool"
        " (`bench/_pg_floor.py`; read in the PostgreSQL rows' reading below)."
        if any(row.name == PG_DURABLE_FLOOR_NAME for row in rows)
        else ""
    )
    return (
        "The floor of a durable write: the echo method "
        "committing each request to a SQLite file the way Spindle's store does (one writer thread, "
        "the requests of a loop turn in one multi-row INSERT, WAL, synchronous=FULL, answered after "
        "the commit; `bench/_durable_floor.py`) and nothing else: no validation, no message built, "
        "no index, no thread's check. " + ". ".join(parts) + ". A durable write pays a commit "
        "(an fdatasync and the WAL's frames) shared by the writes that arrived while the one before "
        "was on disk, and the hand-off to the writer thread and back, on the same 2 cores as the "
        f"load. {verdict}{postgres}\n"
    )


def section(rows: list[Row], when: str, elapsed: float) -> str:
    on_postgres = any(row.store == "PostgreSQL" for row in rows)
    method = METHOD.format(
        seconds=window_seconds(),
        windows=windows(),
        processes=CLIENT_PROCESSES,
        in_flight=CLIENT_PROCESSES * CLIENT_CONCURRENCY,
    )
    if on_postgres:
        method += f"\n{METHOD_POSTGRES}"
    whole = next(row for row in rows if row.name == WHOLE_NAME and row.store == "SQLite")
    postgres = f"{reading_postgres(rows)}\n{PROFILE_POSTGRES}" if on_postgres else ""
    return (
        f"## RPC speed, as a ratio of a bare grpc.aio server\n\n{method}\n{markdown(rows)}\n\n"
        f"Measured {when} on {machine()}; {versions()}. The whole benchmark took {elapsed:.0f} s.\n\n"
        f"{READING.format(calls=whole.cpu_us / whole.baseline_cpu_us)}\n{reading_floor(rows)}\n"
        f"{reading_durable_floor(rows)}\n"
        f"{PROFILE}\n{PROFILE_CREATE}\n{postgres}"
    )


if __name__ == "__main__":
    print(markdown(run_benchmark()))
