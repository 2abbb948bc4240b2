"""The engine in-process against a real SQLite store: stopping while a
claim is in flight, and a storage fault in the middle of a run."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from spindle.v1 import message_pb2, run_pb2, thread_pb2
from spindle_server import clock
from spindle_server.engine import events
from spindle_server.engine.config import EngineConfig
from spindle_server.engine.engine import Engine
from spindle_server.models.builtin import BuiltinBackend
from spindle_server.models.registry import ModelRegistry
from spindle_server.store.base import ClaimedRun, MutationResult, RequestKey, RunMutation
from spindle_server.store.errors import UnavailableError
from spindle_server.store.sqlite import SqliteStore
from support.stubs import TERMINAL

PROJECT = "p"


class GatedClaimStore(SqliteStore):
    """Claims commit at once, but the claimer hears of them only when `gate` opens: the window
    in which a stopping engine used to cancel its claim loop."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.claimed = asyncio.Event()
        self.gate = asyncio.Event()

    async def claim_runs(
        self, owner: str, lease_seconds: float, limit: int, mutate: RunMutation
    ) -> list[ClaimedRun]:
        claims = await super().claim_runs(owner, lease_seconds, limit, mutate)
        if claims:
            self.claimed.set()
            await self.gate.wait()
        return claims


class FlakyStore(SqliteStore):
    """The first write of a claimed run's executor fails as if the disk were briefly full."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.failed = 0

    async def mutate_run(
        self,
        run_id: str,
        mutate: RunMutation,
        *,
        epoch: int | None = None,
        project: str | None = None,
        record: RequestKey | None = None,
    ) -> MutationResult:
        if epoch is not None and self.failed == 0:
            self.failed += 1
            raise UnavailableError("database write failed: database or disk is full")
        return await super().mutate_run(run_id, mutate, epoch=epoch, project=project, record=record)


@pytest.fixture
def models() -> ModelRegistry:
    return ModelRegistry({"builtin": BuiltinBackend()})


async def queue_run(store: SqliteStore, text: str) -> str:
    thread_id, run_id = "thread_1", "run_1"
    user = message_pb2.Message(id="msg_1", thread_id=thread_id, role=message_pb2.USER)
    user.content.add().text.text = text
    await store.insert_thread(PROJECT, thread_pb2.Thread(id=thread_id), [user])
    run = run_pb2.Run(
        id=run_id, thread_id=thread_id, assistant_id="asst_1", status=run_pb2.PENDING, model="builtin"
    )
    run.created_at.CopyFrom(clock.timestamp(clock.now()))
    await store.insert_run(PROJECT, run, [], clock.now() + 3600, [events.status_change(run)])
    return run_id


async def until_finished(store: SqliteStore, run_id: str, within: float = 20.0) -> run_pb2.Run:
    loop = asyncio.get_running_loop()
    give_up = loop.time() + within
    while True:
        run = await store.get_run(PROJECT, run_id)
        if run.status in TERMINAL or loop.time() > give_up:
            return run
        await asyncio.sleep(0.02)


@pytest.fixture
async def gated_store(tmp_path: Path) -> AsyncIterator[GatedClaimStore]:
    store = GatedClaimStore(tmp_path / "gated.db")
    await store.start()
    yield store
    await store.close()


@pytest.fixture
async def flaky_store(tmp_path: Path) -> AsyncIterator[FlakyStore]:
    store = FlakyStore(tmp_path / "flaky.db")
    await store.start()
    yield store
    await store.close()


async def test_stopping_during_a_claim_leaves_no_run_without_an_executor(
    gated_store: GatedClaimStore, models: ModelRegistry
) -> None:
    run_id = await queue_run(gated_store, "hello")
    engine = Engine(gated_store, models, EngineConfig())
    await engine.start()
    await asyncio.wait_for(gated_store.claimed.wait(), 10)  # committed IN_PROGRESS, not yet spawned
    stopping = asyncio.create_task(engine.stop(grace=10))
    for _ in range(5):
        await asyncio.sleep(0)  # stop() is under way
    gated_store.gate.set()
    await asyncio.wait_for(stopping, 30)
    run = await gated_store.get_run(PROJECT, run_id)
    # Executed within the grace period, or handed back: never IN_PROGRESS with nobody on it.
    assert run.status in (run_pb2.COMPLETED, run_pb2.PENDING), run_pb2.RunStatus.Name(run.status)


async def test_a_storage_fault_mid_run_is_recovered_not_failed_as_a_bug(
    flaky_store: FlakyStore, models: ModelRegistry
) -> None:
    run_id = await queue_run(flaky_store, "/sleep 0.2 one two three")
    engine = Engine(
        flaky_store, models, EngineConfig(lease_seconds=0.3, sweep_interval=0.05, idle_poll_interval=0.1)
    )
    await engine.start()
    try:
        run = await until_finished(flaky_store, run_id)
    finally:
        await engine.stop(grace=5)
    assert flaky_store.failed == 1
    # The executor's write failed: like a crash, the run is retried once its lease runs out
    # (and says so), instead of FAILED "internal error (UnavailableError)".
    assert run.status == run_pb2.COMPLETED, run.last_error
    assert run.attempt == 2
