"""Run lifecycle against the real server: every state and transition of the state machine."""

from __future__ import annotations

import json
import time

import grpc
import pytest

from spindle.v1 import assistant_pb2, common_pb2, message_pb2, run_pb2
from support.stubs import Stubs, error_details

EventType = run_pb2.StreamEvent


def tool_assistant(stubs: Stubs, *names: str) -> str:
    return stubs.tool_assistant(*names).id


def test_run_completes_with_reply_on_thread(stubs: Stubs) -> None:
    run = stubs.start("hello spindle")
    assert run.status == run_pb2.PENDING
    assert run.id.startswith("run_") and run.expires_at.seconds > 0
    done = stubs.wait(run.id)
    assert done.status == run_pb2.COMPLETED
    assert done.reply.content[0].text.text == "You said: hello spindle"
    assert done.started_at.seconds and done.completed_at.seconds
    assert done.usage.completion_tokens == 4 and done.usage.total_tokens == done.usage.prompt_tokens + 4
    assert not done.HasField("expires_at")
    messages = stubs.messages.List(
        message_pb2.ListMessagesRequest(thread_id=run.thread_id, order=common_pb2.ASC)
    )
    assert [m.role for m in messages.messages] == [message_pb2.USER, message_pb2.ASSISTANT]
    reply = messages.messages[1]
    assert reply.run_id == run.id and reply.assistant_id == run.assistant_id
    assert reply.id == done.reply.id


def test_event_log_of_a_completed_run(stubs: Stubs) -> None:
    run = stubs.start("one two three four five")
    events = stubs.events(run.id)
    assert [e.index for e in events] == list(range(len(events)))
    assert events[0].type == EventType.STATUS and events[0].status == run_pb2.PENDING
    assert events[1].type == EventType.STATUS and events[1].status == run_pb2.IN_PROGRESS
    text = "".join(e.message_delta.text for e in events if e.type == EventType.PARTIAL_MESSAGE)
    assert text == "You said: one two three four five"
    assert events[-1].type == EventType.DONE and events[-1].status == run_pb2.COMPLETED
    assert events[-1].done.message.content[0].text.text == text
    assert sum(1 for e in events if e.type in (EventType.DONE, EventType.ERROR)) == 1
    assert all(e.run_id == run.id and e.created_at.seconds for e in events)


def test_steps_record_message_creation(stubs: Stubs) -> None:
    run = stubs.start("steps please")
    done = stubs.wait(run.id)
    steps = stubs.runs.ListSteps(run_pb2.ListRunStepsRequest(run_id=run.id)).steps
    assert len(steps) == 1
    step = steps[0]
    assert step.type == run_pb2.RunStep.MESSAGE_CREATION and step.status == run_pb2.RunStep.COMPLETED
    assert step.message_creation.message_id == done.reply.id
    assert step.usage.total_tokens == done.usage.total_tokens


def test_tool_call_round_trip(stubs: Stubs) -> None:
    assistant_id = tool_assistant(stubs, "get_weather")
    thread = stubs.thread('/tool get_weather {"city": "Paris"}')
    run = stubs.run(assistant_id, thread.id)
    paused = stubs.wait(run.id)
    assert paused.status == run_pb2.TOOL_CALLS
    (call,) = paused.required_tool_calls
    assert call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert paused.expires_at.seconds > time.time() + 60

    resumed = stubs.runs.SubmitToolResults(
        run_pb2.SubmitToolResultsRequest(
            run_id=run.id, tool_results=[common_pb2.ToolResult(tool_call_id=call.id, output='{"temp": 21}')]
        )
    )
    assert resumed.status in (run_pb2.PENDING, run_pb2.IN_PROGRESS, run_pb2.COMPLETED)
    assert not resumed.required_tool_calls
    done = stubs.wait(run.id)
    assert done.status == run_pb2.COMPLETED
    assert '{"temp": 21}' in done.reply.content[0].text.text

    events = stubs.events(run.id)
    kinds = [e.type for e in events]
    assert EventType.TOOL_CALL_DELTA in kinds and EventType.TOOL_CALLS in kinds
    tool_event = next(e for e in events if e.type == EventType.TOOL_CALLS)
    assert tool_event.status == run_pb2.TOOL_CALLS
    assert tool_event.tool_calls.tool_calls[0].id == call.id
    # The argument deltas rebuild the arguments exactly.
    rebuilt = "".join(e.tool_call_delta.arguments for e in events if e.type == EventType.TOOL_CALL_DELTA)
    assert rebuilt == call.function.arguments
    assert [e.index for e in events] == list(range(len(events)))

    steps = stubs.runs.ListSteps(run_pb2.ListRunStepsRequest(run_id=run.id, order=common_pb2.ASC)).steps
    assert [s.type for s in steps] == [run_pb2.RunStep.TOOL_CALLS, run_pb2.RunStep.MESSAGE_CREATION]
    assert steps[0].status == run_pb2.RunStep.COMPLETED
    assert steps[0].tool_calls.tool_calls[0].output == '{"temp": 21}'
    assert done.usage.total_tokens == sum(s.usage.total_tokens for s in steps)


def test_parallel_tool_calls_need_every_result(stubs: Stubs) -> None:
    assistant_id = tool_assistant(stubs, "get_weather", "get_time")
    thread = stubs.thread('/tool get_weather {"city": "Oslo"}\n/tool get_time {"tz": "CET"}')
    run = stubs.run(assistant_id, thread.id)
    paused = stubs.wait(run.id)
    assert [c.function.name for c in paused.required_tool_calls] == ["get_weather", "get_time"]
    first, second = paused.required_tool_calls
    with pytest.raises(grpc.RpcError) as partial:
        stubs.runs.SubmitToolResults(
            run_pb2.SubmitToolResultsRequest(
                run_id=run.id, tool_results=[common_pb2.ToolResult(tool_call_id=first.id, output="rain")]
            )
        )
    assert partial.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info, _ = error_details(partial.value)
    assert info is not None and info.reason == "TOOL_RESULTS_MISSING"
    assert stubs.runs.Get(run_pb2.GetRunRequest(run_id=run.id)).status == run_pb2.TOOL_CALLS

    results = [
        common_pb2.ToolResult(tool_call_id=first.id, output="rain"),
        common_pb2.ToolResult(tool_call_id=second.id, output="12:00"),
    ]
    stubs.runs.SubmitToolResults(run_pb2.SubmitToolResultsRequest(run_id=run.id, tool_results=results))
    done = stubs.wait(run.id)
    text = done.reply.content[0].text.text
    assert "get_weather returned rain" in text and "get_time returned 12:00" in text


def test_parallel_tool_calls_disabled_gives_one_call(stubs: Stubs) -> None:
    assistant_id = tool_assistant(stubs, "a", "b")
    thread = stubs.thread("/tool a {}\n/tool b {}")
    run = stubs.run(assistant_id, thread.id, parallel_tool_calls=False)
    paused = stubs.wait(run.id)
    assert paused.parallel_tool_calls is False
    assert [c.function.name for c in paused.required_tool_calls] == ["a"]
    stubs.runs.Cancel(run_pb2.CancelRunRequest(run_id=run.id))


def test_submit_is_idempotent_and_rejects_other_outputs(stubs: Stubs) -> None:
    assistant_id = tool_assistant(stubs)
    run = stubs.run(assistant_id, stubs.thread("/tool get_weather {}").id)
    call = stubs.wait(run.id).required_tool_calls[0]
    request = run_pb2.SubmitToolResultsRequest(
        run_id=run.id, tool_results=[common_pb2.ToolResult(tool_call_id=call.id, output="sunny")]
    )
    stubs.runs.SubmitToolResults(request)
    again = stubs.runs.SubmitToolResults(request)  # no request_id: same results are still a no-op
    assert again.id == run.id
    assert stubs.wait(run.id).status == run_pb2.COMPLETED
    other = run_pb2.SubmitToolResultsRequest(
        run_id=run.id, tool_results=[common_pb2.ToolResult(tool_call_id=call.id, output="snow")]
    )
    with pytest.raises(grpc.RpcError) as changed:
        stubs.runs.SubmitToolResults(other)
    assert changed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    steps = stubs.runs.ListSteps(run_pb2.ListRunStepsRequest(run_id=run.id)).steps
    tool_steps = [s for s in steps if s.type == run_pb2.RunStep.TOOL_CALLS]
    assert len(tool_steps) == 1 and tool_steps[0].tool_calls.tool_calls[0].output == "sunny"
    events = stubs.events(run.id)
    assert sum(1 for e in events if e.type == EventType.TOOL_CALLS) == 1


def test_submit_with_unknown_tool_call_id(stubs: Stubs) -> None:
    assistant_id = tool_assistant(stubs)
    run = stubs.run(assistant_id, stubs.thread("/tool get_weather {}").id)
    stubs.wait(run.id)
    with pytest.raises(grpc.RpcError) as unknown:
        stubs.runs.SubmitToolResults(
            run_pb2.SubmitToolResultsRequest(
                run_id=run.id, tool_results=[common_pb2.ToolResult(tool_call_id="call_nope", output="x")]
            )
        )
    assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info, violations = error_details(unknown.value)
    assert info is not None and info.reason == "UNKNOWN_TOOL_CALL_ID"
    assert violations and violations[0][0] == "tool_results.tool_call_id"
    assert stubs.runs.Get(run_pb2.GetRunRequest(run_id=run.id)).status == run_pb2.TOOL_CALLS
    stubs.runs.Cancel(run_pb2.CancelRunRequest(run_id=run.id))


def test_submit_to_a_run_that_is_not_waiting(stubs: Stubs) -> None:
    run = stubs.start("no tools here")
    stubs.wait(run.id)
    with pytest.raises(grpc.RpcError) as wrong:
        stubs.runs.SubmitToolResults(
            run_pb2.SubmitToolResultsRequest(
                run_id=run.id, tool_results=[common_pb2.ToolResult(tool_call_id="call_x", output="x")]
            )
        )
    assert wrong.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info, _ = error_details(wrong.value)
    assert info is not None and info.reason == "RUN_NOT_WAITING_FOR_TOOLS"


def test_failed_run_has_last_error_and_error_event(stubs: Stubs) -> None:
    run = stubs.start("/fail the model is on fire")
    done = stubs.wait(run.id)
    assert done.status == run_pb2.FAILED
    assert done.last_error.code == "model_error" and done.last_error.message == "the model is on fire"
    assert done.failed_at.seconds
    events = stubs.events(run.id)
    assert events[-1].type == EventType.ERROR and events[-1].error.message == "the model is on fire"
    messages = stubs.messages.List(message_pb2.ListMessagesRequest(thread_id=run.thread_id)).messages
    assert len(messages) == 1  # no reply was added


def test_incomplete_when_completion_budget_runs_out(stubs: Stubs) -> None:
    run = stubs.start("a b c d e f g h", max_completion_tokens=3)
    done = stubs.wait(run.id)
    assert done.status == run_pb2.INCOMPLETE
    assert done.incomplete_details.reason == "max_completion_tokens"
    assert done.usage.completion_tokens == 3
    assert done.reply.content[0].text.text == "You said: a "
    events = stubs.events(run.id)
    assert events[-1].type == EventType.STATUS and events[-1].status == run_pb2.INCOMPLETE


def test_incomplete_when_prompt_budget_is_too_small(stubs: Stubs) -> None:
    run = stubs.start("this prompt is much longer than two tokens", max_prompt_tokens=2)
    done = stubs.wait(run.id)
    assert done.status == run_pb2.INCOMPLETE
    assert done.incomplete_details.reason == "max_prompt_tokens"


def test_truncation_last_messages_limits_the_prompt(stubs: Stubs) -> None:
    assistant = stubs.assistant(name="t")
    thread = stubs.thread("one two three", "four five", "six")
    strategy = common_pb2.TruncationStrategy(
        type=common_pb2.TruncationStrategy.LAST_MESSAGES, last_messages=1
    )
    done = stubs.wait(stubs.run(assistant.id, thread.id, truncation_strategy=strategy).id)
    full = stubs.wait(stubs.run(assistant.id, stubs.thread("one two three", "four five", "six").id).id)
    assert done.status == full.status == run_pb2.COMPLETED
    assert done.usage.prompt_tokens == 1 and full.usage.prompt_tokens == 6


def test_instructions_and_overrides_are_recorded(stubs: Stubs) -> None:
    assistant = stubs.assistant(name="o", instructions="be terse")
    assistant_temp = stubs.assistants.Get(assistant_pb2.GetAssistantRequest(assistant_id=assistant.id))
    assert assistant_temp.instructions == "be terse"
    run = stubs.run(
        assistant.id,
        stubs.thread("hi").id,
        additional_instructions="also kind",
        temperature=0.5,
        top_p=0.9,
        labels={"team": "core"},
    )
    assert run.instructions == "be terse" and run.additional_instructions == "also kind"
    assert run.temperature == 0.5 and run.top_p == 0.9 and run.labels["team"] == "core"
    replaced = stubs.run(assistant.id, stubs.thread("hi").id, instructions="")
    assert replaced.instructions == ""
    done = stubs.wait(run.id)
    # System text counts into the builtin model's prompt (4 words + "hi").
    assert done.usage.prompt_tokens == 5


def test_additional_messages_join_the_thread(stubs: Stubs) -> None:
    assistant = stubs.assistant(name="am")
    thread = stubs.thread("first")
    run = stubs.run(assistant.id, thread.id, additional_messages=[message_pb2.MessageInput(text="second")])
    done = stubs.wait(run.id)
    assert done.reply.content[0].text.text == "You said: second"
    texts = [
        m.content[0].text.text
        for m in stubs.messages.List(
            message_pb2.ListMessagesRequest(thread_id=thread.id, order=common_pb2.ASC)
        ).messages
    ]
    assert texts == ["first", "second", "You said: second"]


def test_one_active_run_per_thread(stubs: Stubs) -> None:
    assistant = stubs.assistant(name="busy")
    thread = stubs.thread("/sleep 30")
    run = stubs.run(assistant.id, thread.id)
    with pytest.raises(grpc.RpcError) as second:
        stubs.run(assistant.id, thread.id)
    assert second.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info, _ = error_details(second.value)
    assert info is not None and info.reason == "THREAD_HAS_ACTIVE_RUN"
    with pytest.raises(grpc.RpcError) as message:
        stubs.say(thread.id, "are you there?")
    assert message.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    stubs.runs.Cancel(run_pb2.CancelRunRequest(run_id=run.id))
    assert stubs.wait(run.id).status == run_pb2.CANCELLED
    stubs.say(thread.id, "now it works")
    assert stubs.wait(stubs.run(assistant.id, thread.id).id).status == run_pb2.COMPLETED


def test_cancel_in_progress_goes_through_cancelling(stubs: Stubs) -> None:
    run = stubs.start("/sleep 30 take your time")
    stubs.wait_for(run.id, {run_pb2.IN_PROGRESS})
    cancelled = stubs.runs.Cancel(run_pb2.CancelRunRequest(run_id=run.id))
    assert cancelled.status in (run_pb2.CANCELLING, run_pb2.CANCELLED)
    done = stubs.wait(run.id)
    assert done.status == run_pb2.CANCELLED and done.cancelled_at.seconds
    events = stubs.events(run.id)
    statuses = [e.status for e in events if e.type == EventType.STATUS]
    assert statuses[-2:] == [run_pb2.CANCELLING, run_pb2.CANCELLED]
    again = stubs.runs.Cancel(run_pb2.CancelRunRequest(run_id=run.id))
    assert again.status == run_pb2.CANCELLED and again.cancelled_at == done.cancelled_at
    assert len(stubs.events(run.id)) == len(events)


def test_cancel_while_waiting_for_tools(stubs: Stubs) -> None:
    assistant_id = tool_assistant(stubs)
    run = stubs.run(assistant_id, stubs.thread("/tool get_weather {}").id)
    stubs.wait(run.id)
    cancelled = stubs.runs.Cancel(run_pb2.CancelRunRequest(run_id=run.id))
    assert cancelled.status == run_pb2.CANCELLED and not cancelled.required_tool_calls
    steps = stubs.runs.ListSteps(run_pb2.ListRunStepsRequest(run_id=run.id)).steps
    assert steps[0].status == run_pb2.RunStep.CANCELLED


def test_cancel_completed_run_returns_it_unchanged(stubs: Stubs) -> None:
    run = stubs.start("quick")
    done = stubs.wait(run.id)
    again = stubs.runs.Cancel(run_pb2.CancelRunRequest(run_id=run.id))
    assert again.status == run_pb2.COMPLETED and again.completed_at == done.completed_at


def test_get_last_by_thread_and_list_filters(stubs: Stubs) -> None:
    assistant = stubs.assistant(name="lister")
    thread = stubs.thread("x")
    first = stubs.run(assistant.id, thread.id, labels={"batch": "a"})
    stubs.wait(first.id)
    stubs.say(thread.id, "/fail nope")
    second = stubs.run(assistant.id, thread.id, labels={"batch": "b"})
    stubs.wait(second.id)
    last = stubs.runs.GetLastByThread(run_pb2.GetLastRunByThreadRequest(thread_id=thread.id))
    assert last.id == second.id
    by_thread = stubs.runs.List(run_pb2.ListRunsRequest(thread_id=thread.id)).runs
    assert [r.id for r in by_thread] == [second.id, first.id]
    failed = stubs.runs.List(run_pb2.ListRunsRequest(thread_id=thread.id, statuses=[run_pb2.FAILED])).runs
    assert [r.id for r in failed] == [second.id]
    labelled = stubs.runs.List(run_pb2.ListRunsRequest(assistant_id=assistant.id, labels={"batch": "a"})).runs
    assert [r.id for r in labelled] == [first.id]


def test_update_run_labels(stubs: Stubs) -> None:
    run = stubs.start("label me", labels={"a": "1"})
    updated = stubs.runs.Update(run_pb2.UpdateRunRequest(run_id=run.id, labels={"b": "2"}))
    assert dict(updated.labels) == {"b": "2"}
    assert dict(stubs.runs.Get(run_pb2.GetRunRequest(run_id=run.id)).labels) == {"b": "2"}
    found = stubs.runs.List(run_pb2.ListRunsRequest(thread_id=run.thread_id, labels={"b": "2"})).runs
    assert [r.id for r in found] == [run.id]


def test_wait_times_out_with_the_run(stubs: Stubs) -> None:
    run = stubs.start("/sleep 30 slow")
    request = run_pb2.WaitRunRequest(run_id=run.id)
    request.timeout.FromMilliseconds(200)
    waited = stubs.runs.Wait(request, timeout=10)
    assert waited.status in (run_pb2.PENDING, run_pb2.IN_PROGRESS)
    stubs.runs.Cancel(run_pb2.CancelRunRequest(run_id=run.id))


def test_wait_respects_the_callers_deadline(stubs: Stubs) -> None:
    run = stubs.start("/sleep 30 slow")
    request = run_pb2.WaitRunRequest(run_id=run.id)
    request.timeout.FromSeconds(60)
    # Answers a fifth of the time before the caller's deadline (0.5 s here: a generous bound on
    # how late a loaded machine delivers the answer), not with DEADLINE_EXCEEDED.
    waited = stubs.runs.Wait(request, timeout=2.5)
    assert waited.status in (run_pb2.PENDING, run_pb2.IN_PROGRESS)
    stubs.runs.Cancel(run_pb2.CancelRunRequest(run_id=run.id))


def test_tool_calls_expire(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server("--tool-timeout", "0.5")
    stubs = Stubs.connect(server.address)
    try:
        assistant_id = tool_assistant(stubs)
        run = stubs.run(assistant_id, stubs.thread("/tool get_weather {}").id)
        paused = stubs.wait(run.id)
        assert paused.status == run_pb2.TOOL_CALLS
        expired = stubs.wait_for(run.id, {run_pb2.EXPIRED}, timeout=15)
        assert expired.status == run_pb2.EXPIRED and expired.last_error.code == "expired"
        with pytest.raises(grpc.RpcError) as late:
            stubs.runs.SubmitToolResults(
                run_pb2.SubmitToolResultsRequest(
                    run_id=run.id,
                    tool_results=[
                        common_pb2.ToolResult(tool_call_id=paused.required_tool_calls[0].id, output="x")
                    ],
                )
            )
        assert late.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        steps = stubs.runs.ListSteps(run_pb2.ListRunStepsRequest(run_id=run.id)).steps
        assert steps[0].status == run_pb2.RunStep.EXPIRED
        events = stubs.events(run.id)
        assert events[-1].type == EventType.STATUS and events[-1].status == run_pb2.EXPIRED
    finally:
        stubs.close()


def test_whole_run_deadline_expires_a_slow_run(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server("--run-timeout", "1")
    stubs = Stubs.connect(server.address)
    try:
        run = stubs.start("/sleep 20 never finishes in time")
        expired = stubs.wait(run.id, timeout=15)
        assert expired.status == run_pb2.EXPIRED
        events = stubs.events(run.id)
        assert events[-1].status == run_pb2.EXPIRED
        assert sum(1 for e in events if e.status in (run_pb2.EXPIRED, run_pb2.COMPLETED)) == 1
    finally:
        stubs.close()


def test_cancel_pending_run_is_immediate(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server("--max-concurrent-runs", "1")
    stubs = Stubs.connect(server.address)
    try:
        blocker = stubs.start("/sleep 30 hog the only slot")
        stubs.wait_for(blocker.id, {run_pb2.IN_PROGRESS})
        queued = stubs.start("wait in line")
        assert stubs.runs.Get(run_pb2.GetRunRequest(run_id=queued.id)).status == run_pb2.PENDING
        cancelled = stubs.runs.Cancel(run_pb2.CancelRunRequest(run_id=queued.id))
        assert cancelled.status == run_pb2.CANCELLED
        assert [e.status for e in stubs.events(queued.id)] == [run_pb2.PENDING, run_pb2.CANCELLED]
        stubs.runs.Cancel(run_pb2.CancelRunRequest(run_id=blocker.id))
        assert stubs.wait(blocker.id).status == run_pb2.CANCELLED
    finally:
        stubs.close()


def test_unknown_builtin_tool_fails_the_run_clearly(stubs: Stubs) -> None:
    run = stubs.start("/tool not_declared {}")
    done = stubs.wait(run.id)
    assert done.status == run_pb2.FAILED
    assert "not_declared" in done.last_error.message


def test_tool_outputs_and_tools_have_total_limits(stubs: Stubs) -> None:
    """Per-item limits alone would let a run or its reply outgrow the 8 MiB message limit."""
    assistant_id = tool_assistant(stubs, "a", "b", "c", "d")
    run = stubs.run(assistant_id, stubs.thread("/tool a {}\n/tool b {}\n/tool c {}\n/tool d {}").id)
    calls = stubs.wait(run.id).required_tool_calls
    big = [common_pb2.ToolResult(tool_call_id=c.id, output="x" * 510_000) for c in calls]
    with pytest.raises(grpc.RpcError) as too_much:
        stubs.runs.SubmitToolResults(run_pb2.SubmitToolResultsRequest(run_id=run.id, tool_results=big))
    assert too_much.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(too_much.value)[1][0][0] == "tool_results"
    stubs.runs.Cancel(run_pb2.CancelRunRequest(run_id=run.id))

    schema = {"type": "object", "description": "d" * 60_000}
    request = assistant_pb2.CreateAssistantRequest(name="wide")
    for index in range(20):
        function = request.tools.add().function
        function.name = f"f{index}"
        function.parameters.update(schema)
    with pytest.raises(grpc.RpcError) as too_wide:
        stubs.assistants.Create(request)
    assert too_wide.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert any(field == "tools" for field, _ in error_details(too_wide.value)[1])
