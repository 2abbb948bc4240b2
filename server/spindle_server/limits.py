"""Per-project and per-request limits (the server's --max-* flags fill them).

Guard rails against one client or one project taking the whole server: the defaults are far
above what a well-behaved client needs and small enough that a runaway loop is stopped early.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Limits:
    # Runs PENDING, IN_PROGRESS, TOOL_CALLS or CANCELLING at once in one project (RESOURCE_EXHAUSTED).
    max_active_runs_per_project: int = 1000
    # Listen streams open at once in one project, on this server (RESOURCE_EXHAUSTED).
    max_listen_streams_per_project: int = 10_000
    # Function tools of one assistant or one run (INVALID_ARGUMENT).
    max_tools: int = 128
    # Characters of one message's text (all its parts together) (INVALID_ARGUMENT).
    max_message_chars: int = 256_000
    # Characters of one tool output, and of all outputs of one SubmitToolResults (INVALID_ARGUMENT).
    max_tool_output_chars: int = 512_000
    max_tool_outputs_total_chars: int = 2_000_000


DEFAULT_LIMITS = Limits()
