"""A run's Listen stream as OpenAI's server-sent events, in OpenAI's order.

The events come from RunServicer.Listen (the same replay-then-live log gRPC clients follow).
Spindle stores a turn's step and reply message when the turn ends, so while text or tool calls
stream, the step and message announced by *.created carry ids made up for the stream; the
*.completed events carry the stored objects with their real ids (those the REST API returns).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, cast

import grpc

from spindle.v1 import common_pb2, message_pb2, run_pb2
from spindle_server import clock, ids
from spindle_server.api.errors import to_api_error
from spindle_server.api.runs import RunServicer
from spindle_server.compat.openai import render
from spindle_server.compat.openai.sdk import BETA, checked
from spindle_server.engine import events as run_events

JSON = dict[str, Any]
DONE = b"event: done\ndata: [DONE]\n\n"

TERMINAL_EVENT = {
    run_pb2.COMPLETED: "thread.run.completed",
    run_pb2.FAILED: "thread.run.failed",
    run_pb2.CANCELLED: "thread.run.cancelled",
    run_pb2.INCOMPLETE: "thread.run.incomplete",
    run_pb2.EXPIRED: "thread.run.expired",
}
LIVE_EVENT = {
    run_pb2.PENDING: "thread.run.queued",
    run_pb2.IN_PROGRESS: "thread.run.in_progress",
    run_pb2.CANCELLING: "thread.run.cancelling",
}


def sse(event: str, data: JSON) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class _ListenContext:
    """What Listen asks of its gRPC context: a callback when the call ends."""

    def __init__(self) -> None:
        self._callbacks: list[Callable[[Any], None]] = []

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        self._callbacks.append(callback)

    def done(self) -> None:
        for callback in self._callbacks:
            callback(None)


class _Turn:
    """The step and message being streamed, under the ids announced for them."""

    def __init__(self, run: run_pb2.Run) -> None:
        self.run = run
        self.step_id = ""
        self.message_id = ""
        self.text = ""
        self.tool_step_id = ""
        self.calls: dict[int, JSON] = {}


class ServerClosing(Exception):
    """The server stops: open streams end with an error event, as gRPC Listen calls end."""


async def _until_closing(
    events: AsyncGenerator[run_pb2.StreamEvent, None], closing: asyncio.Event
) -> AsyncIterator[run_pb2.StreamEvent]:
    stop = asyncio.ensure_future(closing.wait())
    try:
        while True:
            following = asyncio.ensure_future(anext(events))
            await asyncio.wait({following, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not following.done():
                following.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await following
                raise ServerClosing
            try:
                event = following.result()
            except StopAsyncIteration:
                return
            yield event
    finally:
        stop.cancel()


class RunEvents:
    def __init__(self, runs: RunServicer) -> None:
        self._runs = runs
        # Set when the server stops, after the grace period that gRPC calls get too.
        self.closing = asyncio.Event()

    async def _get(self, run_id: str) -> run_pb2.Run:
        return await self._runs.Get(
            run_pb2.GetRunRequest(run_id=run_id), cast(grpc.aio.ServicerContext, None)
        )

    async def _step(self, run_id: str, match: Callable[[run_pb2.RunStep], bool]) -> run_pb2.RunStep | None:
        request = run_pb2.ListRunStepsRequest(run_id=run_id, page_size=20, order=common_pb2.DESC)
        response = await self._runs.ListSteps(request, cast(grpc.aio.ServicerContext, None))
        return next((item for item in response.steps if match(item)), None)

    async def stream(
        self,
        run: run_pb2.Run,
        *,
        created: bool,
        answered_rounds: int = 0,
        prelude: list[bytes] | None = None,
    ) -> AsyncIterator[bytes]:
        """SSE bytes of `run` up to its end or its next requires_action, then `done`.

        answered_rounds: the TOOL_CALLS events already answered (submit_tool_outputs), skipped
        in the replay, as is everything before them.
        """
        for chunk in prelude or ():
            yield chunk
        if created:
            yield sse("thread.run.created", render.run(run))
        listen_context = _ListenContext()
        request = run_pb2.ListenRunRequest(run_id=run.id)
        turn = _Turn(run)
        skipped = 0
        try:
            listen = cast(
                AsyncGenerator[run_pb2.StreamEvent, None],
                self._runs.Listen(request, cast(grpc.aio.ServicerContext, listen_context)),
            )
            async with contextlib.aclosing(listen) as events:
                async for event in _until_closing(events, self.closing):
                    if skipped < answered_rounds:
                        if event.type == run_pb2.StreamEvent.TOOL_CALLS:
                            skipped += 1
                        continue
                    async for chunk in self._translate(turn, event):
                        yield chunk
                    if run_events.is_terminal(event) or event.type == run_pb2.StreamEvent.TOOL_CALLS:
                        break
        except ServerClosing:
            body = {
                "error": {"message": "the server is stopping", "type": "server_error", "code": "unavailable"}
            }
            yield sse("error", body)
        except Exception as exc:
            error = to_api_error(exc)
            body = {"error": {"message": error.message, "type": "server_error", "code": error.reason.lower()}}
            yield sse("error", body)
        finally:
            listen_context.done()
        yield DONE

    async def _translate(self, turn: _Turn, event: run_pb2.StreamEvent) -> AsyncIterator[bytes]:
        kind = event.type
        if kind == run_pb2.StreamEvent.STATUS:
            change = event.status_change
            turn.run = change.run
            if change.discard_partial_message:
                # A retried turn: the text and tool calls streamed so far are void.
                async for chunk in self._close_message(turn, "incomplete"):
                    yield chunk
                if turn.tool_step_id:
                    step = self._step_body(turn, turn.tool_step_id, {"type": "tool_calls", "tool_calls": []})
                    step["status"] = "failed"
                    yield sse("thread.run.step.failed", step)
                    turn.tool_step_id = ""
                    turn.calls = {}
            if event.status in TERMINAL_EVENT:
                async for chunk in self._close_message(turn, "incomplete"):
                    yield chunk
                yield sse(TERMINAL_EVENT[event.status], render.run(change.run))
            elif event.status in LIVE_EVENT:
                yield sse(LIVE_EVENT[event.status], render.run(change.run))
        elif kind == run_pb2.StreamEvent.PARTIAL_MESSAGE:
            if not turn.message_id:
                async for chunk in self._open_message(turn, ids.new_id("step"), ids.new_id("msg")):
                    yield chunk
            turn.text += event.message_delta.text
            delta = {
                "id": turn.message_id,
                "object": "thread.message.delta",
                "delta": {
                    "content": [{"index": 0, "type": "text", "text": {"value": event.message_delta.text}}]
                },
            }
            yield sse("thread.message.delta", checked(f"{BETA}.threads", "MessageDeltaEvent", delta))
        elif kind == run_pb2.StreamEvent.TOOL_CALL_DELTA:
            async for chunk in self._tool_delta(turn, event.tool_call_delta):
                yield chunk
        elif kind == run_pb2.StreamEvent.TOOL_CALLS:
            async for chunk in self._tool_calls(turn, event.tool_calls.tool_calls):
                yield chunk
        elif kind == run_pb2.StreamEvent.DONE:
            async for chunk in self._done(turn, event.done.message):
                yield chunk
        elif kind == run_pb2.StreamEvent.ERROR:
            async for chunk in self._close_message(turn, "incomplete"):
                yield chunk
            yield sse("thread.run.failed", render.run(await self._get(turn.run.id)))

    def _step_body(self, turn: _Turn, step_id: str, details: JSON) -> JSON:
        run = turn.run
        return {
            "id": step_id,
            "object": "thread.run.step",
            "created_at": int(clock.now()),
            "assistant_id": run.assistant_id,
            "thread_id": run.thread_id,
            "run_id": run.id,
            "type": details["type"],
            "status": "in_progress",
            "step_details": details,
            "last_error": None,
            "expired_at": None,
            "cancelled_at": None,
            "failed_at": None,
            "completed_at": None,
            "metadata": {},
            "usage": None,
        }

    async def _open_message(self, turn: _Turn, step_id: str, message_id: str) -> AsyncIterator[bytes]:
        async for chunk in self._close_message(turn, "completed"):
            yield chunk
        turn.step_id, turn.message_id, turn.text = step_id, message_id, ""
        step = self._step_body(
            turn, step_id, {"type": "message_creation", "message_creation": {"message_id": message_id}}
        )
        yield sse("thread.run.step.created", step)
        yield sse("thread.run.step.in_progress", step)
        placeholder = message_pb2.Message(
            id=message_id,
            thread_id=turn.run.thread_id,
            role=message_pb2.ASSISTANT,
            run_id=turn.run.id,
            assistant_id=turn.run.assistant_id,
            created_at=clock.timestamp(clock.now()),
        )
        body = render.message(placeholder, status="in_progress")
        yield sse("thread.message.created", body)
        yield sse("thread.message.in_progress", body)

    async def _close_message(self, turn: _Turn, status: str) -> AsyncIterator[bytes]:
        """Ends the streamed message (without a stored one: text before tool calls, or cut off)."""
        if not turn.message_id:
            return
        message = message_pb2.Message(
            id=turn.message_id,
            thread_id=turn.run.thread_id,
            role=message_pb2.ASSISTANT,
            run_id=turn.run.id,
            assistant_id=turn.run.assistant_id,
            created_at=clock.timestamp(clock.now()),
        )
        message.content.add().text.text = turn.text
        body = render.message(message, status=status)
        yield sse(f"thread.message.{status}", body)
        step = self._step_body(turn, turn.step_id, render.step_details(_message_step(turn.message_id)))
        step["status"] = "completed" if status == "completed" else "failed"
        yield sse(f"thread.run.step.{step['status']}", step)
        turn.message_id = turn.step_id = turn.text = ""

    async def _open_tool_step(self, turn: _Turn) -> AsyncIterator[bytes]:
        async for chunk in self._close_message(turn, "completed"):
            yield chunk
        turn.tool_step_id = ids.new_id("step")
        step = self._step_body(turn, turn.tool_step_id, {"type": "tool_calls", "tool_calls": []})
        yield sse("thread.run.step.created", step)
        yield sse("thread.run.step.in_progress", step)

    def _step_delta(self, turn: _Turn, calls: list[JSON]) -> bytes:
        delta = {
            "id": turn.tool_step_id,
            "object": "thread.run.step.delta",
            "delta": {"step_details": {"type": "tool_calls", "tool_calls": calls}},
        }
        return sse("thread.run.step.delta", checked(f"{BETA}.threads.runs", "RunStepDeltaEvent", delta))

    async def _tool_delta(self, turn: _Turn, delta: run_pb2.ToolCallDelta) -> AsyncIterator[bytes]:
        if not turn.tool_step_id:
            async for chunk in self._open_tool_step(turn):
                yield chunk
        call: JSON = {"index": delta.index, "type": "function", "function": {"arguments": delta.arguments}}
        if delta.index not in turn.calls:
            turn.calls[delta.index] = {"id": delta.id}
            call["id"] = delta.id
            call["function"]["name"] = delta.name
            call["function"]["output"] = None
        yield self._step_delta(turn, [call])

    async def _tool_calls(self, turn: _Turn, calls: Any) -> AsyncIterator[bytes]:
        if not turn.tool_step_id:
            async for chunk in self._open_tool_step(turn):
                yield chunk
            whole = [
                {
                    "index": index,
                    "id": call.id,
                    "type": "function",
                    "function": {
                        "name": call.function.name,
                        "arguments": call.function.arguments,
                        "output": None,
                    },
                }
                for index, call in enumerate(calls)
            ]
            yield self._step_delta(turn, whole)
        # The tool step stays in_progress until the outputs arrive (submit_tool_outputs' stream
        # opens with its thread.run.step.completed).
        yield sse("thread.run.requires_action", render.run(await self._get(turn.run.id)))

    async def _done(self, turn: _Turn, reply: message_pb2.Message) -> AsyncIterator[bytes]:
        stored = await self._step(turn.run.id, lambda item: item.message_creation.message_id == reply.id)
        if not turn.message_id:
            # Nothing was streamed: announce the stored step and message under their own ids.
            async for chunk in self._open_message(
                turn, stored.id if stored else ids.new_id("step"), reply.id
            ):
                yield chunk
        yield sse("thread.message.completed", render.message(reply))
        if stored is not None:
            yield sse("thread.run.step.completed", render.step(stored))
        turn.message_id = turn.step_id = turn.text = ""
        yield sse("thread.run.completed", render.run(await self._get(turn.run.id)))


def _message_step(message_id: str) -> run_pb2.RunStep:
    step = run_pb2.RunStep(type=run_pb2.RunStep.MESSAGE_CREATION)
    step.message_creation.message_id = message_id
    return step
