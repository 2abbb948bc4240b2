"""Small helpers for the client's tests."""

from __future__ import annotations

import socket
import threading
import time

from support.server import ServerProcess


def free_port() -> int:
    """A port nothing listens on right now (127.0.0.1 only)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Restarter:
    """Restarts a server in the background: stop (SIGTERM), stay down a while, start again."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self._threads: list[threading.Thread] = []

    @property
    def address(self) -> str:
        return self.server.address

    def restart(self, down_for: float = 0.5) -> threading.Event:
        """Begin a restart; the returned event is set once the server is down."""
        down = threading.Event()

        def bounce() -> None:
            self.server.stop()
            down.set()
            time.sleep(down_for)  # clients meet a refused connection meanwhile
            self.server.start()

        thread = threading.Thread(target=bounce, daemon=True)
        self._threads.append(thread)
        thread.start()
        return down

    def join(self, timeout: float = 60.0) -> None:
        """Wait for every restart begun so far to finish."""
        for thread in self._threads:
            thread.join(timeout)
