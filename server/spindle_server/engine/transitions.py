"""The run state machine as pure functions: each returns a RunMutation for Store.mutate_run.

A mutation sees the run as committed, checks that the transition is allowed from its status
(compare-and-set: exactly one terminal transition wins) and returns the new run together with
the events, messages and steps that must be committed with it.
"""

from __future__ import annotations

from collections.abc import Sequence

from spindle.v1 import common_pb2, message_pb2, run_pb2
from spindle_server import clock
from spindle_server.engine import events
from spindle_server.store.base import TERMINAL_STATUSES, RunChange, RunMutation
from spindle_server.store.errors import StateError

STATUS_NAMES = run_pb2.RunStatus.Name


class RunNotInProgressError(StateError):
    """The executor's run left IN_PROGRESS under it (cancel, expiry): it must stop."""

    def __init__(self, run: run_pb2.Run) -> None:
        super().__init__("RUN_NOT_IN_PROGRESS", f"run {run.id} is {STATUS_NAMES(run.status)}")
        self.status = run.status


def _wrong_state(run: run_pb2.Run, action: str) -> StateError:
    return StateError("RUN_WRONG_STATUS", f"cannot {action}: run {run.id} is {STATUS_NAMES(run.status)}")


def _stamp(field: object, now: float) -> None:
    field.CopyFrom(clock.timestamp(now))  # type: ignore[attr-defined]


def _add_usage(run: run_pb2.Run, turn: common_pb2.Usage | None) -> None:
    if turn is None:
        return
    run.usage.prompt_tokens += turn.prompt_tokens
    run.usage.completion_tokens += turn.completion_tokens
    run.usage.total_tokens = run.usage.prompt_tokens + run.usage.completion_tokens


def run_deadline(run: run_pb2.Run, run_timeout: float) -> float:
    return clock.seconds_of(run.created_at) + run_timeout


def start(now: float, run_timeout: float, max_attempts: int) -> RunMutation:
    """PENDING -> IN_PROGRESS, when the engine claims the run; FAILED if a re-queued run has
    had its `max_attempts` already (each shutdown that re-queued it counted one)."""

    def mutate(run: run_pb2.Run) -> RunChange:
        if run.status != run_pb2.PENDING:
            raise _wrong_state(run, "start")
        # `attempt` numbers the tries at the current model call: a run resumed after its tool
        # results starts a new call, not a retry (requeue and recover count the retries), so
        # many tool rounds do not use up max_attempts.
        if run.attempt > max_attempts:
            return _out_of_attempts(run, now, run.attempt - 1)
        deadline = run_deadline(run, run_timeout)
        run.status = run_pb2.IN_PROGRESS
        if not run.HasField("started_at"):
            _stamp(run.started_at, now)
        run.attempt = max(run.attempt, 1)
        _stamp(run.expires_at, deadline)
        return RunChange(run, [events.status_change(run)], deadline=deadline)

    return mutate


def recover(now: float, max_attempts: int) -> RunMutation:
    """Take over a run whose executor died: retry the model call, or give up cleanly."""

    def mutate(run: run_pb2.Run) -> RunChange:
        if run.status == run_pb2.CANCELLING:
            return _cancelled(run, now, "cancelled; its executor stopped before it could finish")
        if run.status != run_pb2.IN_PROGRESS:
            raise _wrong_state(run, "recover")
        if run.attempt >= max_attempts:
            return _out_of_attempts(run, now, run.attempt)
        run.attempt += 1
        reason = f"recovered after its executor stopped; model call retried (attempt {run.attempt})"
        return RunChange(run, [events.status_change(run, reason, discard_partial=True)])

    return mutate


def _out_of_attempts(run: run_pb2.Run, now: float, interrupted: int) -> RunChange:
    message = f"the run was interrupted {interrupted} times (server restarts); giving up"
    return _failed(run, now, "server_error", message)


def stream(batch: Sequence[run_pb2.StreamEvent]) -> RunMutation:
    """Append streamed deltas while the run is IN_PROGRESS."""

    def mutate(run: run_pb2.Run) -> RunChange:
        if run.status != run_pb2.IN_PROGRESS:
            raise RunNotInProgressError(run)
        return RunChange(run, list(batch))

    return mutate


def pause_for_tools(
    now: float,
    calls: Sequence[common_pb2.ToolCall],
    step: run_pb2.RunStep,
    turn_usage: common_pb2.Usage | None,
    pending: Sequence[run_pb2.StreamEvent],
    tool_deadline: float,
    said: str = "",
) -> RunMutation:
    """IN_PROGRESS -> TOOL_CALLS: the run waits for the caller's results.

    said: the text this turn streamed before its calls, kept beside the step for the prompt of
    the next turns (rereading the log for it would cost every round the whole run so far)."""

    def mutate(run: run_pb2.Run) -> RunChange:
        if run.status != run_pb2.IN_PROGRESS:
            raise RunNotInProgressError(run)
        _add_usage(run, turn_usage)
        run.status = run_pb2.TOOL_CALLS
        del run.required_tool_calls[:]
        run.required_tool_calls.extend(calls)
        _stamp(run.expires_at, tool_deadline)
        return RunChange(
            run,
            [*pending, events.tool_calls(calls)],
            steps=[step],
            deadline=tool_deadline,
            release_lease=True,
            step_texts={step.id: said},
        )

    return mutate


def complete(
    now: float,
    reply: message_pb2.Message,
    step: run_pb2.RunStep,
    turn_usage: common_pb2.Usage | None,
    pending: Sequence[run_pb2.StreamEvent],
) -> RunMutation:
    """IN_PROGRESS -> COMPLETED: the reply joins the thread."""

    def mutate(run: run_pb2.Run) -> RunChange:
        if run.status != run_pb2.IN_PROGRESS:
            raise RunNotInProgressError(run)
        _add_usage(run, turn_usage)
        run.status = run_pb2.COMPLETED
        _stamp(run.completed_at, now)
        run.reply.CopyFrom(reply)
        run.ClearField("expires_at")
        return RunChange(
            run,
            [*pending, events.done(reply, run.usage)],
            messages=[reply],
            steps=[step],
            release_lease=True,
        )

    return mutate


def incomplete(
    now: float,
    reason: str,
    reply: message_pb2.Message | None,
    step: run_pb2.RunStep | None,
    turn_usage: common_pb2.Usage | None,
    pending: Sequence[run_pb2.StreamEvent],
) -> RunMutation:
    """IN_PROGRESS -> INCOMPLETE: the reply was cut short; the partial reply, if any, is kept.

    reason: max_completion_tokens or max_prompt_tokens (the run's budgets), max_tokens (the
    provider's own output limit) or content_filter (the provider withheld the rest).
    """

    def mutate(run: run_pb2.Run) -> RunChange:
        if run.status != run_pb2.IN_PROGRESS:
            raise RunNotInProgressError(run)
        _add_usage(run, turn_usage)
        run.status = run_pb2.INCOMPLETE
        run.incomplete_details.reason = reason
        _stamp(run.completed_at, now)
        run.ClearField("expires_at")
        if reply is not None:
            run.reply.CopyFrom(reply)
        change = RunChange(run, [*pending, events.status_change(run, f"incomplete: {reason}")])
        change.release_lease = True
        if reply is not None and step is not None:
            change.messages.append(reply)
            change.steps.append(step)
        return change

    return mutate


def fail(now: float, code: str, message: str, pending: Sequence[run_pb2.StreamEvent] = ()) -> RunMutation:
    """IN_PROGRESS -> FAILED (a CANCELLING run ends CANCELLED instead: the caller asked first)."""

    def mutate(run: run_pb2.Run) -> RunChange:
        if run.status == run_pb2.CANCELLING:
            return _cancelled(run, now, "cancelled")
        if run.status != run_pb2.IN_PROGRESS:
            raise RunNotInProgressError(run)
        change = _failed(run, now, code, message)
        change.events[:0] = list(pending)
        return change

    return mutate


def finish_cancel(now: float) -> RunMutation:
    """CANCELLING -> CANCELLED once the model call has stopped."""

    def mutate(run: run_pb2.Run) -> RunChange:
        if run.status not in (run_pb2.CANCELLING, run_pb2.IN_PROGRESS):
            raise _wrong_state(run, "finish cancelling")
        return _cancelled(run, now, "cancelled")

    return mutate


def request_cancel(now: float, tool_step: run_pb2.RunStep | None) -> RunMutation:
    """The Cancel RPC: immediate from PENDING and TOOL_CALLS, via CANCELLING from IN_PROGRESS."""

    def mutate(run: run_pb2.Run) -> RunChange:
        if run.status in TERMINAL_STATUSES or run.status == run_pb2.CANCELLING:
            return RunChange(run)
        if run.status == run_pb2.IN_PROGRESS:
            run.status = run_pb2.CANCELLING
            return RunChange(run, [events.status_change(run, "cancel requested")])
        holds_step = _holds_pending_calls(run, tool_step)
        change = _cancelled(run, now, "cancelled")
        if holds_step and tool_step is not None:
            tool_step.status = run_pb2.RunStep.CANCELLED
            _stamp(tool_step.cancelled_at, now)
            change.steps.append(tool_step)
        return change

    return mutate


def submit_tool_results(
    now: float, results: dict[str, str], step: run_pb2.RunStep, run_deadline: float
) -> RunMutation:
    """TOOL_CALLS -> PENDING with every pending call answered."""

    def mutate(run: run_pb2.Run) -> RunChange:
        if run.status != run_pb2.TOOL_CALLS:
            raise _wrong_state(run, "submit tool results")
        if _past_deadline(run, now):
            # Too late, even if the sweeper has not ended the run yet (it will, as EXPIRED).
            raise StateError("RUN_EXPIRED", f"run {run.id}: tool results arrived after its deadline")
        pending = {call.id for call in run.required_tool_calls}
        step_ids = {call.id for call in step.tool_calls.tool_calls}
        if step_ids != pending:
            raise StateError("RUN_CHANGED", f"run {run.id} changed while submitting; retry")
        _check_results_cover(run, results, pending)
        for call in step.tool_calls.tool_calls:
            call.output = results[call.id]
        step.status = run_pb2.RunStep.COMPLETED
        _stamp(step.completed_at, now)
        del run.required_tool_calls[:]
        run.status = run_pb2.PENDING
        _stamp(run.expires_at, run_deadline)
        return RunChange(
            run, [events.status_change(run, "tool results submitted")], steps=[step], deadline=run_deadline
        )

    return mutate


def _check_results_cover(run: run_pb2.Run, results: dict[str, str], pending: set[str]) -> None:
    unknown = sorted(set(results) - pending)
    if unknown:
        raise UnknownToolCallError(unknown)
    missing = sorted(pending - set(results))
    if missing:
        raise StateError(
            "TOOL_RESULTS_MISSING",
            f"run {run.id} waits for results of every tool call; missing: {', '.join(missing)}",
        )


class UnknownToolCallError(Exception):
    def __init__(self, ids: list[str]) -> None:
        super().__init__(f"unknown tool call ids: {', '.join(ids)}")
        self.ids = ids


# expires_at holds the deadline to the nanosecond, which float rounding may put a hair later.
_DEADLINE_SLACK_SECONDS = 0.001


def _past_deadline(run: run_pb2.Run, now: float) -> bool:
    # expires_at mirrors the store's deadline column while the run is active.
    if not run.HasField("expires_at"):
        return True
    return clock.seconds_of(run.expires_at) <= now + _DEADLINE_SLACK_SECONDS


def _holds_pending_calls(run: run_pb2.Run, step: run_pb2.RunStep | None) -> bool:
    """Whether `step` (read before this transaction) is the one of the calls the run waits on
    now. If the run was resumed and paused again meanwhile, it is an answered step of an
    earlier round, which must not be overwritten."""
    if step is None or run.status != run_pb2.TOOL_CALLS:
        return False
    return {c.id for c in step.tool_calls.tool_calls} == {c.id for c in run.required_tool_calls}


def expire(now: float, tool_step: run_pb2.RunStep | None) -> RunMutation:
    """An active run whose deadline passed: EXPIRED (the executor, if any, is fenced out)."""

    def mutate(run: run_pb2.Run) -> RunChange:
        if run.status in TERMINAL_STATUSES:
            raise _wrong_state(run, "expire")
        # The sweeper found the run due in an earlier read: if it was resumed since (tool
        # results submitted, a new deadline), that finding is stale.
        if not _past_deadline(run, now):
            raise StateError("RUN_NOT_DUE", f"run {run.id} is not past its deadline")
        waiting_for_tools = run.status == run_pb2.TOOL_CALLS
        holds_step = _holds_pending_calls(run, tool_step)
        run.status = run_pb2.EXPIRED
        run.last_error.code = "expired"
        run.last_error.message = (
            "tool results did not arrive before the deadline"
            if waiting_for_tools
            else "the run did not finish before its deadline"
        )
        del run.required_tool_calls[:]
        steps = []
        if holds_step and tool_step is not None:
            tool_step.status = run_pb2.RunStep.EXPIRED
            _stamp(tool_step.expired_at, now)
            steps.append(tool_step)
        return RunChange(
            run, [events.status_change(run, run.last_error.message)], steps=steps, release_lease=True
        )

    return mutate


def requeue(now: float, reason: str) -> RunMutation:
    """IN_PROGRESS -> PENDING: this server stops; another start picks the run up again.

    A CANCELLING run is not handed on: the caller asked for its end, so it ends CANCELLED."""

    def mutate(run: run_pb2.Run) -> RunChange:
        if run.status == run_pb2.CANCELLING:
            return _cancelled(run, now, "cancelled")
        if run.status != run_pb2.IN_PROGRESS:
            raise RunNotInProgressError(run)
        run.status = run_pb2.PENDING
        run.attempt += 1  # the next claim retries the interrupted model call
        return RunChange(run, [events.status_change(run, reason, discard_partial=True)], release_lease=True)

    return mutate


def _failed(run: run_pb2.Run, now: float, code: str, message: str) -> RunChange:
    run.status = run_pb2.FAILED
    run.last_error.code = code
    run.last_error.message = message
    _stamp(run.failed_at, now)
    run.ClearField("expires_at")
    del run.required_tool_calls[:]
    return RunChange(run, [events.error(code, message)], release_lease=True)


def _cancelled(run: run_pb2.Run, now: float, reason: str) -> RunChange:
    run.status = run_pb2.CANCELLED
    _stamp(run.cancelled_at, now)
    run.ClearField("expires_at")
    del run.required_tool_calls[:]
    return RunChange(run, [events.status_change(run, reason)], release_lease=True)
