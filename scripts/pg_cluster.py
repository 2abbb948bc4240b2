"""A developer's private PostgreSQL cluster under .pg/ in the repository: start | stop | dsn | status.

`make pg` starts it (initdb the first time) and prints the DSN to export; the data stays in .pg/
across stops, and the port is kept in .pg/port so the DSN stays the same. The cluster is the
tests' (tests/support/postgres.py: Debian's newest PostgreSQL, run as the `postgres` user when we
are root, 127.0.0.1 only, trust auth) but durable: fsync stays on.

    eval "$(python scripts/pg_cluster.py start)"   # sets SPINDLE_DATABASE
    spindle-server                                  # now on PostgreSQL
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support import postgres  # noqa: E402  (tests/ is on the path only from here on)

HOME = ROOT / ".pg"
PORT_FILE = HOME / "port"
DATABASE = "spindle"


def cluster() -> postgres.Cluster:
    port = int(PORT_FILE.read_text()) if PORT_FILE.exists() else 0
    return postgres.Cluster(HOME / "cluster", port=port)


def dsn(port: int) -> str:
    return f"postgresql://{postgres.USER}@127.0.0.1:{port}/{DATABASE}"


def ensure_running() -> tuple[postgres.Cluster, bool]:
    """The cluster, started (with its database) unless it was running; True if started now."""
    HOME.mkdir(exist_ok=True)
    pg = cluster()
    if pg.running():
        return pg, False
    pg.start()
    PORT_FILE.write_text(str(pg.port))
    admin = postgres.Admin(pg.dsn)
    try:
        admin.execute(f'CREATE DATABASE "{DATABASE}"')
    except Exception as exc:  # already there from an earlier start
        if "already exists" not in str(exc):
            raise
    finally:
        admin.close()
    return pg, True


def start() -> int:
    pg, _ = ensure_running()
    print(f"export SPINDLE_DATABASE={shlex.quote(dsn(pg.port))}")
    print(f"# PostgreSQL in {HOME}; stop it with: make pg-stop", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("command", choices=("start", "stop", "dsn", "status"))
    command = parser.parse_args(argv).command
    HOME.mkdir(exist_ok=True)
    if command == "start":
        return start()
    pg = cluster()
    if command == "stop":
        pg.stop()
        return 0
    if command == "dsn":
        if not pg.running():
            print("not running: make pg", file=sys.stderr)
            return 1
        print(dsn(pg.port))
        return 0
    running = pg.running()
    print(f"running on 127.0.0.1:{pg.port}" if running else "stopped")
    return 0 if running else 3


if __name__ == "__main__":
    sys.exit(main())
