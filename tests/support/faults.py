"""Test side of the server's fault points (spindle_server/faults.py): steer them through files."""

from __future__ import annotations

import time
from pathlib import Path

ENV = "SPINDLE_FAULTS"


def fault_env(**points: str) -> dict[str, str]:
    """{ENV: "a.b=kill;..."} from keyword arguments; use `__` for `.` and `___` for `:` in names."""
    entries = [f"{name.replace('___', ':').replace('__', '.')}={action}" for name, action in points.items()]
    return {ENV: ";".join(entries)}


class Holds:
    """A folder where held fault points announce themselves and wait to be released."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def action(self) -> str:
        return f"hold:{self.directory}"

    def env(self, *points: str) -> dict[str, str]:
        return {ENV: ";".join(f"{point}={self.action()}" for point in points)}

    def is_reached(self, point: str, nth: int = 1) -> bool:
        return (self.directory / f"{point}.{nth}.reached").exists()

    def wait_reached(self, point: str, nth: int = 1, timeout: float = 60.0) -> None:
        """Blocks until the server is held at the Nth arrival at `point`."""
        deadline = time.monotonic() + timeout
        while not self.is_reached(point, nth):
            if time.monotonic() > deadline:
                raise AssertionError(f"the server never reached {point} (#{nth})")
            time.sleep(0.002)

    def release(self, point: str, nth: int = 1) -> None:
        (self.directory / f"{point}.{nth}.release").touch()

    def release_all(self, point: str, upto: int) -> None:
        """Let the first `upto` arrivals pass without waiting for them (they will not hold)."""
        for nth in range(1, upto + 1):
            self.release(point, nth)
