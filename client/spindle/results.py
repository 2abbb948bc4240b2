"""What waiting on and listening to a run give back: :class:`RunResult` and :class:`RunEvent`.

Both carry a status with the seed's ``is_running`` / ``is_succeeded`` / ``is_failed`` /
``is_finished`` / ``status_name``. A TOOL_CALLS pause is neither succeeded nor finished: its
``tool_calls`` are set and ``is_paused`` is true.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from spindle.enums import EventType, RunStatus
from spindle.types import Message, RunData, RunError, ToolCall, ToolCallDelta, Usage

__all__ = ["RunEvent", "RunResult"]


class _StatusView:
    """The status predicates, read from ``self.status``."""

    __slots__ = ()
    status: RunStatus

    @property
    def is_running(self) -> bool:
        """PENDING, IN_PROGRESS or CANCELLING."""
        return self.status.is_running

    @property
    def is_succeeded(self) -> bool:
        """COMPLETED."""
        return self.status.is_succeeded

    @property
    def is_failed(self) -> bool:
        """FAILED, CANCELLED, INCOMPLETE or EXPIRED."""
        return self.status.is_failed

    @property
    def is_finished(self) -> bool:
        """Terminal."""
        return self.status.is_finished

    @property
    def is_paused(self) -> bool:
        """TOOL_CALLS: waiting for tool results."""
        return self.status.is_paused

    @property
    def status_name(self) -> str:
        """The status's name, e.g. ``"COMPLETED"``."""
        return self.status.status_name


@dataclass(frozen=True, slots=True)
class RunResult(_StatusView):
    """The outcome of a run, or the pause it is in.

    Attributes:
        run_id: the run.
        status: COMPLETED, a failure status, TOOL_CALLS (a pause) or, from ``get_result()`` on a
            live run, a running status.
        error: why it failed (FAILED, EXPIRED, CANCELLED, INCOMPLETE), else None.
        tool_calls: the calls to answer when paused in TOOL_CALLS, else None.
        message: the assistant's reply message (COMPLETED, or INCOMPLETE with partial text).
        usage: token counts.
    """

    run_id: str
    status: RunStatus
    error: RunError | None = None
    tool_calls: tuple[ToolCall, ...] | None = None
    message: Message | None = None
    usage: Usage | None = None

    @property
    def text(self) -> str | None:
        """The reply's text, or None without a reply."""
        return self.message.text if self.message is not None else None

    @property
    def parts(self) -> tuple[str, ...]:
        """The reply's text parts (empty without a reply)."""
        return self.message.parts if self.message is not None else ()

    @classmethod
    def from_run(cls, run: RunData) -> RunResult:
        """The result a run snapshot stands for."""
        return cls(
            run_id=run.id,
            status=run.status,
            error=_error_of(run),
            tool_calls=run.required_tool_calls if run.status is RunStatus.TOOL_CALLS else None,
            message=run.reply,
            usage=run.usage,
        )


def _error_of(run: RunData) -> RunError | None:
    if run.last_error is not None and run.last_error.message:
        return run.last_error
    if run.status is RunStatus.CANCELLED:
        return RunError("cancelled", "the run was cancelled")
    if run.status is RunStatus.INCOMPLETE:
        return RunError("incomplete", f"the run stopped early: {run.incomplete_reason or 'a budget ran out'}")
    if run.status is RunStatus.EXPIRED:
        return RunError("expired", "the run expired")
    if run.status is RunStatus.FAILED:
        return RunError("failed", "the run failed")
    return None


@dataclass(frozen=True, slots=True)
class RunEvent(_StatusView):
    """One event of a run's stream, with the reply text so far.

    Attributes:
        run_id, index: the event's place in the run's gap-free log (from 0).
        type: PARTIAL_MESSAGE, DONE, ERROR, TOOL_CALLS, STATUS, TOOL_CALL_DELTA or USAGE.
        status: the run's status once this event is applied.
        delta: the text this event adds to the reply (PARTIAL_MESSAGE), else None.
        text: the reply streamed so far, across tool-call rounds, as this listener saw it (from
            ``events_start_idx``); a ``discard_partial_message`` event drops the current turn's part.
        tool_calls: the calls to answer (TOOL_CALLS).
        tool_call_delta: a piece of a tool call being streamed (TOOL_CALL_DELTA).
        error: the failure (ERROR).
        message: the final reply (DONE).
        usage: token counts (USAGE: of one model turn; DONE: of the run).
        run: the run after a status change (STATUS).
        reason: why the status changed (STATUS).
        discard_partial_message: the model call of the current turn is retried: the text streamed
            since the last TOOL_CALLS event (or since the start) is void; ``text`` no longer has it.
    """

    run_id: str
    index: int
    type: EventType
    status: RunStatus
    text: str = ""
    created_at: datetime | None = None
    delta: str | None = None
    tool_calls: tuple[ToolCall, ...] | None = None
    tool_call_delta: ToolCallDelta | None = None
    error: RunError | None = None
    message: Message | None = None
    usage: Usage | None = None
    run: RunData | None = None
    reason: str = ""
    discard_partial_message: bool = False

    @property
    def parts(self) -> tuple[str, ...]:
        """The final reply's text parts (DONE), else empty (as the seed's ``RunStreamEvent.parts``)."""
        return self.message.parts if self.message is not None else ()

    @property
    def is_terminal(self) -> bool:
        """The run's last event: DONE, ERROR, or a status change to a terminal status."""
        return self.type in (EventType.DONE, EventType.ERROR) or (
            self.type is EventType.STATUS and self.status.is_finished
        )
