"""Refuses API calls with UNAVAILABLE until the server is ready (its database reachable).

The port opens before the database is reached, so health checks can say NOT_SERVING while a
replica waits for PostgreSQL; a call that arrives meanwhile gets STORAGE_UNAVAILABLE (retryable)
rather than reaching a store that is not open. Health and reflection always pass. The check is
one attribute read in api/interceptor.py's call wrapper, which maps the error and logs the call
like any other.
"""

from __future__ import annotations

from spindle_server.store.errors import UnavailableError


class ReadinessGate:
    def __init__(self) -> None:
        self.ready = False


def not_ready() -> UnavailableError:
    return UnavailableError("the server is starting: its database is not reachable yet; retry")
