"""The client's pure parts: enums, backoff and deadlines, request encoding, event cursor, results."""

from __future__ import annotations

import io
import random

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

import spindle
from spindle import _decode, _encode
from spindle._events import EventCursor
from spindle._follow import Follow, poll_policy
from spindle._schema import describe_function
from spindle.cli._output import jsonable
from spindle.cli._spinner import Spinner
from spindle.errors import from_rpc_error
from spindle.retry import (
    DEFAULT_RETRY,
    NO_RETRY,
    Backoff,
    Deadline,
    RetryPolicy,
    is_reset_stream,
    retry_delay,
)
from spindle.v1 import common_pb2, run_pb2

# ---- enums ------------------------------------------------------------------------------------


def test_run_status_has_the_seed_values_and_unknown_for_new_ones() -> None:
    assert [spindle.RunStatus(n).name for n in range(6)] == [
        "RUN_STATUS_UNSPECIFIED",
        "PENDING",
        "IN_PROGRESS",
        "FAILED",
        "COMPLETED",
        "TOOL_CALLS",
    ]
    assert spindle.RunStatus.UNKNOWN == -1
    assert spindle.RunStatus(42) is spindle.RunStatus.UNKNOWN
    assert spindle.EventType(99) is spindle.EventType.UNKNOWN
    assert spindle.RunStatus.COMPLETED == run_pb2.COMPLETED
    assert spindle.EventType.DONE == run_pb2.StreamEvent.DONE


def test_status_predicates_treat_tool_calls_as_a_pause() -> None:
    status = spindle.RunStatus
    assert status.PENDING.is_running and status.IN_PROGRESS.is_running and status.CANCELLING.is_running
    assert status.COMPLETED.is_succeeded and status.COMPLETED.is_finished
    for failed in (status.FAILED, status.CANCELLED, status.INCOMPLETE, status.EXPIRED):
        assert failed.is_failed and failed.is_finished and not failed.is_succeeded
    paused = status.TOOL_CALLS
    assert paused.is_paused
    assert not (paused.is_running or paused.is_finished or paused.is_succeeded or paused.is_failed)
    assert not status.UNKNOWN.is_finished and not status.UNKNOWN.is_running
    assert status.COMPLETED.status_name == "COMPLETED" == str(status.COMPLETED) == f"{status.COMPLETED}"


def test_an_unknown_status_from_a_newer_server_decodes_to_unknown() -> None:
    run = _decode.run_data(run_pb2.Run(id="run_x", status=77))  # type: ignore[arg-type]
    assert run.status is spindle.RunStatus.UNKNOWN
    assert not spindle.RunResult.from_run(run).is_finished


# ---- backoff and deadlines --------------------------------------------------------------------


def test_backoff_grows_with_jitter_up_to_the_maximum() -> None:
    policy = RetryPolicy(initial=0.1, maximum=1.0, multiplier=2.0, jitter=0.5)
    backoff = Backoff(policy, random.Random(7))
    delays = [backoff.next_delay() for _ in range(8)]
    bases = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0]
    for delay, base in zip(delays, bases, strict=True):
        assert base / 2 <= delay <= base
    assert len(set(delays)) == len(delays)  # jittered, not lock-step
    backoff.reset()
    assert 0.05 <= backoff.next_delay() <= 0.1


def test_retry_only_retryable_codes_and_within_the_deadline() -> None:
    policy = RetryPolicy(initial=0.5, jitter=0.0)
    unavailable = spindle.Unavailable("down")
    assert retry_delay(policy, policy.backoff(), Deadline(10), unavailable) == 0.5
    assert retry_delay(policy, policy.backoff(), Deadline(0.2), unavailable) is None  # would overshoot
    assert retry_delay(policy, policy.backoff(), Deadline(10), spindle.NotFound("gone")) is None
    in_flight = spindle.Aborted("busy", reason="REQUEST_IN_PROGRESS")
    assert retry_delay(policy, policy.backoff(), Deadline(10), in_flight) == 0.5
    limited = RetryPolicy(initial=0.01, max_attempts=2)
    backoff = limited.backoff()
    assert retry_delay(limited, backoff, Deadline(None), unavailable) is not None
    assert retry_delay(limited, backoff, Deadline(None), unavailable) is None


def test_deadline_with_a_fake_clock() -> None:
    now = [100.0]
    deadline = Deadline(5, clock=lambda: now[0])
    assert deadline.remaining() == 5 and deadline.cap(10) == 5 and deadline.cap(2) == 2
    now[0] = 106.0
    assert deadline.expired() and deadline.remaining() == 0
    assert Deadline(None).remaining() is None and Deadline(None).cap(3) == 3


# ---- errors -----------------------------------------------------------------------------------


class _FakeCall(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, trailers: tuple[tuple[str, bytes], ...]) -> None:
        self._code, self._trailers = code, trailers

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "bad"

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        return self._trailers


def test_every_status_code_has_its_exception_class() -> None:
    for code in grpc.StatusCode:
        if code is grpc.StatusCode.OK:
            continue
        error = from_rpc_error(_FakeCall(code, ()))
        assert error.code is code
        assert type(error).__name__.lower().replace("_", "") == code.name.lower().replace("_", "")


def test_status_details_become_reason_and_field_violations() -> None:
    status = status_pb2.Status(code=3, message="bad")
    for detail in (
        error_details_pb2.ErrorInfo(reason="INVALID_ARGUMENT", domain="spindle.v1", metadata={"k": "v"}),
        error_details_pb2.BadRequest(field_violations=[{"field": "labels", "description": "too many"}]),
    ):
        packed = any_pb2.Any()
        packed.Pack(detail)
        status.details.append(packed)
    error = from_rpc_error(
        _FakeCall(
            grpc.StatusCode.INVALID_ARGUMENT, (("grpc-status-details-bin", status.SerializeToString()),)
        )
    )
    assert isinstance(error, spindle.InvalidArgument)
    assert (error.reason, error.domain, error.metadata) == ("INVALID_ARGUMENT", "spindle.v1", {"k": "v"})
    assert error.field_violations == (spindle.FieldViolation("labels", "too many"),)


# ---- encoding ---------------------------------------------------------------------------------


def lookup(city: str, days: int = 1, metric: bool | None = None) -> str:
    """Look up the forecast.

    More text that is not the description."""
    return city


def test_a_python_function_describes_itself_as_a_tool() -> None:
    tool = describe_function(lookup)
    assert tool.name == "lookup" and tool.description == "Look up the forecast."
    assert tool.parameters == {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "days": {"type": "integer"},
            "metric": {"type": "boolean"},
        },
        "required": ["city"],
    }


def test_tools_are_accepted_in_every_shape() -> None:
    schema = {"type": "object", "properties": {}}
    shapes: list[_encode.ToolSpec] = [
        spindle.FunctionTool("a", "A", schema),
        {"type": "function", "function": {"name": "b", "description": "B", "parameters": schema}},
        {"name": "c", "parameters": schema},
        lookup,
    ]
    names = [tool.function.name for tool in _encode.tools(shapes)]
    assert names == ["a", "b", "c", "lookup"]


def test_response_format_and_tool_results_encoding() -> None:
    assert _encode.response_format("json_object").type == common_pb2.ResponseFormat.JSON_OBJECT
    schema = _encode.response_format(
        {"type": "json_schema", "json_schema": {"name": "n", "schema": {"a": 1}}}
    )
    assert schema.type == common_pb2.ResponseFormat.JSON_SCHEMA and schema.json_schema.name == "n"
    with pytest.raises(ValueError):
        _encode.response_format("yaml")
    results = _encode.tool_results({"call_1": {"t": 20}, "call_2": "sunny"})
    assert [(r.tool_call_id, r.output) for r in results] == [("call_1", '{"t": 20}'), ("call_2", "sunny")]
    assert _encode.request_id(None) != _encode.request_id(None)
    assert _encode.request_id("mine") == "mine"


# ---- events and results -----------------------------------------------------------------------


def _delta(index: int, text: str) -> run_pb2.StreamEvent:
    event = run_pb2.StreamEvent(run_id="run_x", index=index, type=run_pb2.StreamEvent.PARTIAL_MESSAGE)
    event.message_delta.text = text
    return event


def test_cursor_drops_duplicates_and_restarts_text_on_discard() -> None:
    cursor = EventCursor(0)
    assert cursor.accept(_delta(0, "Hel")) is not None
    assert cursor.accept(_delta(0, "Hel")) is None  # a replayed duplicate
    assert cursor.accept(_delta(1, "lo")).text == "Hello"  # type: ignore[union-attr]
    discard = run_pb2.StreamEvent(index=2, type=run_pb2.StreamEvent.STATUS, status=run_pb2.PENDING)
    discard.status_change.discard_partial_message = True
    assert cursor.accept(discard).discard_partial_message  # type: ignore[union-attr]
    assert cursor.accept(_delta(3, "Hi")).text == "Hi"  # type: ignore[union-attr]
    done = run_pb2.StreamEvent(index=4, type=run_pb2.StreamEvent.DONE, status=run_pb2.COMPLETED)
    assert cursor.accept(done).is_terminal and cursor.finished  # type: ignore[union-attr]
    assert cursor.next_index == 5


def test_a_discard_voids_only_the_text_since_the_last_tool_calls() -> None:
    cursor = EventCursor(0)
    cursor.accept(_delta(0, "Let me check. "))
    cursor.accept(
        run_pb2.StreamEvent(index=1, type=run_pb2.StreamEvent.TOOL_CALLS, status=run_pb2.TOOL_CALLS)
    )
    assert cursor.accept(_delta(2, "The wea")).text == "Let me check. The wea"  # type: ignore[union-attr]
    discard = run_pb2.StreamEvent(index=3, type=run_pb2.StreamEvent.STATUS, status=run_pb2.PENDING)
    discard.status_change.discard_partial_message = True
    assert cursor.accept(discard).text == "Let me check. "  # type: ignore[union-attr]
    assert cursor.accept(_delta(4, "Sunny.")).text == "Let me check. Sunny."  # type: ignore[union-attr]


def test_a_status_event_with_a_terminal_status_is_terminal() -> None:
    cancelled = run_pb2.StreamEvent(index=0, type=run_pb2.StreamEvent.STATUS, status=run_pb2.CANCELLED)
    paused = run_pb2.StreamEvent(index=1, type=run_pb2.StreamEvent.TOOL_CALLS, status=run_pb2.TOOL_CALLS)
    cursor = EventCursor(0)
    assert cursor.accept(cancelled).is_terminal  # type: ignore[union-attr]
    assert not EventCursor(1).accept(paused).is_terminal  # type: ignore[union-attr]


def test_result_of_a_paused_run_is_not_a_success() -> None:
    run = run_pb2.Run(id="run_x", status=run_pb2.TOOL_CALLS)
    run.required_tool_calls.add(id="call_1").function.name = "get_weather"
    result = spindle.RunResult.from_run(_decode.run_data(run))
    assert result.is_paused and not result.is_finished and not result.is_succeeded
    assert result.tool_calls is not None and result.tool_calls[0].name == "get_weather"
    assert result.text is None and result.parts == ()


def test_json_output_of_results() -> None:
    run = run_pb2.Run(id="run_x", status=run_pb2.COMPLETED)
    run.reply.content.add().text.text = "hi"
    value = jsonable(spindle.RunResult.from_run(_decode.run_data(run)))
    assert value["status"] == "COMPLETED" and value["text"] == "hi"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_spinner_draws_only_on_a_terminal() -> None:
    pipe, terminal = io.StringIO(), _Terminal()
    with Spinner(pipe, "waiting"):
        pass
    assert pipe.getvalue() == ""
    spinner = Spinner(terminal, "waiting").start()
    spinner.stop()
    assert "waiting" in terminal.getvalue() and terminal.getvalue().endswith("\r\x1b[2K")


# ---- following a run: which failures end it ----------------------------------------------------


def _follow(deadline: Deadline) -> Follow:
    def timeout() -> Exception:
        return spindle.RunTimeoutError("timed out", None)  # type: ignore[arg-type]

    return Follow("run_x", EventCursor(0), deadline, RetryPolicy(), print, print, timeout)


def test_a_permanent_error_is_raised_as_itself_even_after_the_deadline() -> None:
    expired = _follow(Deadline(0))
    with pytest.raises(spindle.NotFound):
        expired.resume_or_raise(spindle.NotFound("gone"))
    with pytest.raises(spindle.RunTimeoutError):
        expired.resume_or_raise(spindle.Unavailable("down"))


def test_one_slow_poll_is_retried_while_the_wait_has_time() -> None:
    follow = _follow(Deadline(60))
    follow.resume_or_raise(spindle.DeadlineExceeded("poll_timeout passed"))  # no raise: poll again
    follow.resume_or_raise(spindle.Cancelled("server shutting down"))
    assert follow.stream_failed(spindle.Unavailable("down")) is True  # ride the stream again
    assert follow.stream_failed(spindle.ResourceExhausted("too many streams")) is False  # poll alone


def test_a_zero_poll_interval_still_backs_off() -> None:
    backoff = poll_policy(0).backoff(random.Random(1))
    delays = [backoff.next_delay() for _ in range(12)]
    assert all(delay > 0 for delay in delays) and delays[-1] > delays[0]


def test_a_stream_a_proxy_reset_is_retried_and_resumed_like_unavailable() -> None:
    """nginx resets a call's stream (grpc: INTERNAL, "RST_STREAM", no reason) when the replica
    behind it dies mid-call (tests/test_replicas_script.py meets it for real)."""
    reset = spindle.errors.Internal("Stream removed (RST_STREAM (Received RST_STREAM with error code 2))")
    assert is_reset_stream(reset)
    assert DEFAULT_RETRY.is_retryable(reset)
    assert not NO_RETRY.is_retryable(reset)
    assert not RetryPolicy(codes=frozenset({grpc.StatusCode.ABORTED})).is_retryable(reset)
    # The server's own INTERNAL carries a reason, and is not a broken stream.
    assert not DEFAULT_RETRY.is_retryable(spindle.errors.Internal("RST_STREAM in a bug", reason="INTERNAL"))
    assert not DEFAULT_RETRY.is_retryable(spindle.errors.Internal("Exception calling application"))
