"""Errors the store raises; the API layer maps each to one status code."""

from __future__ import annotations


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
    """The database could not be reached or the write could not be committed."""
