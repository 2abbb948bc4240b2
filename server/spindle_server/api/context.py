"""Per-call facts the interceptor establishes and the servicers read (the caller's project)."""

from __future__ import annotations

import contextvars

DEFAULT_PROJECT = "default"

current_project: contextvars.ContextVar[str] = contextvars.ContextVar(
    "spindle_project", default=DEFAULT_PROJECT
)
current_run_id: contextvars.ContextVar[str] = contextvars.ContextVar("spindle_run_id", default="")


def project() -> str:
    return current_project.get()


def note_run(run_id: str) -> None:
    """Let the access log name the run this call was about."""
    current_run_id.set(run_id)
