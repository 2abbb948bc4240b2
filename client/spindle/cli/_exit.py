"""Exit codes of the ``spindle`` command: they tell success, failure and timeout apart."""

from __future__ import annotations

import contextlib
import io
import os
from typing import TextIO

from spindle.results import RunResult

OK = 0
"""The command worked; for a run: it COMPLETED."""
RUN_FAILED = 1
"""The run ended FAILED, CANCELLED, INCOMPLETE or EXPIRED."""
USAGE = 2
"""Bad command line (argparse's code)."""
RPC_ERROR = 3
"""A call failed: server unreachable, not found, invalid argument, ..."""
TIMEOUT = 4
"""The run was still going when ``--timeout`` passed."""
TOOL_CALLS = 5
"""The run is paused, waiting for tool results (``spindle submit``)."""
INTERRUPTED = 130
"""Ctrl-C."""
BROKEN_PIPE = 141
"""Whoever read the output stopped reading (``| head``): 128 + SIGPIPE, as other tools end."""


def for_result(result: RunResult) -> int:
    """The exit code that tells how a run ended (or that it is paused)."""
    if result.is_succeeded:
        return OK
    if result.is_paused:
        return TOOL_CALLS
    if result.is_failed:
        return RUN_FAILED
    return TIMEOUT


def silence_closed_pipe(*streams: TextIO) -> None:
    """Point the streams' descriptors at /dev/null, as Python's docs advise for SIGPIPE: what
    is still buffered then goes nowhere, instead of raising again when Python flushes at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for stream in streams:
            with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
                os.dup2(devnull, stream.fileno())
    finally:
        os.close(devnull)
