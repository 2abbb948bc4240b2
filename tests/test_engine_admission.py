"""The engine in-process against a real SQLite store: a Create that finds a free execution slot
claims its run in the inserting transaction; one that finds runs queued leaves it to the claim
loop, so a new run never overtakes a waiting one."""

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
from spindle_server.store.sqlite import SqliteStore
from support.stubs import TERMINAL

PROJECT = "p"


class SteeredStore(SqliteStore):
    """Records which runs the claim loop took; `claims_open` gates the claim loop's rounds after
    the first, and a run's writes wait while its id is in `held`."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.first_round = asyncio.Event()
        self.claims_open = asyncio.Event()
        self.by_claim_loop: list[str] = []
        self.held: dict[str, asyncio.Event] = {}

    async def claim_runs(
        self, owner: str, lease_seconds: float, limit: int, mutate: RunMutation
    ) -> list[ClaimedRun]:
        if self.first_round.is_set():
            await self.claims_open.wait()
        claims = await super().claim_runs(owner, lease_seconds, limit, mutate)
        self.by_claim_loop.extend(claim.run.id for claim in claims)
        self.first_round.set()
        return claims

    async def mutate_run(
        self,
        run_id: str,
        mutate: RunMutation,
        *,
        epoch: int | None = None,
        project: str | None = None,
        record: RequestKey | None = None,
    ) -> MutationResult:
        if run_id in self.held:
            await self.held[run_id].wait()
        return await super().mutate_run(run_id, mutate, epoch=epoch, project=project, record=record)


@pytest.fixture
async def steered(tmp_path: Path) -> AsyncIterator[SteeredStore]:
    store = SteeredStore(tmp_path / "steered.db")
    await store.start()
    yield store
    await store.close()


async def create(engine: Engine, store: SqliteStore, name: str) -> MutationResult:
    thread_id = f"thread_{name}"
    user = message_pb2.Message(id=f"msg_{name}", thread_id=thread_id, role=message_pb2.USER)
    user.content.add().text.text = f"hello {name}"
    await store.insert_thread(PROJECT, thread_pb2.Thread(id=thread_id), [user])
    run = run_pb2.Run(
        id=f"run_{name}", thread_id=thread_id, assistant_id="asst_1", status=run_pb2.PENDING, model="builtin"
    )
    run.created_at.CopyFrom(clock.timestamp(clock.now()))
    return await engine.create_run(PROJECT, run, [], clock.now() + 3600, [events.status_change(run)])


async def finished(store: SqliteStore, run_id: str) -> run_pb2.Run:
    while True:
        run = await store.get_run(PROJECT, run_id)
        if run.status in TERMINAL:
            return run
        await asyncio.sleep(0.01)


async def idle(engine: Engine) -> None:
    while True:
        if engine.running == 0:
            return
        await asyncio.sleep(0.01)


async def test_a_create_with_a_free_slot_claims_its_run_and_one_with_runs_queued_does_not(
    steered: SteeredStore,
) -> None:
    models = ModelRegistry({"builtin": BuiltinBackend()})
    engine = Engine(steered, models, EngineConfig(max_concurrent_runs=1))
    await engine.start()
    try:
        await asyncio.wait_for(steered.first_round.wait(), 30)  # nothing was queued
        steered.held["run_a"] = asyncio.Event()  # a's task keeps the only slot
        a = await create(engine, steered, "a")
        assert a.run.status == run_pb2.PENDING  # Create's answer: the run as inserted
        assert a.claimed is not None and a.claimed.run.status == run_pb2.IN_PROGRESS
        assert (await steered.get_run(PROJECT, "run_a")).status == run_pb2.IN_PROGRESS
        b = await create(engine, steered, "b")  # no free slot: queued
        assert b.claimed is None
        steered.held.pop("run_a").set()
        assert (await asyncio.wait_for(finished(steered, "run_a"), 30)).status == run_pb2.COMPLETED
        await asyncio.wait_for(idle(engine), 30)  # a's task gives its slot back
        c = await create(engine, steered, "c")  # a slot is free, but b waits: c queues behind it
        assert c.claimed is None
        steered.claims_open.set()
        for name in ("b", "c"):
            assert (await asyncio.wait_for(finished(steered, f"run_{name}"), 30)).status == run_pb2.COMPLETED
        assert steered.by_claim_loop == ["run_b", "run_c"]  # in their order, a not among them
        log = await steered.read_events("run_a", 0, 100)
        assert [e.status for e in log[:2]] == [run_pb2.PENDING, run_pb2.IN_PROGRESS]
        assert [e.index for e in log] == list(range(len(log)))
    finally:
        await engine.stop(grace=10)


class ReadRecordingStore(SqliteStore):
    """Records, in order, the run task's store reads and (via `note`) its Create's answer."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.seen: list[str] = []
        self.first_round = asyncio.Event()

    async def claim_runs(
        self, owner: str, lease_seconds: float, limit: int, mutate: RunMutation
    ) -> list[ClaimedRun]:
        claims = await super().claim_runs(owner, lease_seconds, limit, mutate)
        self.first_round.set()
        return claims

    def note(self, what: str) -> None:
        self.seen.append(what)

    async def thread_messages(self, thread_id: str) -> list[message_pb2.Message]:
        self.seen.append("thread_messages")
        return await super().thread_messages(thread_id)

    async def run_steps(self, run_id: str) -> list[run_pb2.RunStep]:
        self.seen.append("run_steps")
        return await super().run_steps(run_id)

    async def get_run_any_project(self, run_id: str) -> tuple[str, run_pb2.Run]:
        self.seen.append("get_run_any_project")
        return await super().get_run_any_project(run_id)


async def test_a_run_claimed_by_its_create_starts_after_that_create_resumes_and_rereads_nothing(
    tmp_path: Path,
) -> None:
    """The Create resumes (and sends its answer, which the client's Listen follows) before the
    run's task does anything; a run claimed in its inserting transaction has no steps and no
    cancel its task could have missed, so the task reads only the thread's messages."""
    store = ReadRecordingStore(tmp_path / "recorded.db")
    await store.start()
    engine = Engine(store, ModelRegistry({"builtin": BuiltinBackend()}), EngineConfig())
    await engine.start()
    try:
        # The claim loop's first round (nothing queued) lets Creates claim their runs.
        await asyncio.wait_for(store.first_round.wait(), 30)
        created = await create(engine, store, "a")
        store.note("create_answered")  # in the step that resumed the Create: nothing ran between
        assert created.claimed is not None
        assert (await asyncio.wait_for(finished(store, "run_a"), 30)).status == run_pb2.COMPLETED
        assert store.seen == ["create_answered", "thread_messages"]
    finally:
        await engine.stop(grace=10)
        await store.close()
