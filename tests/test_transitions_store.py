"""Store and state machine edges: shutdown of the SQLite plumbing,
deadlines re-checked inside the transaction, attempts, no-op mutations, label filters, runs
claimed in the transaction that inserts them."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Mapping
from pathlib import Path

import pytest

from spindle.v1 import common_pb2, message_pb2, run_pb2, thread_pb2
from spindle_server import clock
from spindle_server.engine import events, transitions
from spindle_server.engine.executor import _step
from spindle_server.store.base import PageQuery, RunClaim, RunFilter
from spindle_server.store.errors import FencedError, StateError, UnavailableError
from spindle_server.store.sqlite import SqliteStore

PROJECT = "p"


async def queued_run(
    store: SqliteStore, run_id: str = "run_1", labels: Mapping[str, str] | None = None
) -> run_pb2.Run:
    thread_id = f"thread_of_{run_id}"
    user = message_pb2.Message(id=f"msg_{run_id}", thread_id=thread_id, role=message_pb2.USER)
    user.content.add().text.text = "/tool f {}"
    await store.insert_thread(PROJECT, thread_pb2.Thread(id=thread_id), [user])
    run = run_pb2.Run(
        id=run_id, thread_id=thread_id, assistant_id="asst_1", status=run_pb2.PENDING, labels=labels
    )
    run.created_at.CopyFrom(clock.timestamp(clock.now()))
    result = await store.insert_run(PROJECT, run, [], clock.now() + 3600, [events.status_change(run)])
    return result.run


async def paused_run(store: SqliteStore, tool_deadline: float) -> tuple[run_pb2.Run, run_pb2.RunStep]:
    """A run waiting for the result of one tool call, with the given tool deadline."""
    await queued_run(store)
    (claim,) = await store.claim_runs("owner", 30, 10, transitions.start(clock.now(), 3600, 3))
    call = common_pb2.ToolCall(id="call_1")
    call.function.name = "f"
    step = _step(claim.run, run_pb2.RunStep.TOOL_CALLS, run_pb2.RunStep.IN_PROGRESS, clock.now())
    step.tool_calls.tool_calls.append(call)
    paused = await store.mutate_run(
        "run_1",
        transitions.pause_for_tools(clock.now(), [call], step, None, [], tool_deadline, "Let me see. "),
        epoch=claim.epoch,
    )
    return paused.run, step


# ---- SqliteDatabase shutdown ----------------------------------------------------------------


async def test_a_write_issued_while_the_database_closes_fails_instead_of_hanging(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "closing.db")
    await store.start()
    closing = asyncio.create_task(store.close())
    await asyncio.sleep(0)  # close() has queued the writer's stop and waits for it
    late = asyncio.ensure_future(store.insert_thread(PROJECT, thread_pb2.Thread(id="thread_late"), []))
    done, _ = await asyncio.wait({late}, timeout=10)
    await closing
    assert done, "a write queued behind the writer's stop was never answered"
    with pytest.raises(UnavailableError):
        late.result()


async def test_a_read_after_close_is_unavailable_not_a_runtime_error(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "closed.db")
    await store.start()
    await store.close()
    with pytest.raises(UnavailableError):
        await store.get_thread(PROJECT, "thread_1")


# ---- deadlines are compared-and-set too -------------------------------------------------------


async def test_expire_refuses_a_run_whose_deadline_moved(store: SqliteStore) -> None:
    """The sweeper lists due runs, then expires them one by one: a run resumed in between (new
    deadline) must not be expired on the strength of the stale list."""
    run, step = await paused_run(store, clock.now() + 600)
    with pytest.raises(StateError):
        await store.mutate_run(run.id, transitions.expire(clock.now(), step))
    assert (await store.get_run(PROJECT, run.id)).status == run_pb2.TOOL_CALLS


async def test_tool_results_after_the_tool_deadline_are_refused(store: SqliteStore) -> None:
    run, step = await paused_run(store, clock.now() - 1)
    submit = transitions.submit_tool_results(clock.now(), {"call_1": "late"}, step, clock.now() + 3600)
    with pytest.raises(StateError) as refused:
        await store.mutate_run(run.id, submit)
    assert refused.value.reason == "RUN_EXPIRED"
    assert (await store.get_run(PROJECT, run.id)).status == run_pb2.TOOL_CALLS  # the sweeper ends it


# ---- what the model said before its tool calls is kept beside the step ------------------------


async def test_a_pause_keeps_the_text_said_before_the_calls_and_a_thread_delete_drops_it(
    store: SqliteStore,
) -> None:
    run, step = await paused_run(store, clock.now() + 600)
    assert await store.tool_round_texts(run.id) == {step.id: "Let me see. "}
    await store.mutate_run(run.id, transitions.request_cancel(clock.now(), step))
    await store.delete_thread(PROJECT, run.thread_id)
    assert await store.tool_round_texts(run.id) == {}


# ---- attempts count interruptions, not tool rounds -------------------------------------------


async def test_tool_rounds_do_not_use_up_the_attempts(store: SqliteStore) -> None:
    run, step = await paused_run(store, clock.now() + 600)
    submit = transitions.submit_tool_results(clock.now(), {"call_1": "ok"}, step, clock.now() + 3600)
    await store.mutate_run(run.id, submit)
    # Claimed again for its second turn, with a lease that has already run out (owner died).
    (claim,) = await store.claim_runs("owner", -1, 10, transitions.start(clock.now(), 3600, 3))
    assert claim.run.attempt == 1  # first attempt at this turn: not a retry
    recovered = await store.reclaim_run(run.id, "other", 30, transitions.recover(clock.now(), 2))
    assert recovered is not None
    assert recovered.run.status == run_pb2.IN_PROGRESS and recovered.run.attempt == 2


async def test_a_requeued_run_counts_the_interrupted_attempt(store: SqliteStore) -> None:
    await queued_run(store)
    (claim,) = await store.claim_runs("owner", 30, 10, transitions.start(clock.now(), 3600, 3))
    await store.mutate_run("run_1", transitions.requeue(clock.now(), "stop"), epoch=claim.epoch)
    (again,) = await store.claim_runs("owner", 30, 10, transitions.start(clock.now(), 3600, 3))
    assert again.run.attempt == 2


async def test_a_run_requeued_max_attempts_times_fails_at_its_next_claim(store: SqliteStore) -> None:
    await queued_run(store)
    for attempt in (1, 2):
        (claim,) = await store.claim_runs("owner", 30, 10, transitions.start(clock.now(), 3600, 2))
        assert claim.run.status == run_pb2.IN_PROGRESS and claim.run.attempt == attempt
        await store.mutate_run("run_1", transitions.requeue(clock.now(), "stop"), epoch=claim.epoch)
    # Two tries were interrupted by shutdowns: the claim counts them and gives up.
    (claim,) = await store.claim_runs("owner", 30, 10, transitions.start(clock.now(), 3600, 2))
    assert claim.run.status == run_pb2.FAILED
    assert claim.run.last_error.code == "server_error"
    assert "interrupted 2 times" in claim.run.last_error.message
    log = await store.read_events("run_1", 0, 100)
    assert [e.index for e in log if events.is_terminal(e)] == [len(log) - 1]
    assert await store.claim_runs("owner", 30, 10, transitions.start(clock.now(), 3600, 2)) == []


async def test_shutdown_requeue_of_a_cancelling_run_ends_it_cancelled(store: SqliteStore) -> None:
    await queued_run(store)
    (claim,) = await store.claim_runs("owner", 30, 10, transitions.start(clock.now(), 3600, 3))
    await store.mutate_run("run_1", transitions.request_cancel(clock.now(), None))
    result = await store.mutate_run("run_1", transitions.requeue(clock.now(), "stop"), epoch=claim.epoch)
    assert result.run.status == run_pb2.CANCELLED
    assert events.is_terminal(result.events[-1])


# ---- a mutation that changes nothing writes nothing -------------------------------------------


async def test_cancelling_a_finished_run_leaves_it_untouched(store: SqliteStore) -> None:
    await queued_run(store)
    before = await store.mutate_run("run_1", transitions.request_cancel(clock.now(), None))
    assert before.run.status == run_pb2.CANCELLED
    await asyncio.sleep(0.01)  # so that a rewrite would show in updated_at
    again = await store.mutate_run("run_1", transitions.request_cancel(clock.now(), None))
    assert again.run == before.run and again.events == []
    assert await store.get_run(PROJECT, "run_1") == before.run


# ---- label filters ----------------------------------------------------------------------------


@pytest.mark.parametrize("key", ['say "hi"', "back\\slash", "dots.and[brackets]", "$"])
async def test_runs_are_found_by_any_valid_label_key(store: SqliteStore, key: str) -> None:
    await queued_run(store, labels={key: "v", "other": "w"})
    found = await store.list_runs(PROJECT, RunFilter(labels=((key, "v"),)), PageQuery(limit=10))
    assert [r.id for r in found.items] == ["run_1"]
    missed = await store.list_runs(PROJECT, RunFilter(labels=((key, "w"),)), PageQuery(limit=10))
    assert missed.items == []


async def test_failed_commit_leaves_the_writer_usable(store: SqliteStore) -> None:
    """A batch whose COMMIT fails answers every write UNAVAILABLE; the next batch works."""

    def poison(conn: sqlite3.Connection) -> None:
        # A deferred foreign-key violation makes COMMIT itself fail.
        conn.execute("PRAGMA defer_foreign_keys=ON")
        conn.execute("CREATE TABLE IF NOT EXISTS parent(id INTEGER PRIMARY KEY)")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS child(p INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED)"
        )
        conn.execute("INSERT INTO child(p) VALUES (42)")

    results = await asyncio.gather(
        store.db.write(poison),
        store.insert_thread(PROJECT, thread_pb2.Thread(id="thread_a"), []),
        return_exceptions=True,
    )
    assert all(isinstance(r, UnavailableError) for r in results), results
    await store.insert_thread(PROJECT, thread_pb2.Thread(id="thread_b"), [])
    assert (await store.get_thread(PROJECT, "thread_b")).id == "thread_b"


async def second_round(store: SqliteStore) -> tuple[run_pb2.Run, run_pb2.RunStep]:
    """A run whose first tool call was answered and that now waits on a second one; returns it
    with a copy of its first step as it was read while pending."""
    run, first_step = await paused_run(store, clock.now() + 600)
    stale_copy = run_pb2.RunStep()
    stale_copy.CopyFrom(first_step)
    submit = transitions.submit_tool_results(clock.now(), {"call_1": "ok"}, first_step, clock.now() + 3600)
    await store.mutate_run(run.id, submit)
    (claim,) = await store.claim_runs("owner", 30, 10, transitions.start(clock.now(), 3600, 3))
    call = common_pb2.ToolCall(id="call_2")
    call.function.name = "f"
    second_step = _step(claim.run, run_pb2.RunStep.TOOL_CALLS, run_pb2.RunStep.IN_PROGRESS, clock.now())
    second_step.tool_calls.tool_calls.append(call)
    paused = await store.mutate_run(
        run.id,
        transitions.pause_for_tools(clock.now(), [call], second_step, None, [], clock.now() + 600),
        epoch=claim.epoch,
    )
    return paused.run, stale_copy


async def assert_first_step_answered(store: SqliteStore, run_id: str, step_id: str) -> None:
    steps = {step.id: step for step in await store.run_steps(run_id)}
    assert steps[step_id].status == run_pb2.RunStep.COMPLETED
    assert steps[step_id].tool_calls.tool_calls[0].output == "ok"


async def test_a_cancel_with_a_stale_tool_step_leaves_the_answered_step_alone(store: SqliteStore) -> None:
    """Cancel reads the run's pending tool step, then mutates. If the run was resumed and paused
    again in between, the step it read belongs to an answered round: rewriting it would mark it
    CANCELLED and drop its outputs."""
    run, stale = await second_round(store)
    cancelled = await store.mutate_run(run.id, transitions.request_cancel(clock.now(), stale))
    assert cancelled.run.status == run_pb2.CANCELLED
    await assert_first_step_answered(store, run.id, stale.id)


async def test_an_expiry_with_a_stale_tool_step_leaves_the_answered_step_alone(store: SqliteStore) -> None:
    run, stale = await second_round(store)
    expired = await store.mutate_run(run.id, transitions.expire(clock.now() + 10_000, stale))
    assert expired.run.status == run_pb2.EXPIRED
    await assert_first_step_answered(store, run.id, stale.id)


# ---- a run claimed in the transaction that inserts it ------------------------------------------


async def test_a_run_claimed_at_insert_is_leased_and_fenced_like_a_claimed_one(store: SqliteStore) -> None:
    thread_id = "thread_of_run_1"
    await store.insert_thread(PROJECT, thread_pb2.Thread(id=thread_id), [])
    run = run_pb2.Run(id="run_1", thread_id=thread_id, assistant_id="asst_1", status=run_pb2.PENDING)
    run.created_at.CopyFrom(clock.timestamp(clock.now()))
    claim = RunClaim("owner", -1, transitions.start(clock.now(), 3600, 3))  # lease already run out
    result = await store.insert_run(
        PROJECT, run, [], clock.now() + 3600, [events.status_change(run)], claim=claim
    )
    assert result.run.status == run_pb2.PENDING  # Create's answer: the run as inserted
    assert result.claimed is not None and result.claimed.epoch == 1
    assert result.claimed.run.status == run_pb2.IN_PROGRESS and result.claimed.run.attempt == 1
    assert [(e.index, e.status) for e in result.events] == [(0, run_pb2.PENDING), (1, run_pb2.IN_PROGRESS)]
    assert [e.index for e in await store.read_events("run_1", 0, 10)] == [0, 1]
    assert (await store.get_run(PROJECT, "run_1")).status == run_pb2.IN_PROGRESS
    assert await store.claim_runs("other", 30, 10, transitions.start(clock.now(), 3600, 3)) == []
    # Its lease ran out: another owner takes it over with a new epoch, and the first is fenced.
    taken = await store.reclaim_run("run_1", "other", 30, transitions.recover(clock.now(), 3))
    assert taken is not None and taken.epoch == 2
    with pytest.raises(FencedError):
        await store.mutate_run("run_1", transitions.stream([events.message_delta("late")]), epoch=1)
    assert not await store.renew_lease("run_1", "owner", 1, 30)


async def test_a_claim_at_insert_refused_with_its_insert_leaves_nothing(store: SqliteStore) -> None:
    await queued_run(store)  # thread_of_run_1 has an active run
    run = run_pb2.Run(id="run_2", thread_id="thread_of_run_1", assistant_id="asst_1", status=run_pb2.PENDING)
    run.created_at.CopyFrom(clock.timestamp(clock.now()))
    claim = RunClaim("owner", 30, transitions.start(clock.now(), 3600, 3))
    with pytest.raises(StateError):
        await store.insert_run(PROJECT, run, [], clock.now() + 3600, [events.status_change(run)], claim=claim)
    assert await store.read_events("run_2", 0, 10) == []
    (claimed,) = await store.claim_runs("owner", 30, 10, transitions.start(clock.now(), 3600, 3))
    assert claimed.run.id == "run_1" and claimed.epoch == 1
