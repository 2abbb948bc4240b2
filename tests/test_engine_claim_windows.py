"""A real server held (fault point `engine.before_run_body`) between a run's claim and its
task's body, while a Cancel or a SIGTERM arrives; and a run that every shutdown interrupts."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from spindle.v1 import run_pb2
from support.faults import Holds
from support.invariants import assert_invariants
from support.server import ServerProcess, TestDatabase
from support.stubs import Stubs

MakeServer = Callable[..., ServerProcess]
NewDatabase = Callable[..., TestDatabase]
BODY = "engine.before_run_body"
REQUEUED = "server shutting down; run re-queued"


def test_cancel_before_the_run_body_ends_the_run_and_frees_its_slot(
    make_server: MakeServer, tmp_path: Path
) -> None:
    holds = Holds(tmp_path / "holds")
    server = make_server("--max-concurrent-runs", "1", env=holds.env(BODY))
    stubs = Stubs.connect(server.address)
    try:
        assistant = stubs.assistant(name="held")
        first = stubs.start("never streamed", assistant)
        holds.wait_reached(BODY)  # claimed: IN_PROGRESS, its task not yet in its body
        assert stubs.runs.Cancel(run_pb2.CancelRunRequest(run_id=first.id), timeout=10).status in (
            run_pb2.CANCELLING,
            run_pb2.CANCELLED,
        )
        assert stubs.wait(first.id, timeout=30).status == run_pb2.CANCELLED
        # The only slot is free again: the next run is claimed and completes.
        holds.release(BODY, 2)
        second = stubs.start("the next one", assistant)
        assert stubs.wait(second.id, timeout=30).status == run_pb2.COMPLETED
        assert_invariants(stubs, [first.id, second.id])
    finally:
        stubs.close()


def test_shutdown_before_the_run_body_requeues_the_run(
    make_server: MakeServer, new_database: NewDatabase, tmp_path: Path
) -> None:
    database = new_database()
    holds = Holds(tmp_path / "holds")
    server = make_server("--grace-period", "0.2", database=database, env=holds.env(BODY))
    stubs = Stubs.connect(server.address)
    run = stubs.start("handed to the next start")
    holds.wait_reached(BODY)
    stubs.close()
    assert server.stop() == 0  # the held task outlives the grace period and is stopped
    server = make_server(database=database)
    stubs = Stubs.connect(server.address)
    try:
        done = stubs.wait(run.id, timeout=30)
        assert done.status == run_pb2.COMPLETED
        assert done.attempt == 2
        finals = assert_invariants(stubs, [run.id])
        # Re-queued by the stopping server (not recovered from a lost executor at the next start).
        reasons = [e.status_change.reason for e in finals[run.id].events if e.status == run_pb2.PENDING]
        assert REQUEUED in reasons
    finally:
        stubs.close()


def test_a_run_interrupted_by_every_shutdown_fails_after_max_attempts(
    make_server: MakeServer, new_database: NewDatabase, tmp_path: Path
) -> None:
    database = new_database()
    max_attempts = 3
    run_id = ""
    for start in range(max_attempts):
        holds = Holds(tmp_path / f"holds{start}")  # a fresh process counts arrivals from 1
        server = make_server(
            "--max-attempts",
            str(max_attempts),
            "--grace-period",
            "0.2",
            database=database,
            env=holds.env(BODY),
        )
        if not run_id:
            with_stubs = Stubs.connect(server.address)
            run_id = with_stubs.start("interrupted every time").id
            with_stubs.close()
        holds.wait_reached(BODY)  # this start's attempt is under way
        assert server.stop() == 0
    server = make_server("--max-attempts", str(max_attempts), database=database)
    stubs = Stubs.connect(server.address)
    try:
        failed = stubs.wait(run_id, timeout=30)
        assert failed.status == run_pb2.FAILED, run_pb2.RunStatus.Name(failed.status)
        assert failed.last_error.code == "server_error"
        assert f"interrupted {max_attempts} times" in failed.last_error.message
        finals = assert_invariants(stubs, [run_id])
        requeues = [e for e in finals[run_id].events if e.status_change.reason == REQUEUED]
        assert len(requeues) == max_attempts
    finally:
        stubs.close()


def test_expiry_while_the_executor_is_about_to_complete_wins(make_server: MakeServer, tmp_path: Path) -> None:
    """The run's deadline passes while its executor is held just before writing COMPLETED: the
    sweeper's EXPIRED stands and the late completion is not written. (The run timeout only has
    to outlast the claim, which the API wakes at once.)"""
    point = "engine.before_turn_end_write"
    holds = Holds(tmp_path / "holds")
    server = make_server("--run-timeout", "10", env=holds.env(point))
    stubs = Stubs.connect(server.address)
    try:
        assistant = stubs.assistant(name="late")
        late = stubs.start("finished too late", assistant)
        holds.wait_reached(point)
        expired = stubs.wait(late.id, timeout=30)
        assert expired.status == run_pb2.EXPIRED, run_pb2.RunStatus.Name(expired.status)
        holds.release(point)  # the executor, if it were still there, would write COMPLETED now
        finals = assert_invariants(stubs, [late.id])
        assert finals[late.id].run.status == run_pb2.EXPIRED
        assert finals[late.id].replies == []
    finally:
        stubs.close()


def test_a_create_given_up_before_its_commit_still_gets_its_run_executed(
    make_server: MakeServer, tmp_path: Path
) -> None:
    """A run claimed by its Create waits for that Create to answer before its body starts (the
    client's Listen goes first); a Create whose client gave up must not leave it waiting."""
    point = "engine.before_create_insert"
    holds = Holds(tmp_path / "holds")
    server = make_server(env=holds.env(point))
    stubs = Stubs.connect(server.address)
    try:
        assistant = stubs.assistant(name="abandoned")
        thread = stubs.thread("nobody waits for this answer")
        request = run_pb2.CreateRunRequest(assistant_id=assistant.id, thread_id=thread.id)
        answer = stubs.runs.Create.future(request, timeout=60)
        holds.wait_reached(point)  # the run is not written yet
        answer.cancel()  # the client gives up: the server cancels the Create call
        with pytest.raises(grpc.FutureCancelledError):
            answer.result()
        holds.release(point)
        deadline = time.monotonic() + 60
        runs: list[run_pb2.Run] = []
        while not runs and time.monotonic() < deadline:
            runs = list(stubs.runs.List(run_pb2.ListRunsRequest(thread_id=thread.id), timeout=10).runs)
            time.sleep(0.01)
        assert len(runs) == 1
        assert stubs.wait(runs[0].id, timeout=30).status == run_pb2.COMPLETED
        assert_invariants(stubs, [runs[0].id])
    finally:
        stubs.close()
