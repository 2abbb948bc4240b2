"""request_id (AIP-155) against real server processes: a mutation is applied once, whatever
crashes or races around it, and every answer to one request_id is the first one.

Each test steers the server with fault points: `idempotency.after_commit:METHOD` (the change and
its answer are committed, the caller has not been answered), `idempotency.in_transaction:METHOD`
(the change and its answer are written, not committed: the SQLite writer waits there) and
`idempotency.before_perform:METHOD` (the request_id was found unanswered, nothing written yet).
"""

from __future__ import annotations

import itertools
import signal
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message as ProtoMessage

from spindle.v1 import common_pb2, message_pb2, run_pb2, thread_pb2
from support.faults import ENV, Holds
from support.invariants import History, assert_invariants
from support.server import ServerProcess
from support.stubs import Stubs, error_details

CALL_TIMEOUT = 60.0  # a failure bound only
RETRIES = 3


@dataclass
class Prepared:
    """One idempotent call, ready to send (and send again) to any server on the same database."""

    request_id: str
    request: ProtoMessage
    stub: Callable[[Stubs], Any]  # the unary method to call
    response: type[Any]
    effects: Callable[[Stubs], list[str]]  # what the call made or did; exactly one item once done
    run_ids: list[str]
    answer_id: str = ""  # the id the answer carries; "" for the one thing the call made
    answered_status: int = run_pb2.RUN_STATUS_UNSPECIFIED  # the run's status the first answer shows

    def send(self, stubs: Stubs) -> Any:
        return self.stub(stubs)(self.request, timeout=CALL_TIMEOUT)

    def send_async(self, stubs: Stubs) -> Any:
        return self.stub(stubs).future(self.request, timeout=CALL_TIMEOUT)


def new_request_id() -> str:
    return f"once-{uuid.uuid4().hex}"


def thread_create(stubs: Stubs) -> Prepared:
    name = f"made-once-{uuid.uuid4().hex[:8]}"
    request_id = new_request_id()
    request = thread_pb2.CreateThreadRequest(name=name, request_id=request_id)
    request.messages.add(text="hello")

    def effects(s: Stubs) -> list[str]:
        listed = s.threads.List(thread_pb2.ListThreadsRequest(page_size=100), timeout=10).threads
        return [t.id for t in listed if t.name == name]

    return Prepared(request_id, request, lambda s: s.threads.Create, thread_pb2.Thread, effects, [])


def message_create(stubs: Stubs) -> Prepared:
    thread_id = stubs.thread().id
    request_id = new_request_id()
    request = message_pb2.CreateMessageRequest(thread_id=thread_id, text="said once", request_id=request_id)

    def effects(s: Stubs) -> list[str]:
        listed = s.messages.List(
            message_pb2.ListMessagesRequest(thread_id=thread_id, page_size=100), timeout=10
        ).messages
        return [m.id for m in listed]

    return Prepared(request_id, request, lambda s: s.messages.Create, message_pb2.Message, effects, [])


def run_create(stubs: Stubs) -> Prepared:
    assistant_id = stubs.assistant(name="echo").id
    thread_id = stubs.thread("hello").id
    request_id = new_request_id()
    request = run_pb2.CreateRunRequest(assistant_id=assistant_id, thread_id=thread_id, request_id=request_id)

    def effects(s: Stubs) -> list[str]:
        listed = s.runs.List(run_pb2.ListRunsRequest(thread_id=thread_id, page_size=100), timeout=10).runs
        return [r.id for r in listed]

    return Prepared(
        request_id,
        request,
        lambda s: s.runs.Create,
        run_pb2.Run,
        effects,
        [],
        answered_status=run_pb2.PENDING,
    )


def status_events(stubs: Stubs, run_id: str, status: int) -> list[str]:
    return [
        str(e.index)
        for e in stubs.events(run_id)
        if e.type == run_pb2.StreamEvent.STATUS and e.status == status
    ]


def run_cancel(stubs: Stubs) -> Prepared:
    run = stubs.start("/sleep 600")  # streams for ten minutes: IN_PROGRESS until cancelled
    assert stubs.wait_for(run.id, {run_pb2.IN_PROGRESS}, timeout=CALL_TIMEOUT).status == run_pb2.IN_PROGRESS
    request_id = new_request_id()
    request = run_pb2.CancelRunRequest(run_id=run.id, request_id=request_id)

    def effects(s: Stubs) -> list[str]:
        return status_events(s, run.id, run_pb2.CANCELLING)

    return Prepared(
        request_id,
        request,
        lambda s: s.runs.Cancel,
        run_pb2.Run,
        effects,
        [run.id],
        run.id,
        run_pb2.CANCELLING,
    )


def tool_submit(stubs: Stubs) -> Prepared:
    assistant = stubs.tool_assistant("f")
    run = stubs.run(assistant.id, stubs.thread("/tool f {}").id)
    paused = stubs.wait(run.id, timeout=CALL_TIMEOUT)
    assert paused.status == run_pb2.TOOL_CALLS
    request_id = new_request_id()
    request = run_pb2.SubmitToolResultsRequest(
        run_id=run.id,
        request_id=request_id,
        tool_results=[
            common_pb2.ToolResult(tool_call_id=c.id, output="42") for c in paused.required_tool_calls
        ],
    )

    def effects(s: Stubs) -> list[str]:
        steps = s.runs.ListSteps(run_pb2.ListRunStepsRequest(run_id=run.id, page_size=100), timeout=10).steps
        answered = [
            st.id for st in steps if st.type == run_pb2.RunStep.TOOL_CALLS and st.status == st.COMPLETED
        ]
        logged = s.events(run.id)
        resumed = [
            e.index
            for before, e in itertools.pairwise(logged)
            if before.status == run_pb2.TOOL_CALLS and e.status == run_pb2.PENDING
        ]
        assert len(resumed) == len(answered), (resumed, answered)
        return answered

    return Prepared(
        request_id,
        request,
        lambda s: s.runs.SubmitToolResults,
        run_pb2.Run,
        effects,
        [run.id],
        run.id,
        run_pb2.PENDING,
    )


CASES: dict[str, Callable[[Stubs], Prepared]] = {
    "threads.create": thread_create,
    "messages.create": message_create,
    "runs.create": run_create,
    "runs.cancel": run_cancel,
    "runs.submit_tool_results": tool_submit,
}


def check_once(stubs: Stubs, prepared: Prepared, history: History) -> None:
    """The effect happened once, every answer is the same, the runs' invariants hold."""
    answers = {bytes(a) for a in history.answers[prepared.request_id]}
    assert len(answers) == 1, "different answers to one request_id"
    assert_invariants(stubs, prepared.run_ids, history)
    effects = prepared.effects(stubs)
    assert len(effects) == 1, f"applied {len(effects)} times: {effects}"
    first = prepared.response.FromString(next(iter(answers)))
    assert first.id == (prepared.answer_id or effects[0])
    if prepared.answered_status:
        # The answer is the one recorded with the change, not recomputed at the retry: the run
        # has moved on since (finished, or cancelled), the answer still shows it as it was.
        assert first.status == prepared.answered_status


@pytest.mark.parametrize("method", list(CASES))
def test_a_crash_between_commit_and_answer_is_answered_by_the_retry(
    method: str, make_server: Callable[..., ServerProcess]
) -> None:
    first = make_server("--tool-timeout", "600", env={ENV: f"idempotency.after_commit:{method}=kill"})
    stubs = Stubs.connect(first.address)
    prepared = CASES[method](stubs)
    with pytest.raises(grpc.RpcError):
        prepared.send(stubs)  # committed, then the server died before answering
    stubs.close()
    assert first.process is not None and first.process.wait(timeout=30) == -signal.SIGKILL
    first.kill()

    second = make_server("--tool-timeout", "600", database=first.database)
    stubs = Stubs.connect(second.address)
    try:
        if method == "runs.create":
            prepared.run_ids.extend(prepared.effects(stubs))
        history = History()
        for _ in range(RETRIES):
            history.answered(prepared.request_id, prepared.send(stubs))
        check_once(stubs, prepared, history)
    finally:
        stubs.close()


def holding(tmp_path: Path, make_server: Callable[..., ServerProcess], *points: str) -> tuple[Holds, Stubs]:
    holds = Holds(tmp_path / "holds")
    server = make_server("--tool-timeout", "600", env=holds.env(*points))
    return holds, Stubs.connect(server.address)


@pytest.mark.parametrize("method", ["runs.create", "messages.create", "runs.submit_tool_results"])
def test_retries_while_the_first_commits_get_its_answer(
    method: str, make_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """The first attempt holds the writer inside its transaction (change and answer written, not
    committed); several retries find no answer yet and try the change themselves. Each is
    refused in its own transaction once the first commits, and answered with the first's answer:
    never ABORTED, never applied twice."""
    read, written = f"idempotency.before_perform:{method}", f"idempotency.in_transaction:{method}"
    holds, stubs = holding(tmp_path, make_server, read, written)
    try:
        prepared = CASES[method](stubs)
        # Were a retry's change ever written, it would pass the writer's hold: let it, so that
        # the count below fails rather than the test hanging.
        for nth in range(2, RETRIES + 2):
            holds.release(written, nth)
        history = History()
        first = prepared.send_async(stubs)
        holds.wait_reached(read)
        holds.release(read)
        holds.wait_reached(written)
        retries = [prepared.send_async(stubs) for _ in range(RETRIES)]
        for nth in range(2, RETRIES + 2):
            holds.wait_reached(read, nth)  # this retry found no answer yet
            holds.release(read, nth)
        holds.release(written)
        for call in [first, *retries]:
            history.answered(prepared.request_id, call.result())
        if method == "runs.create":
            prepared.run_ids.extend(prepared.effects(stubs))
        check_once(stubs, prepared, history)
        assert not holds.is_reached(written, 2), "a retry wrote its change"
    finally:
        stubs.close()


@pytest.mark.parametrize("method", ["runs.create", "messages.create", "runs.submit_tool_results"])
def test_a_retry_that_overtakes_the_first_attempt_answers_both(
    method: str, make_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """The first attempt stops after finding no answer; the retry goes all the way and commits.
    The first then comes back: its change is refused (or, for tools, finds them submitted) and it
    answers with the retry's answer."""
    read = f"idempotency.before_perform:{method}"
    holds, stubs = holding(tmp_path, make_server, read)
    try:
        prepared = CASES[method](stubs)
        holds.release(read, 2)
        history = History()
        first = prepared.send_async(stubs)
        holds.wait_reached(read)
        history.answered(prepared.request_id, prepared.send(stubs))
        holds.release(read)
        history.answered(prepared.request_id, first.result())
        if method == "runs.create":
            prepared.run_ids.extend(prepared.effects(stubs))
        check_once(stubs, prepared, history)
    finally:
        stubs.close()


def test_another_request_under_an_id_in_flight_is_refused_and_not_applied(
    make_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """A different run under the same request_id, sent while the first is being committed: it
    finds no answer yet, so it is its own transaction that must refuse it."""
    method = "runs.create"
    read, written = f"idempotency.before_perform:{method}", f"idempotency.in_transaction:{method}"
    holds, stubs = holding(tmp_path, make_server, read, written)
    try:
        prepared = run_create(stubs)
        other_thread = stubs.thread("another").id
        assert isinstance(prepared.request, run_pb2.CreateRunRequest)
        other = run_pb2.CreateRunRequest()
        other.CopyFrom(prepared.request)
        other.thread_id = other_thread
        holds.release(written, 2)
        first = prepared.send_async(stubs)
        holds.wait_reached(read)
        holds.release(read)
        holds.wait_reached(written)
        second = stubs.runs.Create.future(other, timeout=CALL_TIMEOUT)
        holds.wait_reached(read, 2)
        holds.release(read, 2)
        holds.release(written)
        created = first.result()
        with pytest.raises(grpc.RpcError) as refused:
            second.result()
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        info, violations = error_details(refused.value)
        assert info is not None and info.reason == "REQUEST_ID_REUSED"
        assert [field for field, _ in violations] == ["request_id"]
        listed = stubs.runs.List(run_pb2.ListRunsRequest(thread_id=other_thread), timeout=10).runs
        assert list(listed) == []  # not applied
        assert not holds.is_reached(written, 2), "the refused request wrote its change"
        assert_invariants(stubs, [created.id])
    finally:
        stubs.close()
