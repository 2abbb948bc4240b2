"""A spinner on stderr while a run is pending, drawn only when stderr is a terminal."""

from __future__ import annotations

import threading
from types import TracebackType
from typing import TextIO

FRAMES = "|/-\\"
INTERVAL = 0.1


class Spinner:
    """``with Spinner(sys.stderr, "waiting"):`` draws ``| waiting`` until the block ends or ``stop()``.

    Does nothing when ``stream`` is not a TTY, so pipes and logs stay clean.
    """

    def __init__(self, stream: TextIO, label: str) -> None:
        self._stream = stream
        self.label = label
        self._enabled = stream.isatty()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> Spinner:
        if self._enabled and self._thread is None:
            self._thread = threading.Thread(target=self._spin, name="spindle-spinner", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop and erase the spinner (idempotent)."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        thread.join()
        self._stream.write("\r\x1b[2K")
        self._stream.flush()

    def _spin(self) -> None:
        frame = 0
        while not self._stop.wait(INTERVAL if frame else 0.0):
            self._stream.write(f"\r{FRAMES[frame % len(FRAMES)]} {self.label}")
            self._stream.flush()
            frame += 1

    def __enter__(self) -> Spinner:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
