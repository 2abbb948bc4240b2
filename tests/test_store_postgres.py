"""The PostgreSQL store: the SQLite store's tests, then what only several replicas can break.

Each test gets a database of its own on one private cluster (tests/support/postgres.py). The
"replicas" are several PostgresStore objects on one database, each with its own pool and its
own LISTEN connection, as separate server processes would have.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path

import asyncpg
import pytest

# The store-level tests of the SQLite store, run here against PostgreSQL: pytest collects them
# in this module, where the `store` fixture below is a PostgresStore.
import test_api_edges as api_edge_tests
import test_limits as limits_tests
import test_retention as retention_tests
import test_store_sqlite as sqlite_tests
import test_transitions_store as transition_tests

from spindle.v1 import message_pb2, run_pb2, thread_pb2
from spindle_server import clock, faults
from spindle_server.engine import events, transitions
from spindle_server.store import pg_schema
from spindle_server.store.base import PageQuery, RequestKey, RequestReplayed, RunFilter, RunMutation
from spindle_server.store.errors import FencedError, NotFoundError, QuotaError, StateError, UnavailableError
from spindle_server.store.postgres import PostgresStore
from support import postgres
from support.faults import Holds

pytestmark = pytest.mark.skipif(not postgres.available(), reason="PostgreSQL is not installed")

SHARED_TESTS = [
    sqlite_tests.test_a_superseded_lease_cannot_write,
    sqlite_tests.test_a_failing_write_does_not_undo_the_others,
    sqlite_tests.test_one_active_run_per_thread_is_enforced_in_the_transaction,
    sqlite_tests.test_the_answer_commits_with_the_change_and_a_replay_changes_nothing,
    sqlite_tests.test_a_different_request_under_the_same_id_changes_nothing,
    sqlite_tests.test_a_failed_write_records_no_answer,
    sqlite_tests.test_every_write_records_its_answer,
    sqlite_tests.test_saved_answers_keep_the_first_and_expire,
    sqlite_tests.test_pages_follow_the_cursor,
    sqlite_tests.test_a_draft_becomes_a_message_in_the_batch_that_writes_it,
    transition_tests.test_expire_refuses_a_run_whose_deadline_moved,
    transition_tests.test_tool_results_after_the_tool_deadline_are_refused,
    transition_tests.test_a_pause_keeps_the_text_said_before_the_calls_and_a_thread_delete_drops_it,
    transition_tests.test_tool_rounds_do_not_use_up_the_attempts,
    transition_tests.test_a_run_requeued_max_attempts_times_fails_at_its_next_claim,
    transition_tests.test_a_requeued_run_counts_the_interrupted_attempt,
    transition_tests.test_shutdown_requeue_of_a_cancelling_run_ends_it_cancelled,
    transition_tests.test_cancelling_a_finished_run_leaves_it_untouched,
    transition_tests.test_runs_are_found_by_any_valid_label_key,
    transition_tests.test_a_cancel_with_a_stale_tool_step_leaves_the_answered_step_alone,
    transition_tests.test_an_expiry_with_a_stale_tool_step_leaves_the_answered_step_alone,
    transition_tests.test_a_run_claimed_at_insert_is_leased_and_fenced_like_a_claimed_one,
    transition_tests.test_a_claim_at_insert_refused_with_its_insert_leaves_nothing,
    retention_tests.test_expired_runs_are_deleted_in_bounded_batches,
    limits_tests.test_active_runs_limit_in_the_store,
    api_edge_tests.test_a_caller_that_goes_away_does_not_let_a_retry_act_twice,
]
for _test in SHARED_TESTS:
    globals()[_test.__name__] = _test

PROJECT = "p"
BOUND = 60.0


def FAIL() -> RunMutation:
    return transitions.fail(clock.now(), "MODEL_ERROR", "boom")


# failure bound for waits; never a timing assertion


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    with postgres.server_dsn() as dsn:
        yield dsn


@pytest.fixture
async def database(pg_server: str) -> AsyncIterator[str]:
    """A fresh, empty database; its DSN."""
    name = postgres.fresh_name()
    admin = await asyncpg.connect(pg_server)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield postgres.with_database(pg_server, name)
    admin = await asyncpg.connect(pg_server)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def replicas(database: str) -> AsyncIterator[Callable[..., Awaitable[PostgresStore]]]:
    """Start stores on the test's database, as separate replicas would; closed after the test."""
    started: list[PostgresStore] = []

    async def start(**options: int) -> PostgresStore:
        replica = PostgresStore(database, pool_min=1, pool_max=options.get("pool_max", 4))
        started.append(replica)
        await replica.start()
        return replica

    yield start
    for replica in started:
        await replica.close()


@pytest.fixture
async def store(replicas: Callable[..., Awaitable[PostgresStore]]) -> PostgresStore:
    """Overrides conftest's SQLite `store` for the shared tests above."""
    return await replicas()


async def queued_run(store: PostgresStore, thread_id: str = "thread_1", run_id: str = "run_1") -> run_pb2.Run:
    await store.insert_thread(PROJECT, thread_pb2.Thread(id=thread_id), [])
    run = run_pb2.Run(id=run_id, thread_id=thread_id, assistant_id="asst_1", status=run_pb2.PENDING)
    run.created_at.CopyFrom(clock.timestamp(clock.now()))
    result = await store.insert_run(PROJECT, run, [], clock.now() + 600, [events.status_change(run)])
    return result.run


def key(request_id: str, method: str, fingerprint: str = "f1") -> RequestKey:
    return RequestKey(PROJECT, method, request_id, fingerprint)


async def assert_gap_free(store: PostgresStore, run_id: str) -> list[run_pb2.StreamEvent]:
    logged = await store.read_events(run_id, 0, 100_000)
    assert [e.index for e in logged] == list(range(len(logged)))
    return logged


# ---- claiming and fencing ---------------------------------------------------------------------


async def test_a_run_locked_by_one_replica_is_skipped_by_the_other(
    replicas: Callable[..., Awaitable[PostgresStore]], database: str
) -> None:
    a = await replicas()
    b = await replicas()
    await queued_run(a, "thread_1", "run_1")
    await queued_run(a, "thread_2", "run_2")
    # A claim in progress elsewhere holds run_1's row: B neither waits for it nor takes it.
    holder = await asyncpg.connect(database)
    try:
        async with holder.transaction():
            await holder.execute("SELECT 1 FROM runs WHERE id = 'run_1' FOR UPDATE")
            claimed = await asyncio.wait_for(
                b.claim_runs("b", 30, 10, transitions.start(clock.now(), 3600, 3)), BOUND
            )
            assert [c.run.id for c in claimed] == ["run_2"]
    finally:
        await holder.close()
    (later,) = await a.claim_runs("a", 30, 10, transitions.start(clock.now(), 3600, 3))
    assert later.run.id == "run_1" and later.epoch == 1


async def test_concurrent_claims_from_two_replicas_never_share_a_run(
    replicas: Callable[..., Awaitable[PostgresStore]],
) -> None:
    a = await replicas()
    b = await replicas()
    ids = [f"run_{i}" for i in range(30)]
    for i, run_id in enumerate(ids):
        await queued_run(a, f"thread_{i}", run_id)

    async def drain(replica: PostgresStore, owner: str) -> list[str]:
        taken: list[str] = []
        while claims := await replica.claim_runs(owner, 30, 2, transitions.start(clock.now(), 3600, 3)):
            taken.extend(c.run.id for c in claims)
        return taken

    # Two claimers per replica, all at once, until nothing is left.
    taken = await asyncio.gather(drain(a, "a1"), drain(a, "a2"), drain(b, "b1"), drain(b, "b2"))
    assert sorted(run_id for part in taken for run_id in part) == sorted(ids)  # each run exactly once
    runs = await a.list_runs(PROJECT, RunFilter(), PageQuery(limit=100))
    assert {r.status for r in runs.items} == {run_pb2.IN_PROGRESS}


async def test_a_replica_whose_lease_was_taken_over_writes_nothing(
    replicas: Callable[..., Awaitable[PostgresStore]],
) -> None:
    a = await replicas()
    b = await replicas()
    await queued_run(a)
    # A claims with a lease that has already run out: B may take the run over at once.
    (stale,) = await a.claim_runs("a", -1, 10, transitions.start(clock.now(), 3600, 3))
    assert (await b.due_runs(clock.now(), 10)).orphaned == ["run_1"]
    taken = await b.reclaim_run("run_1", "b", 30, transitions.recover(clock.now(), 3))
    assert taken is not None and taken.epoch == stale.epoch + 1
    # A second reclaim (another sweeper that listed it too) finds the lease live.
    assert await a.reclaim_run("run_1", "a", 30, transitions.recover(clock.now(), 3)) is None
    before_events = await a.read_events("run_1", 0, 1000)
    before_run = await a.get_run(PROJECT, "run_1")
    with pytest.raises(FencedError):
        await a.mutate_run("run_1", transitions.stream([events.message_delta("late")]), epoch=stale.epoch)
    with pytest.raises(FencedError):
        await a.mutate_run("run_1", transitions.fail(clock.now(), "MODEL_ERROR", "boom"), epoch=stale.epoch)
    assert not await a.renew_lease("run_1", "a", stale.epoch, 30)
    assert await a.read_events("run_1", 0, 1000) == before_events
    assert await a.get_run(PROJECT, "run_1") == before_run
    assert await b.renew_lease("run_1", "b", taken.epoch, 30)
    await b.mutate_run("run_1", transitions.stream([events.message_delta("ok")]), epoch=taken.epoch)
    logged = await assert_gap_free(a, "run_1")
    assert [e.message_delta.text for e in logged if e.type == run_pb2.StreamEvent.PARTIAL_MESSAGE] == ["ok"]


async def backend_waiting_for_a_lock(raw: asyncpg.Connection) -> int:
    """The pid of the (one) other backend of this database that waits for a lock."""
    for _ in range(int(BOUND / 0.01)):
        waiting = await raw.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
        )
        if waiting is not None:
            return int(waiting)
        await asyncio.sleep(0.01)
    raise AssertionError("no write ever waited for the lock")


async def test_a_write_waiting_on_the_row_while_the_lease_is_taken_over_is_fenced(
    replicas: Callable[..., Awaitable[PostgresStore]], database: str
) -> None:
    """The epoch is compared under the row lock, against the row as committed when the lock is
    granted: a takeover that commits while the owner's write waits fences that write."""
    a = await replicas()
    await queued_run(a)
    (claim,) = await a.claim_runs("a", 30, 10, transitions.start(clock.now(), 3600, 3))
    before = await a.read_events("run_1", 0, 100)
    raw = await asyncpg.connect(database)
    try:
        async with raw.transaction():  # the takeover, as another replica's reclaim does it
            await raw.execute("SELECT 1 FROM runs WHERE id = 'run_1' FOR UPDATE")
            late = asyncio.create_task(
                a.mutate_run("run_1", transitions.stream([events.message_delta("late")]), epoch=claim.epoch)
            )
            await backend_waiting_for_a_lock(raw)
            await raw.execute(
                "UPDATE runs SET lease_owner = 'b', lease_epoch = lease_epoch + 1 WHERE id = 'run_1'"
            )
        with pytest.raises(FencedError):
            await asyncio.wait_for(late, BOUND)
    finally:
        await raw.close()
    assert await a.read_events("run_1", 0, 100) == before


async def test_release_all_leases_leaves_other_replicas_leases_alone(
    replicas: Callable[..., Awaitable[PostgresStore]],
) -> None:
    a = await replicas()
    await queued_run(a)
    (claim,) = await a.claim_runs("a", 30, 10, transitions.start(clock.now(), 3600, 3))
    b = await replicas()
    assert await b.release_all_leases("b/") == 0
    assert (await b.due_runs(clock.now(), 10)).orphaned == []
    assert await a.renew_lease("run_1", "a", claim.epoch, 30)


async def test_release_all_leases_ends_the_own_replicas_earlier_incarnations_leases(
    replicas: Callable[..., Awaitable[PostgresStore]],
) -> None:
    """A replica restarted under its --replica-id takes its previous incarnation's runs over at
    once; a replica whose id merely starts the same ("r1" and "r10") keeps its lease."""
    a = await replicas()
    await queued_run(a, "thread_1", "run_1")
    await queued_run(a, "thread_2", "run_2")
    start = transitions.start(clock.now(), 3600, 3)
    (mine,) = await a.claim_runs("r1/old-incarnation", 30, 1, start)
    (other,) = await a.claim_runs("r10/live", 30, 1, start)
    restarted = await replicas()
    assert await restarted.release_all_leases("r1/") == 1
    assert (await restarted.due_runs(clock.now(), 10)).orphaned == [mine.run.id]
    taken = await restarted.reclaim_run(
        mine.run.id, "r1/new-incarnation", 30, transitions.recover(clock.now(), 3)
    )
    assert taken is not None and taken.epoch == mine.epoch + 1
    assert not await a.renew_lease(mine.run.id, "r1/old-incarnation", mine.epoch, 30)  # fenced
    assert await a.renew_lease(other.run.id, "r10/live", other.epoch, 30)


# ---- one run row, many writers ------------------------------------------------------------------


async def test_concurrent_appends_from_two_replicas_keep_indexes_gap_free(
    replicas: Callable[..., Awaitable[PostgresStore]],
) -> None:
    a = await replicas(pool_max=8)
    b = await replicas(pool_max=8)
    await queued_run(a)
    (claim,) = await a.claim_runs("a", 30, 10, transitions.start(clock.now(), 3600, 3))
    writes = [
        (a if i % 2 else b).mutate_run(
            "run_1",
            transitions.stream([events.message_delta(str(i)), events.message_delta("+")]),
            epoch=claim.epoch,
        )
        for i in range(100)
    ]
    await asyncio.gather(*writes)
    logged = await assert_gap_free(a, "run_1")
    assert len(logged) == 2 + 200
    texts = [e.message_delta.text for e in logged if e.type == run_pb2.StreamEvent.PARTIAL_MESSAGE]
    assert sorted(t for t in texts if t != "+") == sorted(str(i) for i in range(100))
    # Each transaction's two events are adjacent: indexes were allocated under the row lock.
    assert all(texts[i + 1] == "+" for i in range(0, len(texts), 2))


async def test_one_active_run_per_thread_under_concurrent_inserts_from_two_replicas(
    replicas: Callable[..., Awaitable[PostgresStore]], database: str
) -> None:
    a = await replicas(pool_max=6)
    b = await replicas(pool_max=6)
    await a.insert_thread(PROJECT, thread_pb2.Thread(id="thread_1"), [])
    inserts = [
        (a if i % 2 else b).insert_run(
            PROJECT,
            run_pb2.Run(id=f"run_{i}", thread_id="thread_1", status=run_pb2.PENDING),
            [],
            clock.now() + 60,
            [],
        )
        for i in range(12)
    ]
    results = await asyncio.gather(*inserts, return_exceptions=True)
    won = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, StateError)]
    assert len(won) == 1 and len(refused) == 11, results
    assert {r.reason for r in refused} == {"THREAD_HAS_ACTIVE_RUN"}
    # The database itself refuses a second active run, whatever the code path.
    raw = await asyncpg.connect(database)
    try:
        with pytest.raises(asyncpg.UniqueViolationError):
            await raw.execute(
                "INSERT INTO runs(id, project, thread_id, assistant_id, status, body, deadline)"
                " VALUES ('run_x', 'p', 'thread_1', '', $1, ''::bytea, 0)",
                run_pb2.IN_PROGRESS,
            )
    finally:
        await raw.close()


async def test_one_request_id_from_two_replicas_is_applied_once(
    replicas: Callable[..., Awaitable[PostgresStore]],
) -> None:
    a = await replicas(pool_max=6)
    b = await replicas(pool_max=6)
    await queued_run(a)
    await a.mutate_run("run_1", transitions.request_cancel(clock.now(), None))  # ends it: thread free
    twins = [message_pb2.Message(id=f"msg_{i}", thread_id="thread_1") for i in range(10)]
    results = await asyncio.gather(
        *(
            (a if i % 2 else b).insert_message(PROJECT, m, record=key("r1", "messages.create"))
            for i, m in enumerate(twins)
        ),
        return_exceptions=True,
    )
    applied = [i for i, r in enumerate(results) if not isinstance(r, BaseException)]
    assert len(applied) == 1, results
    assert results[applied[0]] == twins[applied[0]].SerializeToString()  # the message as stored
    replays = [r for r in results if isinstance(r, RequestReplayed)]
    assert len(replays) == 9
    assert {r.record.response for r in replays} == {twins[applied[0]].SerializeToString()}
    page = await b.list_messages(PROJECT, "thread_1", PageQuery(limit=20))
    assert [m.id for m in page.items] == [twins[applied[0]].id]
    # Run writes too: one cancel, the twins get its answer; one CANCELLED event.
    await queued_run(a, "thread_2", "run_2")
    cancels = await asyncio.gather(
        *(
            (a if i % 2 else b).mutate_run(
                "run_2", transitions.request_cancel(clock.now(), None), record=key("c1", "runs.cancel")
            )
            for i in range(6)
        ),
        return_exceptions=True,
    )
    done = [r for r in cancels if not isinstance(r, BaseException)]
    assert len(done) == 1 and all(isinstance(r, RequestReplayed) for r in cancels if r not in done)
    logged = await assert_gap_free(a, "run_2")
    assert [e.status for e in logged].count(run_pb2.CANCELLED) == 1


async def test_the_active_runs_limit_holds_under_concurrent_inserts_from_two_replicas(
    replicas: Callable[..., Awaitable[PostgresStore]],
) -> None:
    a = await replicas(pool_max=6)
    b = await replicas(pool_max=6)
    for i in range(10):
        await a.insert_thread(PROJECT, thread_pb2.Thread(id=f"thread_{i}"), [])
    inserts = [
        (a if i % 2 else b).insert_run(
            PROJECT,
            run_pb2.Run(id=f"run_{i}", thread_id=f"thread_{i}", status=run_pb2.PENDING),
            [],
            clock.now() + 60,
            [],
            max_active_runs=3,
        )
        for i in range(10)
    ]
    results = await asyncio.gather(*inserts, return_exceptions=True)
    assert len([r for r in results if not isinstance(r, BaseException)]) == 3, results
    assert all(isinstance(r, QuotaError) for r in results if isinstance(r, BaseException))
    active = await a.list_runs(PROJECT, RunFilter(statuses=frozenset({run_pb2.PENDING})), PageQuery(limit=20))
    assert len(active.items) == 3


async def test_retention_sweeps_on_two_replicas_delete_each_run_once(
    replicas: Callable[..., Awaitable[PostgresStore]],
) -> None:
    a = await replicas(pool_max=4)
    b = await replicas(pool_max=4)
    for i in range(20):
        await queued_run(a, f"thread_{i}", f"run_{i}")
        await a.mutate_run(f"run_{i}", transitions.request_cancel(clock.now(), None))
    after = clock.now() + 1

    async def sweep(replica: PostgresStore) -> int:
        total = 0
        while deleted := await replica.delete_expired_runs(after, 3):
            total += deleted
        return total

    counts = await asyncio.gather(sweep(a), sweep(b), sweep(a), sweep(b))
    assert sum(counts) == 20
    assert (await a.list_runs(PROJECT, RunFilter(), PageQuery(limit=50))).items == []


def hold_at(monkeypatch: pytest.MonkeyPatch, holds: Holds, point: str) -> None:
    """Turn on one fault-point hold in this process (the store runs in the test's own loop)."""
    monkeypatch.setattr(faults, "ENABLED", True)
    monkeypatch.setattr(faults, "_ACTIONS", faults._parse(holds.env(point)[faults.ENV]))
    monkeypatch.setattr(faults, "_counts", {})


async def test_a_twin_on_another_replica_waits_for_the_first_and_gets_its_answer(
    replicas: Callable[..., Awaitable[PostgresStore]],
    database: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a = await replicas()
    b = await replicas()
    await a.insert_thread(PROJECT, thread_pb2.Thread(id="thread_1"), [])
    holds = Holds(tmp_path)
    hold_at(monkeypatch, holds, "idempotency.in_transaction")
    first = message_pb2.Message(id="msg_1", thread_id="thread_1")
    on_a = asyncio.create_task(a.insert_message(PROJECT, first, record=key("r1", "messages.create")))
    await asyncio.to_thread(holds.wait_reached, "idempotency.in_transaction")  # key taken, not committed
    twin = message_pb2.Message(id="msg_2", thread_id="thread_1")
    on_b = asyncio.create_task(b.insert_message(PROJECT, twin, record=key("r1", "messages.create")))
    raw = await asyncpg.connect(database)
    try:
        await backend_waiting_for_a_lock(raw)  # B's claim of the key waits for A's transaction
    finally:
        await raw.close()
    holds.release("idempotency.in_transaction")
    await asyncio.wait_for(on_a, BOUND)
    with pytest.raises(RequestReplayed) as replayed:
        await asyncio.wait_for(on_b, BOUND)
    assert replayed.value.record.response == first.SerializeToString()
    page = await b.list_messages(PROJECT, "thread_1", PageQuery(limit=10))
    assert [m.id for m in page.items] == ["msg_1"]


async def test_migrations_applied_by_three_replicas_at_once(database: str) -> None:
    stores = [PostgresStore(database, pool_min=1, pool_max=2) for _ in range(3)]
    try:
        await asyncio.gather(*(s.start() for s in stores))
        # Each version once, by one of them.
        assert sorted(v for s in stores for v in s.migrations_applied) == VERSIONS
        raw = await asyncpg.connect(database)
        try:
            versions = await raw.fetch("SELECT version FROM schema_migrations ORDER BY version")
            assert [r[0] for r in versions] == VERSIONS
        finally:
            await raw.close()
        await queued_run(stores[2])
        assert (await stores[0].get_run(PROJECT, "run_1")).id == "run_1"
    finally:
        for s in stores:
            await s.close()
    again = PostgresStore(database, pool_min=1, pool_max=2)
    await again.start()  # a restart applies nothing
    try:
        assert again.migrations_applied == []
    finally:
        await again.close()


VERSIONS = [version for version, _ in pg_schema.MIGRATIONS]


async def test_a_database_of_an_earlier_version_gets_the_message_insert(database: str) -> None:
    """A database left at version 3 (before the one-statement message insert) opens: the
    function is added, and a message is inserted, or refused for the right reason, through it."""
    raw = await asyncpg.connect(database)
    try:
        async with raw.transaction():
            await raw.execute(
                "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY,"
                " applied_at DOUBLE PRECISION NOT NULL)"
            )
            for version, script in pg_schema.MIGRATIONS[:3]:
                await raw.execute(script)
                await raw.execute("INSERT INTO schema_migrations VALUES ($1, 0)", version)
            await raw.execute(
                "INSERT INTO threads(id, project, body) VALUES ('thread_1', $1, ''::bytea)", PROJECT
            )
    finally:
        await raw.close()
    store = PostgresStore(database, pool_min=1, pool_max=2)
    await store.start()
    try:
        assert store.migrations_applied == VERSIONS[3:]
        await store.insert_message(PROJECT, message_pb2.Message(id="msg_1", thread_id="thread_1"))
        with pytest.raises(NotFoundError):  # another project's thread
            await store.insert_message("other", message_pb2.Message(id="msg_2", thread_id="thread_1"))
        with pytest.raises(NotFoundError):
            await store.insert_message(PROJECT, message_pb2.Message(id="msg_3", thread_id="thread_2"))
        page = await store.list_messages(PROJECT, "thread_1", PageQuery(limit=10))
        assert [m.id for m in page.items] == ["msg_1"]
    finally:
        await store.close()


async def test_an_unreachable_database_is_unavailable(pg_server: str) -> None:
    port = postgres.free_port()  # nothing listens there
    unreachable = PostgresStore(f"postgresql://postgres@127.0.0.1:{port}/postgres", pool_min=1, pool_max=1)
    with pytest.raises(UnavailableError):
        await unreachable.start()


async def test_calls_after_close_are_unavailable(database: str) -> None:
    closed = PostgresStore(database, pool_min=1, pool_max=1)
    await closed.start()
    await closed.close()
    with pytest.raises(UnavailableError):
        await closed.get_thread(PROJECT, "thread_1")
    with pytest.raises(UnavailableError):
        await closed.insert_thread(PROJECT, thread_pb2.Thread(id="thread_1"), [])


async def test_a_connection_lost_mid_write_is_unavailable_not_internal(
    replicas: Callable[..., Awaitable[PostgresStore]], database: str
) -> None:
    a = await replicas(pool_max=1)
    await queued_run(a)
    raw = await asyncpg.connect(database)
    try:
        async with raw.transaction():
            # A's write waits on the run's row lock held here; its backend is then killed.
            await raw.execute("SELECT 1 FROM runs WHERE id = 'run_1' FOR UPDATE")
            write = asyncio.create_task(a.mutate_run("run_1", transitions.request_cancel(clock.now(), None)))
            waiting = await backend_waiting_for_a_lock(raw)
            await raw.execute("SELECT pg_terminate_backend($1)", waiting)
            with pytest.raises(UnavailableError):
                await asyncio.wait_for(write, BOUND)
    finally:
        await raw.close()
    assert (await a.get_run(PROJECT, "run_1")).status == run_pb2.PENDING  # nothing was written
    cancelled = await a.mutate_run("run_1", transitions.request_cancel(clock.now(), None))
    assert cancelled.run.status == run_pb2.CANCELLED  # the pool replaced the connection


# ---- fan-out across replicas --------------------------------------------------------------------


class Collected:
    """What a replica's events listener received, with a way to wait for an index."""

    def __init__(self, replica: PostgresStore, watched: set[str]) -> None:
        self.events: list[run_pb2.StreamEvent] = []
        self._changed = asyncio.Event()
        replica.add_events_listener(self._receive)
        replica.watch_runs(lambda: watched)

    def _receive(self, batch: Sequence[run_pb2.StreamEvent]) -> None:
        self.events.extend(batch)
        self._changed.set()

    async def wait_for(self, run_id: str, index: int) -> None:
        async def reached() -> None:
            while not any(e.run_id == run_id and e.index >= index for e in self.events):
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(reached(), BOUND)

    def indexes(self, run_id: str) -> list[int]:
        return [e.index for e in self.events if e.run_id == run_id]


async def stream_deltas(replica: PostgresStore, epoch: int, texts: list[str]) -> None:
    for text in texts:
        await replica.mutate_run("run_1", transitions.stream([events.message_delta(text)]), epoch=epoch)


async def test_events_committed_on_one_replica_reach_listeners_on_another(
    replicas: Callable[..., Awaitable[PostgresStore]],
) -> None:
    a = await replicas()
    b = await replicas()
    on_a = Collected(a, {"run_1"})
    on_b = Collected(b, {"run_1"})
    await queued_run(a)
    (claim,) = await a.claim_runs("a", 30, 10, transitions.start(clock.now(), 3600, 3))
    await stream_deltas(a, claim.epoch, [str(i) for i in range(40)])
    done = await a.mutate_run(
        "run_1", transitions.fail(clock.now(), "MODEL_ERROR", "boom"), epoch=claim.epoch
    )
    last = done.events[-1].index
    await on_b.wait_for("run_1", last)
    assert on_b.indexes("run_1") == list(range(last + 1))  # no gap, no duplicate
    assert [e.SerializeToString() for e in on_b.events] == [
        e.SerializeToString() for e in await a.read_events("run_1", 0, 1000)
    ]
    # A published its own commits once, though its own NOTIFYs came back to it too.
    await on_a.wait_for("run_1", last)
    assert on_a.indexes("run_1") == list(range(last + 1))


async def test_local_only_listeners_hear_only_this_replicas_commits(
    replicas: Callable[..., Awaitable[PostgresStore]],
) -> None:
    a = await replicas()
    b = await replicas()
    on_b = Collected(b, {"run_1", "run_2"})
    local_on_b: list[run_pb2.StreamEvent] = []
    b.add_events_listener(local_on_b.extend, local_only=True)
    await queued_run(a, "thread_1", "run_1")
    await queued_run(b, "thread_2", "run_2")
    await on_b.wait_for("run_1", 0)
    await on_b.wait_for("run_2", 0)
    assert [(e.run_id, e.index) for e in local_on_b] == [("run_2", 0)]


async def test_unwatched_runs_are_not_read(replicas: Callable[..., Awaitable[PostgresStore]]) -> None:
    a = await replicas()
    b = await replicas()
    on_b = Collected(b, {"run_2"})
    await queued_run(a, "thread_1", "run_1")
    await queued_run(a, "thread_2", "run_2")  # committed after run_1's: its hint comes after
    await on_b.wait_for("run_2", 0)
    assert on_b.indexes("run_1") == []


async def test_a_lost_listen_connection_is_reopened_and_catches_up(
    replicas: Callable[..., Awaitable[PostgresStore]],
    database: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a = await replicas()
    b = await replicas()
    on_b = Collected(b, {"run_1"})
    await queued_run(a)
    (claim,) = await a.claim_runs("a", 30, 10, transitions.start(clock.now(), 3600, 3))
    await stream_deltas(a, claim.epoch, ["before"])
    await on_b.wait_for("run_1", 2)
    # Hold B's reconnect, so that what A commits next is never NOTIFYed to B.
    holds = Holds(tmp_path)
    hold_at(monkeypatch, holds, "pg.listen_connect")
    raw = await asyncpg.connect(database)
    try:
        await raw.execute("SELECT pg_terminate_backend($1)", b.fanout.server_pid())
    finally:
        await raw.close()
    await asyncio.to_thread(holds.wait_reached, "pg.listen_connect")
    assert not b.fanout.connected.is_set()
    await stream_deltas(a, claim.epoch, [f"missed {i}" for i in range(5)])
    done = await a.mutate_run(
        "run_1", transitions.fail(clock.now(), "MODEL_ERROR", "boom"), epoch=claim.epoch
    )
    holds.release("pg.listen_connect")
    last = done.events[-1].index
    await on_b.wait_for("run_1", last)
    assert on_b.indexes("run_1") == list(range(last + 1))
    assert b.fanout.connects == 2


# ---- messages and a run's start on one thread ------------------------------------------------


async def test_messages_share_the_thread_lock_and_a_run_start_waits_for_them(
    replicas: Callable[..., Awaitable[PostgresStore]], database: str
) -> None:
    store = await replicas()
    await store.insert_thread(PROJECT, thread_pb2.Thread(id="thread_1"), [])
    raw = await asyncpg.connect(database)
    try:
        # `raw` is a message insert of another replica, between its lock and its commit.
        in_flight = raw.transaction()
        await in_flight.start()
        await raw.execute("SELECT 1 FROM threads WHERE id = 'thread_1' FOR SHARE")
        # Another message does not queue behind it...
        async with asyncio.timeout(BOUND):
            await store.insert_message(PROJECT, message_pb2.Message(id="msg_1", thread_id="thread_1"))
        # ...but a run's start does, until that message is committed.
        run = run_pb2.Run(id="run_1", thread_id="thread_1", status=run_pb2.PENDING)
        start = asyncio.create_task(store.insert_run(PROJECT, run, [], clock.now() + 60, []))
        watcher = await asyncpg.connect(database)
        try:
            await backend_waiting_for_a_lock(watcher)
        finally:
            await watcher.close()
        assert not start.done()
        await in_flight.commit()
        async with asyncio.timeout(BOUND):
            await start
    finally:
        await raw.close()
    # Once the run is active, a message is refused and names it; nothing is written.
    with pytest.raises(StateError) as refused:
        await store.insert_message(PROJECT, message_pb2.Message(id="msg_2", thread_id="thread_1"))
    assert refused.value.reason == "THREAD_HAS_ACTIVE_RUN" and "run_1" in str(refused.value)
    with pytest.raises(NotFoundError):
        await store.get_message(PROJECT, "msg_2")
    assert (await store.get_message(PROJECT, "msg_1")).thread_id == "thread_1"
