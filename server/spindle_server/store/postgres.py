"""The PostgreSQL store: several replicas share one database.

Same Store protocol and same rules as the SQLite store, made safe for concurrent writers:
- a run's changes take its row FOR UPDATE first; the owner's writes compare the lease epoch
  under that lock (FencedError, nothing written) and allocate event indexes from the row's
  next_event_idx, so indexes are gap-free and a taken-over owner writes nothing;
- claiming takes PENDING rows FOR UPDATE SKIP LOCKED, so two replicas never claim one run;
- writes that depend on a thread having no active run lock the thread row; the partial unique
  index on active runs is the database's own guarantee behind that;
- a request_id is claimed first in its transaction with INSERT ... ON CONFLICT DO NOTHING (a
  concurrent twin waits on the key, then finds it taken) and its answer is written with the
  change;
- lost connections, failovers and serialization failures are UnavailableError (UNAVAILABLE):
  the caller may retry, and a retry with its request_id is applied at most once.
Events committed here are published after commit; events committed by other replicas arrive
through pg_fanout (NOTIFY hint, then a read of the table).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from typing import Any, TypeVar

import asyncpg
import structlog
from asyncpg import Connection as Conn
from google.protobuf.message import Message as ProtoMessage

from spindle.v1 import assistant_pb2, message_pb2, run_pb2, thread_pb2
from spindle_server import clock, faults, metrics
from spindle_server.drafts import MessageDraft
from spindle_server.store import pg_schema
from spindle_server.store.base import (
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
    StateError,
    UnavailableError,
    thread_busy,
)
from spindle_server.store.pg_fanout import CHANNEL, EventFanout, hint

log = structlog.get_logger(__name__)
M = TypeVar("M", bound=ProtoMessage)
T = TypeVar("T")

_ACTIVE = pg_schema.ACTIVE
_TERMINAL = pg_schema.TERMINAL
_LEASED = f"{run_pb2.IN_PROGRESS}, {run_pb2.CANCELLING}"

# Failures that say "not now" rather than "wrong": the connection, the server, or a transaction
# the database chose to abort (serialization, deadlock). Class 08, 40, 53, 57 and client-side.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.TransactionRollbackError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.ReadOnlySQLTransactionError,  # a standby after failover
)


def _parse(cls: type[M], body: bytes) -> M:
    message = cls()
    message.ParseFromString(body)
    return message


_INSERT_MESSAGE = f"SELECT {pg_schema.INSERT_MESSAGE_FUNCTION}($1, $2, $3, $4, $5)"


def _message_refused(refused: str | None, thread_id: str) -> None:
    """Raises what the insert function's answer says (pg_schema: NULL inserted, '' no such
    thread in the project, else the thread's active run)."""
    if refused is None:
        return
    if not refused:
        raise NotFoundError("thread", thread_id)
    raise thread_busy(thread_id, refused, "add a message")


class PostgresStore:
    def __init__(
        self,
        dsn: str,
        *,
        pool_min: int = 2,
        pool_max: int = 10,
        command_timeout: float | None = 60.0,
        stalled_transaction_seconds: float | None = None,
    ) -> None:
        self.dsn = dsn
        self._pool_min = pool_min
        self._pool_max = pool_max
        self._command_timeout = command_timeout
        # A replica stalled (SIGSTOP, a frozen VM) inside a transaction keeps its run's row
        # locked, and no other replica could take the run over; PostgreSQL ends such a session
        # after this long idle in its transaction (its commit then fails: nothing of it lands).
        self._settings: dict[str, str] = {}
        if stalled_transaction_seconds is not None:
            milliseconds = max(int(stalled_transaction_seconds * 1000), 1)
            self._settings["idle_in_transaction_session_timeout"] = str(milliseconds)
        self._pool: asyncpg.Pool | None = None
        self.fanout = EventFanout(dsn, self.read_events, self._next_event_index)
        self.migrations_applied: list[int] = []
        self._local_listeners: list[EventsListener] = []

    async def start(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn,
                min_size=self._pool_min,
                max_size=self._pool_max,
                command_timeout=self._command_timeout,
                reset=keep_session,
                server_settings=self._settings,
            )
            async with self._pool.acquire() as conn:
                self.migrations_applied = await pg_schema.migrate(conn)
            await self.fanout.start()
        except _UNAVAILABLE as exc:
            await self.close()
            raise UnavailableError(f"cannot reach PostgreSQL: {exc}") from exc

    async def close(self) -> None:
        await self.fanout.close()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            with contextlib.suppress(Exception):
                await pool.close()

    def add_events_listener(self, listener: EventsListener, *, local_only: bool = False) -> None:
        """`local_only`: only the events this replica commits (e.g. metrics, which every replica
        counts for its own commits); otherwise also those other replicas commit (Listen)."""
        if local_only:
            self._local_listeners.append(listener)
        else:
            self.fanout.add_listener(listener)

    def watch_runs(self, watched: Callable[[], Collection[str]] | None) -> None:
        """Only runs in `watched()` (those with local listeners) are read on another replica's
        hint; without it every hinted run is read. See pg_fanout."""
        self.fanout.watch_runs(watched)

    def _publish(self, result: MutationResult | None) -> None:
        if result is not None and result.events:
            for listener in self._local_listeners:
                try:
                    listener(result.events)
                except Exception:
                    log.exception("events_listener_failed")
            self.fanout.publish(result.events)

    # ---- plumbing ----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Conn]:
        if self._pool is None:
            raise UnavailableError("the database is closed")
        try:
            async with self._pool.acquire() as conn:
                yield conn
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name == pg_schema.ONE_ACTIVE_RUN_INDEX:
                # A concurrent insert won the thread (the thread-row lock makes this rare).
                raise StateError("THREAD_HAS_ACTIVE_RUN", "the thread has an active run") from exc
            raise
        except _UNAVAILABLE as exc:
            raise UnavailableError(f"database unavailable: {exc}") from exc
        except asyncpg.exceptions.InternalClientError as exc:
            # Met when PostgreSQL restarts under load: handing back a connection it cut in the
            # middle of a query, asyncpg's reset finds the protocol still busy ("cannot switch
            # to state ...") and terminates that connection. The next call gets a fresh one, so
            # it is "not now" (UNAVAILABLE, retryable), not a bug to answer with INTERNAL.
            log.warning("pg_connection_reset_failed", error=str(exc))
            raise UnavailableError(f"database connection lost: {exc}") from exc

    async def _read(self, fn: Callable[[Conn], Any]) -> Any:
        async with self._connection() as conn:
            return await fn(conn)

    async def _write(
        self,
        fn: Callable[[Conn], Any],
        record: RequestKey | None = None,
        answer: Callable[[Any], bytes] | None = None,
    ) -> Any:
        """`fn` in one transaction, with `record`'s answer (`answer(result)`) when given."""
        began = time.perf_counter()
        async with self._connection() as conn, conn.transaction():
            if record is not None:
                await _claim_request(conn, record)
            result = await fn(conn)
            if record is not None:
                assert answer is not None
                await conn.execute(
                    "UPDATE idempotency SET response = $3 WHERE project = $1 AND key = $2",
                    record.project,
                    record.key,
                    answer(result),
                )
                if faults.ENABLED:
                    await faults.reached(f"idempotency.in_transaction:{record.method}")
        metrics.record_commit(began, 1)
        if record is not None:
            record.recorded = True
        return result

    # ---- generic resources -------------------------------------------------------------

    async def _get(self, table: str, cls: type[M], kind: str, project: str, resource_id: str) -> M:
        body = await self._read(
            lambda c: c.fetchval(
                f"SELECT body FROM {table} WHERE id = $1 AND project = $2", resource_id, project
            )
        )
        if body is None:
            raise NotFoundError(kind, resource_id)
        return _parse(cls, body)

    async def _list(
        self, table: str, cls: type[M], where: str, args: Sequence[Any], query: PageQuery
    ) -> Page[M]:
        params = list(args)
        condition = ""
        if query.after_seq is not None:
            params.append(query.after_seq)
            condition = f" AND seq {'<' if query.descending else '>'} ${len(params)}"
        order = "DESC" if query.descending else "ASC"
        limit = int(query.limit) + 1  # one more: is there a next page?
        sql = f"SELECT seq, body FROM {table} WHERE {where}{condition} ORDER BY seq {order} LIMIT {limit}"
        rows = await self._read(lambda c: c.fetch(sql, *params))
        more = len(rows) > query.limit
        rows = rows[: query.limit]
        return Page([_parse(cls, row["body"]) for row in rows], rows[-1]["seq"] if more and rows else None)

    async def _update(
        self,
        table: str,
        cls: type[M],
        kind: str,
        project: str,
        resource_id: str,
        mutate: Callable[[M], None],
        columns: dict[str, Any] | None = None,
        record: RequestKey | None = None,
    ) -> M:
        extra = columns or {}
        assignments = "".join(f", {name} = ${i + 3}" for i, name in enumerate(extra))

        async def write(conn: Conn) -> M:
            body = await conn.fetchval(
                f"SELECT body FROM {table} WHERE id = $1 AND project = $2 FOR UPDATE", resource_id, project
            )
            if body is None:
                raise NotFoundError(kind, resource_id)
            resource = _parse(cls, body)
            mutate(resource)
            await conn.execute(
                f"UPDATE {table} SET body = $2{assignments} WHERE id = $1",
                resource_id,
                resource.SerializeToString(),
                *extra.values(),
            )
            return resource

        result: M = await self._write(write, record, _serialized)
        return result

    # ---- assistants --------------------------------------------------------------------

    async def insert_assistant(
        self, project: str, assistant: assistant_pb2.Assistant, *, record: RequestKey | None = None
    ) -> None:
        async def write(conn: Conn) -> None:
            await conn.execute(
                "INSERT INTO assistants(id, project, body) VALUES ($1, $2, $3)",
                assistant.id,
                project,
                assistant.SerializeToString(),
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
        async def write(conn: Conn) -> None:
            status = await conn.execute(
                "DELETE FROM assistants WHERE id = $1 AND project = $2", assistant_id, project
            )
            if status == "DELETE 0":
                raise NotFoundError("assistant", assistant_id)

        await self._write(write, record, _empty)

    async def list_assistants(self, project: str, query: PageQuery) -> Page[assistant_pb2.Assistant]:
        return await self._list("assistants", assistant_pb2.Assistant, "project = $1", [project], query)

    # ---- threads -----------------------------------------------------------------------

    async def insert_thread(
        self,
        project: str,
        thread: thread_pb2.Thread,
        messages: Sequence[message_pb2.Message],
        *,
        record: RequestKey | None = None,
    ) -> None:
        async def write(conn: Conn) -> None:
            await conn.execute(
                "INSERT INTO threads(id, project, body) VALUES ($1, $2, $3)",
                thread.id,
                project,
                thread.SerializeToString(),
            )
            await _insert_messages(conn, project, messages)

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
        async def write(conn: Conn) -> None:
            await _lock_thread(conn, project, thread_id)
            await _require_no_active_run(conn, thread_id, "delete the thread")
            await conn.execute(
                "DELETE FROM run_events WHERE run_id IN (SELECT id FROM runs WHERE thread_id = $1)", thread_id
            )
            await conn.execute(
                "DELETE FROM run_steps WHERE run_id IN (SELECT id FROM runs WHERE thread_id = $1)", thread_id
            )
            await conn.execute(
                "DELETE FROM step_texts WHERE run_id IN (SELECT id FROM runs WHERE thread_id = $1)", thread_id
            )
            await conn.execute("DELETE FROM runs WHERE thread_id = $1", thread_id)
            await conn.execute("DELETE FROM messages WHERE thread_id = $1", thread_id)
            await conn.execute("DELETE FROM threads WHERE id = $1", thread_id)

        await self._write(write, record, _empty)

    async def list_threads(self, project: str, query: PageQuery) -> Page[thread_pb2.Thread]:
        return await self._list("threads", thread_pb2.Thread, "project = $1", [project], query)

    # ---- messages ----------------------------------------------------------------------

    async def insert_message(
        self, project: str, message: message_pb2.Message, *, record: RequestKey | None = None
    ) -> bytes:
        body = message.SerializeToString()
        args = (message.id, project, message.thread_id, message.run_id, body)

        async def write(conn: Conn) -> None:
            _message_refused(await conn.fetchval(_INSERT_MESSAGE, *args), message.thread_id)

        if record is not None:
            await self._write(write, record, lambda _: body)
            return body
        # Alone, the function's call is its own transaction: committed (the WAL flushed, with
        # synchronous_commit on) before its answer comes back, in one round trip.
        began = time.perf_counter()
        async with self._connection() as conn:
            await write(conn)
        metrics.record_commit(began, 1)
        return body

    async def create_message(self, project: str, draft: MessageDraft) -> bytes:
        return await self.insert_message(project, draft.build(clock.now()))

    async def get_message(self, project: str, message_id: str) -> message_pb2.Message:
        return await self._get("messages", message_pb2.Message, "message", project, message_id)

    async def list_messages(
        self, project: str, thread_id: str, query: PageQuery, run_id: str = ""
    ) -> Page[message_pb2.Message]:
        await self.get_thread(project, thread_id)
        where, args = "project = $1 AND thread_id = $2", [project, thread_id]
        if run_id:
            where += " AND run_id = $3"
            args.append(run_id)
        return await self._list("messages", message_pb2.Message, where, args, query)

    async def thread_messages(self, thread_id: str) -> list[message_pb2.Message]:
        rows = await self._read(
            lambda c: c.fetch("SELECT body FROM messages WHERE thread_id = $1 ORDER BY seq", thread_id)
        )
        return [_parse(message_pb2.Message, row["body"]) for row in rows]

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
        async def write(conn: Conn) -> MutationResult:
            await _lock_thread(conn, project, run.thread_id)
            await _require_no_active_run(conn, run.thread_id, "start another run")
            if max_active_runs is not None:
                await _require_run_quota(conn, project, max_active_runs)
            await _insert_messages(conn, project, messages)
            stored = _number_events(run.id, 0, events)
            await conn.execute(
                "INSERT INTO runs(id, project, thread_id, assistant_id, status, labels, body, deadline,"
                " next_event_idx) VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8, $9)",
                run.id,
                project,
                run.thread_id,
                run.assistant_id,
                run.status,
                json.dumps(dict(run.labels)),
                run.SerializeToString(),
                deadline,
                len(stored),
            )
            await _insert_events(conn, run.id, stored)
            if claim is None:
                return MutationResult(run, stored)
            # Claimed in the inserting transaction, as claim_runs would: nobody else can have
            # seen the row yet, so the lease is this one's from the start.
            epoch = await _take_lease(conn, run.id, claim.owner, claim.lease_seconds)
            started = await _mutate_run(conn, run.id, claim.mutate, epoch=epoch)
            return MutationResult(run, stored + started.events, ClaimedRun(started.run, epoch))

        result: MutationResult = await self._write(write, record, _run_answer)
        self._publish(result)
        return result

    async def get_run(self, project: str, run_id: str) -> run_pb2.Run:
        return await self._get("runs", run_pb2.Run, "run", project, run_id)

    def kept_run_body(self, project: str, run_id: str) -> bytes | None:
        return None  # several replicas write the database: nothing read is known to be current

    async def get_run_body(self, project: str, run_id: str) -> bytes:
        body = await self._read(
            lambda c: c.fetchval("SELECT body FROM runs WHERE id = $1 AND project = $2", run_id, project)
        )
        if body is None:
            raise NotFoundError("run", run_id)
        return bytes(body)

    async def get_run_any_project(self, run_id: str) -> tuple[str, run_pb2.Run]:
        row = await self._read(lambda c: c.fetchrow("SELECT project, body FROM runs WHERE id = $1", run_id))
        if row is None:
            raise NotFoundError("run", run_id)
        return row["project"], _parse(run_pb2.Run, row["body"])

    async def get_last_run(self, project: str, thread_id: str) -> run_pb2.Run:
        await self.get_thread(project, thread_id)
        body = await self._read(
            lambda c: c.fetchval(
                "SELECT body FROM runs WHERE thread_id = $1 AND project = $2 ORDER BY seq DESC LIMIT 1",
                thread_id,
                project,
            )
        )
        if body is None:
            raise NotFoundError("run", f"last run of thread {thread_id}")
        return _parse(run_pb2.Run, body)

    async def list_runs(self, project: str, flt: RunFilter, query: PageQuery) -> Page[run_pb2.Run]:
        args: list[Any] = [project]
        where = "project = $1"
        if flt.thread_id:
            args.append(flt.thread_id)
            where += f" AND thread_id = ${len(args)}"
        if flt.assistant_id:
            args.append(flt.assistant_id)
            where += f" AND assistant_id = ${len(args)}"
        if flt.statuses:
            args.append(sorted(flt.statuses))
            where += f" AND status = ANY(${len(args)}::int[])"
        for key, value in flt.labels:
            args.extend([key, value])
            where += f" AND labels ->> ${len(args) - 1} = ${len(args)}"
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
        async def write(conn: Conn) -> MutationResult:
            result = await _mutate_run(conn, run_id, mutate, epoch=epoch, project=project)
            if faults.ENABLED:  # the run's row locked, the transaction open (a stall here)
                await faults.reached(f"store.in_mutate:{run_pb2.RunStatus.Name(result.run.status)}")
            return result

        result: MutationResult = await self._write(write, record, _run_answer)
        self._publish(result)
        if faults.ENABLED:  # committed: a kill here leaves the run exactly in this status
            await faults.reached(f"store.after_mutate:{run_pb2.RunStatus.Name(result.run.status)}")
        return result

    async def list_steps(self, project: str, run_id: str, query: PageQuery) -> Page[run_pb2.RunStep]:
        await self.get_run(project, run_id)
        return await self._list("run_steps", run_pb2.RunStep, "run_id = $1", [run_id], query)

    async def run_steps(self, run_id: str) -> list[run_pb2.RunStep]:
        rows = await self._read(
            lambda c: c.fetch("SELECT body FROM run_steps WHERE run_id = $1 ORDER BY seq", run_id)
        )
        return [_parse(run_pb2.RunStep, row["body"]) for row in rows]

    async def read_events(self, run_id: str, start: int, limit: int) -> list[run_pb2.StreamEvent]:
        return [
            _parse(run_pb2.StreamEvent, body) for body in await self.read_event_wires(run_id, start, limit)
        ]

    async def read_event_wires(self, run_id: str, start: int, limit: int) -> list[bytes]:
        rows = await self._read(
            lambda c: c.fetch(
                "SELECT body FROM run_events WHERE run_id = $1 AND idx >= $2 ORDER BY idx LIMIT $3",
                run_id,
                start,
                limit,
            )
        )
        return [row["body"] for row in rows]

    async def tool_round_texts(self, run_id: str) -> dict[str, str]:
        rows = await self._read(
            lambda c: c.fetch("SELECT step_id, said FROM step_texts WHERE run_id = $1", run_id)
        )
        return {row["step_id"]: row["said"] for row in rows}

    async def count_active_runs(self) -> dict[int, int]:
        """Runs not finished yet, by status, over every replica (the metrics' active-runs gauge;
        the partial index on active runs keeps it a short scan)."""
        rows = await self._read(
            lambda c: c.fetch(
                f"SELECT status, COUNT(*) AS n FROM runs WHERE status IN ({_ACTIVE}) GROUP BY status"
            )
        )
        return {int(row["status"]): int(row["n"]) for row in rows}

    async def _next_event_index(self, run_id: str) -> int:
        value = await self._read(
            lambda c: c.fetchval("SELECT next_event_idx FROM runs WHERE id = $1", run_id)
        )
        return int(value or 0)

    # ---- engine ------------------------------------------------------------------------

    async def claim_runs(
        self, owner: str, lease_seconds: float, limit: int, mutate: RunMutation
    ) -> list[ClaimedRun]:
        if faults.ENABLED:  # held here, queued runs stay PENDING
            await faults.reached("store.claim")

        async def write(conn: Conn) -> list[tuple[ClaimedRun, MutationResult]]:
            # SKIP LOCKED: a run another replica is claiming right now is not waited for, and
            # not taken twice; this replica takes the next ones.
            ids = await conn.fetch(
                "SELECT id FROM runs WHERE status = $1 ORDER BY seq LIMIT $2 FOR UPDATE SKIP LOCKED",
                run_pb2.PENDING,
                limit,
            )
            claimed = []
            for row in ids:
                epoch = await _take_lease(conn, row["id"], owner, lease_seconds)
                result = await _mutate_run(conn, row["id"], mutate, epoch=epoch)
                claimed.append((ClaimedRun(result.run, epoch), result))
            return claimed

        pairs: list[tuple[ClaimedRun, MutationResult]] = await self._write(write)
        for _, result in pairs:
            self._publish(result)
        return [claim for claim, _ in pairs]

    async def reclaim_run(
        self, run_id: str, owner: str, lease_seconds: float, mutate: RunMutation
    ) -> ClaimedRun | None:
        async def write(conn: Conn) -> tuple[ClaimedRun, MutationResult] | None:
            # The row lock, then the condition: a renewal or another reclaim committed since
            # due_runs listed it is seen here. SKIP LOCKED: a row locked by a stalled replica's
            # open transaction is not waited for (the sweep goes on to the other runs); it is
            # retried at the next sweep, once PostgreSQL ended that transaction.
            found = await conn.fetchval(
                f"SELECT 1 FROM runs WHERE id = $1 AND status IN ({_LEASED}) AND lease_expires < $2"
                " FOR UPDATE SKIP LOCKED",
                run_id,
                clock.now(),
            )
            if found is None:
                return None
            epoch = await _take_lease(conn, run_id, owner, lease_seconds)
            result = await _mutate_run(conn, run_id, mutate, epoch=epoch)
            return ClaimedRun(result.run, epoch), result

        pair: tuple[ClaimedRun, MutationResult] | None = await self._write(write)
        if pair is None:
            return None
        self._publish(pair[1])
        return pair[0]

    async def renew_lease(self, run_id: str, owner: str, epoch: int, lease_seconds: float) -> bool:
        status = await self._read(
            lambda c: c.execute(
                "UPDATE runs SET lease_expires = $4 WHERE id = $1 AND lease_owner = $2 AND lease_epoch = $3",
                run_id,
                owner,
                epoch,
                clock.now() + lease_seconds,
            )
        )
        return bool(status == "UPDATE 1")

    async def due_runs(self, now: float, limit: int) -> DueRuns:
        async def read(conn: Conn) -> DueRuns:
            expired = await conn.fetch(
                f"SELECT id FROM runs WHERE status IN ({_ACTIVE}) AND deadline < $1"
                " ORDER BY deadline LIMIT $2",
                now,
                limit,
            )
            orphaned = await conn.fetch(
                f"SELECT id FROM runs WHERE status IN ({_LEASED}) AND lease_expires < $1"
                " ORDER BY seq LIMIT $2",
                now,
                limit,
            )
            return DueRuns([r["id"] for r in expired], [r["id"] for r in orphaned])

        result: DueRuns = await self._read(read)
        return result

    async def release_all_leases(self, owner_prefix: str) -> int:
        # Only this replica's own earlier incarnations' leases (a stable --replica-id): other
        # replicas share the database and theirs may be live. Another replica's dead leases run
        # out and the sweepers (reclaim_run) take its runs over then. Were the earlier
        # incarnation still alive (two processes given one id), its writes are fenced: the
        # takeover raises the epoch.
        status = await self._read(
            lambda c: c.execute(
                f"UPDATE runs SET lease_expires = 0 WHERE status IN ({_LEASED})"
                " AND starts_with(lease_owner, $1) AND lease_expires > 0",
                owner_prefix,
            )
        )
        return int(status.rsplit(" ", 1)[-1])

    # ---- retention ---------------------------------------------------------------------

    async def delete_expired_runs(self, before: float, limit: int) -> int:
        async def write(conn: Conn) -> int:
            # SKIP LOCKED: sweepers on several replicas take disjoint batches.
            rows = await conn.fetch(
                f"SELECT id FROM runs WHERE finished_at < $1 AND status IN ({_TERMINAL})"
                " ORDER BY finished_at LIMIT $2 FOR UPDATE SKIP LOCKED",
                before,
                limit,
            )
            run_ids = [row["id"] for row in rows]
            if run_ids:
                await conn.execute("DELETE FROM run_events WHERE run_id = ANY($1::text[])", run_ids)
                await conn.execute("DELETE FROM run_steps WHERE run_id = ANY($1::text[])", run_ids)
                await conn.execute("DELETE FROM step_texts WHERE run_id = ANY($1::text[])", run_ids)
                await conn.execute("DELETE FROM runs WHERE id = ANY($1::text[])", run_ids)
            return len(run_ids)

        deleted: int = await self._write(write)
        return deleted

    async def checkpoint_wal(self) -> bool:
        # PostgreSQL checkpoints and recycles its WAL by itself (checkpoint_timeout,
        # max_wal_size); there is nothing for a client to fold back.
        return True

    # ---- idempotency -------------------------------------------------------------------

    async def get_request(self, project: str, key: str) -> IdempotencyRecord | None:
        row = await self._read(
            lambda c: c.fetchrow(
                "SELECT fingerprint, response FROM idempotency"
                " WHERE project = $1 AND key = $2 AND response IS NOT NULL",
                project,
                key,
            )
        )
        return IdempotencyRecord(row["fingerprint"], row["response"]) if row else None

    async def save_request(self, request: RequestKey, response: bytes) -> IdempotencyRecord:
        async def write(conn: Conn) -> IdempotencyRecord:
            inserted = await conn.fetchval(
                "INSERT INTO idempotency(project, key, fingerprint, response, created_at)"
                " VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING RETURNING 1",
                request.project,
                request.key,
                request.fingerprint,
                response,
                clock.now(),
            )
            if inserted is not None:
                return IdempotencyRecord(request.fingerprint, response)
            return await _recorded(conn, request)

        kept: IdempotencyRecord = await self._write(write)
        request.recorded = True
        return kept

    async def purge_requests(self, older_than: float) -> int:
        status = await self._read(
            lambda c: c.execute("DELETE FROM idempotency WHERE created_at < $1", older_than)
        )
        return int(status.split()[-1])


async def keep_session(_conn: Conn) -> None:
    """The pool's reset on release, instead of asyncpg's default query (advisory unlock all,
    CLOSE ALL, UNLISTEN *, RESET ALL): one more round trip for every store call, 8% of a
    replica's CPU under load (bench/replicas.py). Nothing here leaves session state behind:
    advisory locks are transaction-level, LISTEN has its own connection (pg_fanout), nothing
    SETs or opens cursors outside a transaction, and asyncpg still rolls back a transaction
    left open."""


# ---- helpers that run inside a write transaction -----------------------------------------


async def _claim_request(conn: Conn, request: RequestKey) -> None:
    """First in the transaction: take the key, or refuse with the answer already given. A twin
    in flight holds the key's index entry; this insert waits for its transaction and then
    finds the key taken (or free, if the twin rolled back)."""
    inserted = await conn.fetchval(
        "INSERT INTO idempotency(project, key, fingerprint, response, created_at)"
        " VALUES ($1, $2, $3, NULL, $4) ON CONFLICT DO NOTHING RETURNING 1",
        request.project,
        request.key,
        request.fingerprint,
        clock.now(),
    )
    if inserted is None:
        raise RequestReplayed(await _recorded(conn, request))


async def _recorded(conn: Conn, request: RequestKey) -> IdempotencyRecord:
    row = await conn.fetchrow(
        "SELECT fingerprint, response FROM idempotency WHERE project = $1 AND key = $2",
        request.project,
        request.key,
    )
    if row is None or row["response"] is None:  # purged in between: let the caller retry
        raise UnavailableError("request_id record changed concurrently; retry")
    return IdempotencyRecord(row["fingerprint"], row["response"])


def _serialized(resource: ProtoMessage) -> bytes:
    return resource.SerializeToString()


def _run_answer(result: MutationResult) -> bytes:
    return result.run.SerializeToString()


def _empty(_: None) -> bytes:
    return b""  # the empty Delete*Response


async def _lock_thread(conn: Conn, project: str, thread_id: str, *, shared: bool = False) -> None:
    """Serializes the writes that check "no active run" on this thread (run inserts, messages,
    deletion) across replicas, so the check cannot be overtaken. `shared`: for writes that only
    must not overlap a run's start or the thread's deletion (a message), not each other. The
    check must be a later statement than the lock: its snapshot then sees what the lock waited for."""
    mode = "SHARE" if shared else "UPDATE"
    found = await conn.fetchval(
        f"SELECT 1 FROM threads WHERE id = $1 AND project = $2 FOR {mode}", thread_id, project
    )
    if found is None:
        raise NotFoundError("thread", thread_id)


async def _require_no_active_run(conn: Conn, thread_id: str, action: str) -> None:
    active = await conn.fetchval(
        f"SELECT id FROM runs WHERE thread_id = $1 AND status IN ({_ACTIVE})", thread_id
    )
    if active is not None:
        raise thread_busy(thread_id, active, action)


async def _require_run_quota(conn: Conn, project: str, limit: int) -> None:
    # Replicas insert concurrently: two creates in different threads could each count one free
    # slot. A per-project transaction lock makes the count-then-insert serial per project.
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"spindle-quota:{project}")
    active = await conn.fetchval(
        f"SELECT COUNT(*) FROM (SELECT 1 FROM runs WHERE project = $1 AND status IN ({_ACTIVE}) LIMIT $2) a",
        project,
        limit,
    )
    if active >= limit:
        raise QuotaError(
            "ACTIVE_RUNS_LIMIT",
            f"projects/{project}",
            f"{active} runs are active; at most {limit} are allowed at once",
            limit,
        )


async def _insert_messages(conn: Conn, project: str, messages: Sequence[message_pb2.Message]) -> None:
    if messages:
        await conn.executemany(
            "INSERT INTO messages(id, project, thread_id, run_id, body) VALUES ($1, $2, $3, $4, $5)",
            [(m.id, project, m.thread_id, m.run_id, m.SerializeToString()) for m in messages],
        )


def _number_events(
    run_id: str, first_index: int, events: Sequence[run_pb2.StreamEvent]
) -> list[run_pb2.StreamEvent]:
    created = clock.timestamp(clock.now())
    for offset, event in enumerate(events):
        event.run_id = run_id
        event.index = first_index + offset
        if not event.HasField("created_at"):
            event.created_at.CopyFrom(created)
    return list(events)


async def _insert_events(conn: Conn, run_id: str, events: Sequence[run_pb2.StreamEvent]) -> None:
    """The events and the hint in one statement (one round trip, where executemany and a
    separate SELECT pg_notify took two); PostgreSQL delivers a NOTIFY at commit, and not at
    all on a rollback. The INSERT is a data-modifying WITH: it runs whatever the SELECT reads."""
    if not events:
        return
    await conn.execute(
        "WITH added AS (INSERT INTO run_events(run_id, idx, body)"
        " SELECT $1, e.idx, e.body FROM unnest($2::bigint[], $3::bytea[]) AS e(idx, body))"
        " SELECT pg_notify($4, $5)",
        run_id,
        [event.index for event in events],
        [event.SerializeToString() for event in events],
        CHANNEL,
        hint(run_id, events[-1].index),
    )


async def _take_lease(conn: Conn, run_id: str, owner: str, lease_seconds: float) -> int:
    epoch = await conn.fetchval(
        "UPDATE runs SET lease_owner = $2, lease_epoch = lease_epoch + 1, lease_expires = $3"
        " WHERE id = $1 RETURNING lease_epoch",
        run_id,
        owner,
        clock.now() + lease_seconds,
    )
    return int(epoch)


async def _mutate_run(
    conn: Conn, run_id: str, mutate: RunMutation, *, epoch: int | None, project: str | None = None
) -> MutationResult:
    # FOR UPDATE: the epoch compared below is the one this transaction commits against; a
    # takeover either committed before (and is seen: FencedError) or waits for this one.
    row = await conn.fetchrow(
        "SELECT project, body, lease_epoch, next_event_idx FROM runs WHERE id = $1 FOR UPDATE", run_id
    )
    if row is None or (project is not None and row["project"] != project):
        raise NotFoundError("run", run_id)
    current_epoch, next_index = int(row["lease_epoch"]), int(row["next_event_idx"])
    if epoch is not None and epoch != current_epoch:
        raise FencedError(f"run {run_id}: lease epoch {epoch} was superseded by {current_epoch}")
    body: bytes = row["body"]
    change: RunChange = mutate(_parse(run_pb2.Run, body))
    run = change.run
    if _no_op(change, body):
        return MutationResult(run, [])
    run.updated_at.CopyFrom(clock.timestamp(clock.now()))
    for event in change.events:
        if event.status == run_pb2.RUN_STATUS_UNSPECIFIED:
            event.status = run.status
    embed_stored_run(change)
    await _insert_messages(conn, row["project"], change.messages)
    for step in change.steps:
        await conn.execute(
            "INSERT INTO run_steps(id, project, run_id, body) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT (id) DO UPDATE SET body = excluded.body",
            step.id,
            row["project"],
            run_id,
            step.SerializeToString(),
        )
    for step_id, said in change.step_texts.items():
        await conn.execute(
            "INSERT INTO step_texts(run_id, step_id, said) VALUES ($1, $2, $3)"
            " ON CONFLICT (run_id, step_id) DO UPDATE SET said = excluded.said",
            run_id,
            step_id,
            said,
        )
    stored = _number_events(run_id, next_index, change.events)
    await _insert_events(conn, run_id, stored)
    args: list[Any] = [run_id, run.status, run.SerializeToString(), next_index + len(stored)]
    assignments = "status = $2, body = $3, next_event_idx = $4"
    if change.deadline is not None:
        args.append(change.deadline)
        assignments += f", deadline = ${len(args)}"
    if change.release_lease:
        assignments += ", lease_owner = '', lease_expires = 0"
    if run.status in TERMINAL_STATUSES:
        args.append(clock.now())
        assignments += f", finished_at = COALESCE(finished_at, ${len(args)})"
    await conn.execute(f"UPDATE runs SET {assignments} WHERE id = $1", *args)
    return MutationResult(run, stored)


def _no_op(change: RunChange, body: bytes) -> bool:
    if change.events or change.messages or change.steps or change.step_texts or change.deadline is not None:
        return False
    if change.release_lease:
        return False
    return change.run == _parse(run_pb2.Run, body)
