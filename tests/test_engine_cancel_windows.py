"""The engine in-process against a real SQLite store: a cancel that lands in the windows between
a run's claim and the start of its task's body ends the run, and frees its slot."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from spindle.v1 import message_pb2, run_pb2, thread_pb2
from spindle_server import clock
from spindle_server.engine import events, transitions
from spindle_server.engine.config import EngineConfig
from spindle_server.engine.engine import Engine
from spindle_server.models.builtin import BuiltinBackend
from spindle_server.models.registry import ModelRegistry
from spindle_server.store.base import ClaimedRun, RunMutation
from spindle_server.store.sqlite import SqliteStore
from support.stubs import TERMINAL

PROJECT = "p"
BOUND = 30.0  # failure bound only: each run here ends at once or never


class CancelOnClaimStore(SqliteStore):
    """The first claim commits; then, before the engine hears of it, a Cancel commits too."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.cancel_next_claim = True

    async def claim_runs(
        self, owner: str, lease_seconds: float, limit: int, mutate: RunMutation
    ) -> list[ClaimedRun]:
        claims = await super().claim_runs(owner, lease_seconds, limit, mutate)
        if claims and self.cancel_next_claim:
            self.cancel_next_claim = False
            for claim in claims:
                await self.mutate_run(claim.run.id, transitions.request_cancel(clock.now(), None))
        return claims


class CancelOnSpawnEngine(Engine):
    """Calls cancel_local (as the Cancel RPC does) right after the task of the first claimed
    run is created, before it has had a step: the window of the stuck-CANCELLING defect."""

    cancel_next_spawn = True

    def _spawn(self, claim: ClaimedRun, answered: asyncio.Future[None] | None = None) -> None:
        super()._spawn(claim, answered)
        if self.cancel_next_spawn:
            self.cancel_next_spawn = False
            assert self.cancel_local(claim.run.id)


@pytest.fixture
def models() -> ModelRegistry:
    return ModelRegistry({"builtin": BuiltinBackend()})


@pytest.fixture
async def cancel_on_claim_store(tmp_path: Path) -> AsyncIterator[CancelOnClaimStore]:
    store = CancelOnClaimStore(tmp_path / "cancel.db")
    await store.start()
    yield store
    await store.close()


async def queue_run(store: SqliteStore, number: int, text: str) -> str:
    thread_id, run_id = f"thread_{number}", f"run_{number}"
    user = message_pb2.Message(id=f"msg_{number}", thread_id=thread_id, role=message_pb2.USER)
    user.content.add().text.text = text
    await store.insert_thread(PROJECT, thread_pb2.Thread(id=thread_id), [user])
    run = run_pb2.Run(
        id=run_id, thread_id=thread_id, assistant_id="asst_1", status=run_pb2.PENDING, model="builtin"
    )
    run.created_at.CopyFrom(clock.timestamp(clock.now()))
    await store.insert_run(PROJECT, run, [], clock.now() + 3600, [events.status_change(run)])
    return run_id


async def until_finished(store: SqliteStore, run_id: str) -> run_pb2.Run:
    loop = asyncio.get_running_loop()
    give_up = loop.time() + BOUND
    while True:
        run = await store.get_run(PROJECT, run_id)
        if run.status in TERMINAL or loop.time() > give_up:
            return run
        await asyncio.sleep(0.01)


async def assert_one_terminal_event_last(store: SqliteStore, run_id: str) -> None:
    log = await store.read_events(run_id, 0, 10_000)
    assert [e.index for e in log if events.is_terminal(e)] == [len(log) - 1]


async def test_a_cancel_before_the_task_runs_ends_the_run_and_frees_its_slot(
    store: SqliteStore, models: ModelRegistry
) -> None:
    first = await queue_run(store, 1, "/sleep 600 never said")
    engine = CancelOnSpawnEngine(store, models, EngineConfig(max_concurrent_runs=1, idle_poll_interval=0.05))
    await engine.start()
    try:
        run = await until_finished(store, first)
        assert run.status == run_pb2.CANCELLED, run_pb2.RunStatus.Name(run.status)
        await assert_one_terminal_event_last(store, first)
        # The one slot is free again: the next run is claimed and completes.
        second = await queue_run(store, 2, "hello")
        engine.wake()
        assert (await until_finished(store, second)).status == run_pb2.COMPLETED
    finally:
        await engine.stop(grace=5)
    assert engine.running == 0


async def test_a_cancel_between_claim_and_spawn_is_seen_by_the_task(
    cancel_on_claim_store: CancelOnClaimStore, models: ModelRegistry
) -> None:
    store = cancel_on_claim_store
    run_id = await queue_run(store, 1, "/sleep 600 never said")
    engine = Engine(store, models, EngineConfig(idle_poll_interval=0.05))
    await engine.start()
    try:
        # The Cancel found no task to stop; the task reads the run's status before its model call.
        run = await until_finished(store, run_id)
        assert run.status == run_pb2.CANCELLED, run_pb2.RunStatus.Name(run.status)
        await assert_one_terminal_event_last(store, run_id)
    finally:
        await engine.stop(grace=5)
    assert engine.running == 0


async def test_a_shutdown_before_the_task_runs_requeues_the_run(
    store: SqliteStore, models: ModelRegistry
) -> None:
    run_id = await queue_run(store, 1, "/sleep 600 never said")

    spawned = asyncio.Event()

    class ShutdownOnSpawn(Engine):
        def _spawn(self, claim: ClaimedRun, answered: asyncio.Future[None] | None = None) -> None:
            super()._spawn(claim, answered)
            assert self.cancel_local(claim.run.id, "shutdown")  # what stop() does after its grace
            spawned.set()

    engine = ShutdownOnSpawn(store, models, EngineConfig(idle_poll_interval=0.05))
    await engine.start()
    await asyncio.wait_for(spawned.wait(), BOUND)
    await engine.stop(grace=BOUND)
    run = await store.get_run(PROJECT, run_id)
    # Handed back for the next start, its interrupted try counted: not IN_PROGRESS with no task.
    assert run.status == run_pb2.PENDING, run_pb2.RunStatus.Name(run.status)
    assert run.attempt == 2
    assert engine.running == 0
