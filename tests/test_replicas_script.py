"""scripts/replicas.py (make replicas) end to end: three replicas on one PostgreSQL behind nginx.

The script is run as a newcomer runs it, on a fresh database of the session's cluster: the
address and PIDs it prints are used to make a run, its executing replica (from `replicas.py runs`)
is killed with SIGKILL while three Listen streams through nginx (one on each replica) follow the
run, and the run still ends, every stream with every event once. Ctrl-C then stops it all.
The executing replica is held before its run's body (a fault point), so the kill always lands
while the run is in progress, whatever the machine's speed.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import spindle
from spindle.enums import EventType, RunStatus
from support.faults import Holds
from support.invariants import assert_invariants
from support.nginx import nginx_binary
from support.server import PostgresDatabase, TestDatabase, store_under_test
from support.stubs import Stubs

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "replicas.py"
POINT = "engine.before_run_body"
BOUND = 120.0  # seconds: a failure bound only

pytestmark = [
    pytest.mark.skipif(store_under_test() != "postgresql", reason="the script runs replicas on PostgreSQL"),
    pytest.mark.skipif(nginx_binary() is None, reason="nginx is not installed (apt-get install nginx)"),
]


class Script:
    """The script as a child process, its stdout read line by line on a thread."""

    def __init__(self, *args: str, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(SCRIPT), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def until(self, predicate: Callable[[str], bool]) -> str:
        deadline = time.monotonic() + BOUND
        while True:
            try:
                line = self._queue.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(f"the script never printed it: {self.lines}") from None
            if line is None:
                raise AssertionError(f"the script ended: {self.lines}")
            self.lines.append(line)
            if predicate(line):
                return line

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # what Ctrl-C sends it
        return self.process.wait(timeout=BOUND)


def executing_pid(database: str, state: Path, run_id: str) -> int:
    """The PID `replicas.py runs` names for the run (its lease holder), once there is one."""
    deadline = time.monotonic() + BOUND
    while time.monotonic() < deadline:
        listed = subprocess.run(
            [sys.executable, str(SCRIPT), "runs", "--state", str(state), "--database", database],
            capture_output=True,
            text=True,
            timeout=BOUND,
            check=True,
        ).stdout
        found = re.search(rf"^{run_id} IN_PROGRESS executed by pid (\d+)$", listed, re.MULTILINE)
        if found:
            return int(found[1])
        time.sleep(0.1)
    raise AssertionError(f"no replica holds {run_id}'s lease")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_make_replicas_survives_the_death_of_the_executing_replica(
    tmp_path: Path, new_database: Callable[..., TestDatabase]
) -> None:
    database = new_database()
    assert isinstance(database, PostgresDatabase)
    holds = Holds(tmp_path / "holds")
    state = tmp_path / "state"
    env = {**os.environ, **holds.env(POINT)}
    script = Script(
        "start", "--database", database.dsn, "--state", str(state), "--lease-seconds", "3", env=env
    )
    try:
        script.until(lambda line: line == "ready")
        target = next(line for line in script.lines if "export SPINDLE_TARGET=" in line).split("=", 1)[1]
        replica_pids = [
            int(pid) for pid in re.findall(r"^replica \d: pid (\d+) at ", "\n".join(script.lines), re.M)
        ]
        (nginx_pid,) = [int(p) for p in re.findall(r"^nginx: pid (\d+) at ", "\n".join(script.lines), re.M)]
        assert len(replica_pids) == 3

        with spindle.Client(target, timeout=30) as client:
            assistant = client.assistants.create(name="survivor")
            thread = client.threads.create(messages=["say something long enough to be followed"])
            run = client.runs.create(thread_id=thread.id, assistant_id=assistant.id)
            holds.wait_reached(POINT, timeout=BOUND)  # the executing replica has it, held
            victim = executing_pid(database.dsn, state, run.id)
            assert victim in replica_pids

            # Three Listens in a row through nginx: round robin puts one on each replica.
            streams = [Follower(client, run.id) for _ in range(3)]
            for stream in streams:
                stream.start()
                assert stream.opened.wait(BOUND), "a Listen through nginx never delivered its first event"

            os.kill(victim, signal.SIGKILL)
            script.until(
                lambda line: line.startswith("replica ") and f"(pid {victim}) exited (signal 9)" in line
            )
            holds.release(POINT)  # the replica that takes the run over passes the point

            for stream in streams:
                stream.join(BOUND)
                assert not stream.is_alive(), "a Listen never ended"
                assert stream.error is None, stream.error
                assert stream.indexes == list(range(len(stream.indexes)))  # no gap, no duplicate
                assert stream.types[-1] is EventType.DONE
            ended = client.runs.get(run.id)
            assert ended.status is RunStatus.COMPLETED
            assert ended.attempt == 2  # the killed replica's attempt, then the one that ended it
        stubs = Stubs.connect(target)
        try:
            assert_invariants(stubs, [run.id])  # one terminal event, last; one reply on the thread
        finally:
            stubs.close()
    finally:
        code = script.stop()
    assert code == 0, script.lines
    script.until(lambda line: line.startswith("stopped: nginx, replica 1"))
    for pid in [nginx_pid, *replica_pids]:
        assert not alive(pid), f"pid {pid} outlived the script"


class Follower(threading.Thread):
    """One client Listen of the run to its end (the client resumes it after a broken stream)."""

    def __init__(self, client: spindle.Client, run_id: str) -> None:
        super().__init__(daemon=True)
        self.handle = client.runs.get(run_id)
        self.opened = threading.Event()
        self.indexes: list[int] = []
        self.types: list[EventType] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for event in self.handle.listen(timeout=BOUND):
                self.indexes.append(event.index)
                self.types.append(event.type)
                self.opened.set()
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.opened.set()
