"""The cancel race, 200 times at once against a real server: no run is left stuck, none leaks
an executor slot, and every run's log and thread obey the invariants."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from spindle.v1 import run_pb2, thread_pb2
from support.invariants import assert_invariants
from support.server import ServerProcess
from support.stubs import Stubs

MakeServer = Callable[..., ServerProcess]
RUNS = 200
SLOTS = 64
TIMEOUT = 60.0  # per call: a failure bound only
SETTLE_BOUND = 100.0  # for all 200 runs together; also a failure bound (the runs take seconds)


@pytest.mark.timeout(400)
def test_two_hundred_runs_cancelled_at_once_leave_none_stuck(make_server: MakeServer) -> None:
    server = make_server("--max-concurrent-runs", str(SLOTS))
    stubs = Stubs.connect(server.address)
    try:
        assistant = stubs.assistant(name="storm")
        # Short replies: cancels land on PENDING runs, on runs being claimed, on tasks that have
        # not started, on streaming ones, and on runs that have just finished.
        thread_calls = [
            stubs.threads.Create.future(
                _thread_request(f"/sleep 0.05 reply {i} " + "w " * 5), timeout=TIMEOUT
            )
            for i in range(RUNS)
        ]
        threads = [call.result() for call in thread_calls]
        run_calls = [
            stubs.runs.Create.future(
                run_pb2.CreateRunRequest(assistant_id=assistant.id, thread_id=t.id), timeout=TIMEOUT
            )
            for t in threads
        ]
        runs = [call.result() for call in run_calls]
        cancel_calls = [
            stubs.runs.Cancel.future(run_pb2.CancelRunRequest(run_id=run.id), timeout=TIMEOUT) for run in runs
        ]
        answers = [call.result() for call in cancel_calls]
        assert {a.status for a in answers} <= {run_pb2.CANCELLED, run_pb2.CANCELLING, run_pb2.COMPLETED}

        finals = assert_invariants(stubs, [run.id for run in runs], bound=SETTLE_BOUND)
        statuses = {final.run.status for final in finals.values()}
        assert statuses <= {run_pb2.CANCELLED, run_pb2.COMPLETED}, statuses
        for answer in answers:
            if answer.status == run_pb2.COMPLETED:  # cancelling a finished run changes nothing
                assert finals[answer.id].run.status == run_pb2.COMPLETED

        # Every executor slot is free again: as many long runs as there are slots all start.
        long_runs = [stubs.start("/sleep 600 " + "w " * 5, assistant) for _ in range(SLOTS)]
        started = [stubs.wait_for(run.id, {run_pb2.IN_PROGRESS}, timeout=TIMEOUT) for run in long_runs]
        assert [run_pb2.RunStatus.Name(r.status) for r in started] == ["IN_PROGRESS"] * SLOTS
        for run in long_runs:
            stubs.runs.Cancel(run_pb2.CancelRunRequest(run_id=run.id), timeout=TIMEOUT)
        assert_invariants(stubs, [run.id for run in long_runs], bound=60.0)
    finally:
        stubs.close()


def _thread_request(text: str) -> thread_pb2.CreateThreadRequest:
    request = thread_pb2.CreateThreadRequest()
    request.messages.add(text=text)
    return request
