"""Many tool rounds in one run: what the model said before each round goes back to it in every
later prompt and into the reply, without the engine rereading the run's log each round.

The engine runs in-process on a real SQLite store and a real OpenAI-compatible backend talking
HTTP to tests/fake_openai.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from fake_openai import FakeOpenAI, StreamReply, role_chunk, text_chunk, text_stream, tool_calls_stream
from spindle.v1 import common_pb2, message_pb2, run_pb2, thread_pb2
from spindle_server import clock
from spindle_server.engine import events, transitions
from spindle_server.engine.config import EngineConfig
from spindle_server.engine.engine import Engine, find_tool_step
from spindle_server.engine.executor import _round_texts
from spindle_server.models.builtin import BuiltinBackend
from spindle_server.models.openai_backend import OpenAIBackend
from spindle_server.models.provider_spec import parse_provider_spec
from spindle_server.models.registry import ModelRegistry
from spindle_server.store.sqlite import SqliteStore
from support.stubs import TERMINAL

PROJECT = "p"
ROUNDS = 4
BOUND = 30.0  # failure bound only


class LogReadCountingStore(SqliteStore):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.log_reads = 0

    async def read_events(self, run_id: str, start: int, limit: int) -> list[run_pb2.StreamEvent]:
        self.log_reads += 1
        return await super().read_events(run_id, start, limit)


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


@pytest.fixture
async def counting_store(tmp_path: Path) -> AsyncIterator[LogReadCountingStore]:
    store = LogReadCountingStore(tmp_path / "rounds.db")
    await store.start()
    yield store
    await store.close()


async def settled(store: SqliteStore, run_id: str) -> run_pb2.Run:
    loop = asyncio.get_running_loop()
    give_up = loop.time() + BOUND
    while True:
        run = await store.get_run(PROJECT, run_id)
        if run.status in TERMINAL | {run_pb2.TOOL_CALLS} or loop.time() > give_up:
            return run
        await asyncio.sleep(0.01)


async def test_each_round_keeps_what_the_model_said_without_rereading_the_log(
    counting_store: LogReadCountingStore, fake: FakeOpenAI
) -> None:
    store = counting_store
    said = [f"Round {n} first. " for n in range(ROUNDS)]
    fake.enqueue(
        *(StreamReply([role_chunk(), text_chunk(said[n]), *_calls(n).chunks[1:]]) for n in range(ROUNDS)),
        text_stream("All ", "done."),
    )
    backend = OpenAIBackend(parse_provider_spec(f"fake={fake.base_url}", environ={}))
    models = ModelRegistry({"builtin": BuiltinBackend(), "fake": backend})
    run_id = await _queue_run(store)
    engine = Engine(store, models, EngineConfig(idle_poll_interval=0.05))
    await engine.start()
    try:
        for n in range(ROUNDS):
            paused = await settled(store, run_id)
            assert paused.status == run_pb2.TOOL_CALLS, run_pb2.RunStatus.Name(paused.status)
            step = find_tool_step(await store.run_steps(run_id), paused)
            assert step is not None
            deadline = transitions.run_deadline(paused, 3600)
            results = {c.id: f"result {n}" for c in paused.required_tool_calls}
            await store.mutate_run(
                run_id, transitions.submit_tool_results(clock.now(), results, step, deadline)
            )
            engine.wake()
        run = await settled(store, run_id)
    finally:
        await engine.stop(grace=5)
        await models.aclose()
    assert run.status == run_pb2.COMPLETED, run.last_error
    assert run.reply.content[0].text.text == "".join(said) + "All done."
    # Every later prompt carries each earlier round's text as that round's assistant message.
    for turn, request in enumerate(fake.requests):
        assistant_texts = [m.get("content") for m in request.body["messages"] if m["role"] == "assistant"]
        assert assistant_texts == said[:turn]
    assert store.log_reads == 0


def test_the_log_fallback_drops_deltas_voided_by_a_retried_call() -> None:
    """Runs paused by an older server have no kept texts: rebuilt from the log, a retried call's
    voided deltas are left out, as listeners left them out."""
    run = run_pb2.Run(id="run_1", status=run_pb2.IN_PROGRESS)
    retried = events.status_change(run, "recovered", discard_partial=True)
    log = [
        events.message_delta("lost "),
        retried,
        events.message_delta("kept "),
        events.tool_calls([common_pb2.ToolCall(id="c1")]),
        events.message_delta("second"),
        events.tool_calls([common_pb2.ToolCall(id="c2")]),
    ]
    assert _round_texts(log) == ["kept ", "second"]


def _calls(n: int) -> StreamReply:
    return tool_calls_stream([(f"call_{n}", "lookup", ['{"n": ', f"{n}}}"])])


async def _queue_run(store: SqliteStore) -> str:
    user = message_pb2.Message(id="msg_1", thread_id="thread_1", role=message_pb2.USER)
    user.content.add().text.text = "look things up"
    await store.insert_thread(PROJECT, thread_pb2.Thread(id="thread_1"), [user])
    run = run_pb2.Run(
        id="run_1", thread_id="thread_1", assistant_id="asst_1", status=run_pb2.PENDING, model="fake/gpt-test"
    )
    run.tools.add().function.name = "lookup"
    run.created_at.CopyFrom(clock.timestamp(clock.now()))
    await store.insert_run(PROJECT, run, [], clock.now() + 3600, [events.status_change(run)])
    return run.id
