"""Python enums for the API's run statuses, stream event types and message roles.

Values are the wire numbers (Yandex's for 0-5, extended with OpenAI's states), so they compare
equal to the generated proto constants. A number a newer server sends that this client does not
know becomes ``UNKNOWN`` (-1) instead of raising.
"""

from __future__ import annotations

import enum

__all__ = ["EventType", "MessageRole", "RunStatus", "SortOrder"]


class _TolerantIntEnum(enum.IntEnum):
    """An IntEnum whose unknown values map to its ``UNKNOWN`` member."""

    @classmethod
    def _missing_(cls, value: object) -> _TolerantIntEnum:
        return cls["UNKNOWN"]

    @property
    def status_name(self) -> str:
        """The member's name, e.g. ``"COMPLETED"``."""
        return self.name

    def __str__(self) -> str:
        return self.name

    def __format__(self, format_spec: str) -> str:
        return self.name if not format_spec else int.__format__(self, format_spec)


class RunStatus(_TolerantIntEnum):
    """Where a run is in its life.

    ``is_running``: the server is (or will be) working on it. ``TOOL_CALLS`` is a pause: the run
    waits for the caller's tool results, so it is neither running nor finished.
    """

    UNKNOWN = -1
    RUN_STATUS_UNSPECIFIED = 0
    PENDING = 1
    IN_PROGRESS = 2
    FAILED = 3
    COMPLETED = 4
    TOOL_CALLS = 5
    CANCELLING = 6
    CANCELLED = 7
    INCOMPLETE = 8
    EXPIRED = 9

    @property
    def is_running(self) -> bool:
        """PENDING, IN_PROGRESS or CANCELLING: the run will move on by itself."""
        return self in _RUNNING

    @property
    def is_succeeded(self) -> bool:
        """COMPLETED: the reply is on the thread."""
        return self is RunStatus.COMPLETED

    @property
    def is_failed(self) -> bool:
        """A terminal status other than COMPLETED: FAILED, CANCELLED, INCOMPLETE or EXPIRED."""
        return self in _FAILED

    @property
    def is_finished(self) -> bool:
        """Terminal: the run will never change again."""
        return self.is_succeeded or self.is_failed

    @property
    def is_paused(self) -> bool:
        """TOOL_CALLS: the run waits for ``submit_tool_results``."""
        return self is RunStatus.TOOL_CALLS


_RUNNING = frozenset({RunStatus.PENDING, RunStatus.IN_PROGRESS, RunStatus.CANCELLING})
_FAILED = frozenset({RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.INCOMPLETE, RunStatus.EXPIRED})


class EventType(_TolerantIntEnum):
    """The type of one event of a run's stream (Yandex's numbers 0-4, then Spindle's)."""

    UNKNOWN = -1
    EVENT_TYPE_UNSPECIFIED = 0
    PARTIAL_MESSAGE = 1
    ERROR = 2
    DONE = 3
    TOOL_CALLS = 4
    STATUS = 5
    TOOL_CALL_DELTA = 6
    USAGE = 7

    @property
    def is_running(self) -> bool:
        """The run goes on after an event of this type (deltas, usage, status changes)."""
        return self in (
            EventType.PARTIAL_MESSAGE,
            EventType.STATUS,
            EventType.TOOL_CALL_DELTA,
            EventType.USAGE,
        )

    @property
    def is_succeeded(self) -> bool:
        """DONE: the run completed."""
        return self is EventType.DONE

    @property
    def is_failed(self) -> bool:
        """ERROR: the run failed."""
        return self is EventType.ERROR

    @property
    def is_finished(self) -> bool:
        """DONE or ERROR. A STATUS event may be terminal too: see ``RunEvent.is_terminal``."""
        return self.is_succeeded or self.is_failed


class MessageRole(_TolerantIntEnum):
    """Who wrote a message."""

    UNKNOWN = -1
    MESSAGE_ROLE_UNSPECIFIED = 0
    USER = 1
    ASSISTANT = 2


class SortOrder(_TolerantIntEnum):
    """Order of a listing by creation time; unspecified means newest first."""

    UNKNOWN = -1
    SORT_ORDER_UNSPECIFIED = 0
    ASC = 1
    DESC = 2
