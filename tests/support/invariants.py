"""One checker for what must hold after any race, crash or fault, over real servers' final state.

Tests record what every client saw (`History`), let the runs settle, read each run's final log,
steps and reply messages (`read_final`), and `check` compares:

- the log's indexes are gap-free from 0 and every event names its run;
- every run ends terminal, or waits in TOOL_CALLS, within the settle bound (never stuck);
- a run has exactly one terminal event, it is the last, and its status is the run's; a run
  waiting in TOOL_CALLS has none, and its last event is the TOOL_CALLS event;
- every event a client saw is in the final log, byte for byte, and each client's history is a
  gap-free run of indexes from where it started (so from 0 it is a prefix of the log);
- no PARTIAL_MESSAGE or TOOL_CALL_DELTA after the run was CANCELLING or CANCELLED;
- each tool call is requested once (one TOOL_CALLS event, one step) and its result applied once
  (one resumption per answered pause);
- a completed run left exactly one reply message on its thread, a failed, cancelled or expired one
  none, an incomplete one at most one;
- every answer to one request_id was the same response (the mutation happened once).
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
from google.protobuf.message import Message as ProtoMessage

from spindle.v1 import message_pb2, run_pb2
from support.stubs import TERMINAL, Stubs

EventType = run_pb2.StreamEvent
SETTLED = TERMINAL | {run_pb2.TOOL_CALLS}
DELTA_TYPES = (EventType.PARTIAL_MESSAGE, EventType.TOOL_CALL_DELTA)
T = TypeVar("T")


def is_terminal(event: run_pb2.StreamEvent) -> bool:
    if event.type in (EventType.DONE, EventType.ERROR):
        return True
    return event.type == EventType.STATUS and event.status in TERMINAL


@dataclass
class Seen:
    """What one client received of one run, in order of arrival, across its reconnects."""

    run_id: str
    start: int
    events: list[run_pb2.StreamEvent] = field(default_factory=list)


@dataclass
class History:
    """Everything the clients of a test saw; thread-safe enough for appends from many threads."""

    seen: list[Seen] = field(default_factory=list)
    answers: dict[str, list[bytes]] = field(default_factory=lambda: defaultdict(list))

    def listener(self, run_id: str, start: int = 0) -> Seen:
        seen = Seen(run_id, start)
        self.seen.append(seen)
        return seen

    def answered(self, request_id: str, response: ProtoMessage) -> None:
        self.answers[request_id].append(response.SerializeToString(deterministic=True))


@dataclass
class Final:
    run: run_pb2.Run
    events: list[run_pb2.StreamEvent]
    steps: list[run_pb2.RunStep]
    replies: list[message_pb2.Message]


def settle(stubs: Stubs, run_ids: Iterable[str], bound: float) -> dict[str, run_pb2.Run]:
    """Each run once it is terminal or in TOOL_CALLS, or as it stands when `bound` runs out."""
    deadline = time.monotonic() + bound
    settled: dict[str, run_pb2.Run] = {}
    for run_id in run_ids:
        while True:
            wait = min(max(deadline - time.monotonic(), 0.0), 30.0)
            run = _retry(lambda: _wait(stubs, run_id, wait))  # noqa: B023 - called at once
            if run.status in SETTLED or time.monotonic() >= deadline:
                settled[run_id] = run
                break
    return settled


def _wait(stubs: Stubs, run_id: str, seconds: float) -> run_pb2.Run:
    request = run_pb2.WaitRunRequest(run_id=run_id)
    request.timeout.FromNanoseconds(int(seconds * 1e9))
    return stubs.runs.Wait(request, timeout=seconds + 10)


def read_final(stubs: Stubs, run_id: str) -> Final:
    run = _retry(lambda: stubs.runs.Get(run_pb2.GetRunRequest(run_id=run_id), timeout=10))
    # A paused (or stuck) run's stream stays open: read what is there with a short deadline.
    events = _retry(lambda: stubs.events(run_id)) if run.status in TERMINAL else _read_open_log(stubs, run_id)
    steps = list(
        _retry(lambda: stubs.runs.ListSteps(run_pb2.ListRunStepsRequest(run_id=run_id, page_size=100))).steps
    )
    replies = [
        message
        for message in _retry(
            lambda: stubs.messages.List(
                message_pb2.ListMessagesRequest(thread_id=run.thread_id, run_id=run_id, page_size=100),
                timeout=10,
            )
        ).messages
        if message.role == message_pb2.ASSISTANT
    ]
    return Final(run, events, steps, replies)


def _read_open_log(stubs: Stubs, run_id: str) -> list[run_pb2.StreamEvent]:
    events: list[run_pb2.StreamEvent] = []
    call = stubs.runs.Listen(run_pb2.ListenRunRequest(run_id=run_id), timeout=2.0)
    try:
        for event in call:
            events.append(event)
            if event.type == EventType.TOOL_CALLS:
                break
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
    finally:
        call.cancel()
    return events


def _retry(call: Callable[[], T], attempts: int = 50) -> T:
    """Reads right after a restart may meet UNAVAILABLE for a moment."""
    for attempt in range(attempts):
        try:
            return call()
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or attempt == attempts - 1:
                raise
            time.sleep(0.1)
    raise AssertionError("unreachable")


def check(finals: dict[str, Final], history: History | None = None) -> list[str]:
    """Every violation of the invariants above, as readable lines (empty: all hold)."""
    problems: list[str] = []
    for run_id, final in finals.items():
        problems.extend(f"{run_id}: {p}" for p in _check_run(final))
    if history is not None:
        for seen in history.seen:
            if seen.run_id in finals:
                problems.extend(f"{seen.run_id}: {p}" for p in _check_seen(seen, finals[seen.run_id]))
        for request_id, answers in history.answers.items():
            if len(set(answers)) > 1:
                problems.append(f"request_id {request_id}: {len(set(answers))} different answers")
    return problems


def assert_invariants(
    stubs: Stubs, run_ids: Iterable[str], history: History | None = None, bound: float = 60.0
) -> dict[str, Final]:
    """Settle the runs, read their final state and fail with every violation found."""
    ids = list(dict.fromkeys(run_ids))
    settle(stubs, ids, bound)
    finals = {run_id: read_final(stubs, run_id) for run_id in ids}
    problems = check(finals, history)
    assert not problems, "invariants violated:\n" + "\n".join(problems[:50])
    return finals


def _check_run(final: Final) -> list[str]:
    run, events = final.run, final.events
    problems = []
    if [e.index for e in events] != list(range(len(events))):
        problems.append(f"log indexes are not gap-free from 0: {[e.index for e in events][:20]}")
    if any(e.run_id != run.id for e in events):
        problems.append("an event names another run")
    if run.status not in SETTLED:
        problems.append(f"stuck in {run_pb2.RunStatus.Name(run.status)}")
    terminal = [e.index for e in events if is_terminal(e)]
    if run.status in TERMINAL:
        if terminal != [len(events) - 1]:
            problems.append(f"terminal events at {terminal} of {len(events)}, expected exactly the last")
        elif events[-1].status != run.status:
            problems.append(f"terminal event status {events[-1].status} but the run is {run.status}")
    elif run.status == run_pb2.TOOL_CALLS:
        if terminal:
            problems.append(f"waits for tools but has terminal events at {terminal}")
        if not events or events[-1].type != EventType.TOOL_CALLS:
            problems.append("waits for tools but its last event is not TOOL_CALLS")
    problems.extend(_check_cancel(events))
    problems.extend(_check_tools(final))
    problems.extend(_check_replies(final))
    return problems


def _check_cancel(events: list[run_pb2.StreamEvent]) -> list[str]:
    cancelling = False
    for event in events:
        if event.type == EventType.STATUS and event.status in (run_pb2.CANCELLING, run_pb2.CANCELLED):
            cancelling = True
        elif cancelling and event.type in DELTA_TYPES:
            return [f"delta at index {event.index} after cancel"]
    return []


def _check_tools(final: Final) -> list[str]:
    problems: list[str] = []
    requested = Counter(
        c.id for e in final.events if e.type == EventType.TOOL_CALLS for c in e.tool_calls.tool_calls
    )
    problems.extend(f"tool call {i} requested {n} times" for i, n in requested.items() if n > 1)
    in_steps = Counter(
        c.id for s in final.steps if s.type == run_pb2.RunStep.TOOL_CALLS for c in s.tool_calls.tool_calls
    )
    problems.extend(f"tool call {i} in {n} steps" for i, n in in_steps.items() if n > 1)
    if set(in_steps) != set(requested):
        problems.append("tool calls in steps and in the log differ")
    resumptions, status = 0, run_pb2.RUN_STATUS_UNSPECIFIED
    for event in final.events:
        resumed = status == run_pb2.TOOL_CALLS and event.status == run_pb2.PENDING
        resumptions += event.type == EventType.STATUS and resumed
        status = event.status
    answered = [
        s
        for s in final.steps
        if s.type == run_pb2.RunStep.TOOL_CALLS and s.status == run_pb2.RunStep.COMPLETED
    ]
    if resumptions != len(answered):
        problems.append(f"{resumptions} resumptions for {len(answered)} answered tool steps")
    return problems


def _check_replies(final: Final) -> list[str]:
    count, status = len(final.replies), final.run.status
    if status == run_pb2.COMPLETED and count != 1:
        return [f"completed with {count} reply messages"]
    if status in (run_pb2.FAILED, run_pb2.CANCELLED, run_pb2.EXPIRED) and count != 0:
        return [f"{run_pb2.RunStatus.Name(status)} with {count} reply messages"]
    if status == run_pb2.INCOMPLETE and count > 1:
        return [f"incomplete with {count} reply messages"]
    return []


def _check_seen(seen: Seen, final: Final) -> list[str]:
    indexes = [e.index for e in seen.events]
    if indexes != list(range(seen.start, seen.start + len(indexes))):
        return [f"a client saw indexes {indexes[:20]}... from {seen.start}: a gap or a duplicate"]
    for event in seen.events:
        if event.index >= len(final.events):
            return [f"a client saw index {event.index}, past the log's end {len(final.events)}"]
        stored = final.events[event.index]
        if event.SerializeToString(deterministic=True) != stored.SerializeToString(deterministic=True):
            return [f"a client saw index {event.index} differ from the log"]
    return []
