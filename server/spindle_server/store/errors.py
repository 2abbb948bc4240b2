"""Errors the store raises; the API layer maps each to one status code."""

from __future__ import annotations

# Why the database could not serve a call (the ErrorInfo reason of its UNAVAILABLE).
STORAGE_UNAVAILABLE = "STORAGE_UNAVAILABLE"  # closed, I/O error, anything else
STORAGE_BUSY = "STORAGE_BUSY"  # another process holds a lock longer than busy_timeout
STORAGE_FULL = "STORAGE_FULL"  # the disk (or the database's size limit) is full


class StoreError(Exception):
    pass


class NotFoundError(StoreError):
    def __init__(self, kind: str, resource_id: str) -> None:
        super().__init__(f"{kind} {resource_id!r} not found")
        self.kind = kind
        self.resource_id = resource_id


class StateError(StoreError):
    """The resource is in a state that does not allow the change (FAILED_PRECONDITION)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def thread_busy(thread_id: str, run_id: str, action: str) -> StateError:
    """The refusal of a change the thread's active run `run_id` does not allow."""
    return StateError(
        "THREAD_HAS_ACTIVE_RUN",
        f"thread {thread_id} has an active run {run_id}; cannot {action} until it ends",
    )


class QuotaError(StoreError):
    """A limit counted in the store is reached (RESOURCE_EXHAUSTED), e.g. active runs of a project."""

    def __init__(self, reason: str, subject: str, description: str, limit: int) -> None:
        super().__init__(f"{subject}: {description}")
        self.reason = reason
        self.subject = subject
        self.description = description
        self.limit = limit


class FencedError(StoreError):
    """A write from an engine whose lease on the run was taken over (stale epoch)."""


class UnavailableError(StoreError):
    """The database could not be reached or the write could not be committed (retryable:
    nothing of the failed call was committed)."""

    def __init__(self, message: str, reason: str = STORAGE_UNAVAILABLE) -> None:
        super().__init__(message)
        self.reason = reason
