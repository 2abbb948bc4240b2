"""Listen under faults: clients that vanish mid-stream, listeners that read slowly or not at all,
and SIGTERM during live streams. The server stays healthy and bounded, runs are unaffected, and
every client's view is a gap-free, duplicate-free part of the log (tests/support/invariants.py)."""

from __future__ import annotations

import concurrent.futures
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from spindle.v1 import run_pb2, run_pb2_grpc
from support.faults import Holds
from support.followers import Follower
from support.invariants import History, assert_invariants
from support.observe import open_listens, wait_until
from support.server import ServerProcess
from support.stubs import Stubs

MakeServer = Callable[..., ServerProcess]
EventType = run_pb2.StreamEvent
WORDS = " ".join(f"w{i}" for i in range(60))
DELTA = "store.after_mutate:IN_PROGRESS"

_LISTEN_SCRIPT = """
import sys, grpc
from spindle.v1 import run_pb2, run_pb2_grpc
stub = run_pb2_grpc.RunServiceStub(grpc.insecure_channel(sys.argv[1]))
for event in stub.Listen(run_pb2.ListenRunRequest(run_id=sys.argv[2]), timeout=300):
    print(event.index, flush=True)
"""


def healthy(stubs: Stubs) -> bool:
    check = health_pb2_grpc.HealthStub(stubs.channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    return check.status == health_pb2.HealthCheckResponse.SERVING


def ended_listens(server: ServerProcess, code: str) -> int:
    return sum(
        1
        for e in server.log_events()
        if e.get("event") == "rpc" and str(e.get("method", "")).endswith("/Listen") and e.get("code") == code
    )


def test_clients_that_vanish_mid_listen(make_server: MakeServer, tmp_path: Path) -> None:
    holds = Holds(tmp_path / "holds")
    server = make_server("--metrics-port", "0", env=holds.env(DELTA))
    for nth in range(4, 2000):
        holds.release(DELTA, nth)
    holds.release(DELTA, 1)
    holds.release(DELTA, 2)  # the run is held after its third delta, while clients listen
    stubs = Stubs.connect(server.address)
    history = History()
    run = stubs.start(f"/sleep 1 {WORDS}")
    holds.wait_reached(DELTA, 3)

    # Three client processes and two in-process channels listen...
    clients = [
        subprocess.Popen(
            [sys.executable, "-c", _LISTEN_SCRIPT, server.address, run.id], stdout=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    for client in clients:
        assert client.stdout is not None
        assert client.stdout.readline().strip() == "0"  # it is streaming
    channels = [grpc.insecure_channel(server.address) for _ in range(2)]
    listens = [
        run_pb2_grpc.RunServiceStub(channel).Listen(run_pb2.ListenRunRequest(run_id=run.id), timeout=300)
        for channel in channels
    ]
    assert [next(listen).index for listen in listens] == [0, 0]
    assert open_listens(server) == 5
    # ...then the processes die by SIGKILL and the channels are closed under their streams.
    for client in clients:
        client.send_signal(signal.SIGKILL)
        client.wait(timeout=30)
        assert client.stdout is not None
        client.stdout.close()
    for channel in channels:
        channel.close()

    # Each vanished client's Listen ended on the server (its subscription released).
    wait_until(lambda: ended_listens(server, "CANCELLED") >= 5, "5 Listen calls ended CANCELLED")
    wait_until(lambda: open_listens(server) == 0, "the open-stream count drops to 0")
    assert healthy(stubs)

    follower = Follower(history, run.id)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        following = pool.submit(follower.follow, stubs)
        holds.release(DELTA, 3)
        assert following.result(timeout=60) == grpc.StatusCode.OK
    # A later run's fan-out works for every listener.
    later = stubs.start(f"/sleep 0.5 {WORDS}")
    followers = [Follower(history, later.id) for _ in range(3)]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        fan_out = [pool.submit(f.follow, stubs) for f in followers]
        assert {f.result(timeout=60) for f in fan_out} == {grpc.StatusCode.OK}
    finals = assert_invariants(stubs, [run.id, later.id], history)
    assert {f.run.status for f in finals.values()} == {run_pb2.COMPLETED}
    assert all(len(f.seen.events) == len(finals[later.id].events) for f in followers)
    stubs.close()


def rss_bytes(server: ServerProcess) -> int:
    assert server.process is not None
    with open(f"/proc/{server.process.pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def stream_many(stubs: Stubs, address: str, history: History, runs: int, silent: int) -> int:
    """`runs` runs that stream thousands of deltas, each with `silent` listeners that never read
    and one that reads one event, waits for the run's end, then reads the rest. Returns what
    the server would hold if it buffered every event for every silent listener.

    The listeners' channel keeps HTTP/2's initial 64 KiB stream window (no BDP probing, which
    would let the client's library buffer whole logs): the server meets real back-pressure."""
    assistant = stubs.assistant(name="long")
    text = " ".join("y" * 99 for _ in range(2500))  # 250,000 characters, 2,500 deltas
    started = [stubs.start(f"/sleep 2 {text}", assistant) for _ in range(runs)]
    with grpc.insecure_channel(address, options=[("grpc.http2.bdp_probe", 0)]) as channel:
        listen = run_pb2_grpc.RunServiceStub(channel).Listen
        silent_calls = [
            listen(run_pb2.ListenRunRequest(run_id=run.id), timeout=300)
            for run in started
            for _ in range(silent)
        ]
        slow = [
            (history.listener(run.id), listen(run_pb2.ListenRunRequest(run_id=run.id), timeout=300))
            for run in started
        ]
        for seen, call in slow:
            seen.events.append(next(call))
        for run in started:
            assert stubs.wait(run.id, timeout=120).status == run_pb2.COMPLETED
        for seen, call in slow:
            seen.events.extend(call)  # the rest, after the run ended: a gap-free log
        for call in silent_calls:
            call.cancel()
    log_bytes = sum(len(e.SerializeToString()) for seen, _ in slow for e in seen.events)
    return log_bytes * silent


def test_listeners_that_do_not_read_keep_server_memory_bounded(make_server: MakeServer) -> None:
    server = make_server("--metrics-port", "0")
    stubs = Stubs.connect(server.address)
    history = History()
    stream_many(stubs, server.address, history, runs=4, silent=0)  # warm-up: the allocator's pools, caches
    warm = rss_bytes(server)
    unbounded = stream_many(stubs, server.address, history, runs=4, silent=64)
    grown = rss_bytes(server) - warm
    # Flow control holds each silent stream to its window: a few tens of KiB each, far below
    # one copy of every event per listener (which is what a per-listener queue would hold).
    assert unbounded > 100_000_000  # 4 runs x 64 listeners x about 550 kB
    assert grown < unbounded / 4, (grown, unbounded)
    print(f"server RSS grew {grown / 1e6:.1f} MB; buffering every event would take {unbounded / 1e6:.0f} MB")
    assert_invariants(stubs, {seen.run_id for seen in history.seen}, history)
    # Every silent listener's call ended on the server when its client gave up: none is left
    # blocked on a write it can never finish (a leaked subscription).
    wait_until(lambda: ended_listens(server, "CANCELLED") >= 4 * 64, "every silent Listen ended")
    wait_until(lambda: open_listens(server) == 0, "the open-stream count drops to 0")
    assert healthy(stubs)
    stubs.close()


def test_sigterm_during_live_streams(make_server: MakeServer) -> None:
    """Open Listens end with a retryable status when the server stops; after the restart each
    resumes from its last index + 1 and sees the rest: no gap, no duplicate. The runs (each
    streams for at least 5 s, far longer than the grace period) are handed back and finish."""
    server = make_server("--grace-period", "0.5")
    stubs = Stubs.connect(server.address)
    history = History()
    assistant = stubs.assistant(name="echo")
    runs = [stubs.start(f"/sleep 5 {WORDS}", assistant) for _ in range(4)]
    followers = [Follower(history, run.id) for run in runs for _ in range(2)]
    with concurrent.futures.ThreadPoolExecutor(len(followers)) as pool:
        following = [pool.submit(f.follow, stubs) for f in followers]
        wait_until(
            lambda: all(any(e.type == EventType.PARTIAL_MESSAGE for e in f.seen.events) for f in followers),
            "every listener saw a delta",
        )
        assert server.process is not None
        server.process.terminate()
        codes = {future.result(timeout=60) for future in following}
    assert codes <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}, codes
    assert server.process.wait(timeout=60) == 0
    server.kill()
    stubs.close()

    server.start()
    stubs = Stubs.connect(server.address)
    try:
        with concurrent.futures.ThreadPoolExecutor(len(followers)) as pool:
            resumed = [pool.submit(f.follow, stubs) for f in followers]
            assert {future.result(timeout=120) for future in resumed} == {grpc.StatusCode.OK}
        finals = assert_invariants(stubs, [run.id for run in runs], history)
        for final in finals.values():
            assert final.run.status == run_pb2.COMPLETED
            assert any(e.status_change.discard_partial_message for e in final.events)  # handed back
        assert all(len(f.seen.events) == len(finals[f.run_id].events) for f in followers)
    finally:
        stubs.close()
