"""The SQLite store on its own: fencing, batching, idempotency records, the single-owner lock."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from spindle.v1 import message_pb2, run_pb2, thread_pb2
from spindle_server import clock
from spindle_server.engine import events, transitions
from spindle_server.store.base import PageQuery, RunChange
from spindle_server.store.errors import FencedError, StateError, UnavailableError
from spindle_server.store.sqlite import ABANDONED_RESERVATION_SECONDS, SqliteStore

PROJECT = "p"


async def queued_run(store: SqliteStore, thread_id: str = "thread_1", run_id: str = "run_1") -> run_pb2.Run:
    await store.insert_thread(PROJECT, thread_pb2.Thread(id=thread_id), [])
    run = run_pb2.Run(id=run_id, thread_id=thread_id, assistant_id="asst_1", status=run_pb2.PENDING)
    run.created_at.CopyFrom(clock.timestamp(clock.now()))
    result = await store.insert_run(PROJECT, run, [], clock.now() + 60, [events.status_change(run)])
    return result.run


async def test_a_superseded_lease_cannot_write(store: SqliteStore) -> None:
    await queued_run(store)
    (first,) = await store.claim_runs("owner-a", 0.01, 10, transitions.start(clock.now(), 3600))
    await asyncio.sleep(0.05)  # the lease runs out: owner-a is presumed dead
    second = await store.reclaim_run("run_1", "owner-b", 30, transitions.recover(clock.now(), 3))
    assert second is not None and second.epoch == first.epoch + 1
    with pytest.raises(FencedError):
        await store.mutate_run("run_1", transitions.stream([events.message_delta("late")]), epoch=first.epoch)
    assert not await store.renew_lease("run_1", "owner-a", first.epoch, 30)
    await store.mutate_run("run_1", transitions.stream([events.message_delta("ok")]), epoch=second.epoch)
    logged = await store.read_events("run_1", 0, 100)
    assert [e.index for e in logged] == list(range(len(logged)))
    assert [e.message_delta.text for e in logged if e.type == run_pb2.StreamEvent.PARTIAL_MESSAGE] == ["ok"]


async def test_concurrent_writes_share_commits_and_keep_indexes_gap_free(store: SqliteStore) -> None:
    await queued_run(store)
    (claim,) = await store.claim_runs("owner", 30, 10, transitions.start(clock.now(), 3600))
    batches_before = store.db.batches
    await asyncio.gather(
        *(
            store.mutate_run("run_1", transitions.stream([events.message_delta(str(i))]), epoch=claim.epoch)
            for i in range(200)
        )
    )
    assert store.db.batches - batches_before < 200  # many writes per commit (one fsync each)
    logged = await store.read_events("run_1", 0, 1000)
    assert [e.index for e in logged] == list(range(len(logged)))
    assert len(logged) == 2 + 200


async def test_a_failing_write_does_not_undo_the_others(store: SqliteStore) -> None:
    await queued_run(store)

    def refuse(run: run_pb2.Run) -> RunChange:
        raise StateError("NOPE", "refused")

    def note(run: run_pb2.Run) -> RunChange:
        return RunChange(run, [events.message_delta("kept")])

    results = await asyncio.gather(
        store.mutate_run("run_1", refuse), store.mutate_run("run_1", note), return_exceptions=True
    )
    assert isinstance(results[0], StateError) and not isinstance(results[1], BaseException)
    texts = [e.message_delta.text for e in await store.read_events("run_1", 0, 10)]
    assert "kept" in texts


async def test_one_active_run_per_thread_is_enforced_in_the_transaction(store: SqliteStore) -> None:
    await queued_run(store)
    second = run_pb2.Run(id="run_2", thread_id="thread_1", status=run_pb2.PENDING)
    with pytest.raises(StateError):
        await store.insert_run(PROJECT, second, [], clock.now() + 60, [])
    with pytest.raises(StateError):
        await store.insert_message(PROJECT, message_pb2.Message(id="msg_1", thread_id="thread_1"))


async def test_abandoned_request_reservations_are_taken_over(store: SqliteStore) -> None:
    assert await store.reserve_request(PROJECT, "k", "f1") is None
    pending = await store.reserve_request(PROJECT, "k", "f1")
    assert pending is not None and pending.response is None  # still being served

    def age(conn: sqlite3.Connection) -> None:
        conn.execute(
            "UPDATE idempotency SET created_at = created_at - ?", (ABANDONED_RESERVATION_SECONDS + 1,)
        )

    await store.db.write(age)
    assert await store.reserve_request(PROJECT, "k", "f2") is None  # its server died: free again
    await store.complete_request(PROJECT, "k", b"answer")
    done = await store.reserve_request(PROJECT, "k", "f2")
    assert done is not None and done.response == b"answer"
    assert await store.purge_requests(clock.now() + 1) == 1
    assert await store.reserve_request(PROJECT, "k", "f3") is None


async def test_pages_follow_the_cursor(store: SqliteStore) -> None:
    for i in range(5):
        await store.insert_thread(PROJECT, thread_pb2.Thread(id=f"thread_{i}"), [])
    first = await store.list_threads(PROJECT, PageQuery(limit=2, descending=False))
    assert [t.id for t in first.items] == ["thread_0", "thread_1"] and first.next_seq is not None
    rest = await store.list_threads(PROJECT, PageQuery(limit=10, after_seq=first.next_seq, descending=False))
    assert [t.id for t in rest.items] == ["thread_2", "thread_3", "thread_4"] and rest.next_seq is None
    assert (await store.list_threads("other", PageQuery(limit=10))).items == []


async def test_the_database_has_one_owner(tmp_path: Path) -> None:
    first = SqliteStore(tmp_path / "owned.db")
    await first.start()
    try:
        second = SqliteStore(tmp_path / "owned.db")
        with pytest.raises(UnavailableError):
            await second.start()
    finally:
        await first.close()
    again = SqliteStore(tmp_path / "owned.db")
    await again.start()  # released on close
    await again.close()
