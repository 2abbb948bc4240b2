"""--database: a SQLite file or a PostgreSQL DSN; the pool flags; no password in a log."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from spindle_server.config import describe_database, parse_config, redact_dsn
from spindle_server.server import build_store
from spindle_server.store.sqlite import SqliteStore


def test_a_path_is_a_sqlite_file(tmp_path: Path) -> None:
    config = parse_config(["--database", str(tmp_path / "x.db")])
    assert config.postgres_dsn is None
    assert config.database == tmp_path / "x.db"
    assert isinstance(build_store(config), SqliteStore)


@pytest.mark.parametrize(
    "dsn",
    ["postgresql://spindle@db.internal:5432/spindle", "postgres://u:pw@10.0.0.5/spindle", "POSTGRESQL://h/d"],
)
def test_a_postgresql_dsn_picks_postgresql(dsn: str) -> None:
    config = parse_config(["--database", dsn, "--pg-pool-min", "1", "--pg-pool-max", "4"])
    assert config.postgres_dsn == dsn
    assert (config.pg_pool_min, config.pg_pool_max) == (1, 4)


def test_the_environment_sets_the_dsn_and_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPINDLE_DATABASE", "postgresql://app@db/spindle")
    monkeypatch.setenv("SPINDLE_PG_POOL_MAX", "20")
    config = parse_config([])
    assert config.postgres_dsn == "postgresql://app@db/spindle"
    assert config.pg_pool_max == 20


def test_the_password_never_reaches_the_log_line() -> None:
    assert redact_dsn("postgresql://app:s3cret@db:5432/spindle") == "postgresql://app:***@db:5432/spindle"
    assert redact_dsn("postgresql://app@db/spindle") == "postgresql://app@db/spindle"
    config = parse_config(["--database", "postgresql://app:s3cret@db/spindle"])
    assert "s3cret" not in describe_database(config)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--pg-pool-min", "5", "--pg-pool-max", "2"], "must not exceed --pg-pool-max"),
        (["--pg-pool-max", "0"], "--pg-pool-max at least 1"),
        (["--pg-pool-min", "-1"], "--pg-pool-min must be 0 or more"),
    ],
)
def test_bad_pool_sizes_are_usage_errors(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_config(["--database", "postgresql://app@db/spindle", *flags])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_sqlite_start_does_not_import_asyncpg(tmp_path: Path) -> None:
    """The PostgreSQL store is imported only for a DSN: SQLite users do not pay for asyncpg."""
    probe = (
        "import sys; from spindle_server.config import parse_config; "
        "from spindle_server.server import SpindleServer; "
        f"SpindleServer(parse_config(['--database', {str(tmp_path / 'x.db')!r}])); "
        "print('asyncpg' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
