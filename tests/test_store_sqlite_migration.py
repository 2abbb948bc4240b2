"""A SQLite database made by an older version, opened by this one: the messages table was
AUTOINCREMENT and is rebuilt as a plain rowid table at start, keeping every message, its seq (so
order and page tokens issued before hold) and its lookups by id."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from spindle.v1 import common_pb2, message_pb2, thread_pb2
from spindle_server.api.paging import next_page_token
from spindle_server.store.base import Page, PageQuery
from spindle_server.store.sqlite import SCHEMA, SqliteStore
from support.server import ServerProcess
from support.stubs import Stubs

pytestmark = pytest.mark.sqlite_only  # a SQLite file's schema

PROJECT = "default"  # the project of a server without API keys
# The messages table as versions before this one made it (the rest of SCHEMA is unchanged).
OLD_MESSAGES = """
CREATE TABLE messages (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL UNIQUE,
  project TEXT NOT NULL,
  thread_id TEXT NOT NULL,
  run_id TEXT NOT NULL DEFAULT '',
  body BLOB NOT NULL
);
CREATE INDEX messages_thread ON messages(thread_id, seq);
"""
# Inserted in this order; "gone" is a thread deleted before the upgrade, whose messages had
# seqs in the middle and at the top (so sqlite_sequence stays above the largest seq left).
MESSAGES_SQL = "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'messages'"
ROWS = "SELECT seq, id, project, thread_id, run_id, body FROM messages ORDER BY seq"
ORDER = ["a1", "b1", "gone1", "a2", "a3", "b2", "a4", "a5", "gone2", "gone3"]


def old_database(path: Path) -> dict[str, int]:
    """An old-schema file with threads a and b and their messages; each message's seq by name."""
    with sqlite3.connect(path) as db:
        db.executescript(OLD_MESSAGES + SCHEMA)
        for name in ("a", "b", "gone"):
            thread = thread_pb2.Thread(id=f"thread_{name}", created_by=PROJECT)
            db.execute(
                "INSERT INTO threads(id, project, body) VALUES (?, ?, ?)",
                (thread.id, PROJECT, thread.SerializeToString()),
            )
        for name in ORDER:
            message = message_pb2.Message(
                id=f"msg_{name}", thread_id=f"thread_{name[:-1]}", role=message_pb2.USER, created_by=PROJECT
            )
            message.content.add().text.text = name
            db.execute(
                "INSERT INTO messages(id, project, thread_id, body) VALUES (?, ?, ?, ?)",
                (message.id, PROJECT, message.thread_id, message.SerializeToString()),
            )
        db.execute("DELETE FROM messages WHERE thread_id = 'thread_gone'")
        db.execute("DELETE FROM threads WHERE id = 'thread_gone'")
        seqs = dict(db.execute("SELECT substr(id, 5), seq FROM messages"))
        (top,) = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchone()
    assert top == len(ORDER) > max(seqs.values())  # the old table would never give 8-10 again
    return seqs


def messages_table(path: Path) -> tuple[str, list[str], int]:
    """The messages table's SQL, its indexes' names, and its rows in sqlite_sequence."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        (sql,) = db.execute(MESSAGES_SQL).fetchone()
        indexes = [row[0] for row in db.execute("SELECT name FROM pragma_index_list('messages')")]
        (counters,) = db.execute("SELECT COUNT(*) FROM sqlite_sequence WHERE name = 'messages'").fetchone()
    return sql, sorted(indexes), counters


def list_all(
    stubs: Stubs,
    thread_id: str,
    order: common_pb2.SortOrder.ValueType,
    page_token: str = "",
    page_size: int = 2,
) -> list[str]:
    """The texts of a thread's messages, every page followed from `page_token`."""
    texts: list[str] = []
    while True:
        page = stubs.messages.List(
            message_pb2.ListMessagesRequest(
                thread_id=thread_id, page_size=page_size, page_token=page_token, order=order
            )
        )
        texts += [m.content[0].text.text for m in page.messages]
        page_token = page.next_page_token
        if not page_token:
            return texts


def old_token(thread_id: str, after_seq: int, descending: bool) -> str:
    """A page token as the old server issued it: its format and its seqs are unchanged."""
    query = PageQuery(limit=2, after_seq=None, descending=descending)
    return next_page_token(Page([], after_seq), query, f"messages:{thread_id}:")


def test_an_old_database_keeps_its_messages_order_and_page_tokens(
    tmp_path: Path, make_server: Callable[..., ServerProcess]
) -> None:
    path = tmp_path / "old.db"
    seqs = old_database(path)
    # Tokens a client got from the old server: after a2, ascending; after a4, descending.
    ascending_token = old_token("thread_a", seqs["a2"], descending=False)
    descending_token = old_token("thread_a", seqs["a4"], descending=True)

    server = make_server(database=path)
    stubs = Stubs.connect(server.address)
    try:
        # The rebuild says what it did (it takes a while on a large database).
        rebuilt = server.wait_for_log(lambda e: e.get("event") == "sqlite_messages_rebuilt", timeout=30)
        assert rebuilt["messages"] == len(seqs)
        sql, indexes, counters = messages_table(path)
        assert "AUTOINCREMENT" not in sql.upper()
        assert indexes == ["messages_thread", "sqlite_autoindex_messages_1"]  # the thread's, UNIQUE(id)
        assert counters == 0

        a = ["a1", "a2", "a3", "a4", "a5"]
        assert list_all(stubs, "thread_a", common_pb2.ASC) == a
        assert list_all(stubs, "thread_a", common_pb2.DESC) == a[::-1]
        assert list_all(stubs, "thread_b", common_pb2.ASC, page_size=1) == ["b1", "b2"]
        assert list_all(stubs, "thread_a", common_pb2.ASC, ascending_token) == ["a3", "a4", "a5"]
        assert list_all(stubs, "thread_a", common_pb2.DESC, descending_token) == ["a3", "a2", "a1"]
        got = stubs.messages.Get(message_pb2.GetMessageRequest(message_id="msg_a3"))
        assert got.content[0].text.text == "a3" and got.thread_id == "thread_a"

        # A new message takes the seq after the largest left (one the deleted thread once had):
        # it is still above every message of its thread, so it comes last, and a token issued
        # before it, at the old last message, leads to it.
        created = stubs.messages.Create(message_pb2.CreateMessageRequest(thread_id="thread_a", text="a6"))
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            (seq,) = db.execute("SELECT seq FROM messages WHERE id = ?", (created.id,)).fetchone()
        assert seq == max(seqs.values()) + 1
        assert list_all(stubs, "thread_a", common_pb2.ASC) == [*a, "a6"]
        assert list_all(stubs, "thread_a", common_pb2.DESC, page_size=4) == ["a6", *a[::-1]]
        assert list_all(stubs, "thread_a", common_pb2.ASC, old_token("thread_a", seqs["a5"], False)) == ["a6"]
        # The deleted thread's messages stay gone, and its listing with them.
        with pytest.raises(grpc.RpcError) as refused:
            list_all(stubs, "thread_gone", common_pb2.ASC, old_token("thread_gone", seqs["b2"], False))
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        stubs.close()


async def test_the_rebuild_runs_once_and_keeps_every_row(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    seqs = old_database(path)
    with sqlite3.connect(path) as db:
        before = db.execute(ROWS).fetchall()
    for _ in range(2):  # the second start finds the new table and leaves it alone
        store = SqliteStore(path)
        await store.start()
        try:
            in_a = await store.thread_messages("thread_a")
            assert [m.content[0].text.text for m in in_a] == ["a1", "a2", "a3", "a4", "a5"]
        finally:
            await store.close()
        with sqlite3.connect(path) as db:
            after = db.execute(ROWS).fetchall()
            (rebuilt,) = db.execute(
                "SELECT COUNT(*) FROM sqlite_master WHERE name = 'messages_rebuilt'"
            ).fetchone()
        assert after == before and rebuilt == 0
        assert "AUTOINCREMENT" not in messages_table(path)[0].upper()
    assert sorted(seqs.values()) == [seq for seq, *_ in before]


async def test_a_new_database_has_no_counter_for_messages(store: SqliteStore) -> None:
    await store.insert_thread(PROJECT, thread_pb2.Thread(id="thread_1"), [])
    await store.insert_message(PROJECT, message_pb2.Message(id="msg_1", thread_id="thread_1"))
    sql, indexes, counters = messages_table(store.db.path)
    assert "AUTOINCREMENT" not in sql.upper()
    assert indexes == ["messages_thread", "sqlite_autoindex_messages_1"]
    assert counters == 0
