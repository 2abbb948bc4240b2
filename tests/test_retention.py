"""Retention: finished runs are deleted after --retention (NOT_FOUND afterwards), the database
stops growing under a steady load, and deleting a thread takes everything of it along.

Tests wait for the sweep by polling for its effect, with generous failure bounds; nothing
depends on how fast the sweep runs.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from spindle.v1 import common_pb2, message_pb2, run_pb2, thread_pb2
from spindle_server import clock
from spindle_server.config import parse_config, parse_duration
from spindle_server.engine import events
from spindle_server.engine.retention import sweep_interval
from spindle_server.store import sqlite_db
from spindle_server.store.base import RunChange
from spindle_server.store.errors import NotFoundError
from spindle_server.store.sqlite import SqliteStore
from support.faults import Holds
from support.server import ServerProcess
from support.stubs import TERMINAL, Stubs, error_details

SWEEP_BOUND_SECONDS = 30.0  # failure bound for a sweep to happen, never a time relied on


def read_db(database: Path, sql: str, *args: object) -> list[tuple[Any, ...]]:
    """Read the server's SQLite file directly (read-only, alongside the running server)."""
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        return db.execute(sql, args).fetchall()


def await_not_found(stubs: Stubs, run_ids: list[str]) -> None:
    deadline = time.monotonic() + SWEEP_BOUND_SECONDS
    pending = list(run_ids)
    while pending:
        try:
            stubs.runs.Get(run_pb2.GetRunRequest(run_id=pending[-1]), timeout=10)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND, error
            pending.pop()
            continue
        assert time.monotonic() < deadline, f"{len(pending)} finished runs outlived the retention"
        time.sleep(0.05)


def submit(stubs: Stubs, run_id: str, output: str) -> None:
    calls = stubs.wait(run_id).required_tool_calls
    results = [common_pb2.ToolResult(tool_call_id=call.id, output=output) for call in calls]
    stubs.runs.SubmitToolResults(run_pb2.SubmitToolResultsRequest(run_id=run_id, tool_results=results))


def rows_of_run(database: Path, run_id: str) -> dict[str, int]:
    return {
        table: int(read_db(database, f"SELECT COUNT(*) FROM {table} WHERE {column} = ?", run_id)[0][0])
        for table, column in (
            ("runs", "id"),
            ("run_events", "run_id"),
            ("run_steps", "run_id"),
            ("step_texts", "run_id"),
            ("runs_finished", "run_id"),
        )
    }


@pytest.mark.sqlite_only("reads the SQLite file")
def test_finished_runs_are_deleted_after_the_retention(make_server: Callable[..., ServerProcess]) -> None:
    server = make_server("--retention", "1s", "--tool-timeout", "600")
    stubs = Stubs.connect(server.address)
    assistant = stubs.tool_assistant("get_weather")
    thread = stubs.thread("/tool get_weather {}")
    finished = stubs.run(assistant.id, thread.id)
    submit(stubs, finished.id, "sunny")
    done = stubs.wait(finished.id)
    assert done.status == run_pb2.COMPLETED
    assert rows_of_run(server.sqlite_path, finished.id) == {
        "runs": 1,
        "run_events": len(stubs.events(finished.id)),
        "run_steps": 2,  # the tool calls, then the reply
        "step_texts": 1,  # what the model said before its tool calls
        "runs_finished": 1,
    }
    # A run that is still waiting for tool results is never deleted, however old it gets.
    waiting = stubs.run(assistant.id, stubs.thread("/tool get_weather {}").id)
    assert stubs.wait(waiting.id).status == run_pb2.TOOL_CALLS

    await_not_found(stubs, [finished.id])
    for call in (
        lambda: stubs.runs.Get(run_pb2.GetRunRequest(run_id=finished.id), timeout=10),
        lambda: stubs.events(finished.id),
        lambda: stubs.runs.ListSteps(run_pb2.ListRunStepsRequest(run_id=finished.id), timeout=10),
    ):
        with pytest.raises(grpc.RpcError) as gone:
            call()
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
        info, _ = error_details(gone.value)
        assert info is not None and info.reason == "RUN_NOT_FOUND"
    assert rows_of_run(server.sqlite_path, finished.id) == dict.fromkeys(
        ("runs", "run_events", "run_steps", "step_texts", "runs_finished"), 0
    )
    # The reply stays on the thread (messages belong to the thread), naming the run it came from.
    messages = stubs.messages.List(message_pb2.ListMessagesRequest(thread_id=thread.id), timeout=10).messages
    assert [m.run_id for m in messages] == [finished.id, ""]  # newest first
    # The thread can go on with a new run.
    again = stubs.run(
        assistant.id, thread.id, tool_choice=common_pb2.ToolChoice(mode=common_pb2.ToolChoice.NONE)
    )
    assert stubs.wait(again.id).status == run_pb2.COMPLETED

    assert stubs.wait(waiting.id).status == run_pb2.TOOL_CALLS
    assert rows_of_run(server.sqlite_path, waiting.id)["runs"] == 1
    stubs.close()


@pytest.mark.sqlite_only("measures the SQLite file and its WAL")
def test_the_database_stops_growing_under_steady_load(
    make_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """Waves of runs on a fixed pool of threads, each run failing or cancelled in TOOL_CALLS, so
    the threads themselves do not grow (no reply is added): every byte a wave adds belongs to
    its runs (their bodies, steps and events), which retention deletes.

    The sweeper is held (fault point retention.sweep) while a wave is written, then let go
    sweep by sweep until the whole wave is NOT_FOUND: so exactly one wave is in the database
    at its peak, every time, whatever the machine's speed. The bound: SQLite reuses the pages a
    sweep frees, so the page count (what the database holds, WAL included) rises to the pool
    plus one wave and then holds, give or take b-tree fragmentation, while without retention
    every wave would add `wave_bytes`. The WAL file is cut back to JOURNAL_SIZE_LIMIT when it
    restarts after a checkpoint (and to zero by the sweep's TRUNCATE checkpoint), so it stays
    under that limit plus one autocheckpoint's worth of pages plus a commit.
    """
    holds = Holds(tmp_path / "holds")
    server = make_server("--retention", "0.3", "--tool-timeout", "600", env=holds.env("retention.sweep"))
    stubs = Stubs.connect(server.address)
    assistant = stubs.tool_assistant("get_weather")
    instructions = "steady load " * 800  # ~10 KB, carried by the run and every status event
    pool = [stubs.thread("/fail boom") for _ in range(8)] + [
        stubs.thread("/tool get_weather {}") for _ in range(8)
    ]
    arrival = 1
    holds.wait_reached("retention.sweep", arrival)

    def wave() -> list[str]:
        runs = [stubs.run(assistant.id, t.id, instructions=instructions) for t in pool]
        for run in runs:
            if stubs.wait(run.id).status == run_pb2.TOOL_CALLS:
                stubs.runs.Cancel(run_pb2.CancelRunRequest(run_id=run.id), timeout=10)
            assert stubs.wait(run.id).status in TERMINAL
        return [run.id for run in runs]

    def gone(run_ids: list[str]) -> bool:
        placeholders = ",".join("?" * len(run_ids))
        return read_db(
            server.sqlite_path, f"SELECT COUNT(*) FROM runs WHERE id IN ({placeholders})", *run_ids
        ) == [(0,)]

    def sweep_until_gone(run_ids: list[str]) -> None:
        nonlocal arrival
        deadline = time.monotonic() + SWEEP_BOUND_SECONDS
        while not gone(run_ids):
            assert time.monotonic() < deadline, "the sweeps did not delete a finished wave"
            holds.release("retention.sweep", arrival)
            arrival += 1
            holds.wait_reached("retention.sweep", arrival)  # that sweep is over
        await_not_found(stubs, run_ids)

    def logical_bytes() -> int:
        (pages,) = read_db(server.sqlite_path, "PRAGMA page_count")[0]
        (page_size,) = read_db(server.sqlite_path, "PRAGMA page_size")[0]
        return int(pages) * int(page_size)

    def wal_bytes() -> int:
        wal = Path(f"{server.sqlite_path}-wal")
        return wal.stat().st_size if wal.exists() else 0

    base = logical_bytes()
    written: list[int] = []  # after each wave is written, before it is swept: the peaks
    wal_sizes: list[int] = []
    for _ in range(10):
        run_ids = wave()
        written.append(logical_bytes())
        wal_sizes.append(wal_bytes())
        sweep_until_gone(run_ids)
        wal_sizes.append(wal_bytes())
    wave_bytes = written[0] - base  # what a wave adds when nothing can be reused
    assert wave_bytes > 200_000, wave_bytes  # the load is big enough to see growth
    # 7 waves after warm-up would add 7 * wave_bytes without retention.
    assert written[-1] - written[2] < wave_bytes / 2, (base, wave_bytes, written)
    assert max(written) < base + 2 * wave_bytes, (base, wave_bytes, written)
    page_size = int(read_db(server.sqlite_path, "PRAGMA page_size")[0][0])
    wal_bound = sqlite_db.JOURNAL_SIZE_LIMIT_BYTES + (sqlite_db.WAL_AUTOCHECKPOINT_PAGES + 64) * page_size
    assert max(wal_sizes) <= wal_bound, wal_sizes
    print("retention steady load:", {"base": base, "wave": wave_bytes, "written": written, "wal": wal_sizes})
    # The threads did not grow: only runs came and went.
    for thread in pool:
        listed = stubs.messages.List(message_pb2.ListMessagesRequest(thread_id=thread.id), timeout=10)
        assert len(listed.messages) == 1
    stubs.close()


@pytest.mark.sqlite_only("reads the SQLite file")
def test_deleting_a_thread_takes_its_messages_runs_steps_and_events(
    make_server: Callable[..., ServerProcess],
) -> None:
    server = make_server()  # no retention: only the delete removes anything
    stubs = Stubs.connect(server.address)
    assistant = stubs.tool_assistant("get_weather")
    thread = stubs.thread("/tool get_weather {}")
    kept = stubs.thread("hello")  # a neighbour that must stay whole
    kept_run = stubs.run(assistant.id, kept.id)
    first = stubs.run(assistant.id, thread.id)
    submit(stubs, first.id, "sunny")
    assert stubs.wait(first.id).status == run_pb2.COMPLETED
    stubs.say(thread.id, "and again")
    second = stubs.run(assistant.id, thread.id)
    assert stubs.wait(second.id).status == run_pb2.COMPLETED
    assert stubs.wait(kept_run.id).status == run_pb2.COMPLETED
    run_ids = [first.id, second.id]
    assert all(rows_of_run(server.sqlite_path, r)["run_events"] > 0 for r in run_ids)

    stubs.threads.Delete(thread_pb2.DeleteThreadRequest(thread_id=thread.id), timeout=10)
    for run_id in run_ids:
        with pytest.raises(grpc.RpcError) as gone:
            stubs.runs.Get(run_pb2.GetRunRequest(run_id=run_id), timeout=10)
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as no_thread:
        stubs.messages.List(message_pb2.ListMessagesRequest(thread_id=thread.id), timeout=10)
    assert no_thread.value.code() == grpc.StatusCode.NOT_FOUND
    stubs.close()
    server.stop()  # the file, read after the server is gone: nothing of the thread remains

    database = server.sqlite_path
    assert read_db(database, "SELECT COUNT(*) FROM threads WHERE id = ?", thread.id) == [(0,)]
    assert read_db(database, "SELECT COUNT(*) FROM messages WHERE thread_id = ?", thread.id) == [(0,)]
    assert read_db(database, "SELECT COUNT(*) FROM runs WHERE thread_id = ?", thread.id) == [(0,)]
    for run_id in run_ids:
        assert set(rows_of_run(database, run_id).values()) == {0}
    # The neighbour thread is untouched.
    assert read_db(database, "SELECT COUNT(*) FROM messages WHERE thread_id = ?", kept.id) == [(2,)]
    assert rows_of_run(database, kept_run.id)["runs"] == 1
    assert rows_of_run(database, kept_run.id)["run_events"] > 0


# ---- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("off", None),
        ("0", None),
        ("90", 90.0),
        ("90s", 90.0),
        ("15m", 900.0),
        ("12h", 43200.0),
        ("7d", 604800.0),
    ],
)
def test_retention_durations(text: str, seconds: float | None) -> None:
    assert parse_duration(text) == seconds
    assert parse_config(["--retention", text]).retention == seconds


def test_retention_defaults_off_and_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_config([]).retention is None
    monkeypatch.setenv("SPINDLE_RETENTION", "2h")
    assert parse_config([]).retention == 7200.0


@pytest.mark.parametrize("text", ["5x", "-1", "1.5.2", "d"])
def test_a_bad_retention_is_a_usage_error(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_config(["--retention", text])
    assert exited.value.code == 2 and "--retention" in capsys.readouterr().err


def test_sweep_interval_follows_the_retention() -> None:
    assert sweep_interval(1.0) == pytest.approx(0.1)
    assert sweep_interval(0.01) == pytest.approx(0.05)
    assert sweep_interval(7 * 86400.0) == 60.0


# ---- the store's sweep on its own -------------------------------------------------------------


async def test_expired_runs_are_deleted_in_bounded_batches(store: SqliteStore) -> None:
    def finish(run: run_pb2.Run) -> RunChange:
        run.status = run_pb2.COMPLETED
        return RunChange(run, [events.status_change(run)], steps=[run_pb2.RunStep(id=f"step_{run.id}")])

    for index in range(5):
        thread_id, run_id = f"thread_{index}", f"run_{index}"
        await store.insert_thread("p", thread_pb2.Thread(id=thread_id), [])
        run = run_pb2.Run(id=run_id, thread_id=thread_id, assistant_id="asst_1", status=run_pb2.PENDING)
        await store.insert_run("p", run, [], clock.now() + 60, [events.status_change(run)])
        if index < 4:  # run_4 stays PENDING: active runs are never deleted
            await store.mutate_run(run_id, finish)
    assert await store.delete_expired_runs(clock.now() - 3600, 10) == 0  # none finished that long ago
    after = clock.now() + 1
    assert [await store.delete_expired_runs(after, 3) for _ in range(3)] == [3, 1, 0]
    for index in range(4):
        with pytest.raises(NotFoundError):
            await store.get_run("p", f"run_{index}")
        assert await store.read_events(f"run_{index}", 0, 10) == []
        assert await store.run_steps(f"run_{index}") == []
    assert (await store.get_run("p", "run_4")).status == run_pb2.PENDING
    assert len(await store.read_events("run_4", 0, 10)) == 1
    assert await store.checkpoint_wal()  # nothing else holds the database: the WAL folds back
