"""Per-call facts the interceptor establishes and the servicers read (the caller's project)."""

from __future__ import annotations

import contextvars

DEFAULT_PROJECT = "default"

current_project: contextvars.ContextVar[str] = contextvars.ContextVar(
    "spindle_project", default=DEFAULT_PROJECT
)
current_run_id: contextvars.ContextVar[str] = contextvars.ContextVar("spindle_run_id", default="")
# Messages a stream written with ctx.write sent (a generator's are counted as it yields them).
current_messages: contextvars.ContextVar[int] = contextvars.ContextVar("spindle_messages", default=0)


def project() -> str:
    return current_project.get()


def note_run(run_id: str) -> None:
    """Let the access log name the run this call was about."""
    current_run_id.set(run_id)


def note_messages(count: int) -> None:
    """Let the access log count what a writing stream handler sent (the handler and the
    interceptor share the call's task, and so its context)."""
    current_messages.set(count)
