"""The Prometheus endpoint, scraped over HTTP from a real server while runs live and end.

Each test reads the figures before and after what it does and checks how they moved, so the
tests share one server without counting each other's calls. Every counter moves before the
call that caused it answers (the interceptor records before the reply goes out; the run
observer and the store's commit histogram before the writing caller resumes), so a scrape
right after a call sees it: no waiting, except for a Listen that the client walks away from,
whose end the server learns at its own pace (polled for, with a bound).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from fake_openai import FakeOpenAI, error_reply, text_stream
from spindle.v1 import common_pb2, run_pb2
from spindle_server import ids
from spindle_server.config import parse_config
from spindle_server.metrics import SharedActiveRuns
from spindle_server.server import SpindleServer
from support.replicas import replicas, shared
from support.server import ServerProcess, TestDatabase, store_under_test
from support.stubs import Stubs

RUNS = "/spindle.v1.RunService/"
MODEL = "fake/gpt-test"
ENV = {"SPINDLE_PROVIDER_FAKE_API_KEY": "sk-test"}
STORE = store_under_test()
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int, host: str = "127.0.0.1") -> Samples:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 for a label set not seen yet (a counter that has not moved)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def metrics_port(process: ServerProcess) -> int:
    port = process.serving["metrics_port"]
    assert isinstance(port, int) and port > 0
    return port


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


@pytest.fixture(scope="module")
def spindle(fake: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    database = tmp_path_factory.mktemp("metrics") / "spindle.db"
    flags = [
        *("--metrics-port", "0"),
        *("--tool-timeout", "600"),
        *("--provider", f"fake={fake.base_url},max_retries=0"),
    ]
    process = ServerProcess(database, flags, ENV).start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def api(spindle: ServerProcess) -> Iterator[Stubs]:
    stubs = Stubs.connect(spindle.address)
    yield stubs
    stubs.close()


def paused_run(api: Stubs) -> run_pb2.Run:
    """A run of the builtin model waiting for one tool result."""
    assistant = api.tool_assistant("get_weather")
    thread = api.thread('/tool get_weather {"city": "Paris"}')
    run = api.wait(api.run(assistant.id, thread.id).id)
    assert run.status == run_pb2.TOOL_CALLS
    return run


def test_a_runs_life_moves_rpcs_runs_and_store_figures(api: Stubs, spindle: ServerProcess) -> None:
    port = metrics_port(spindle)
    before = scrape(port)

    # One run through a tool round to COMPLETED, one cancelled while it waits for tools.
    completed = paused_run(api)
    (call,) = completed.required_tool_calls
    api.runs.SubmitToolResults(
        run_pb2.SubmitToolResultsRequest(
            run_id=completed.id, tool_results=[common_pb2.ToolResult(tool_call_id=call.id, output="21")]
        ),
        timeout=10,
    )
    assert api.wait(completed.id).status == run_pb2.COMPLETED
    events = api.events(completed.id)
    assert events[-1].type == run_pb2.StreamEvent.DONE
    cancelled = paused_run(api)
    waiting = scrape(port)
    assert moved(before, waiting, "spindle_runs_active", status="TOOL_CALLS") == 1
    assert api.runs.Cancel(run_pb2.CancelRunRequest(run_id=cancelled.id), timeout=10).status == (
        run_pb2.CANCELLED
    )
    with pytest.raises(grpc.RpcError) as missing:
        api.runs.Get(run_pb2.GetRunRequest(run_id=ids.new_id("run")), timeout=10)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND

    after = scrape(port)
    calls = {
        ("Create", "OK"): 2,
        ("SubmitToolResults", "OK"): 1,
        ("Cancel", "OK"): 1,
        ("Listen", "OK"): 1,
        ("Get", "NOT_FOUND"): 1,
        ("Get", "OK"): 0,
    }
    for (method, code), count in calls.items():
        assert moved(before, after, "spindle_rpcs_total", method=RUNS + method, code=code) == count
    assert moved(before, after, "spindle_rpc_duration_seconds_count", method=RUNS + "Create") == 2
    assert moved(before, after, "spindle_rpc_duration_seconds_count", method=RUNS + "Get") == 1
    assert moved(before, after, "spindle_rpc_duration_seconds_sum", method=RUNS + "Create") > 0
    # Wait calls are counted too (at least one per paused_run and one for the end).
    assert moved(before, after, "spindle_rpcs_total", method=RUNS + "Wait", code="OK") >= 3

    assert moved(before, after, "spindle_runs_ended_total", status="COMPLETED") == 1
    assert moved(before, after, "spindle_runs_ended_total", status="CANCELLED") == 1
    for status in ("PENDING", "IN_PROGRESS", "TOOL_CALLS", "CANCELLING"):
        assert moved(before, after, "spindle_runs_active", status=status) == 0
    assert moved(before, after, "spindle_runs_ended_total", status="FAILED") == 0
    assert moved(before, after, "spindle_run_duration_seconds_count") == 2
    assert moved(before, after, "spindle_run_duration_seconds_sum") > 0
    # Both runs streamed a tool call before anything else: one first event each, no more
    # for the second turn of the completed run.
    assert moved(before, after, "spindle_run_time_to_first_event_seconds_count") == 2
    assert moved(before, after, "spindle_run_time_to_first_event_seconds_sum") > 0
    # The largest bucket holds every observation: the histogram is consistent.
    assert moved(before, after, "spindle_run_duration_seconds_bucket", le="+Inf") == 2

    # At least the 8 writes the client waited for one after another (2 assistants, 2 threads,
    # 2 runs, the results, the cancel) were separate commits; the engine's may share them. The
    # engine may be committing during a scrape, so the two histograms are not compared.
    assert moved(before, after, "spindle_store_commit_duration_seconds_count") >= 8
    assert moved(before, after, "spindle_store_commit_duration_seconds_sum") > 0
    assert moved(before, after, "spindle_store_commit_batch_size_count") >= 8
    # Every batch holds one write or more (a scrape reads a histogram's sum after its buckets).
    assert value(after, "spindle_store_commit_batch_size_sum") >= value(
        after, "spindle_store_commit_batch_size_count"
    )


def test_the_listen_gauge_counts_open_streams(api: Stubs, spindle: ServerProcess) -> None:
    port = metrics_port(spindle)
    open_before = value(scrape(port), "spindle_listen_streams")
    run = paused_run(api)

    # A Listen on a paused run stays open after its TOOL_CALLS event: held open by the client.
    held = api.runs.Listen(run_pb2.ListenRunRequest(run_id=run.id), timeout=60)
    for event in held:
        if event.type == run_pb2.StreamEvent.TOOL_CALLS:
            break
    assert value(scrape(port), "spindle_listen_streams") == open_before + 1

    # A second one, ended by the run's end: it is counted down before the client sees the end.
    ended = api.runs.Listen(run_pb2.ListenRunRequest(run_id=run.id), timeout=60)
    for event in ended:
        if event.type == run_pb2.StreamEvent.TOOL_CALLS:
            break
    assert value(scrape(port), "spindle_listen_streams") == open_before + 2
    api.runs.Cancel(run_pb2.CancelRunRequest(run_id=run.id), timeout=10)
    assert [e.status for e in ended][-1] == run_pb2.CANCELLED
    # `held` has that event unread: the server may still be sending it, so read it too.
    assert [e.status for e in held][-1] == run_pb2.CANCELLED
    assert value(scrape(port), "spindle_listen_streams") == open_before


def test_a_listen_the_client_abandons_is_counted_down(api: Stubs, spindle: ServerProcess) -> None:
    port = metrics_port(spindle)
    open_before = value(scrape(port), "spindle_listen_streams")
    run = paused_run(api)
    held = api.runs.Listen(run_pb2.ListenRunRequest(run_id=run.id), timeout=60)
    for event in held:
        if event.type == run_pb2.StreamEvent.TOOL_CALLS:
            break
    assert value(scrape(port), "spindle_listen_streams") == open_before + 1
    held.cancel()  # the client goes away; the server learns it when grpc tells it
    deadline = time.monotonic() + 30  # a failure bound only
    while value(scrape(port), "spindle_listen_streams") != open_before:
        assert time.monotonic() < deadline, "the abandoned Listen was never counted down"
        time.sleep(0.05)
    api.runs.Cancel(run_pb2.CancelRunRequest(run_id=run.id), timeout=10)


def test_model_calls_and_their_errors_by_provider(
    api: Stubs, spindle: ServerProcess, fake: FakeOpenAI
) -> None:
    port = metrics_port(spindle)
    assistant = api.assistant(name="fake", model=MODEL)
    before = scrape(port)

    fake.enqueue(text_stream("fine"))
    ok = api.wait(api.run(assistant.id, api.thread("hello").id).id)
    assert ok.status == run_pb2.COMPLETED
    fake.enqueue(error_reply(400, "no such parameter", "invalid_request_error"))
    failed = api.wait(api.run(assistant.id, api.thread("hello").id).id)
    assert failed.status == run_pb2.FAILED
    assert failed.last_error.code == "invalid_request"

    after = scrape(port)
    assert moved(before, after, "spindle_model_call_duration_seconds_count", provider="fake") == 2
    assert (
        moved(before, after, "spindle_model_call_errors_total", provider="fake", code="invalid_request") == 1
    )
    assert moved(before, after, "spindle_runs_ended_total", status="FAILED") == 1
    assert moved(before, after, "spindle_runs_ended_total", status="COMPLETED") == 1
    # The completed run's first text delta; the failed one never had output.
    assert moved(before, after, "spindle_run_time_to_first_event_seconds_count") == 1


def test_the_endpoint_listens_only_on_the_configured_host(spindle: ServerProcess) -> None:
    port = metrics_port(spindle)
    assert scrape(port)  # reachable where configured (127.0.0.1, the gRPC host)
    # 127.0.0.2 is this machine too (all of 127/8 is loopback): a socket bound to any address
    # would answer there. This one must not.
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.2", port), timeout=10):
        pass


def test_off_unless_asked_and_port_zero_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPINDLE_METRICS_PORT", raising=False)
    assert parse_config([]).metrics_port is None
    monkeypatch.setenv("SPINDLE_METRICS_PORT", "0")
    config = parse_config([])
    assert config.metrics_port == 0 and config.metrics_host is None
    with pytest.raises(SystemExit):
        parse_config(["--metrics-port", "70000"])


@pytest.mark.sqlite_only("spindle_runs_active is read from the SQLite file (metrics.ActiveRuns)")
def test_runs_active_counts_runs_left_by_an_earlier_server(
    make_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """The gauge is the database's count, not what this process saw happen."""
    database = tmp_path / "kept.db"
    first = make_server("--tool-timeout", "600", database=database)
    api = Stubs.connect(first.address)
    try:
        paused_run(api)
    finally:
        api.close()
    assert first.stop() == 0
    second = make_server("--metrics-port", "0", database=database)
    samples = scrape(metrics_port(second))
    assert value(samples, "spindle_runs_active", status="TOOL_CALLS") == 1
    assert value(samples, "spindle_runs_active", status="PENDING") == 0


def test_a_server_without_the_flag_serves_no_metrics(make_server: Callable[..., ServerProcess]) -> None:
    process = make_server()
    assert process.serving["metrics_port"] is None


def test_a_taken_metrics_port_is_a_clear_startup_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = ServerProcess(tmp_path / "spindle.db", ["--metrics-port", str(port)])
        with pytest.raises(RuntimeError, match="server exited at start"):
            process.start()
    # start() has waited for the process and read all of its stderr by now.
    stderr = "".join(process.stderr_lines)
    assert f"spindle-server: cannot serve metrics on 127.0.0.1:{port}" in stderr
    assert "Traceback" not in stderr


async def test_the_endpoint_stops_with_the_server(tmp_path: Path) -> None:
    """In this process, so that only stop() (not the process's exit) can close the port."""
    config = parse_config(["--port", "0", "--metrics-port", "0", "--database", str(tmp_path / "spindle.db")])
    server = SpindleServer(config)
    await server.start()
    port = server.metrics_port
    assert port is not None
    assert await asyncio.to_thread(scrape, port)
    await server.stop()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.to_thread(socket.create_connection, ("127.0.0.1", port), 10)


# ---- several replicas on one PostgreSQL: the active-runs gauge is the shared table's ---------


def scrape_until(port: int, name: str, want: float, **labels: str) -> Samples:
    """Scrapes until the gauge shows `want`: a count is kept for up to a second (one query
    serves the scrapes of many replicas), so a change shows on a later scrape."""
    deadline = time.monotonic() + 30
    while True:
        samples = scrape(port)
        if value(samples, name, **labels) == want or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


@pytest.mark.skipif(STORE != "postgresql", reason="replicas share a database on PostgreSQL only")
def test_runs_active_on_postgresql_is_global_on_every_replica(
    new_database: Callable[..., TestDatabase],
) -> None:
    flags = ["--metrics-port", "0", "--tool-timeout", "600"]
    with replicas(shared(new_database()), count=2, extra_args=flags) as (first, second):
        on_first = Stubs.connect(first.address)
        on_second = Stubs.connect(second.address)
        try:
            run = paused_run(on_first)
            for replica in (first, second):  # both count the run, whichever executes it
                samples = scrape_until(metrics_port(replica), "spindle_runs_active", 1, status="TOOL_CALLS")
                assert value(samples, "spindle_runs_active", status="TOOL_CALLS") == 1
                assert value(samples, "spindle_runs_active", status="PENDING") == 0
            cancel = run_pb2.CancelRunRequest(run_id=run.id)
            assert on_second.runs.Cancel(cancel, timeout=10).status == run_pb2.CANCELLED
            for replica in (first, second):
                samples = scrape_until(metrics_port(replica), "spindle_runs_active", 0, status="TOOL_CALLS")
                assert value(samples, "spindle_runs_active", status="TOOL_CALLS") == 0
                assert value(samples, "spindle_runs_active_read_failures_total") == 0
        finally:
            on_first.close()
            on_second.close()


class _Counts:
    """A count of active runs for SharedActiveRuns: fails while `failing`, counts its calls."""

    def __init__(self) -> None:
        self.failing = True
        self.calls = 0

    async def __call__(self) -> dict[int, int]:
        self.calls += 1
        if self.failing:
            raise ConnectionRefusedError("the database is down")
        return {run_pb2.TOOL_CALLS: 2}


def test_shared_active_runs_counts_failures_and_reuses_a_fresh_count() -> None:
    """On the scrape thread, with the count running on an event loop of its own (the server's)."""
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, daemon=True)
    runner.start()
    try:
        counts = _Counts()
        failures = REGISTRY.get_sample_value("spindle_runs_active_read_failures_total") or 0.0
        gauge = SharedActiveRuns(counts, loop, ttl=3600)
        assert list(gauge.collect()) == []  # no figure rather than a wrong one; nothing raised
        assert REGISTRY.get_sample_value("spindle_runs_active_read_failures_total") == failures + 1
        counts.failing = False
        for _ in range(2):  # the second scrape within the ttl takes the first one's count
            (family,) = gauge.collect()
            by_status = {sample.labels["status"]: sample.value for sample in family.samples}
            assert by_status == {"PENDING": 0, "IN_PROGRESS": 0, "TOOL_CALLS": 2, "CANCELLING": 0}
        assert counts.calls == 2
        fresh = SharedActiveRuns(counts, loop, ttl=0)
        list(fresh.collect())
        list(fresh.collect())
        assert counts.calls == 4
    finally:
        loop.call_soon_threadsafe(loop.stop)
        runner.join(timeout=10)
        loop.close()
