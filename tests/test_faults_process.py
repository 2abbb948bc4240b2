"""SIGKILL at exact points of a run's life (fault points, not timing), then a restart on the same
database: every run settles as it must, and what every client saw, across its reconnects, is a
gap-free, duplicate-free part of the final log (tests/support/invariants.py)."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from spindle.v1 import common_pb2, run_pb2
from support.faults import ENV, Holds, fault_env
from support.followers import Follower
from support.invariants import History, assert_invariants
from support.server import ServerProcess
from support.stubs import Stubs

MakeServer = Callable[..., ServerProcess]
WORDS = " ".join(f"w{i}" for i in range(60))


def died(server: ServerProcess) -> None:
    """Waits for the server to kill itself at its fault point, and cleans up after it."""
    assert server.process is not None
    assert server.process.wait(timeout=60) == -9  # SIGKILL, not a clean exit
    server.kill()


def restart_without_faults(server: ServerProcess) -> Stubs:
    server.env.pop(ENV, None)
    server.start()
    return Stubs.connect(server.address)


def test_kill_while_pending(make_server: MakeServer, tmp_path: Path) -> None:
    holds = Holds(tmp_path / "holds")
    server = make_server(env=holds.env("store.claim"))
    holds.wait_reached("store.claim")  # the claim loop is held: queued runs stay PENDING
    stubs = Stubs.connect(server.address)
    history = History()
    run = stubs.start(f"queued {WORDS}")
    follower = Follower(history, run.id)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(follower.follow, stubs)
        assert stubs.runs.Get(run_pb2.GetRunRequest(run_id=run.id), timeout=10).status == run_pb2.PENDING
        server.kill()
        assert first.result(timeout=60) == grpc.StatusCode.UNAVAILABLE
    stubs.close()

    stubs = restart_without_faults(server)
    try:
        assert follower.follow(stubs) == grpc.StatusCode.OK
        finals = assert_invariants(stubs, [run.id], history)
        done = finals[run.id].run
        assert done.status == run_pb2.COMPLETED and done.attempt == 1  # never started before
        assert follower.seen.events[0].status == run_pb2.PENDING
    finally:
        stubs.close()


def test_kill_while_streaming(make_server: MakeServer) -> None:
    server = make_server(env=fault_env(store__after_mutate___IN_PROGRESS="kill@5"))
    stubs = Stubs.connect(server.address)
    history = History()
    run = stubs.start(f"/sleep 2 {WORDS}")
    follower = Follower(history, run.id)
    assert follower.follow(stubs) == grpc.StatusCode.UNAVAILABLE  # the server died under it
    died(server)
    stubs.close()

    stubs = restart_without_faults(server)
    try:
        assert follower.follow(stubs) == grpc.StatusCode.OK  # resumed from its last index + 1
        finals = assert_invariants(stubs, [run.id], history)
        done = finals[run.id].run
        assert done.status == run_pb2.COMPLETED and done.attempt == 2  # retried once
        assert done.reply.content[0].text.text == f"You said: /sleep 2 {WORDS}"
    finally:
        stubs.close()


def test_kill_while_streaming_with_no_attempts_left(make_server: MakeServer) -> None:
    server = make_server("--max-attempts", "1", env=fault_env(store__after_mutate___IN_PROGRESS="kill@3"))
    stubs = Stubs.connect(server.address)
    history = History()
    run = stubs.start(f"/sleep 2 {WORDS}")
    follower = Follower(history, run.id)
    assert follower.follow(stubs) == grpc.StatusCode.UNAVAILABLE
    died(server)
    stubs.close()

    stubs = restart_without_faults(server)
    try:
        assert follower.follow(stubs) == grpc.StatusCode.OK
        finals = assert_invariants(stubs, [run.id], history)
        failed = finals[run.id].run
        assert failed.status == run_pb2.FAILED  # cleanly: a reason, one ERROR event, no reply
        assert failed.last_error.code == "server_error" and "interrupted" in failed.last_error.message
        assert finals[run.id].events[-1].type == run_pb2.StreamEvent.ERROR
    finally:
        stubs.close()


def test_kill_while_waiting_for_tools(make_server: MakeServer) -> None:
    server = make_server(env=fault_env(store__after_mutate___TOOL_CALLS="kill"))
    stubs = Stubs.connect(server.address)
    history = History()
    assistant = stubs.tool_assistant("get_weather")
    run = stubs.start('/tool get_weather {"city": "Oslo"}', assistant)
    follower = Follower(history, run.id)
    assert follower.follow(stubs) == grpc.StatusCode.UNAVAILABLE
    died(server)
    stubs.close()

    stubs = restart_without_faults(server)
    try:
        # Still waiting for its tool results, across the crash: nothing lost, nothing retried.
        waiting = stubs.wait(run.id)
        assert waiting.status == run_pb2.TOOL_CALLS and waiting.attempt == 1
        assert_invariants(stubs, [run.id], history)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            resumed = pool.submit(follower.follow, stubs)
            results = [
                common_pb2.ToolResult(tool_call_id=call.id, output="sunny")
                for call in waiting.required_tool_calls
            ]
            stubs.runs.SubmitToolResults(
                run_pb2.SubmitToolResultsRequest(run_id=run.id, tool_results=results), timeout=10
            )
            assert resumed.result(timeout=60) == grpc.StatusCode.OK
        finals = assert_invariants(stubs, [run.id], history)
        assert finals[run.id].run.status == run_pb2.COMPLETED
        assert "sunny" in finals[run.id].run.reply.content[0].text.text
    finally:
        stubs.close()


@pytest.mark.parametrize("max_attempts", ["3", "1"])
def test_kill_right_after_cancel_commits(make_server: MakeServer, tmp_path: Path, max_attempts: str) -> None:
    """The server dies right after committing CANCELLING; the next start ends the run CANCELLED
    (even with no attempts left: a cancel is not a failure), never retried, never FAILED."""
    holds = Holds(tmp_path / "holds")
    first_delta = "store.after_mutate:IN_PROGRESS"
    env = {ENV: f"{first_delta}=hold:{holds.directory};store.after_mutate:CANCELLING=kill"}
    server = make_server("--max-attempts", max_attempts, env=env)
    stubs = Stubs.connect(server.address)
    history = History()
    run = stubs.start(f"/sleep 2 {WORDS}")
    follower = Follower(history, run.id)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        listening = pool.submit(follower.follow, stubs)
        holds.wait_reached(first_delta)  # streaming, held after its first delta
        with pytest.raises(grpc.RpcError) as cancel:
            stubs.runs.Cancel(run_pb2.CancelRunRequest(run_id=run.id), timeout=30)
        assert cancel.value.code() == grpc.StatusCode.UNAVAILABLE  # died before answering
        assert listening.result(timeout=60) == grpc.StatusCode.UNAVAILABLE
    died(server)
    stubs.close()

    stubs = restart_without_faults(server)
    try:
        assert follower.follow(stubs) == grpc.StatusCode.OK
        finals = assert_invariants(stubs, [run.id], history)
        assert finals[run.id].run.status == run_pb2.CANCELLED
        statuses = [e.status for e in finals[run.id].events if e.type == run_pb2.StreamEvent.STATUS]
        assert statuses[-2:] == [run_pb2.CANCELLING, run_pb2.CANCELLED]
        # A cancel after the restart answers the finished run as it is (idempotent).
        again = stubs.runs.Cancel(run_pb2.CancelRunRequest(run_id=run.id), timeout=10)
        assert again.status == run_pb2.CANCELLED
    finally:
        stubs.close()
