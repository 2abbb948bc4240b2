"""Fault points: named places in the server where a test can kill it, hold it, or make it fail.

Off unless the environment variable SPINDLE_FAULTS is set when the process starts (tests set it
on the servers they start; operators never do). With it unset, `ENABLED` is False and every call
site costs one attribute read. The value is a list of `POINT=ACTION` entries separated by `;`:

  kill         SIGKILL this process the first time the point is reached
  kill@N       SIGKILL it the Nth time (counting from 1)
  hold:DIR     each time the point is reached (the Nth time), create DIR/POINT.N.reached and wait
               until DIR/POINT.N.release exists: the test steers both sides of a race by files
  error        raise InjectedFault there, every time (as an I/O error would)
  error@N      raise it only the Nth time

A POINT may be followed by `:QUALIFIER` at the call site (`after_commit:runs.create`); an entry
names either the bare point (matching every qualifier) or the qualified one.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ENV = "SPINDLE_FAULTS"
POLL_SECONDS = 0.002


class InjectedFault(OSError):
    """The failure a test asked for at a fault point."""


@dataclass(frozen=True, slots=True)
class _Action:
    kind: str  # kill | hold | error
    nth: int | None = None
    directory: Path | None = None


def _parse(spec: str) -> dict[str, _Action]:
    actions: dict[str, _Action] = {}
    for entry in filter(None, (part.strip() for part in spec.split(";"))):
        point, sep, action = entry.partition("=")
        if not sep:
            raise ValueError(f"{ENV}: expected POINT=ACTION, got {entry!r}")
        kind, _, argument = action.partition(":")
        kind, _, nth = kind.partition("@")
        if kind == "hold":
            actions[point] = _Action("hold", directory=Path(argument))
        elif kind in ("kill", "error"):
            actions[point] = _Action(kind, nth=int(nth) if nth else (1 if kind == "kill" else None))
        else:
            raise ValueError(f"{ENV}: unknown action {action!r} for {point!r}")
    return actions


_ACTIONS = _parse(os.environ.get(ENV, ""))
ENABLED = bool(_ACTIONS)
_counts: dict[str, int] = {}
_lock = threading.Lock()


def _lookup(point: str) -> tuple[_Action, str, int] | None:
    name = point if point in _ACTIONS else point.partition(":")[0]
    action = _ACTIONS.get(name)
    if action is None:
        return None
    with _lock:
        count = _counts[name] = _counts.get(name, 0) + 1
    return action, name, count


def _act_now(action: _Action, point: str, count: int) -> bool:
    """Kill or raise; True if the action is a hold the caller must wait out."""
    if action.kind == "kill" and count == action.nth:
        os.kill(os.getpid(), signal.SIGKILL)
    if action.kind == "error" and (action.nth is None or count == action.nth):
        raise InjectedFault(f"injected fault at {point}")
    return action.kind == "hold"


def _hold_files(action: _Action, name: str, count: int) -> tuple[Path, Path]:
    assert action.directory is not None
    reached = action.directory / f"{name}.{count}.reached"
    reached.touch()
    return reached, action.directory / f"{name}.{count}.release"


def configured(point: str) -> bool:
    """Whether an entry names `point` (the code may take another path while a test steers it)."""
    return point in _ACTIONS


async def reached(point: str) -> None:
    """Call at a fault point on the event loop."""
    found = _lookup(point)
    if found is None:
        return
    action, name, count = found
    if _act_now(action, point, count):
        _, release = _hold_files(action, name, count)
        while not release.exists():  # noqa: ASYNC110 - another process creates the file
            await asyncio.sleep(POLL_SECONDS)


def reached_sync(point: str) -> None:
    """Call at a fault point on a worker thread (the SQLite writer)."""
    found = _lookup(point)
    if found is None:
        return
    action, name, count = found
    if _act_now(action, point, count):
        _, release = _hold_files(action, name, count)
        while not release.exists():
            time.sleep(POLL_SECONDS)
