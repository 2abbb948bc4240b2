"""Reading a run's event stream: decode each event and keep the place and the reply text so far.

:class:`EventCursor` is the pure state of one listener. A reconnect resumes at ``next_index``;
an event below it (already seen) is dropped, so a resumed stream has no duplicate.
"""

from __future__ import annotations

from spindle import _decode
from spindle.enums import EventType, RunStatus
from spindle.results import RunEvent
from spindle.types import ToolCallDelta
from spindle.v1 import run_pb2


class EventCursor:
    """Where a listener is in a run's log, and the reply text streamed so far.

    The reply is everything the model said in the run, before its tool calls and after. A status
    change with ``discard_partial_message`` voids only the text of the turn being retried: what
    came since the last TOOL_CALLS event (the server builds the reply the same way).
    """

    def __init__(self, start: int = 0) -> None:
        if start < 0:
            raise ValueError("events_start_idx must not be negative")
        self.next_index = start
        self.finished = False
        self.text = ""  # the reply so far: ``_earlier`` + the text of the current turn
        self._earlier = ""  # text of the turns that ended in TOOL_CALLS

    def accept(self, event: run_pb2.StreamEvent) -> RunEvent | None:
        """The decoded event, or None for one already seen."""
        if event.index < self.next_index:
            return None
        self.next_index = event.index + 1
        payload = event.WhichOneof("payload")
        if payload == "status_change" and event.status_change.discard_partial_message:
            self.text = self._earlier
        elif payload == "message_delta":
            self.text += event.message_delta.text
        elif event.type == run_pb2.StreamEvent.TOOL_CALLS:
            self._earlier = self.text
        decoded = decode_event(event, self.text)
        self.finished = decoded.is_terminal
        return decoded


def decode_event(event: run_pb2.StreamEvent, text: str) -> RunEvent:
    """A RunEvent from its proto; ``text`` is the reply so far, this event included."""
    payload = event.WhichOneof("payload")
    change = event.status_change
    done = event.done
    delta = event.tool_call_delta
    usage = None
    if payload == "usage":
        usage = _decode.usage(event.usage)
    elif payload == "done" and done.HasField("usage"):
        usage = _decode.usage(done.usage)
    return RunEvent(
        run_id=event.run_id,
        index=event.index,
        type=EventType(event.type),
        status=RunStatus(event.status),
        text=text,
        created_at=_decode.timestamp(event.created_at),
        delta=event.message_delta.text if payload == "message_delta" else None,
        tool_calls=tuple(_decode.tool_call(c) for c in event.tool_calls.tool_calls)
        if payload == "tool_calls"
        else None,
        tool_call_delta=ToolCallDelta(delta.index, delta.id, delta.name, delta.arguments)
        if payload == "tool_call_delta"
        else None,
        error=_decode.error(event.error) if payload == "error" else None,
        message=_decode.message(done.message) if payload == "done" and done.HasField("message") else None,
        usage=usage,
        run=_decode.run_data(change.run) if payload == "status_change" and change.HasField("run") else None,
        reason=change.reason if payload == "status_change" else "",
        discard_partial_message=payload == "status_change" and change.discard_partial_message,
    )
