"""The embedded default store: one SQLite file in WAL mode, owned by one server process."""

from __future__ import annotations

import asyncio
import functools
import json
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import structlog
from google.protobuf.message import Message as ProtoMessage

from spindle.v1 import assistant_pb2, message_pb2, run_pb2, thread_pb2
from spindle_server import clock, faults
from spindle_server.drafts import MessageDraft
from spindle_server.store.base import (
    ACTIVE_STATUSES,
    TERMINAL_STATUSES,
    ClaimedRun,
    DueRuns,
    EventsListener,
    IdempotencyRecord,
    MutationResult,
    Page,
    PageQuery,
    RequestKey,
    RequestReplayed,
    RunChange,
    RunClaim,
    RunFilter,
    RunMutation,
    embed_stored_run,
)
from spindle_server.store.errors import (
    FencedError,
    NotFoundError,
    QuotaError,
    StoreError,
    thread_busy,
)
from spindle_server.store.sqlite_db import SqliteDatabase

M = TypeVar("M", bound=ProtoMessage)
T = TypeVar("T")

log = structlog.get_logger(__name__)

_ACTIVE = ",".join(str(s) for s in sorted(ACTIVE_STATUSES))
_TERMINAL = ",".join(str(s) for s in sorted(TERMINAL_STATUSES))

# messages.seq is a plain rowid, not AUTOINCREMENT: every commit of a message would write
# sqlite_sequence's page too (one more WAL frame and page write per durable Create). Without
# it a new row's seq is the largest one's + 1, so a seq freed by deleting the largest rows can
# come back; messages are deleted only with their thread, whose id is never reused, and every
# reader of seq (paging cursors, a run's prompt) reads within one thread, where seq still
# only grows: a live thread's rows are never deleted, so each new one is above them all.
_MESSAGES_TABLE = """CREATE TABLE IF NOT EXISTS {name} (
  seq INTEGER PRIMARY KEY,
  id TEXT NOT NULL UNIQUE,
  project TEXT NOT NULL,
  thread_id TEXT NOT NULL,
  run_id TEXT NOT NULL DEFAULT '',
  body BLOB NOT NULL
);"""
_MESSAGES_INDEX = "CREATE INDEX IF NOT EXISTS messages_thread ON messages(thread_id, seq);"

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS assistants (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL UNIQUE,
  project TEXT NOT NULL,
  body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS assistants_project ON assistants(project, seq);
CREATE TABLE IF NOT EXISTS threads (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL UNIQUE,
  project TEXT NOT NULL,
  body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS threads_project ON threads(project, seq);
{_MESSAGES_TABLE.format(name="messages")}
{_MESSAGES_INDEX}
CREATE TABLE IF NOT EXISTS runs (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL UNIQUE,
  project TEXT NOT NULL,
  thread_id TEXT NOT NULL,
  assistant_id TEXT NOT NULL,
  status INTEGER NOT NULL,
  labels TEXT NOT NULL DEFAULT '{{}}',
  body BLOB NOT NULL,
  deadline REAL NOT NULL,
  lease_owner TEXT NOT NULL DEFAULT '',
  lease_epoch INTEGER NOT NULL DEFAULT 0,
  lease_expires REAL NOT NULL DEFAULT 0,
  next_event_idx INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS runs_project ON runs(project, seq);
CREATE INDEX IF NOT EXISTS runs_thread ON runs(thread_id, seq);
CREATE INDEX IF NOT EXISTS runs_status ON runs(status, seq);
CREATE UNIQUE INDEX IF NOT EXISTS runs_one_active_per_thread ON runs(thread_id) WHERE status IN ({_ACTIVE});
CREATE TABLE IF NOT EXISTS run_steps (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL UNIQUE,
  project TEXT NOT NULL,
  run_id TEXT NOT NULL,
  body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS run_steps_run ON run_steps(run_id, seq);
CREATE TABLE IF NOT EXISTS step_texts (
  run_id TEXT NOT NULL,
  step_id TEXT NOT NULL,
  said TEXT NOT NULL,
  PRIMARY KEY (run_id, step_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS run_events (
  run_id TEXT NOT NULL,
  idx INTEGER NOT NULL,
  body BLOB NOT NULL,
  PRIMARY KEY (run_id, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS idempotency (
  project TEXT NOT NULL,
  key TEXT NOT NULL,
  fingerprint TEXT NOT NULL,
  response BLOB,
  created_at REAL NOT NULL,
  PRIMARY KEY (project, key)
) WITHOUT ROWID;
-- Reservations without an answer were left by versions that reserved before writing; answers are
-- now written with their change, so such a row proves nothing was answered: drop it.
DELETE FROM idempotency WHERE response IS NULL;
"""


# Retention and limits, kept apart from SCHEMA and applied at every start (all IF NOT EXISTS).
# runs_finished records when each run reached a terminal status; triggers keep it, so no write
# path has to remember to. The time is SQLite's clock in epoch seconds (julianday has ms).
_NOW = "((julianday('now') - 2440587.5) * 86400.0)"
LIMITS_SCHEMA = f"""
CREATE INDEX IF NOT EXISTS runs_active_per_project ON runs(project) WHERE status IN ({_ACTIVE});
CREATE TABLE IF NOT EXISTS runs_finished (
  run_id TEXT PRIMARY KEY,
  finished_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS runs_finished_at ON runs_finished(finished_at);
CREATE TRIGGER IF NOT EXISTS runs_finish AFTER UPDATE OF status ON runs
  WHEN NEW.status IN ({_TERMINAL}) AND OLD.status NOT IN ({_TERMINAL})
  BEGIN INSERT OR IGNORE INTO runs_finished(run_id, finished_at) VALUES (NEW.id, {_NOW}); END;
CREATE TRIGGER IF NOT EXISTS runs_forget AFTER DELETE ON runs
  BEGIN DELETE FROM runs_finished WHERE run_id = OLD.id; END;
"""


def _migrate(conn: sqlite3.Connection) -> None:
    """What SCHEMA's IF NOT EXISTS cannot do for a database made by an older version, in the
    writer's first transaction (all of it or none)."""
    _drop_messages_autoincrement(conn)
    _apply_limits_schema(conn)


def _drop_messages_autoincrement(conn: sqlite3.Connection) -> None:
    """A messages table made AUTOINCREMENT (before this version) rebuilt as the plain rowid
    table SCHEMA makes now: every row kept with its seq (so order and paging cursors hold),
    its index made again."""
    (sql,) = conn.execute(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'messages'"
    ).fetchone()
    if "AUTOINCREMENT" not in sql.upper():
        return
    # One copy of the whole table, once: a large database takes a while (about 1 s a 100,000
    # messages here) and the dropped table's pages stay in the file, free, until a VACUUM.
    (rows,) = conn.execute("SELECT count(*) FROM messages").fetchone()
    log.info("sqlite_messages_rebuild_started", messages=rows)
    began = time.monotonic()
    conn.execute("DROP TABLE IF EXISTS messages_rebuilt")  # never left by a commit; to be sure
    conn.execute(_MESSAGES_TABLE.format(name="messages_rebuilt"))
    conn.execute(
        "INSERT INTO messages_rebuilt(seq, id, project, thread_id, run_id, body)"
        " SELECT seq, id, project, thread_id, run_id, body FROM messages ORDER BY seq"
    )
    conn.execute("DROP TABLE messages")  # its index and its sqlite_sequence row go with it
    conn.execute("ALTER TABLE messages_rebuilt RENAME TO messages")
    conn.execute(_MESSAGES_INDEX)
    log.info("sqlite_messages_rebuilt", messages=rows, seconds=round(time.monotonic() - began, 3))


def _apply_limits_schema(conn: sqlite3.Connection) -> None:
    created = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'runs_finished'"
    ).fetchone()
    for statement in _statements(LIMITS_SCHEMA):
        conn.execute(statement)
    if created is None:
        # A database from before retention: its finished runs count as finished now.
        conn.execute(
            f"INSERT OR IGNORE INTO runs_finished(run_id, finished_at)"
            f" SELECT id, {_NOW} FROM runs WHERE status IN ({_TERMINAL})"
        )


def _statements(script: str) -> list[str]:
    """Split a script whose triggers end with 'END;' (executescript would commit the batch)."""
    statements, current = [], ""
    for line in script.strip().splitlines():
        current += line + "\n"
        if sqlite3.complete_statement(current):
            statements.append(current)
            current = ""
    return statements


# Lookups by key, one statement each (SqliteDatabase.read_row): made once, not per call.
_GET_BY_ID = {
    table: f"SELECT body FROM {table} WHERE id = ? AND project = ?"
    for table in ("assistants", "threads", "messages", "runs")
}
_GET_RUN = _GET_BY_ID["runs"]  # its arguments (id, project) are the cache's key
# A fault point that sends RunService.Get's read to the reader pool and holds it there, after
# the read and before the cache is filled (tests steer a write into that window).
_POOL_POINT = "store.get_run.after_pool_read"
_THREAD_MESSAGES = "SELECT body FROM messages WHERE thread_id = ? ORDER BY seq"
_RUN_STEPS = "SELECT body FROM run_steps WHERE run_id = ? ORDER BY seq"
_READ_EVENTS = "SELECT body FROM run_events WHERE run_id = ? AND idx >= ? ORDER BY idx LIMIT ?"


def _parse(cls: type[M], body: bytes) -> M:
    message = cls()
    message.ParseFromString(body)
    return message


def _page_sql(query: PageQuery) -> tuple[str, list[Any]]:
    """ORDER/LIMIT (and the cursor condition) for seq-ordered pages; fetches one extra row."""
    args: list[Any] = []
    condition = ""
    if query.after_seq is not None:
        condition = " AND seq < ?" if query.descending else " AND seq > ?"
        args.append(query.after_seq)
    order = "DESC" if query.descending else "ASC"
    return f"{condition} ORDER BY seq {order} LIMIT {int(query.limit) + 1}", args


def _to_page(rows: list[tuple[int, bytes]], cls: type[M], query: PageQuery) -> Page[M]:
    more = len(rows) > query.limit
    rows = rows[: query.limit]
    items = [_parse(cls, body) for _, body in rows]
    return Page(items, rows[-1][0] if more and rows else None)


class SqliteStore:
    def __init__(self, path: Path) -> None:
        self.db = SqliteDatabase(path)
        self._listeners: list[EventsListener] = []

    async def start(self) -> None:
        self.db.open(SCHEMA)
        await self.db.write(_migrate)

    async def close(self) -> None:
        await self.db.close()

    def add_events_listener(self, listener: EventsListener) -> None:
        self._listeners.append(listener)

    def _publish(self, result: MutationResult | None) -> None:
        if result is not None:
            self._publish_many([result])

    def _publish_many(self, results: Sequence[MutationResult]) -> None:
        events = [event for result in results for event in result.events]
        if events:
            for listener in self._listeners:
                listener(events)

    async def _write(
        self,
        fn: Callable[[sqlite3.Connection], T],
        record: RequestKey | None,
        answer: Callable[[T], bytes],
        after_commit: Callable[[T], None] | None = None,
    ) -> T:
        """`fn` in one transaction with `record`'s answer (`answer(result)`): both commit or neither."""
        if record is None:
            return await self.db.write(fn, after_commit)

        def write(conn: sqlite3.Connection) -> T:
            # Checked first, inside the transaction: a twin that committed (or was queued ahead
            # in this batch) wins, and this change is rolled back before it is even tried.
            _refuse_replay(conn, record)
            result = fn(conn)
            _insert_request(conn, record, answer(result))
            if faults.ENABLED:
                faults.reached_sync(f"idempotency.in_transaction:{record.method}")
            return result

        result = await self.db.write(write, after_commit, fault=record.method)
        record.recorded = True
        return result

    # ---- generic resources -------------------------------------------------------------

    async def _get(self, table: str, cls: type[M], kind: str, project: str, resource_id: str) -> M:
        row = await self.db.read_row(_GET_BY_ID[table], (resource_id, project))
        if row is None:
            raise NotFoundError(kind, resource_id)
        return cls.FromString(row[0])

    async def _list(
        self, table: str, cls: type[M], where: str, args: Sequence[Any], query: PageQuery
    ) -> Page[M]:
        tail, tail_args = _page_sql(query)

        def read(conn: sqlite3.Connection) -> list[tuple[int, bytes]]:
            return conn.execute(
                f"SELECT seq, body FROM {table} WHERE {where}{tail}", [*args, *tail_args]
            ).fetchall()

        return _to_page(await self.db.read(read), cls, query)

    async def _update(
        self,
        table: str,
        cls: type[M],
        kind: str,
        project: str,
        resource_id: str,
        mutate: Callable[[M], None],
        columns: Mapping[str, Any] | None = None,
        record: RequestKey | None = None,
    ) -> M:
        """Read-modify-write of one resource's body; `columns` are set alongside it."""
        assignments = "".join(f", {name} = ?" for name in columns or {})

        def write(conn: sqlite3.Connection) -> M:
            row = conn.execute(
                f"SELECT body FROM {table} WHERE id = ? AND project = ?", (resource_id, project)
            ).fetchone()
            if row is None:
                raise NotFoundError(kind, resource_id)
            resource = _parse(cls, row[0])
            mutate(resource)
            conn.execute(
                f"UPDATE {table} SET body = ?{assignments} WHERE id = ?",
                (resource.SerializeToString(), *(columns or {}).values(), resource_id),
            )
            return resource

        return await self._write(write, record, _serialized)

    # ---- assistants --------------------------------------------------------------------

    async def insert_assistant(
        self, project: str, assistant: assistant_pb2.Assistant, *, record: RequestKey | None = None
    ) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO assistants(id, project, body) VALUES (?, ?, ?)",
                (assistant.id, project, assistant.SerializeToString()),
            )

        await self._write(write, record, lambda _: assistant.SerializeToString())

    async def get_assistant(self, project: str, assistant_id: str) -> assistant_pb2.Assistant:
        return await self._get("assistants", assistant_pb2.Assistant, "assistant", project, assistant_id)

    async def update_assistant(
        self,
        project: str,
        assistant_id: str,
        mutate: Callable[[assistant_pb2.Assistant], None],
        *,
        record: RequestKey | None = None,
    ) -> assistant_pb2.Assistant:
        return await self._update(
            "assistants", assistant_pb2.Assistant, "assistant", project, assistant_id, mutate, record=record
        )

    async def delete_assistant(
        self, project: str, assistant_id: str, *, record: RequestKey | None = None
    ) -> None:
        def write(conn: sqlite3.Connection) -> None:
            cursor = conn.execute(
                "DELETE FROM assistants WHERE id = ? AND project = ?", (assistant_id, project)
            )
            if cursor.rowcount == 0:
                raise NotFoundError("assistant", assistant_id)

        await self._write(write, record, _empty)

    async def list_assistants(self, project: str, query: PageQuery) -> Page[assistant_pb2.Assistant]:
        return await self._list("assistants", assistant_pb2.Assistant, "project = ?", [project], query)

    # ---- threads -----------------------------------------------------------------------

    async def insert_thread(
        self,
        project: str,
        thread: thread_pb2.Thread,
        messages: Sequence[message_pb2.Message],
        *,
        record: RequestKey | None = None,
    ) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO threads(id, project, body) VALUES (?, ?, ?)",
                (thread.id, project, thread.SerializeToString()),
            )
            _insert_messages(conn, project, messages)

        await self._write(write, record, lambda _: thread.SerializeToString())

    async def get_thread(self, project: str, thread_id: str) -> thread_pb2.Thread:
        return await self._get("threads", thread_pb2.Thread, "thread", project, thread_id)

    async def update_thread(
        self,
        project: str,
        thread_id: str,
        mutate: Callable[[thread_pb2.Thread], None],
        *,
        record: RequestKey | None = None,
    ) -> thread_pb2.Thread:
        return await self._update(
            "threads", thread_pb2.Thread, "thread", project, thread_id, mutate, record=record
        )

    async def delete_thread(self, project: str, thread_id: str, *, record: RequestKey | None = None) -> None:
        def write(conn: sqlite3.Connection) -> None:
            _require_thread(conn, project, thread_id)
            _require_no_active_run(conn, thread_id, "delete the thread")
            run_ids = [
                row[0] for row in conn.execute("SELECT id FROM runs WHERE thread_id = ?", (thread_id,))
            ]
            for run_id in run_ids:
                conn.execute("DELETE FROM run_events WHERE run_id = ?", (run_id,))
                conn.execute("DELETE FROM run_steps WHERE run_id = ?", (run_id,))
                conn.execute("DELETE FROM step_texts WHERE run_id = ?", (run_id,))
            conn.execute("DELETE FROM runs WHERE thread_id = ?", (thread_id,))
            conn.execute("DELETE FROM messages WHERE thread_id = ?", (thread_id,))
            conn.execute("DELETE FROM threads WHERE id = ?", (thread_id,))

        await self._write(write, record, _empty)

    async def list_threads(self, project: str, query: PageQuery) -> Page[thread_pb2.Thread]:
        return await self._list("threads", thread_pb2.Thread, "project = ?", [project], query)

    # ---- messages ----------------------------------------------------------------------

    async def insert_message(
        self, project: str, message: message_pb2.Message, *, record: RequestKey | None = None
    ) -> bytes:
        body = message.SerializeToString()
        row = (message.id, project, message.thread_id, message.run_id, body)
        if record is None:
            await self.db.write_row(_insert_messages_checked, row)
            return body

        def write(conn: sqlite3.Connection) -> None:
            ((ok, failure),) = _insert_messages_checked(conn, [row])
            if not ok:
                raise failure

        await self._write(write, record, lambda _: body)
        return body

    def create_message(self, project: str, draft: MessageDraft) -> asyncio.Future[bytes]:
        # Not a coroutine: the caller awaits the write's future, one coroutine fewer.
        return self.db.write_row(_insert_drafts, (project, draft))

    async def get_message(self, project: str, message_id: str) -> message_pb2.Message:
        return await self._get("messages", message_pb2.Message, "message", project, message_id)

    async def list_messages(
        self, project: str, thread_id: str, query: PageQuery, run_id: str = ""
    ) -> Page[message_pb2.Message]:
        await self.get_thread(project, thread_id)
        where, args = "project = ? AND thread_id = ?", [project, thread_id]
        if run_id:
            where += " AND run_id = ?"
            args.append(run_id)
        return await self._list("messages", message_pb2.Message, where, args, query)

    async def thread_messages(self, thread_id: str) -> list[message_pb2.Message]:
        # Read by every turn: one statement on the loop's connection, not a reader-pool hop.
        rows = await self.db.read_rows(_THREAD_MESSAGES, (thread_id,))
        return [message_pb2.Message.FromString(row[0]) for row in rows]

    # ---- runs --------------------------------------------------------------------------

    async def insert_run(
        self,
        project: str,
        run: run_pb2.Run,
        messages: Sequence[message_pb2.Message],
        deadline: float,
        events: Sequence[run_pb2.StreamEvent],
        *,
        record: RequestKey | None = None,
        max_active_runs: int | None = None,
        claim: RunClaim | None = None,
    ) -> MutationResult:
        def write(conn: sqlite3.Connection) -> MutationResult:
            _require_new_run_allowed(conn, project, run.thread_id, max_active_runs)
            _insert_messages(conn, project, messages)
            if claim is None:
                _insert_run_row(conn, project, run, deadline, next_event_idx=len(events))
                return MutationResult(run, _append_events(conn, run.id, 0, events))
            # Claimed in its insert: the row is written once, already started, with its first
            # lease (epoch 1: a claim increments from 0), rather than inserted and then updated.
            started = run_pb2.Run()
            started.CopyFrom(run)
            change = _finished_change(claim.mutate(started))
            expires = 0.0 if change.release_lease else clock.now() + claim.lease_seconds
            _insert_run_row(
                conn,
                project,
                change.run,
                deadline if change.deadline is None else change.deadline,
                next_event_idx=len(events) + len(change.events),
                lease=("" if change.release_lease else claim.owner, 1, expires),
            )
            stored = _append_events(conn, run.id, 0, [*events, *change.events])
            _write_change_rows(conn, project, run.id, change)
            return MutationResult(run, stored, ClaimedRun(change.run, 1))

        return await self._write(write, record, _run_answer, self._publish)

    async def get_run(self, project: str, run_id: str) -> run_pb2.Run:
        key = (run_id, project)
        body = self.db.cache.get(key)
        if body is None:
            body = await self._read_run_body(key, self.db.cache.generation, steered=False)
        return run_pb2.Run.FromString(body)

    def kept_run_body(self, project: str, run_id: str) -> bytes | None:
        """RunService.Get's answer from memory, with no coroutine (sqlite_cache), or None."""
        return self.db.cache.get((run_id, project))

    async def get_run_body(self, project: str, run_id: str) -> bytes:
        # The hottest read (RunService.Get): from memory when no write is in flight since it
        # was read (sqlite_cache); else read at once on the loop's connection, with no
        # coroutine below this one and no parse; the reader pool only if the file is busy.
        key = (run_id, project)
        cache = self.db.cache
        body = cache.get(key)
        if body is not None:
            return body
        return await self._read_run_body(key, cache.generation, faults.ENABLED)

    async def _read_run_body(self, key: tuple[str, str], generation: int, steered: bool) -> bytes:
        """The body of the run `key` (id, project) from the file, kept in the cache if no write
        ran since `generation` was taken. `steered`: RunService.Get under fault points: with
        _POOL_POINT named, its read goes to the pool and is held there after the read, before
        the fill. Internal reads (get_run) are never steered, so a test counts its own Gets."""
        self.db.cache.missed()
        rows = None if steered and faults.configured(_POOL_POINT) else self.db.read_rows_now(_GET_RUN, key)
        if rows is None:
            rows = await self.db.read_rows_in_pool(_GET_RUN, key)
            if steered:
                await faults.reached(_POOL_POINT)
        if not rows:
            raise NotFoundError("run", key[0])
        body: bytes = rows[0][0]  # a BLOB column: bytes, sent as they are
        self.db.cache.fill(key, body, generation)
        return body

    async def get_run_any_project(self, run_id: str) -> tuple[str, run_pb2.Run]:
        row = await self.db.read_row("SELECT project, body FROM runs WHERE id = ?", (run_id,))
        if row is None:
            raise NotFoundError("run", run_id)
        return row[0], run_pb2.Run.FromString(row[1])

    async def get_last_run(self, project: str, thread_id: str) -> run_pb2.Run:
        await self.get_thread(project, thread_id)

        row = await self.db.read_row(
            "SELECT body FROM runs WHERE thread_id = ? AND project = ? ORDER BY seq DESC LIMIT 1",
            (thread_id, project),
        )
        if row is None:
            raise NotFoundError("run", f"last run of thread {thread_id}")
        return run_pb2.Run.FromString(row[0])

    async def list_runs(self, project: str, flt: RunFilter, query: PageQuery) -> Page[run_pb2.Run]:
        where, args = "project = ?", list[Any]([project])
        if flt.thread_id:
            where += " AND thread_id = ?"
            args.append(flt.thread_id)
        if flt.assistant_id:
            where += " AND assistant_id = ?"
            args.append(flt.assistant_id)
        if flt.statuses:
            where += f" AND status IN ({','.join('?' * len(flt.statuses))})"
            args.extend(sorted(flt.statuses))
        for key, value in flt.labels:
            # Not json_extract with a "$.\"key\"" path: SQLite's path syntax has no escapes, so a
            # key holding a double quote (a valid label key) would silently match nothing.
            where += " AND EXISTS (SELECT 1 FROM json_each(runs.labels) WHERE key = ? AND value = ?)"
            args.extend([key, value])
        return await self._list("runs", run_pb2.Run, where, args, query)

    async def update_run_labels(
        self, project: str, run_id: str, labels: dict[str, str], *, record: RequestKey | None = None
    ) -> run_pb2.Run:
        def relabel(run: run_pb2.Run) -> None:
            run.labels.clear()
            run.labels.update(labels)
            run.updated_at.CopyFrom(clock.timestamp(clock.now()))

        return await self._update(
            "runs", run_pb2.Run, "run", project, run_id, relabel, {"labels": json.dumps(labels)}, record
        )

    async def mutate_run(
        self,
        run_id: str,
        mutate: RunMutation,
        *,
        epoch: int | None = None,
        project: str | None = None,
        record: RequestKey | None = None,
    ) -> MutationResult:
        def write(conn: sqlite3.Connection) -> MutationResult:
            return _mutate_run(conn, run_id, mutate, epoch=epoch, project=project)

        result = await self._write(write, record, _run_answer, self._publish)
        if faults.ENABLED:  # committed: a kill here leaves the run exactly in this status
            await faults.reached(f"store.after_mutate:{run_pb2.RunStatus.Name(result.run.status)}")
        return result

    async def run_steps(self, run_id: str) -> list[run_pb2.RunStep]:
        rows = await self.db.read_rows(_RUN_STEPS, (run_id,))
        return [run_pb2.RunStep.FromString(row[0]) for row in rows]

    async def release_all_leases(self, owner_prefix: str) -> int:
        # One process owns the file (see SqliteDatabase.open), so a lease found at start-up
        # belongs to a process that is gone, whatever its owner: its runs are taken over at once.
        def write(conn: sqlite3.Connection) -> int:
            cursor = conn.execute(
                "UPDATE runs SET lease_expires = 0 WHERE status IN (?, ?)",
                (run_pb2.IN_PROGRESS, run_pb2.CANCELLING),
            )
            return cursor.rowcount

        return await self.db.write(write)

    async def list_steps(self, project: str, run_id: str, query: PageQuery) -> Page[run_pb2.RunStep]:
        await self.get_run(project, run_id)
        return await self._list("run_steps", run_pb2.RunStep, "run_id = ?", [run_id], query)

    async def read_events(self, run_id: str, start: int, limit: int) -> list[run_pb2.StreamEvent]:
        wires = await self.read_event_wires(run_id, start, limit)
        return [run_pb2.StreamEvent.FromString(wire) for wire in wires]

    async def read_event_wires(self, run_id: str, start: int, limit: int) -> list[bytes]:
        # A block of the log (Listen's feed reads it once for all of a run's listeners): one
        # statement on the loop's connection, not a reader-pool hop, like the reads above.
        rows = await self.db.read_rows(_READ_EVENTS, (run_id, start, limit))
        return [row[0] for row in rows]

    async def tool_round_texts(self, run_id: str) -> dict[str, str]:
        rows = await self.db.read_rows("SELECT step_id, said FROM step_texts WHERE run_id = ?", (run_id,))
        return {row[0]: row[1] for row in rows}

    # ---- engine ------------------------------------------------------------------------

    async def claim_runs(
        self, owner: str, lease_seconds: float, limit: int, mutate: RunMutation
    ) -> list[ClaimedRun]:
        if faults.ENABLED:  # held here, queued runs stay PENDING
            await faults.reached("store.claim")

        def write(conn: sqlite3.Connection) -> list[tuple[ClaimedRun, MutationResult]]:
            ids = [
                row[0]
                for row in conn.execute(
                    "SELECT id FROM runs WHERE status = ? ORDER BY seq LIMIT ?", (run_pb2.PENDING, limit)
                )
            ]
            claimed = []
            for run_id in ids:
                epoch = _take_lease(conn, run_id, owner, lease_seconds)
                result = _mutate_run(conn, run_id, mutate, epoch=epoch)
                claimed.append((ClaimedRun(result.run, epoch), result))
            return claimed

        pairs = await self.db.write(write, lambda pairs: self._publish_many([r for _, r in pairs]))
        return [claim for claim, _ in pairs]

    async def reclaim_run(
        self, run_id: str, owner: str, lease_seconds: float, mutate: RunMutation
    ) -> ClaimedRun | None:
        def write(conn: sqlite3.Connection) -> tuple[ClaimedRun, MutationResult] | None:
            row = conn.execute(
                "SELECT 1 FROM runs WHERE id = ? AND status IN (?, ?) AND lease_expires < ?",
                (run_id, run_pb2.IN_PROGRESS, run_pb2.CANCELLING, clock.now()),
            ).fetchone()
            if row is None:
                return None
            epoch = _take_lease(conn, run_id, owner, lease_seconds)
            result = _mutate_run(conn, run_id, mutate, epoch=epoch)
            return ClaimedRun(result.run, epoch), result

        pair = await self.db.write(write, lambda pair: self._publish(pair[1] if pair else None))
        return pair[0] if pair else None

    async def renew_lease(self, run_id: str, owner: str, epoch: int, lease_seconds: float) -> bool:
        def write(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                "UPDATE runs SET lease_expires = ? WHERE id = ? AND lease_owner = ? AND lease_epoch = ?",
                (clock.now() + lease_seconds, run_id, owner, epoch),
            )
            return cursor.rowcount == 1

        return await self.db.write(write)

    async def due_runs(self, now: float, limit: int) -> DueRuns:
        def read(conn: sqlite3.Connection) -> DueRuns:
            expired = [
                row[0]
                for row in conn.execute(
                    f"SELECT id FROM runs WHERE status IN ({_ACTIVE}) AND deadline < ?"
                    " ORDER BY deadline LIMIT ?",
                    (now, limit),
                )
            ]
            orphaned = [
                row[0]
                for row in conn.execute(
                    "SELECT id FROM runs WHERE status IN (?, ?) AND lease_expires < ? ORDER BY seq LIMIT ?",
                    (run_pb2.IN_PROGRESS, run_pb2.CANCELLING, now, limit),
                )
            ]
            return DueRuns(expired, orphaned)

        return await self.db.read(read)

    # ---- retention ---------------------------------------------------------------------

    async def delete_expired_runs(self, before: float, limit: int) -> int:
        def write(conn: sqlite3.Connection) -> int:
            run_ids = [
                row[0]
                for row in conn.execute(
                    "SELECT run_id FROM runs_finished WHERE finished_at < ? ORDER BY finished_at LIMIT ?",
                    (before, limit),
                )
            ]
            for run_id in run_ids:
                conn.execute("DELETE FROM run_events WHERE run_id = ?", (run_id,))
                conn.execute("DELETE FROM run_steps WHERE run_id = ?", (run_id,))
                conn.execute("DELETE FROM step_texts WHERE run_id = ?", (run_id,))
                conn.execute(f"DELETE FROM runs WHERE id = ? AND status IN ({_TERMINAL})", (run_id,))
                conn.execute("DELETE FROM runs_finished WHERE run_id = ?", (run_id,))
            return len(run_ids)

        return await self.db.write(write)

    async def checkpoint_wal(self) -> bool:
        return await self.db.checkpoint()

    # ---- idempotency -------------------------------------------------------------------

    async def get_request(self, project: str, key: str) -> IdempotencyRecord | None:
        row = await self.db.read_row(
            "SELECT fingerprint, response FROM idempotency WHERE project = ? AND key = ?", (project, key)
        )
        return IdempotencyRecord(row[0], row[1]) if row else None

    async def save_request(self, request: RequestKey, response: bytes) -> IdempotencyRecord:
        def write(conn: sqlite3.Connection) -> IdempotencyRecord:
            try:
                _refuse_replay(conn, request)
            except RequestReplayed as replayed:
                return replayed.record
            _insert_request(conn, request, response)
            return IdempotencyRecord(request.fingerprint, response)

        kept = await self.db.write(write)
        request.recorded = True
        return kept

    async def purge_requests(self, older_than: float) -> int:
        def write(conn: sqlite3.Connection) -> int:
            return conn.execute("DELETE FROM idempotency WHERE created_at < ?", (older_than,)).rowcount

        return await self.db.write(write)


# ---- helpers that run inside a write transaction -----------------------------------------


def _refuse_replay(conn: sqlite3.Connection, request: RequestKey) -> None:
    row = conn.execute(
        "SELECT fingerprint, response FROM idempotency WHERE project = ? AND key = ?",
        (request.project, request.key),
    ).fetchone()
    if row is not None:
        raise RequestReplayed(IdempotencyRecord(row[0], row[1]))


def _insert_request(conn: sqlite3.Connection, request: RequestKey, response: bytes) -> None:
    # A plain INSERT: were the key taken after all, the primary key fails this write, not the
    # first answer.
    conn.execute(
        "INSERT INTO idempotency(project, key, fingerprint, response, created_at) VALUES (?, ?, ?, ?, ?)",
        (request.project, request.key, request.fingerprint, response, clock.now()),
    )


def _serialized(resource: ProtoMessage) -> bytes:
    return resource.SerializeToString()


def _run_answer(result: MutationResult) -> bytes:
    return result.run.SerializeToString()


def _empty(_: None) -> bytes:
    return b""  # the empty Delete*Response


def _require_thread(conn: sqlite3.Connection, project: str, thread_id: str) -> None:
    row = conn.execute("SELECT 1 FROM threads WHERE id = ? AND project = ?", (thread_id, project)).fetchone()
    if row is None:
        raise NotFoundError("thread", thread_id)


def _require_no_active_run(conn: sqlite3.Connection, thread_id: str, action: str) -> None:
    row = conn.execute(
        f"SELECT id FROM runs WHERE thread_id = ? AND status IN ({_ACTIVE})", (thread_id,)
    ).fetchone()
    if row is not None:
        raise thread_busy(thread_id, row[0], action)


_NEW_RUN_CHECKS = (
    "SELECT EXISTS(SELECT 1 FROM threads WHERE id = ? AND project = ?),"
    f" (SELECT id FROM runs WHERE thread_id = ? AND status IN ({_ACTIVE}))"
)
_NEW_RUN_CHECKS_WITH_QUOTA = (
    _NEW_RUN_CHECKS
    + f", (SELECT COUNT(*) FROM (SELECT 1 FROM runs WHERE project = ? AND status IN ({_ACTIVE}) LIMIT ?))"
)


def _require_new_run_allowed(
    conn: sqlite3.Connection, project: str, thread_id: str, max_active_runs: int | None
) -> None:
    """The thread exists in the project and has no active run, and the project is under its
    quota of active runs, in one statement (the insert of a run is on the path from Create to
    its first delta), failing in that order. The quota is counted in the inserting transaction
    (the writer is serial): two creates cannot both see one free slot; the partial index
    runs_active_per_project holds only active runs."""
    if max_active_runs is None:
        thread, active_run = conn.execute(_NEW_RUN_CHECKS, (thread_id, project, thread_id)).fetchone()
        active = 0
    else:
        thread, active_run, active = conn.execute(
            _NEW_RUN_CHECKS_WITH_QUOTA, (thread_id, project, thread_id, project, max_active_runs)
        ).fetchone()
    if not thread:
        raise NotFoundError("thread", thread_id)
    if active_run is not None:
        raise thread_busy(thread_id, active_run, "start another run")
    if max_active_runs is not None and active >= max_active_runs:
        raise QuotaError(
            "ACTIVE_RUNS_LIMIT",
            f"projects/{project}",
            f"{active} runs are active; at most {max_active_runs} are allowed at once",
            max_active_runs,
        )


@functools.lru_cache(maxsize=1024)
def _insert_messages_checked_sql(count: int) -> str:
    """The INSERT of `count` messages (id, project, thread_id, run_id, body), each only if its
    thread exists in its project and has no active run."""
    values = ", ".join(["(?, ?, ?, ?, ?)"] * count)
    return (
        "INSERT INTO messages(id, project, thread_id, run_id, body)"
        f" SELECT column1, column2, column3, column4, column5 FROM (VALUES {values}) AS v"
        " WHERE EXISTS (SELECT 1 FROM threads WHERE id = v.column3 AND project = v.column2)"
        f" AND NOT EXISTS (SELECT 1 FROM runs WHERE thread_id = v.column3 AND status IN ({_ACTIVE}))"
    )


def _insert_messages_checked(conn: sqlite3.Connection, rows: list[Any]) -> list[tuple[bool, Any]]:
    """MessageService.Create's writes (SqliteDatabase.write_row): a batch's messages in one
    statement, the thread's existence and the active-run rule inside it; the checks that say
    why run only for a message it refused."""
    try:
        inserted = conn.execute(
            _insert_messages_checked_sql(len(rows)), [value for row in rows for value in row]
        ).rowcount
    except sqlite3.IntegrityError as exc:  # an id taken (one write's fault): each on its own
        if len(rows) == 1:
            return [(False, exc)]
        return [_insert_message_alone(conn, row) for row in rows]
    if inserted == len(rows):
        return [(True, None)] * len(rows)
    ids = [row[0] for row in rows]
    stored = {
        found
        for (found,) in conn.execute(
            f"SELECT id FROM messages WHERE id IN ({', '.join('?' * len(ids))})", ids
        )
    }
    return [(True, None) if row[0] in stored else (False, _message_refused(conn, row)) for row in rows]


def _insert_drafts(conn: sqlite3.Connection, rows: list[Any]) -> list[tuple[bool, Any]]:
    """create_message's writes (SqliteDatabase.write_row): each (project, draft)'s message built
    here, on the writer thread, then all of them in one statement as _insert_messages_checked
    writes them; each one's outcome is its bytes. A draft that cannot be built fails alone."""
    now = clock.now()
    outcomes: list[tuple[bool, Any]] = []
    checked = []
    for project, draft in rows:
        try:
            message = draft.build(now)
            body = message.SerializeToString()
        except Exception as exc:  # its caller gets it; the others are written
            outcomes.append((False, exc))
            continue
        outcomes.append((True, body))
        checked.append((message.id, project, message.thread_id, "", body))
    written = iter(_insert_messages_checked(conn, checked) if checked else ())
    for index, (built, body) in enumerate(outcomes):
        if built:
            ok, failure = next(written)
            outcomes[index] = (True, body) if ok else (False, failure)
    return outcomes


def _insert_message_alone(conn: sqlite3.Connection, row: Any) -> tuple[bool, Any]:
    """One message of a batch whose statement failed. In autocommit each commits on its own
    (one failing leaves the others as they are); in a transaction an error that ended it
    leaves, failing the whole batch."""
    in_transaction = conn.in_transaction
    try:
        ((ok, value),) = _insert_messages_checked(conn, [row])
    except sqlite3.Error as exc:
        if in_transaction and not conn.in_transaction:
            raise
        return False, exc
    return ok, value


def _message_refused(conn: sqlite3.Connection, row: tuple[str, str, str, str, bytes]) -> Exception:
    _, project, thread_id, _, _ = row
    try:
        _require_thread(conn, project, thread_id)
        _require_no_active_run(conn, thread_id, "add a message")
    except StoreError as refusal:
        return refusal
    return AssertionError(f"a message for thread {thread_id} was refused for no known reason")


def _insert_messages(conn: sqlite3.Connection, project: str, messages: Sequence[message_pb2.Message]) -> None:
    if not messages:
        return
    conn.executemany(
        "INSERT INTO messages(id, project, thread_id, run_id, body) VALUES (?, ?, ?, ?, ?)",
        [(m.id, project, m.thread_id, m.run_id, m.SerializeToString()) for m in messages],
    )


def _append_events(
    conn: sqlite3.Connection, run_id: str, first_index: int, events: Sequence[run_pb2.StreamEvent]
) -> list[run_pb2.StreamEvent]:
    stored: list[run_pb2.StreamEvent] = []
    created = clock.timestamp(clock.now())
    for offset, event in enumerate(events):
        event.run_id = run_id
        event.index = first_index + offset
        if not event.HasField("created_at"):
            event.created_at.CopyFrom(created)
        stored.append(event)
    # One statement for a change's events (executemany steps once per row), in chunks of at
    # most EVENT_ROWS rows (a prepared text each, under the writer's statement cache).
    for first in range(0, len(stored), EVENT_ROWS):
        chunk = stored[first : first + EVENT_ROWS]
        conn.execute(
            _insert_events_sql(len(chunk)),
            [value for event in chunk for value in (run_id, event.index, event.SerializeToString())],
        )
    return stored


EVENT_ROWS = 256


@functools.lru_cache(maxsize=EVENT_ROWS)
def _insert_events_sql(count: int) -> str:
    return "INSERT INTO run_events(run_id, idx, body) VALUES " + ", ".join(["(?, ?, ?)"] * count)


def _take_lease(conn: sqlite3.Connection, run_id: str, owner: str, lease_seconds: float) -> int:
    conn.execute(
        "UPDATE runs SET lease_owner = ?, lease_epoch = lease_epoch + 1, lease_expires = ? WHERE id = ?",
        (owner, clock.now() + lease_seconds, run_id),
    )
    return int(conn.execute("SELECT lease_epoch FROM runs WHERE id = ?", (run_id,)).fetchone()[0])


def _mutate_run(
    conn: sqlite3.Connection,
    run_id: str,
    mutate: RunMutation,
    *,
    epoch: int | None,
    project: str | None = None,
) -> MutationResult:
    row = conn.execute(
        "SELECT project, body, lease_epoch, next_event_idx, status FROM runs WHERE id = ?", (run_id,)
    ).fetchone()
    if row is None or (project is not None and row[0] != project):
        raise NotFoundError("run", run_id)
    row_project, body, current_epoch, next_index, stored_status = row
    if epoch is not None and epoch != current_epoch:
        raise FencedError(f"run {run_id}: lease epoch {epoch} was superseded by {current_epoch}")
    change: RunChange = mutate(_parse(run_pb2.Run, body))
    run = change.run
    if _no_op(change, body):
        # E.g. Cancel of a finished run: it is returned as it is, updated_at included.
        return MutationResult(run, [])
    _finished_change(change)
    _write_change_rows(conn, row_project, run_id, change)
    stored = _append_events(conn, run_id, next_index, change.events)
    assignments = "body = ?, next_event_idx = ?"
    args: list[Any] = [run.SerializeToString(), next_index + len(stored)]
    if run.status != stored_status:
        # Only when it changes: every index of the status column (three) and the trigger on
        # it are rewritten when it is assigned, even to its own value (each streamed delta).
        assignments += ", status = ?"
        args.append(run.status)
    if change.deadline is not None:
        assignments += ", deadline = ?"
        args.append(change.deadline)
    if change.release_lease:
        assignments += ", lease_owner = '', lease_expires = 0"
    conn.execute(f"UPDATE runs SET {assignments} WHERE id = ?", [*args, run_id])
    return MutationResult(run, stored)


def _finished_change(change: RunChange) -> RunChange:
    """The change as stored: the run's updated_at now, each event's status the run's unless set,
    the terminal event carrying the stored run."""
    change.run.updated_at.CopyFrom(clock.timestamp(clock.now()))
    for event in change.events:
        if event.status == run_pb2.RUN_STATUS_UNSPECIFIED:
            event.status = change.run.status
    embed_stored_run(change)
    return change


def _write_change_rows(conn: sqlite3.Connection, project: str, run_id: str, change: RunChange) -> None:
    """What a change brings besides the run's row and its events: messages, steps, step texts."""
    _insert_messages(conn, project, change.messages)
    for step in change.steps:
        conn.execute(
            "INSERT INTO run_steps(id, project, run_id, body) VALUES (?, ?, ?, ?)"
            " ON CONFLICT(id) DO UPDATE SET body = excluded.body",
            (step.id, project, run_id, step.SerializeToString()),
        )
    for step_id, said in change.step_texts.items():
        conn.execute(
            "INSERT INTO step_texts(run_id, step_id, said) VALUES (?, ?, ?)"
            " ON CONFLICT(run_id, step_id) DO UPDATE SET said = excluded.said",
            (run_id, step_id, said),
        )


def _insert_run_row(
    conn: sqlite3.Connection,
    project: str,
    run: run_pb2.Run,
    deadline: float,
    *,
    next_event_idx: int,
    lease: tuple[str, int, float] | None = None,
) -> None:
    """A new run's row; `lease` (owner, epoch, expiry) for a run claimed as it is inserted."""
    owner, epoch, expires = lease or ("", 0, 0.0)
    conn.execute(
        "INSERT INTO runs(id, project, thread_id, assistant_id, status, labels, body, deadline,"
        " next_event_idx, lease_owner, lease_epoch, lease_expires)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            run.id,
            project,
            run.thread_id,
            run.assistant_id,
            run.status,
            json.dumps(dict(run.labels)),
            run.SerializeToString(),
            deadline,
            next_event_idx,
            owner,
            epoch,
            expires,
        ),
    )


def _no_op(change: RunChange, body: bytes) -> bool:
    if change.events or change.messages or change.steps or change.step_texts or change.deadline is not None:
        return False
    if change.release_lease:
        return False
    return change.run == _parse(run_pb2.Run, body)
