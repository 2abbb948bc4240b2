"""Executes one model turn of a claimed run and moves it to its next state."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncGenerator

import structlog

from spindle.v1 import common_pb2, message_pb2, run_pb2
from spindle_server import clock, faults, ids
from spindle_server.engine import events, transitions
from spindle_server.engine.config import EngineConfig
from spindle_server.engine.prompt import PromptBudgetExceededError, build_request, completion_budget
from spindle_server.engine.turn import TurnState
from spindle_server.models.base import ModelBackend, ModelChunk, ModelError, ModelRequest
from spindle_server.models.registry import ModelRegistry, UnknownModelError
from spindle_server.store.base import ClaimedRun, RunMutation, Store
from spindle_server.store.errors import FencedError, StateError, UnavailableError

log = structlog.get_logger(__name__)

# Why an executor's task was cancelled from outside.
CANCEL_BY_USER = "cancel"
CANCEL_SHUTDOWN = "shutdown"
CANCEL_LOST_RUN = "lost"  # expired or taken over: someone else has written its end


class TurnExecutor:
    def __init__(self, store: Store, models: ModelRegistry, config: EngineConfig) -> None:
        self._store = store
        self._models = models
        self._config = config

    async def execute(self, claimed: ClaimedRun, cancel_reason: dict[str, str], *, new: bool = False) -> None:
        """Run one turn. `cancel_reason` (run id -> why) is set by whoever stops the task; it is
        read here too, so a stop that came before the task ever ran still ends the run.
        `new`: claimed in the transaction that created it (Engine.create_run), its task spawned
        as that commit was answered: no step is stored yet, and no cancel can have committed
        without reaching the task (the run's id was not known outside before), so neither is
        read from the store."""
        run = claimed.run
        bound = log.bind(run_id=run.id, epoch=claimed.epoch)
        try:
            if run.id in cancel_reason:
                raise asyncio.CancelledError  # stopped before this task began: handled below
            if faults.ENABLED:
                await faults.reached("engine.before_run_body")
            if not new:
                await self._check_still_in_progress(run)
            await self._execute(claimed, new)
        except asyncio.CancelledError:
            reason = cancel_reason.get(run.id, CANCEL_SHUTDOWN)
            bound.info("run_execution_interrupted", reason=reason)
            if reason == CANCEL_BY_USER:
                await self._final_write(claimed, transitions.finish_cancel(clock.now()))
            elif reason == CANCEL_SHUTDOWN:
                await self._final_write(
                    claimed, transitions.requeue(clock.now(), "server shutting down; run re-queued")
                )
        except UnavailableError as exc:
            # The store could not commit: like a crash of this executor. Nothing more can be
            # written now; the lease runs out and the sweeper retries the run (counting the
            # attempt), rather than failing it as if this were a bug.
            bound.warning("run_execution_store_unavailable", error=str(exc))
        except (FencedError, transitions.RunNotInProgressError) as exc:
            bound.info("run_execution_superseded", reason=str(exc))
            if isinstance(exc, transitions.RunNotInProgressError) and exc.status == run_pb2.CANCELLING:
                await self._final_write(claimed, transitions.finish_cancel(clock.now()))
        except Exception as exc:
            bound.exception("run_execution_bug")
            await self._final_write(
                claimed,
                transitions.fail(clock.now(), "server_error", f"internal error: {type(exc).__name__}"),
            )

    async def _check_still_in_progress(self, run: run_pb2.Run) -> None:
        """A cancel that committed after the claim but before this task existed found no task
        to stop: the run's status says so. Later cancels reach the task itself."""
        _, current = await self._store.get_run_any_project(run.id)
        if current.status != run_pb2.IN_PROGRESS:
            raise transitions.RunNotInProgressError(current)

    async def _final_write(self, claimed: ClaimedRun, mutation: RunMutation) -> None:
        # Shielded: the end of a run must be written even while the server is being stopped.
        write = self._store.mutate_run(claimed.run.id, mutation, epoch=claimed.epoch)
        try:
            await asyncio.shield(write)
        except (StateError, FencedError) as exc:
            log.info("run_final_write_skipped", run_id=claimed.run.id, reason=str(exc))

    async def _execute(self, claimed: ClaimedRun, new: bool) -> None:
        run, epoch = claimed.run, claimed.epoch
        now = clock.now()
        try:
            backend, provider_model = self._models.resolve(run.model)
        except UnknownModelError as exc:
            await self._write(run, epoch, transitions.fail(now, "model_not_found", str(exc)))
            return
        thread_messages = await self._store.thread_messages(run.thread_id)
        steps = [] if new else await self._store.run_steps(run.id)
        # Read before this turn streams: afterwards the log also holds this turn's own deltas.
        round_texts = await self._round_texts(run, steps)
        if completion_budget(run) == 0:
            await self._end_before_turn(run, epoch, "max_completion_tokens", round_texts)
            return
        try:
            request, prompt_tokens = build_request(
                run, provider_model, thread_messages, steps, backend.count_tokens, round_texts
            )
        except PromptBudgetExceededError:
            await self._end_before_turn(run, epoch, "max_prompt_tokens", round_texts)
            return

        turn = TurnState()
        try:
            await self._stream(run, epoch, backend.stream(request), turn)
        except ModelError as exc:
            # Logged for operators; backends keep secrets out of their messages.
            log.info("model_call_failed", run_id=run.id, model=run.model, code=exc.code, error=exc.message)
            await self._write(
                run, epoch, transitions.fail(clock.now(), exc.code, exc.message, turn.take_pending())
            )
            return
        await self._finish_turn(run, epoch, backend, request, turn, prompt_tokens, "".join(round_texts))

    async def _end_before_turn(
        self, run: run_pb2.Run, epoch: int, reason: str, round_texts: list[str]
    ) -> None:
        """INCOMPLETE before a model call: a budget is spent. Text of earlier turns is the reply."""
        now = clock.now()
        earlier_text = "".join(round_texts)
        reply = _reply(run, earlier_text, now) if earlier_text else None
        step = _message_step(run, reply, now, None) if reply is not None else None
        await self._write(run, epoch, transitions.incomplete(now, reason, reply, step, None, ()))

    async def _stream(
        self, run: run_pb2.Run, epoch: int, chunks: AsyncGenerator[ModelChunk, None], turn: TurnState
    ) -> None:
        """Consume the model stream, writing coalesced deltas at most every coalesce_window.

        Leading edge: a delta after a quiet window is written at once (the first token of a
        reply reaches listeners without waiting out the window); deltas arriving within the
        window of the last write share the next one."""
        loop = asyncio.get_running_loop()
        next_chunk: asyncio.Future[ModelChunk] | None = None
        flush_at: float | None = None
        written_at = -math.inf
        try:
            while True:
                chunk: ModelChunk | None = None
                if next_chunk is None and flush_at is None:
                    # No write is due: the next chunk is awaited as it is (no task, no wait).
                    try:
                        chunk = await anext(chunks)
                    except StopAsyncIteration:
                        return
                else:
                    if next_chunk is None:
                        next_chunk = asyncio.ensure_future(anext(chunks))
                    timeout = None if flush_at is None else max(flush_at - loop.time(), 0.0)
                    done, _ = await asyncio.wait({next_chunk}, timeout=timeout)
                    if done:
                        try:
                            chunk = next_chunk.result()
                        except StopAsyncIteration:
                            next_chunk = None
                            return
                        next_chunk = None
                if chunk is not None:
                    turn.add(chunk)
                    if turn.pending and flush_at is None:
                        flush_at = written_at + self._config.coalesce_window
                if flush_at is not None and loop.time() >= flush_at:
                    flush_at = None
                    if turn.pending:
                        await self._write(run, epoch, transitions.stream(turn.take_pending()))
                        written_at = loop.time()
        finally:
            if next_chunk is not None:
                next_chunk.cancel()
                with contextlib.suppress(BaseException):
                    await next_chunk
            # Close the model call now (an HTTP stream), not whenever the generator is collected.
            with contextlib.suppress(Exception):
                await chunks.aclose()

    async def _finish_turn(
        self,
        run: run_pb2.Run,
        epoch: int,
        backend: ModelBackend,
        request: ModelRequest,
        turn: TurnState,
        prompt_tokens: int,
        earlier_text: str,
    ) -> None:
        now = clock.now()
        text = "".join(turn.text)
        usage = turn.turn_usage(prompt_tokens, backend.count_tokens(text))
        # Each turn's usage is an event of its own (DONE carries the run's total).
        pending = [*turn.take_pending(), events.usage(usage)]
        incomplete_reason = _incomplete_reason(turn, request.max_tokens)
        calls = turn.tool_calls()
        # Tool calls of a turn cut short are dropped: their arguments are likely truncated JSON.
        if calls and incomplete_reason is None:
            step = _step(run, run_pb2.RunStep.TOOL_CALLS, run_pb2.RunStep.IN_PROGRESS, now)
            step.tool_calls.tool_calls.extend(calls)
            step.usage.CopyFrom(usage)
            tool_deadline = min(
                now + self._config.tool_timeout, transitions.run_deadline(run, self._config.run_timeout)
            )
            mutation = transitions.pause_for_tools(now, calls, step, usage, pending, tool_deadline, text)
            await self._write_turn_end(run, epoch, mutation)
            return

        # The reply is everything the model said in this run: before its tool calls, and now.
        full_text = earlier_text + text
        if incomplete_reason is not None:
            # A run cut short keeps its partial reply; one with no text at all adds no message.
            reply = _reply(run, full_text, now) if full_text else None
            message_step = _message_step(run, reply, now, usage) if reply is not None else None
            mutation = transitions.incomplete(now, incomplete_reason, reply, message_step, usage, pending)
        else:
            reply = _reply(run, full_text, now)
            mutation = transitions.complete(now, reply, _message_step(run, reply, now, usage), usage, pending)
        await self._write_turn_end(run, epoch, mutation)

    async def _round_texts(self, run: run_pb2.Run, steps: list[run_pb2.RunStep]) -> list[str]:
        """What the model said before each answered tool-call round of this run, as listeners
        saw it: kept beside each TOOL_CALLS step when the run paused, so a round costs one small
        read, not a reread of the whole log."""
        answered = [
            step
            for step in steps
            if step.type == run_pb2.RunStep.TOOL_CALLS and step.status == run_pb2.RunStep.COMPLETED
        ]
        if not answered:
            return []
        said = await self._store.tool_round_texts(run.id)
        if all(step.id in said for step in answered):
            return [said[step.id] for step in answered]
        # Paused by a server that did not keep the texts yet: rebuild them from the log once.
        streamed: list[run_pb2.StreamEvent] = []
        while True:
            batch = await self._store.read_events(run.id, len(streamed), 1000)
            streamed.extend(batch)
            if len(batch) < 1000:
                return _round_texts(streamed)

    async def _write_turn_end(self, run: run_pb2.Run, epoch: int, mutation: RunMutation) -> None:
        """The write that ends a model turn (completed, incomplete, paused for tools)."""
        if faults.ENABLED:
            await faults.reached("engine.before_turn_end_write")
        await self._write(run, epoch, mutation)
        if faults.ENABLED:
            await faults.reached("engine.after_turn_end_write")

    async def _write(self, run: run_pb2.Run, epoch: int, mutation: RunMutation) -> None:
        await self._store.mutate_run(run.id, mutation, epoch=epoch)


def _step(run: run_pb2.Run, kind: int, status: int, now: float) -> run_pb2.RunStep:
    step = run_pb2.RunStep(
        id=ids.new_id("step"),
        run_id=run.id,
        thread_id=run.thread_id,
        assistant_id=run.assistant_id,
        type=kind,  # type: ignore[arg-type]
        status=status,  # type: ignore[arg-type]
    )
    step.created_at.CopyFrom(clock.timestamp(now))
    return step


def _incomplete_reason(turn: TurnState, max_tokens: int | None) -> str | None:
    """Why a turn that stopped before its answer was done leaves the run INCOMPLETE, or None.

    `length` means the completion limit was hit. It is the run's budget, reason
    `max_completion_tokens`, when this turn was given what was left of max_completion_tokens
    and used it up (or the provider did not say how much it used). Otherwise the provider's
    own limit cut the reply: the model's maximum output, a server-side cap (llama.cpp's
    n_predict, vLLM's max_model_len) or a full context window. OpenAI's runs know only their
    two budgets; Spindle ends those runs INCOMPLETE too, with reason `max_tokens`, so that the
    caller can tell that raising max_completion_tokens would not help.
    `content_filter`: the provider withheld the rest of the reply; reason `content_filter`
    (as OpenAI's Responses API reports it).
    """
    if turn.finish_reason == "content_filter":
        return "content_filter"
    if turn.finish_reason != "length":
        return None
    if max_tokens is None or (turn.usage is not None and turn.usage.completion_tokens < max_tokens):
        return "max_tokens"
    return "max_completion_tokens"


def _round_texts(streamed: list[run_pb2.StreamEvent]) -> list[str]:
    """The text deltas before each TOOL_CALLS event; deltas voided by a retried call are dropped."""
    texts: list[str] = []
    current: list[str] = []
    for event in streamed:
        if event.type == run_pb2.StreamEvent.PARTIAL_MESSAGE:
            current.append(event.message_delta.text)
        elif event.type == run_pb2.StreamEvent.TOOL_CALLS:
            texts.append("".join(current))
            current = []
        elif event.type == run_pb2.StreamEvent.STATUS and event.status_change.discard_partial_message:
            current = []
    return texts


def _message_step(
    run: run_pb2.Run, reply: message_pb2.Message, now: float, usage: common_pb2.Usage | None
) -> run_pb2.RunStep:
    step = _step(run, run_pb2.RunStep.MESSAGE_CREATION, run_pb2.RunStep.COMPLETED, now)
    step.message_creation.message_id = reply.id
    step.completed_at.CopyFrom(clock.timestamp(now))
    if usage is not None:
        step.usage.CopyFrom(usage)
    return step


def _reply(run: run_pb2.Run, text: str, now: float) -> message_pb2.Message:
    message = message_pb2.Message(
        id=ids.new_id("msg"),
        thread_id=run.thread_id,
        role=message_pb2.ASSISTANT,
        run_id=run.id,
        assistant_id=run.assistant_id,
        created_by=run.created_by,
    )
    message.content.add().text.text = text
    message.created_at.CopyFrom(clock.timestamp(now))
    return message
