"""Three Spindle replicas on one PostgreSQL with nginx in front, on this machine: start | runs.

`make replicas` (start) brings up, in order: the developer's PostgreSQL of `make pg` (started if it
is not running; --database DSN uses another one instead), COUNT `spindle-server` replicas on it on
free 127.0.0.1 ports, and nginx in front of them (deploy/nginx/spindle.conf, rendered by
scripts/nginx_conf.py). It prints the address to give the CLI or the client and each process's
PID, then waits. Ctrl-C (or SIGTERM) stops what it started, by PID: nginx, the replicas, and
PostgreSQL if it was not running before. Logs and nginx's files are under .replicas/.

`make replicas-runs` (runs) lists the runs not finished yet and the replica executing each (the
PID in its lease), to know which one to kill -9 when watching a failover.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from scripts import pg_cluster  # noqa: E402  (the repository is on the path only from here on)
from support import postgres  # noqa: E402
from support.nginx import NginxProcess, nginx_binary  # noqa: E402

STATE = ROOT / ".replicas"
STATE_FILE = "state.json"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0


class Stop(Exception):
    """Ctrl-C or SIGTERM: stop everything started."""


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise Stop(signal.Signals(signum).name)


class Replica:
    """One `spindle-server` on a free port; its stdout and stderr go to files in `state`."""

    def __init__(self, number: int, dsn: str, state: Path, server_args: Sequence[str]) -> None:
        self.number = number
        self.exited_before_stop = False
        self.log = state / f"replica{number}.log"
        self._stdout = state / f"replica{number}.out"
        command = [
            sys.executable,
            "-m",
            "spindle_server",
            *("--host", "127.0.0.1", "--port", "0", "--database", dsn),
            *("--openai-port", "off", "--log-format", "json"),
            *server_args,
        ]
        with self._stdout.open("w") as out, self.log.open("w") as err:
            # A session of its own: the terminal's Ctrl-C reaches this script only, which stops it.
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True
            )
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def await_serving(self, deadline: float) -> None:
        """The port from the server's `serving` line (it opens the port, then reaches the database)."""
        while time.monotonic() < deadline:
            for line in self._stdout.read_text().splitlines():
                try:
                    message = json.loads(line)
                except ValueError:
                    continue
                if message.get("event") == "serving":
                    self.port = int(message["port"])
                    return
            if self.process.poll() is not None:
                raise RuntimeError(f"replica {self.number} exited at start; see {self.log}")
            time.sleep(0.05)
        raise RuntimeError(f"replica {self.number} did not start in time; see {self.log}")

    def stop(self) -> None:
        """SIGTERM (it finishes or hands on its runs), SIGKILL if it takes too long."""
        self.exited_before_stop = self.process.poll() is not None
        if not self.exited_before_stop:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT)


def start_postgres(given: str | None) -> tuple[str, postgres.Cluster | None]:
    """The DSN to run on, and the cluster to stop at the end if this script started it."""
    if given:
        return given, None
    cluster, started = pg_cluster.ensure_running()
    return pg_cluster.dsn(cluster.port), cluster if started else None


def start(args: argparse.Namespace) -> int:
    binary = nginx_binary()
    if binary is None:
        print("nginx is not installed (Debian: apt-get install nginx)", file=sys.stderr)
        return 2
    state: Path = args.state.resolve()
    state.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    replicas: list[Replica] = []
    nginx: NginxProcess | None = None
    cluster: postgres.Cluster | None = None
    try:
        dsn, cluster = start_postgres(args.database)
        server_args = ["--lease-seconds", str(args.lease_seconds), *args.server_args]
        for number in range(1, args.count + 1):  # one by one: a Ctrl-C meanwhile stops those started
            replicas.append(Replica(number, dsn, state, server_args))
        deadline = time.monotonic() + START_TIMEOUT
        for replica in replicas:
            replica.await_serving(deadline)
        nginx = NginxProcess(binary, state / "nginx", [replica.address for replica in replicas]).start()
        assert nginx.process is not None
        (state / STATE_FILE).write_text(json.dumps({"database": dsn, "address": nginx.address}))
        report(dsn, nginx, replicas, cluster)
        watch(replicas, nginx)
    except Stop as stop:
        print(f"\n{stop}: stopping", flush=True)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if nginx is not None:
            nginx.stop()
        for replica in replicas:
            replica.stop()
        if cluster is not None:
            cluster.stop()
        (state / STATE_FILE).unlink(missing_ok=True)
        print("stopped: " + ", ".join(stopped(nginx, replicas, cluster)), flush=True)
    return 0


def stopped(nginx: NginxProcess | None, replicas: list[Replica], cluster: object) -> list[str]:
    names = [
        f"replica {replica.number} (pid {replica.process.pid}"
        + (", had exited already)" if replica.exited_before_stop else ")")
        for replica in replicas
    ]
    return (["nginx"] if nginx is not None else []) + names + (["PostgreSQL"] if cluster else [])


def postgres_line(cluster: postgres.Cluster | None) -> str:
    if cluster is None:
        return "PostgreSQL: already running (not stopped at the end; make pg-stop stops it)"
    pid_file = cluster.data / "postmaster.pid"
    pid = pid_file.read_text().split("\n", 1)[0] if pid_file.exists() else "?"
    return f"PostgreSQL: pid {pid} (started here, stopped at the end; data under {cluster.root})"


def report(dsn: str, nginx: NginxProcess, replicas: list[Replica], cluster: postgres.Cluster | None) -> None:
    assert nginx.process is not None
    lines = [
        f"Spindle: {len(replicas)} replicas on {dsn}, nginx in front.",
        "Point the CLI or the client at nginx:",
        f"  export SPINDLE_TARGET={nginx.address}",
        "or at the replicas themselves (the client balances with round_robin):",
        f"  export SPINDLE_TARGET={','.join(replica.address for replica in replicas)}",
        postgres_line(cluster),
        f"nginx: pid {nginx.process.pid} at {nginx.address} (access log {nginx.access_log})",
    ]
    for replica in replicas:
        lines.append(
            f"replica {replica.number}: pid {replica.process.pid} at {replica.address} (log {replica.log})"
        )
    lines += [
        "Which replica executes which run: make replicas-runs",
        "Ctrl-C stops them all.",
        "ready",
    ]
    print("\n".join(lines), flush=True)


def watch(replicas: list[Replica], nginx: NginxProcess) -> None:
    """Until a signal: say when a replica or nginx exits (a replica killed to watch a failover)."""
    gone: set[int] = set()
    while True:
        for replica in replicas:
            code = replica.process.poll()
            if code is not None and replica.number not in gone:
                gone.add(replica.number)
                how = f"signal {-code}" if code < 0 else f"code {code}"
                print(f"replica {replica.number} (pid {replica.process.pid}) exited ({how})", flush=True)
        if nginx.process is not None and nginx.process.poll() is not None:
            print(f"nginx exited; see {nginx.directory / 'error.log'}", flush=True)
            return
        time.sleep(0.2)


# ---- runs: which replica executes what --------------------------------------------------------


async def active_runs(dsn: str) -> list[tuple[str, str, str]]:
    import asyncpg  # the server's dependency; only this command needs it here

    from spindle.v1 import run_pb2
    from spindle_server.store.base import ACTIVE_STATUSES

    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch(
            "SELECT id, status, lease_owner, lease_expires FROM runs"
            " WHERE status = ANY($1::int[]) ORDER BY seq",
            list(ACTIVE_STATUSES),
        )
    finally:
        await connection.close()
    now = time.time()
    found = []
    for row in rows:
        # lease_owner is HOST:PID:TOKEN while a replica executes the run (and its lease is current).
        owner = row["lease_owner"].split(":")
        pid = owner[1] if len(owner) == 3 and row["lease_expires"] > now else "-"
        found.append((row["id"], run_pb2.RunStatus.Name(row["status"]), pid))
    return found


def runs(args: argparse.Namespace) -> int:
    path = args.state.resolve() / STATE_FILE
    if not path.exists():
        print("no replicas running: make replicas", file=sys.stderr)
        return 1
    dsn = args.database or json.loads(path.read_text())["database"]
    found = asyncio.run(active_runs(dsn))
    if not found:
        print("no run is active")
    for run_id, status, pid in found:
        print(f"{run_id} {status} executed by pid {pid}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("command", choices=("start", "runs"), nargs="?", default="start")
    parser.add_argument("--count", type=int, default=3, help="replicas to start")
    parser.add_argument("--database", help="a PostgreSQL DSN to use instead of make pg's")
    parser.add_argument("--state", type=Path, default=STATE, help="folder for logs and nginx's files")
    parser.add_argument(
        "--lease-seconds",
        type=float,
        default=5.0,
        help="the replicas' --lease-seconds: a killed replica's run continues elsewhere after it",
    )
    parser.epilog = "Flags after -- go to every replica's spindle-server."
    # Split at "--" here: argparse drops what follows it once an option comes after the command.
    given = list(sys.argv[1:] if argv is None else argv)
    cut = given.index("--") if "--" in given else len(given)
    args = parser.parse_args(given[:cut])
    args.server_args = given[cut + 1 :]
    if args.count < 1:
        parser.error("--count must be at least 1")
    if args.command == "runs":
        return runs(args)
    print(f"starting: {shlex.join(['spindle-server', *args.server_args])} x {args.count}", flush=True)
    return start(args)


if __name__ == "__main__":
    sys.exit(main())
