"""The sync Run handle against the real server: wait, pause, timeout, listen, cancel, idempotency."""

from __future__ import annotations

import uuid

import grpc
import pytest
from client_faults import BreakStreams, CountUnary, DropResponses

import spindle
from spindle import RunStatus
from support.server import ServerProcess

LOOKUP_LABEL = f"client-test-{uuid.uuid4().hex}"


def start(client: spindle.Client, assistant: spindle.Assistant, text: str, **options: object) -> spindle.Run:
    thread = client.threads.create(messages=[text])
    return client.runs.create(thread_id=thread.id, assistant_id=assistant.id, **options)  # type: ignore[arg-type]


def test_wait_returns_the_completed_result(client: spindle.Client, echo: spindle.Assistant) -> None:
    run = start(client, echo, "hello there", labels={"case": "wait"})
    assert run.id.startswith("run_") and run.status is RunStatus.PENDING and run.labels == {"case": "wait"}
    result = run.wait(timeout=20)
    assert result.status is RunStatus.COMPLETED and result.is_succeeded and result.is_finished
    assert result.text == "You said: hello there" and result.parts == ("You said: hello there",)
    assert result.error is None and result.tool_calls is None
    assert result.usage is not None and result.usage.total_tokens > 0
    assert run.status is RunStatus.COMPLETED and run.completed_at is not None  # the handle is refreshed
    assert run.reply is not None and run.reply.run_id == run.id
    assert run.get_status() is RunStatus.COMPLETED
    assert run.get_result() == result
    assert run.wait() == result  # a finished run answers at once


def test_failed_run_reports_its_error(client: spindle.Client, echo: spindle.Assistant) -> None:
    result = start(client, echo, "/fail the model broke").wait(timeout=20)
    assert result.status is RunStatus.FAILED and result.is_failed and not result.is_succeeded
    assert result.error is not None and "the model broke" in result.error.message
    assert result.text is None


def test_tool_calls_are_a_pause_not_a_success(client: spindle.Client, weather: spindle.Assistant) -> None:
    run = start(client, weather, '/tool get_weather {"city": "Paris"}')
    result = run.wait(timeout=20)
    assert result.status is RunStatus.TOOL_CALLS and result.is_paused
    assert not result.is_finished and not result.is_succeeded and not result.is_failed
    assert result.tool_calls is not None and [c.name for c in result.tool_calls] == ["get_weather"]
    assert result.tool_calls[0].parse_arguments() == {"city": "Paris"}
    assert run.required_tool_calls == result.tool_calls
    assert run.wait(timeout=5) == result  # still the same pause
    run.submit_tool_results({result.tool_calls[0].id: {"sky": "clear"}})
    done = run.wait(timeout=20)
    assert done.is_succeeded and done.text == 'Tool results: get_weather returned {"sky": "clear"}'
    steps = list(run.steps(order="asc"))
    assert [s.type for s in steps] == ["tool_calls", "message_creation"]
    assert steps[0].tool_calls[0].output == '{"sky": "clear"}'


def test_timeout_error_keeps_the_run(client: spindle.Client, echo: spindle.Assistant) -> None:
    run = start(client, echo, "/sleep 5\nslow reply")
    with pytest.raises(spindle.RunTimeoutError) as caught:
        run.wait(timeout=0.5)
    assert isinstance(caught.value, TimeoutError)
    kept = caught.value.run
    assert kept is run and kept.id == run.id and kept.status.is_running
    kept.cancel()
    assert kept.wait(timeout=20).status is RunStatus.CANCELLED


def test_cancel_and_update(client: spindle.Client, echo: spindle.Assistant) -> None:
    run = start(client, echo, "/sleep 5\nto be cancelled")
    assert run.update(labels={"a": "b"}).labels == {"a": "b"}
    assert run.cancel().status in (RunStatus.CANCELLING, RunStatus.CANCELLED)
    result = run.wait(timeout=20)
    assert result.status is RunStatus.CANCELLED and result.is_failed and result.error is not None
    assert run.cancel().status is RunStatus.CANCELLED  # a finished run stays as it is


def test_listen_yields_every_event_with_the_text_so_far(
    client: spindle.Client, echo: spindle.Assistant
) -> None:
    run = start(client, echo, "one two three four")
    events = list(run.listen(timeout=20))
    assert [e.index for e in events] == list(range(len(events)))
    assert events[0].type is spindle.EventType.STATUS and events[0].status is RunStatus.PENDING
    deltas = [e for e in events if e.type is spindle.EventType.PARTIAL_MESSAGE]
    assert "".join(e.delta or "" for e in deltas) == "You said: one two three four"
    assert deltas[-1].text == "You said: one two three four"
    assert events[-1].type is spindle.EventType.DONE and events[-1].is_terminal
    assert events[-1].message is not None and events[-1].message.text == deltas[-1].text
    again = list(client.runs.listen(run.id, events_start_idx=2))  # replay from an index, after the end
    assert [e.index for e in again] == [e.index for e in events[2:]]
    assert list(run.listen(events_start_idx=len(events))) == []  # past the end: nothing, no hang
    assert [e.index for e in run] == [e.index for e in events]


def test_retried_create_with_the_same_request_id_makes_one_run(
    client: spindle.Client, echo: spindle.Assistant
) -> None:
    thread = client.threads.create(messages=["once"])
    request_id = f"client-test-{uuid.uuid4().hex}"  # unique: the shared server remembers request ids
    first = client.runs.create(thread_id=thread, assistant_id=echo, request_id=request_id)
    second = client.runs.create(thread_id=thread, assistant_id=echo, request_id=request_id)
    assert first.id == second.id
    assert [r.id for r in client.runs.list(thread_id=thread)] == [first.id]


def test_a_lost_response_is_retried_with_the_same_request_id(
    server: ServerProcess, echo: spindle.Assistant
) -> None:
    drop = DropResponses("RunService/Create", fail_first=1)
    with spindle.Client(server.address, interceptors=[drop]) as client:
        thread = client.threads.create(messages=["retry me"])
        run = client.runs.create(thread_id=thread, assistant_id=echo)
        ids = [request.request_id for request in drop.record.requests]
        assert len(ids) == 2 and ids[0] == ids[1] and ids[0]
        assert [r.id for r in client.runs.list(thread_id=thread)] == [run.id]
        assert run.wait(timeout=20).is_succeeded


def test_wait_falls_back_to_polling_when_the_stream_fails(
    server: ServerProcess, echo: spindle.Assistant
) -> None:
    broken, counter = BreakStreams(), CountUnary()
    with spindle.Client(server.address, interceptors=[broken, counter]) as client:
        run = start(client, echo, "/sleep 0.6\npolled")
        result = run.wait(timeout=20, poll_interval=0.05)
    assert result.text == "You said: /sleep 0.6\npolled"
    assert broken.record.streams()["ListenBatches"] >= 1
    assert counter.record.calls["/spindle.v1.RunService/Get"] >= 2


def test_run_lookups_and_the_server_long_poll(client: spindle.Client, echo: spindle.Assistant) -> None:
    run = start(client, echo, "look me up", labels={"lookup": LOOKUP_LABEL})
    assert client.runs.get_last_by_thread(run.thread_id).id == run.id
    waited = client.runs.wait(run.id, timeout=20)
    assert waited.status is RunStatus.COMPLETED
    by_label = client.runs.list(labels={"lookup": LOOKUP_LABEL}, statuses=[RunStatus.COMPLETED])
    assert [r.id for r in by_label] == [run.id]
    assert repr(run).startswith("Run(id='run_")


def test_listen_timeout_keeps_the_run(client: spindle.Client, echo: spindle.Assistant) -> None:
    run = start(client, echo, "/sleep 2\nslow stream")
    seen: list[spindle.RunEvent] = []
    with pytest.raises(spindle.RunTimeoutError) as caught:
        for event in run.listen(timeout=0.5):
            seen.append(event)
    assert caught.value.run is run and run.status is RunStatus.IN_PROGRESS  # updated from the events
    assert [e.index for e in seen] == list(range(len(seen))) and seen
    resumed = list(run.listen(events_start_idx=seen[-1].index + 1, timeout=20))
    assert resumed[0].index == seen[-1].index + 1 and resumed[-1].is_terminal


@pytest.mark.parametrize("code", [grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNIMPLEMENTED])
def test_wait_polls_when_the_stream_is_refused_for_good(
    server: ServerProcess, echo: spindle.Assistant, code: grpc.StatusCode
) -> None:
    """A server out of room for more Listens (RESOURCE_EXHAUSTED), or a proxy that cannot stream:
    wait() still answers, by polling Get, and does not retry the refused stream on every poll.
    UNIMPLEMENTED for ListenBatches is also what an older server says: Listen is tried once then."""
    broken, counter = BreakStreams(code), CountUnary()
    with spindle.Client(server.address, interceptors=[broken, counter]) as client:
        run = start(client, echo, "/sleep 0.6\nrefused stream")
        result = run.wait(timeout=20, poll_interval=0.05)
    assert result.text == "You said: /sleep 0.6\nrefused stream"
    listens = 1 if code is grpc.StatusCode.UNIMPLEMENTED else 0
    assert broken.record.streams() == {"ListenBatches": 1, "Listen": listens}
    assert counter.record.calls["/spindle.v1.RunService/Get"] >= 2


def test_wait_raises_what_get_says_for_good(server: ServerProcess) -> None:
    """Polling is the judge: a run that is not there is NotFound, even while the stream is refused."""
    broken = BreakStreams(grpc.StatusCode.INTERNAL)
    with spindle.Client(server.address, interceptors=[broken]) as client, pytest.raises(spindle.NotFound):
        client.runs.poll("run_doesnotexist", timeout=5)  # waits on an id the server never made


def test_after_listening_the_handle_holds_the_outcome(
    client: spindle.Client, echo: spindle.Assistant
) -> None:
    """Events keep the handle current: after the terminal event its result is the run's, with the
    reply (DONE) or the error (ERROR), without another call."""
    run = start(client, echo, "listened to the end")
    events = list(run.listen(timeout=20))
    assert events[-1].type is spindle.EventType.DONE
    assert run.status is RunStatus.COMPLETED and run.result.text == "You said: listened to the end"
    assert run.result == run.get_result()
    failed = start(client, echo, "/fail on purpose")
    assert list(failed.listen(timeout=20))[-1].type is spindle.EventType.ERROR
    assert failed.result.is_failed and failed.result.error is not None
    assert "on purpose" in failed.result.error.message
    assert failed.result == failed.get_result()
    cut = start(client, echo, "one two three four", max_completion_tokens=2)
    assert list(cut.listen(timeout=20))[-1].type is spindle.EventType.STATUS
    assert cut.status is RunStatus.INCOMPLETE and cut.result.text == "You said: "
    assert cut.result == cut.get_result()
