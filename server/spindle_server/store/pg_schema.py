"""PostgreSQL schema as numbered migrations, applied at start by every replica.

Each replica applies what is missing in one transaction under a transaction-level advisory
lock: replicas that start together queue on the lock, and the ones after the first find every
version recorded and apply nothing. DDL is transactional in PostgreSQL, so a replica that dies
half-way leaves no partial version behind. Add a migration by appending to MIGRATIONS; never
edit one that has shipped.
"""

from __future__ import annotations

import asyncpg

from spindle.v1 import run_pb2
from spindle_server import clock
from spindle_server.store.base import ACTIVE_STATUSES, TERMINAL_STATUSES

# Any constant that no other component of the database uses for an advisory lock.
MIGRATION_LOCK_KEY = 0x5370696E646C65  # "Spindle"

ACTIVE = ",".join(str(s) for s in sorted(ACTIVE_STATUSES))
TERMINAL = ",".join(str(s) for s in sorted(TERMINAL_STATUSES))
ONE_ACTIVE_RUN_INDEX = "runs_one_active_per_thread"

_V1 = f"""
CREATE TABLE assistants (
  seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  id TEXT NOT NULL UNIQUE,
  project TEXT NOT NULL,
  body BYTEA NOT NULL
);
CREATE INDEX assistants_project ON assistants(project, seq);
CREATE TABLE threads (
  seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  id TEXT NOT NULL UNIQUE,
  project TEXT NOT NULL,
  body BYTEA NOT NULL
);
CREATE INDEX threads_project ON threads(project, seq);
CREATE TABLE messages (
  seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  id TEXT NOT NULL UNIQUE,
  project TEXT NOT NULL,
  thread_id TEXT NOT NULL,
  run_id TEXT NOT NULL DEFAULT '',
  body BYTEA NOT NULL
);
CREATE INDEX messages_thread ON messages(thread_id, seq);
CREATE TABLE runs (
  seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  id TEXT NOT NULL UNIQUE,
  project TEXT NOT NULL,
  thread_id TEXT NOT NULL,
  assistant_id TEXT NOT NULL,
  status INTEGER NOT NULL,
  labels JSONB NOT NULL DEFAULT '{{}}',
  body BYTEA NOT NULL,
  deadline DOUBLE PRECISION NOT NULL,
  lease_owner TEXT NOT NULL DEFAULT '',
  lease_epoch BIGINT NOT NULL DEFAULT 0,
  lease_expires DOUBLE PRECISION NOT NULL DEFAULT 0,
  next_event_idx BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX runs_project ON runs(project, seq);
CREATE INDEX runs_thread ON runs(thread_id, seq);
CREATE INDEX runs_pending ON runs(seq) WHERE status = {run_pb2.PENDING};
CREATE INDEX runs_active_deadline ON runs(deadline) WHERE status IN ({ACTIVE});
CREATE INDEX runs_leased ON runs(lease_expires)
  WHERE status IN ({run_pb2.IN_PROGRESS}, {run_pb2.CANCELLING});
CREATE UNIQUE INDEX {ONE_ACTIVE_RUN_INDEX} ON runs(thread_id) WHERE status IN ({ACTIVE});
CREATE TABLE run_steps (
  seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  id TEXT NOT NULL UNIQUE,
  project TEXT NOT NULL,
  run_id TEXT NOT NULL,
  body BYTEA NOT NULL
);
CREATE INDEX run_steps_run ON run_steps(run_id, seq);
CREATE TABLE run_events (
  run_id TEXT NOT NULL,
  idx BIGINT NOT NULL,
  body BYTEA NOT NULL,
  PRIMARY KEY (run_id, idx)
);
-- response is NULL only inside the transaction that claimed the key (never committed so).
CREATE TABLE idempotency (
  project TEXT NOT NULL,
  key TEXT NOT NULL,
  fingerprint TEXT NOT NULL,
  response BYTEA,
  created_at DOUBLE PRECISION NOT NULL,
  PRIMARY KEY (project, key)
);
CREATE INDEX idempotency_created ON idempotency(created_at);
"""

# Retention and limits: when each run reached a terminal status (set by the write that ends it,
# with the same clock as every other stored time; runs that had ended before this version count
# as ended now), and the active runs of a project, counted by quota checks.
_V2 = f"""
ALTER TABLE runs ADD COLUMN finished_at DOUBLE PRECISION;
UPDATE runs SET finished_at = EXTRACT(EPOCH FROM clock_timestamp()) WHERE status IN ({TERMINAL});
CREATE INDEX runs_finished_at ON runs(finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX runs_active_per_project ON runs(project) WHERE status IN ({ACTIVE});
"""

# What the model said in the turn that made each TOOL_CALLS step (RunChange.step_texts).
_V3 = """
CREATE TABLE step_texts (
  run_id TEXT NOT NULL,
  step_id TEXT NOT NULL,
  said TEXT NOT NULL,
  PRIMARY KEY (run_id, step_id)
);
"""

# A message's insert as one statement (MessageService.Create): called alone it is its own
# transaction, one round trip instead of four (BEGIN, the thread's lock, the INSERT, COMMIT).
# Under READ COMMITTED each statement of a (volatile) PL/pgSQL function takes a new snapshot, so
# the active-run check after the lock sees what the lock waited for, as it did as a later
# statement of the client's transaction (postgres._lock_thread). Returns NULL when inserted,
# '' when the thread is not in the project, else the id of the thread's active run. The active
# statuses are written in, like the partial index's: a change to them needs a new version.
INSERT_MESSAGE_FUNCTION = "spindle_insert_message"
_V4 = f"""
CREATE FUNCTION {INSERT_MESSAGE_FUNCTION}(
  m_id TEXT, m_project TEXT, m_thread_id TEXT, m_run_id TEXT, m_body BYTEA
) RETURNS TEXT LANGUAGE plpgsql VOLATILE AS $$
DECLARE
  running TEXT;
BEGIN
  -- Shared: messages do not conflict with each other, only with a run's start or the thread's
  -- deletion, which take the row FOR UPDATE.
  PERFORM 1 FROM threads WHERE id = m_thread_id AND project = m_project FOR SHARE;
  IF NOT FOUND THEN
    RETURN '';
  END IF;
  LOOP
    INSERT INTO messages(id, project, thread_id, run_id, body)
      SELECT m_id, m_project, m_thread_id, m_run_id, m_body
      WHERE NOT EXISTS (SELECT 1 FROM runs WHERE thread_id = m_thread_id AND status IN ({ACTIVE}));
    IF FOUND THEN
      RETURN NULL;
    END IF;
    -- Refused: name the run, unless it ended in between (a run's end takes no thread lock).
    SELECT id INTO running FROM runs WHERE thread_id = m_thread_id AND status IN ({ACTIVE}) LIMIT 1;
    IF running IS NOT NULL THEN
      RETURN running;
    END IF;
  END LOOP;
END
$$;
"""

MIGRATIONS: tuple[tuple[int, str], ...] = ((1, _V1), (2, _V2), (3, _V3), (4, _V4))


async def migrate(conn: asyncpg.Connection) -> list[int]:
    """Apply the missing migrations; returns the versions this call applied."""
    applied: list[int] = []
    async with conn.transaction():
        # Before anything else, even CREATE TABLE IF NOT EXISTS: two of those racing can
        # fail on the catalog's unique index.
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
        )
        done = {row[0] for row in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, script in MIGRATIONS:
            if version in done:
                continue
            await conn.execute(script)
            await conn.execute(
                "INSERT INTO schema_migrations(version, applied_at) VALUES ($1, $2)", version, clock.now()
            )
            applied.append(version)
    return applied
