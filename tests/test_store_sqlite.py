"""The SQLite store on its own: fencing, batching, idempotency records, the single-owner lock."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from spindle.v1 import assistant_pb2, message_pb2, run_pb2, thread_pb2
from spindle_server import clock
from spindle_server.drafts import MessageDraft
from spindle_server.engine import events, transitions
from spindle_server.store.base import PageQuery, RequestKey, RequestReplayed, RunChange, RunFilter
from spindle_server.store.errors import FencedError, NotFoundError, StateError, UnavailableError
from spindle_server.store.sqlite import SqliteStore

PROJECT = "p"


async def queued_run(store: SqliteStore, thread_id: str = "thread_1", run_id: str = "run_1") -> run_pb2.Run:
    await store.insert_thread(PROJECT, thread_pb2.Thread(id=thread_id), [])
    run = run_pb2.Run(id=run_id, thread_id=thread_id, assistant_id="asst_1", status=run_pb2.PENDING)
    run.created_at.CopyFrom(clock.timestamp(clock.now()))
    result = await store.insert_run(PROJECT, run, [], clock.now() + 60, [events.status_change(run)])
    return result.run


async def test_a_superseded_lease_cannot_write(store: SqliteStore) -> None:
    await queued_run(store)
    (first,) = await store.claim_runs("owner-a", 0.01, 10, transitions.start(clock.now(), 3600, 3))
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
    (claim,) = await store.claim_runs("owner", 30, 10, transitions.start(clock.now(), 3600, 3))
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


async def test_a_lone_write_that_fails_leaves_nothing_and_the_next_one_commits(store: SqliteStore) -> None:
    """A batch of one write runs without a SAVEPOINT: its failure rolls its whole transaction back."""

    def half_then_fail(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO threads(id, project, body) VALUES ('thread_half', ?, x'')", (PROJECT,))
        raise StateError("HALF", "failed after its first statement")

    batches = store.db.batches
    with pytest.raises(StateError):
        await store.db.write(half_then_fail)
    assert store.db.batches == batches + 1  # alone in its batch
    with pytest.raises(NotFoundError):
        await store.get_thread(PROJECT, "thread_half")
    await store.insert_thread(PROJECT, thread_pb2.Thread(id="thread_whole"), [])
    assert (await store.get_thread(PROJECT, "thread_whole")).id == "thread_whole"


async def test_a_change_of_many_events_is_stored_whole_and_in_order(store: SqliteStore) -> None:
    """A change's events go in multi-row INSERTs of at most EVENT_ROWS rows: a change of more
    is stored across several, gap-free."""
    await queued_run(store)
    (claim,) = await store.claim_runs("owner", 30, 10, transitions.start(clock.now(), 3600, 3))
    deltas = [events.message_delta(f"w{i} ") for i in range(600)]
    result = await store.mutate_run("run_1", transitions.stream(deltas), epoch=claim.epoch)
    assert [e.index for e in result.events] == list(range(2, 602))
    logged = await store.read_events("run_1", 0, 1000)
    assert [e.index for e in logged] == list(range(602))
    assert "".join(e.message_delta.text for e in logged[2:]) == "".join(f"w{i} " for i in range(600))


async def test_writes_are_durable_and_keep_savepoint_undo_in_memory(store: SqliteStore) -> None:
    # Each write of a group commit runs under a SAVEPOINT; SQLite keeps its undo pages in a
    # temporary file unless temp_store is MEMORY, which about halved the append path's speed.
    def pragmas(conn: sqlite3.Connection) -> tuple[int, int, str]:
        synchronous = conn.execute("PRAGMA synchronous").fetchone()[0]
        temp_store = conn.execute("PRAGMA temp_store").fetchone()[0]
        journal = conn.execute("PRAGMA journal_mode").fetchone()[0]
        return synchronous, temp_store, journal

    assert await store.db.write(pragmas) == (2, 2, "wal")  # FULL, MEMORY, WAL


async def test_one_active_run_per_thread_is_enforced_in_the_transaction(store: SqliteStore) -> None:
    await queued_run(store)
    second = run_pb2.Run(id="run_2", thread_id="thread_1", status=run_pb2.PENDING)
    with pytest.raises(StateError):
        await store.insert_run(PROJECT, second, [], clock.now() + 60, [])
    with pytest.raises(StateError):
        await store.insert_message(PROJECT, message_pb2.Message(id="msg_1", thread_id="thread_1"))


def request_key(request_id: str = "r1", fingerprint: str = "f1", method: str = "runs.create") -> RequestKey:
    return RequestKey(PROJECT, method, request_id, fingerprint)


def new_run(run_id: str, thread_id: str = "thread_1") -> run_pb2.Run:
    return run_pb2.Run(id=run_id, thread_id=thread_id, assistant_id="asst_1", status=run_pb2.PENDING)


async def test_the_answer_commits_with_the_change_and_a_replay_changes_nothing(store: SqliteStore) -> None:
    await store.insert_thread(PROJECT, thread_pb2.Thread(id="thread_1"), [])
    first = request_key()
    created = await store.insert_run(PROJECT, new_run("run_1"), [], clock.now() + 60, [], record=first)
    assert first.recorded
    stored = await store.get_request(PROJECT, first.key)
    assert stored is not None and stored.fingerprint == "f1"
    assert run_pb2.Run.FromString(stored.response) == created.run
    # The same request_id again (a retry that missed the answer): refused inside the transaction
    # with the first answer, before its own change is tried (it would be THREAD_HAS_ACTIVE_RUN).
    with pytest.raises(RequestReplayed) as replayed:
        await store.insert_run(PROJECT, new_run("run_2"), [], clock.now() + 60, [], record=request_key())
    assert replayed.value.record == stored
    runs = await store.list_runs(
        PROJECT, RunFilter(thread_id="thread_1"), PageQuery(limit=10, descending=False)
    )
    assert [r.id for r in runs.items] == ["run_1"]


async def test_queued_twins_apply_once_and_share_the_answer(store: SqliteStore) -> None:
    await store.insert_thread(PROJECT, thread_pb2.Thread(id="thread_1"), [])
    twins = [message_pb2.Message(id=f"msg_{i}", thread_id="thread_1") for i in range(5)]
    results = await asyncio.gather(
        *(store.insert_message(PROJECT, m, record=request_key(method="messages.create")) for m in twins),
        return_exceptions=True,
    )
    assert results[0] == twins[0].SerializeToString()  # queued first, so written first
    assert all(isinstance(r, RequestReplayed) for r in results[1:])
    answers = {r.record.response for r in results[1:] if isinstance(r, RequestReplayed)}
    assert answers == {twins[0].SerializeToString()}
    page = await store.list_messages(PROJECT, "thread_1", PageQuery(limit=10, descending=False))
    assert [m.id for m in page.items] == ["msg_0"]


async def test_a_different_request_under_the_same_id_changes_nothing(store: SqliteStore) -> None:
    await queued_run(store)
    cancel = transitions.request_cancel(clock.now(), None)
    await store.mutate_run("run_1", cancel, record=request_key("c", "f1", "runs.cancel"))
    with pytest.raises(RequestReplayed) as replayed:
        note = transitions.stream([events.message_delta("not applied")])
        await store.mutate_run("run_1", note, record=request_key("c", "other", "runs.cancel"))
    assert replayed.value.record.fingerprint == "f1"
    logged = await store.read_events("run_1", 0, 100)
    assert not [e for e in logged if e.type == run_pb2.StreamEvent.PARTIAL_MESSAGE]


async def test_a_failed_write_records_no_answer(store: SqliteStore) -> None:
    key = request_key(method="messages.create")
    with pytest.raises(NotFoundError):
        await store.insert_message(PROJECT, message_pb2.Message(id="msg_1", thread_id="thread_9"), record=key)
    assert not key.recorded
    assert await store.get_request(PROJECT, key.key) is None


async def test_every_write_records_its_answer(store: SqliteStore) -> None:
    """Each write an API method makes stores what that method answers."""
    keys = {name: request_key(name, method=name) for name in ANSWERING_WRITES}
    assistant = assistant_pb2.Assistant(id="asst_1", name="a")
    await store.insert_assistant(PROJECT, assistant, record=keys["assistants.create"])
    renamed_assistant = await store.update_assistant(
        PROJECT, "asst_1", lambda a: setattr(a, "name", "b"), record=keys["assistants.update"]
    )
    await store.delete_assistant(PROJECT, "asst_1", record=keys["assistants.delete"])
    thread = thread_pb2.Thread(id="thread_1", name="t")
    await store.insert_thread(PROJECT, thread, [], record=keys["threads.create"])
    renamed = await store.update_thread(
        PROJECT, "thread_1", lambda t: setattr(t, "name", "u"), record=keys["threads.update"]
    )
    message = message_pb2.Message(id="msg_1", thread_id="thread_1")
    await store.insert_message(PROJECT, message, record=keys["messages.create"])
    created = await store.insert_run(
        PROJECT, new_run("run_1"), [], clock.now() + 60, [], record=keys["runs.create"]
    )
    relabelled = await store.update_run_labels(PROJECT, "run_1", {"a": "b"}, record=keys["runs.update"])
    cancelled = await store.mutate_run(
        "run_1", transitions.request_cancel(clock.now(), None), record=keys["runs.cancel"]
    )
    await store.insert_thread(PROJECT, thread_pb2.Thread(id="thread_2"), [])
    await store.delete_thread(PROJECT, "thread_2", record=keys["threads.delete"])
    expected = {
        "assistants.create": assistant.SerializeToString(),
        "assistants.update": renamed_assistant.SerializeToString(),
        "assistants.delete": b"",
        "threads.create": thread.SerializeToString(),
        "threads.update": renamed.SerializeToString(),
        "threads.delete": b"",
        "messages.create": message.SerializeToString(),
        "runs.create": created.run.SerializeToString(),
        "runs.update": relabelled.SerializeToString(),
        "runs.cancel": cancelled.run.SerializeToString(),
    }
    assert set(expected) == set(ANSWERING_WRITES)
    for name, answer in expected.items():
        assert keys[name].recorded, name
        stored = await store.get_request(PROJECT, keys[name].key)
        assert stored is not None and stored.response == answer, name


ANSWERING_WRITES = (
    "assistants.create",
    "assistants.update",
    "assistants.delete",
    "threads.create",
    "threads.update",
    "threads.delete",
    "messages.create",
    "runs.create",
    "runs.update",
    "runs.cancel",
)


async def test_saved_answers_keep_the_first_and_expire(store: SqliteStore) -> None:
    first = await store.save_request(request_key(), b"first")
    assert first.response == b"first"
    kept = await store.save_request(request_key(fingerprint="f2"), b"second")
    assert kept == first
    assert await store.purge_requests(clock.now() + 1) == 1
    assert await store.get_request(PROJECT, request_key().key) is None


async def test_reservations_left_by_the_old_scheme_are_dropped(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old = SqliteStore(path)
    await old.start()

    def reserve(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO idempotency(project, key, fingerprint, response, created_at)"
            " VALUES (?, ?, ?, NULL, ?)",
            (PROJECT, "runs.create:r1", "f1", clock.now()),
        )

    await old.db.write(reserve)
    await old.close()
    reopened = SqliteStore(path)
    await reopened.start()
    try:
        assert await reopened.get_request(PROJECT, "runs.create:r1") is None
    finally:
        await reopened.close()


async def test_pages_follow_the_cursor(store: SqliteStore) -> None:
    for i in range(5):
        await store.insert_thread(PROJECT, thread_pb2.Thread(id=f"thread_{i}"), [])
    first = await store.list_threads(PROJECT, PageQuery(limit=2, descending=False))
    assert [t.id for t in first.items] == ["thread_0", "thread_1"] and first.next_seq is not None
    rest = await store.list_threads(PROJECT, PageQuery(limit=10, after_seq=first.next_seq, descending=False))
    assert [t.id for t in rest.items] == ["thread_2", "thread_3", "thread_4"] and rest.next_seq is None
    assert (await store.list_threads("other", PageQuery(limit=10, descending=False))).items == []


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


async def test_a_lookup_reads_the_latest_commit_and_keeps_no_snapshot(store: SqliteStore) -> None:
    """Gets are one autocommit SELECT on the event loop's connection (no BEGIN/COMMIT): each
    sees what committed before it, and none leaves its read transaction open, which would hold
    the WAL back (a TRUNCATE checkpoint could not finish past that reader's snapshot)."""
    await queued_run(store)
    assert (await store.get_run(PROJECT, "run_1")).labels == {}
    assert await store.get_run_any_project("run_1") is not None
    await store.update_run_labels(PROJECT, "run_1", {"k": "v"})
    assert (await store.get_run(PROJECT, "run_1")).labels == {"k": "v"}
    with pytest.raises(NotFoundError):
        await store.get_run("other", "run_1")
    assert (await store.get_last_run(PROJECT, "thread_1")).labels == {"k": "v"}
    assert await store.db.checkpoint()


async def test_a_draft_becomes_a_message_in_the_batch_that_writes_it(store: SqliteStore) -> None:
    """MessageService.Create's hot path: the store builds each draft's message (a new id, the
    commit's time) and answers its bytes as written; one refused fails alone."""
    await store.insert_thread(PROJECT, thread_pb2.Thread(id="thread_a"), [])
    await queued_run(store, "thread_busy", "run_busy")
    parts = [message_pb2.ContentPart(text=message_pb2.TextPart(text="two"))]
    drafts = [
        (PROJECT, MessageDraft("thread_a", message_pb2.MESSAGE_ROLE_UNSPECIFIED, "one", {}, PROJECT)),
        (PROJECT, MessageDraft("thread_missing", message_pb2.USER, "lost", {}, PROJECT)),
        ("other", MessageDraft("thread_a", message_pb2.USER, "elsewhere", {}, "other")),
        (PROJECT, MessageDraft("thread_busy", message_pb2.USER, "busy", {}, PROJECT)),
        (PROJECT, MessageDraft("thread_a", message_pb2.ASSISTANT, parts, {"k": "v"}, PROJECT)),
    ]
    before = clock.now()
    outcomes = await asyncio.gather(*(store.create_message(p, d) for p, d in drafts), return_exceptions=True)
    after = clock.now()
    assert isinstance(outcomes[1], NotFoundError) and isinstance(outcomes[2], NotFoundError)
    assert isinstance(outcomes[3], StateError) and outcomes[3].reason == "THREAD_HAS_ACTIVE_RUN"
    first, last = (message_pb2.Message.FromString(outcomes[i]) for i in (0, 4))  # type: ignore[arg-type]
    assert first.id.startswith("msg_") and last.id.startswith("msg_") and first.id != last.id
    assert (first.thread_id, first.role, first.content[0].text.text) == ("thread_a", message_pb2.USER, "one")
    assert (last.role, dict(last.labels), list(last.content)) == (message_pb2.ASSISTANT, {"k": "v"}, parts)
    assert first.created_by == last.created_by == PROJECT
    assert before <= clock.seconds_of(first.created_at) <= after
    stored = await store.list_messages(PROJECT, "thread_a", PageQuery(limit=10, descending=False))
    assert {m.id: m for m in stored.items} == {first.id: first, last.id: last}  # any order (PostgreSQL)
    assert (await store.list_messages(PROJECT, "thread_busy", PageQuery(limit=10))).items == []


async def test_a_draft_that_cannot_be_built_fails_alone(store: SqliteStore) -> None:
    await store.insert_thread(PROJECT, thread_pb2.Thread(id="thread_a"), [])
    broken = MessageDraft("thread_a", message_pb2.USER, "bad", {"k": 1}, PROJECT)  # type: ignore[dict-item]
    fine = MessageDraft("thread_a", message_pb2.USER, "fine", {}, PROJECT)
    outcomes = await asyncio.gather(
        store.create_message(PROJECT, broken), store.create_message(PROJECT, fine), return_exceptions=True
    )
    assert isinstance(outcomes[0], TypeError)
    stored = await store.list_messages(PROJECT, "thread_a", PageQuery(limit=10))
    assert [m.SerializeToString() for m in stored.items] == [outcomes[1]]


def _message(message_id: str, thread_id: str) -> message_pb2.Message:
    return message_pb2.Message(id=message_id, thread_id=thread_id, role=message_pb2.USER)


async def test_a_batch_of_messages_is_one_commit_and_each_gets_its_own_answer(store: SqliteStore) -> None:
    """Messages queued in one turn of the loop are one statement in one commit; one refused
    (no such thread, another project's thread, an active run, an id taken) fails alone."""
    for thread_id in ("thread_a", "thread_b"):
        await store.insert_thread(PROJECT, thread_pb2.Thread(id=thread_id), [])
    await queued_run(store, "thread_busy", "run_busy")
    await store.insert_message(PROJECT, _message("msg_taken", "thread_a"))
    writes = [
        (PROJECT, _message("msg_1", "thread_a")),
        (PROJECT, _message("msg_2", "thread_missing")),
        (PROJECT, _message("msg_3", "thread_b")),
        ("other", _message("msg_4", "thread_a")),
        (PROJECT, _message("msg_5", "thread_busy")),
        (PROJECT, _message("msg_6", "thread_a")),
    ]
    batches = store.db.batches
    outcomes = await asyncio.gather(*(store.insert_message(p, m) for p, m in writes), return_exceptions=True)
    assert store.db.batches == batches + 1
    # Each stored message answers its bytes as written (MessageService.Create sends them as they are).
    for i in (0, 2, 5):
        assert outcomes[i] == writes[i][1].SerializeToString()
    assert isinstance(outcomes[1], NotFoundError) and isinstance(outcomes[3], NotFoundError)
    assert isinstance(outcomes[4], StateError) and outcomes[4].reason == "THREAD_HAS_ACTIVE_RUN"
    in_a = await store.list_messages(PROJECT, "thread_a", PageQuery(limit=10, descending=False))
    assert [m.id for m in in_a.items] == ["msg_taken", "msg_1", "msg_6"]
    assert [
        m.id
        for m in (await store.list_messages(PROJECT, "thread_b", PageQuery(limit=10, descending=False))).items
    ] == ["msg_3"]

    # An id taken fails its statement: each message then goes alone, and only that one fails.
    again = [_message("msg_7", "thread_b"), _message("msg_taken", "thread_b"), _message("msg_8", "thread_b")]
    outcomes = await asyncio.gather(
        *(store.insert_message(PROJECT, m) for m in again), return_exceptions=True
    )
    assert outcomes[0] == again[0].SerializeToString() and outcomes[2] == again[2].SerializeToString()
    assert isinstance(outcomes[1], sqlite3.IntegrityError)
    in_b = await store.list_messages(PROJECT, "thread_b", PageQuery(limit=10, descending=False))
    assert [m.id for m in in_b.items] == ["msg_3", "msg_7", "msg_8"]

    # Beside other writes, in one transaction: a message sees the thread created before it.
    batches = store.db.batches
    await asyncio.gather(
        store.insert_thread(PROJECT, thread_pb2.Thread(id="thread_c"), []),
        store.insert_message(PROJECT, _message("msg_9", "thread_c")),
    )
    assert store.db.batches == batches + 1
    assert [
        m.id
        for m in (await store.list_messages(PROJECT, "thread_c", PageQuery(limit=10, descending=False))).items
    ] == ["msg_9"]
