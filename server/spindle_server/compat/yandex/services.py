"""Yandex AI Studio's assistants v1 services, each call translated onto Spindle's own servicer.

No run logic, validation or idempotency lives here: every call builds a spindle.v1 request, calls
the servicer the Spindle API uses, and translates the answer. Errors are Spindle's ApiErrors,
mapped to statuses by the interceptor (Attach, a bidirectional stream the interceptor does not
wrap, authenticates and maps its errors itself).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, TypeAlias

import grpc
import structlog
from google.protobuf import field_mask_pb2

from spindle.v1 import assistant_pb2, common_pb2, message_pb2, run_pb2, thread_pb2
from spindle_server.api import context
from spindle_server.api.assistants import AssistantServicer
from spindle_server.api.errors import ApiError, to_api_error, trailing_metadata
from spindle_server.api.interceptor import ApiKeys
from spindle_server.api.runs import RunServicer
from spindle_server.api.threads import MessageServicer, ThreadServicer
from spindle_server.compat.yandex import pb
from spindle_server.compat.yandex import translate as tr
from spindle_server.store.base import TERMINAL_STATUSES

log = structlog.get_logger("spindle.access")
Ctx: TypeAlias = grpc.aio.ServicerContext
# The SDK reads pages until one is empty; Spindle's last page has no token. After a last page
# with items this token is handed out, and it answers an empty page.
END_TOKEN = "end"
# Yandex update_mask paths that are spelled differently in spindle.v1.
MASK_PATHS = {"model_uri": "model", "instruction": "instructions"}
IGNORED_MASK_PATHS = {"expiration_config"}  # see translate.expiration


def _folder() -> str:
    return context.project()


def _mask(paths: Any) -> list[str]:
    out = []
    for path in paths:
        head, dot, rest = path.partition(".")
        if head in IGNORED_MASK_PATHS:
            continue
        out.append(MASK_PATHS.get(head, head) + dot + rest)
    return out


def _page(items: list[Any], token: str) -> str:
    return token or (END_TOKEN if items else "")


class YandexAssistants(pb.assistant_grpc.AssistantServiceServicer):
    def __init__(self, spindle: AssistantServicer) -> None:
        self._spindle = spindle

    async def Create(self, request: Any, ctx: Ctx) -> Any:
        made = await self._spindle.Create(
            assistant_pb2.CreateAssistantRequest(
                name=request.name,
                description=request.description,
                model=tr.model_from_uri(request.model_uri),
                instructions=request.instruction,
                tools=tr.tools_in(request.tools),
                completion_options=tr.completion_in(request.completion_options),
                prompt_truncation_options=tr.truncation_in(request.prompt_truncation_options),
                response_format=tr.response_format_in(request.response_format),
                labels=request.labels,
            ),
            ctx,
        )
        return tr.assistant_out(made, _folder())

    async def Get(self, request: Any, ctx: Ctx) -> Any:
        got = await self._spindle.Get(
            assistant_pb2.GetAssistantRequest(assistant_id=request.assistant_id), ctx
        )
        return tr.assistant_out(got, _folder())

    async def Update(self, request: Any, ctx: Ctx) -> Any:
        get = assistant_pb2.GetAssistantRequest(assistant_id=request.assistant_id)
        paths = _mask(request.update_mask.paths)
        if request.update_mask.paths and not paths:  # only expiration: nothing Spindle keeps
            return tr.assistant_out(await self._spindle.Get(get, ctx), _folder())
        update = assistant_pb2.UpdateAssistantRequest(
            assistant_id=request.assistant_id,
            name=request.name,
            description=request.description,
            model=tr.model_from_uri(request.model_uri),
            instructions=request.instruction,
            tools=tr.tools_in(request.tools),
            completion_options=tr.completion_in(request.completion_options),
            prompt_truncation_options=tr.truncation_in(request.prompt_truncation_options),
            response_format=tr.response_format_in(request.response_format),
            labels=request.labels,
        )
        # The SDK names nested paths (completion_options.temperature) and Spindle replaces whole
        # fields: a nested path's field is the current value with those leaves taken from here.
        nested = {p.partition(".")[0] for p in paths if "." in p and p.partition(".")[0] not in paths}
        if nested:
            current = await self._spindle.Get(get, ctx)
            for field in nested:
                merged = type(getattr(current, field))()
                merged.CopyFrom(getattr(current, field))
                for path in paths:
                    head, _, leaf = path.partition(".")
                    if head == field and leaf:
                        tr.merge_leaf(merged, getattr(update, field), leaf)
                getattr(update, field).CopyFrom(merged)
        top = list(dict.fromkeys(p.partition(".")[0] for p in paths))
        update.update_mask.paths.extend(top)
        return tr.assistant_out(await self._spindle.Update(update, ctx), _folder())

    async def Delete(self, request: Any, ctx: Ctx) -> Any:
        await self._spindle.Delete(
            assistant_pb2.DeleteAssistantRequest(assistant_id=request.assistant_id), ctx
        )
        return pb.assistant_service.DeleteAssistantResponse()

    async def List(self, request: Any, ctx: Ctx) -> Any:
        if request.page_token == END_TOKEN:
            return pb.assistant_service.ListAssistantsResponse()
        page = await self._spindle.List(
            assistant_pb2.ListAssistantsRequest(
                page_size=tr.int32(request.page_size), page_token=request.page_token
            ),
            ctx,
        )
        return pb.assistant_service.ListAssistantsResponse(
            assistants=[tr.assistant_out(a, _folder()) for a in page.assistants],
            next_page_token=_page(list(page.assistants), page.next_page_token),
        )

    async def ListVersions(self, request: Any, ctx: Ctx) -> Any:
        raise tr.unsupported("assistant versions")


class YandexThreads(pb.thread_grpc.ThreadServiceServicer):
    def __init__(self, spindle: ThreadServicer) -> None:
        self._spindle = spindle

    async def Create(self, request: Any, ctx: Ctx) -> Any:
        if request.tools:
            raise tr.unsupported("a thread's own tools (give them to the assistant or the run)")
        made = await self._spindle.Create(
            thread_pb2.CreateThreadRequest(
                name=request.name,
                description=request.description,
                labels=request.labels,
                messages=[tr.message_input(m) for m in request.messages],
            ),
            ctx,
        )
        return tr.thread_out(made, _folder())

    async def Get(self, request: Any, ctx: Ctx) -> Any:
        got = await self._spindle.Get(thread_pb2.GetThreadRequest(thread_id=request.thread_id), ctx)
        return tr.thread_out(got, _folder())

    async def Update(self, request: Any, ctx: Ctx) -> Any:
        if request.tools:
            raise tr.unsupported("a thread's own tools (give them to the assistant or the run)")
        if request.update_mask.paths and not _mask(request.update_mask.paths):
            got = await self._spindle.Get(thread_pb2.GetThreadRequest(thread_id=request.thread_id), ctx)
            return tr.thread_out(got, _folder())  # only expiration: nothing Spindle keeps
        updated = await self._spindle.Update(
            thread_pb2.UpdateThreadRequest(
                thread_id=request.thread_id,
                update_mask=field_mask_pb2.FieldMask(paths=_mask(request.update_mask.paths)),
                name=request.name,
                description=request.description,
                labels=request.labels,
            ),
            ctx,
        )
        return tr.thread_out(updated, _folder())

    async def Delete(self, request: Any, ctx: Ctx) -> Any:
        await self._spindle.Delete(thread_pb2.DeleteThreadRequest(thread_id=request.thread_id), ctx)
        return pb.thread_service.DeleteThreadResponse()

    async def List(self, request: Any, ctx: Ctx) -> Any:
        if request.page_token == END_TOKEN:
            return pb.thread_service.ListThreadsResponse()
        page = await self._spindle.List(
            thread_pb2.ListThreadsRequest(
                page_size=tr.int32(request.page_size), page_token=request.page_token
            ),
            ctx,
        )
        return pb.thread_service.ListThreadsResponse(
            threads=[tr.thread_out(t, _folder()) for t in page.threads],
            next_page_token=_page(list(page.threads), page.next_page_token),
        )


class YandexMessages(pb.message_grpc.MessageServiceServicer):
    def __init__(self, spindle: MessageServicer) -> None:
        self._spindle = spindle

    async def Create(self, request: Any, ctx: Ctx) -> Any:
        made = await self._spindle.Create(
            message_pb2.CreateMessageRequest(
                thread_id=request.thread_id,
                role=tr.role_in(request.author),
                content=tr.content_in(request.content),
                labels=request.labels,
            ),
            ctx,
        )
        return tr.message_out(made)

    async def Get(self, request: Any, ctx: Ctx) -> Any:
        got = await self._spindle.Get(message_pb2.GetMessageRequest(message_id=request.message_id), ctx)
        if got.thread_id != request.thread_id:
            raise ApiError(
                grpc.StatusCode.NOT_FOUND,
                "MESSAGE_NOT_FOUND",
                f"message {request.message_id} is not in thread {request.thread_id}",
            )
        return tr.message_out(got)

    async def List(self, request: Any, ctx: Ctx) -> AsyncGenerator[Any, None]:
        """The whole thread, newest first, as Yandex streams it."""
        token = ""
        while True:
            page = await self._spindle.List(
                message_pb2.ListMessagesRequest(
                    thread_id=request.thread_id, page_token=token, order=common_pb2.DESC, page_size=100
                ),
                ctx,
            )
            for message in page.messages:
                yield tr.message_out(message)
            token = page.next_page_token
            if not token:
                return


class YandexRuns(pb.run_grpc.RunServiceServicer):
    def __init__(self, spindle: RunServicer, keys: ApiKeys) -> None:
        self._spindle = spindle
        self._keys = keys

    async def Create(self, request: Any, ctx: Ctx) -> Any:
        # `stream` needs nothing: every Spindle run records its events for Listen.
        return tr.run_out(await self._spindle.Create(tr.create_run_in(request), ctx))

    async def Get(self, request: Any, ctx: Ctx) -> Any:
        return tr.run_out(await self._spindle.Get(run_pb2.GetRunRequest(run_id=request.run_id), ctx))

    async def GetLastByThread(self, request: Any, ctx: Ctx) -> Any:
        got = await self._spindle.GetLastByThread(
            run_pb2.GetLastRunByThreadRequest(thread_id=request.thread_id), ctx
        )
        return tr.run_out(got)

    async def List(self, request: Any, ctx: Ctx) -> Any:
        if request.page_token == END_TOKEN:
            return pb.run_service.ListRunsResponse()
        page = await self._spindle.List(
            run_pb2.ListRunsRequest(page_size=tr.int32(request.page_size), page_token=request.page_token), ctx
        )
        return pb.run_service.ListRunsResponse(
            runs=[tr.run_out(r) for r in page.runs],
            next_page_token=_page(list(page.runs), page.next_page_token),
        )

    async def Submit(self, request: Any, ctx: Ctx) -> Any:
        await self._submit(request.run_id, request.tool_result_list, ctx)
        return pb.run_service.SubmitToRunResponse()

    async def Listen(self, request: Any, ctx: Ctx) -> AsyncGenerator[Any, None]:
        start = request.events_start_idx.value if request.HasField("events_start_idx") else 0
        async with contextlib.aclosing(self._events(request.run_id, start, ctx)) as events:
            async for event in events:
                yield event

    async def Attach(self, requests: AsyncIterator[Any], ctx: Ctx) -> AsyncGenerator[Any, None]:
        """Tool results in, the run's events out. The interceptor passes bidirectional calls
        through untouched, so this authenticates and maps errors as it does."""
        tasks: list[asyncio.Task[None]] = []
        try:
            metadata = {k: v for k, v in ctx.invocation_metadata() or () if isinstance(v, str)}
            context.current_project.set(self._keys.project_for(metadata))
            first = await anext(aiter(requests), None)
            if first is None:
                return
            context.note_run(first.run_id)
            if first.HasField("tool_result_list"):
                await self._submit(first.run_id, first.tool_result_list, ctx)
            start = first.events_start_idx.value if first.HasField("events_start_idx") else 0
            # One queue for both directions, so a bad later request ends the call even while
            # the run waits for tools and no event comes. Size 1: the client's reading paces both.
            queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue(maxsize=1)
            tasks.append(asyncio.create_task(self._pump(first.run_id, start, ctx, queue)))
            tasks.append(asyncio.create_task(self._more_results(first.run_id, requests, ctx, queue)))
            while True:
                kind, item = await queue.get()
                if kind == "error":
                    raise item
                if kind == "end":
                    return
                yield item
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            error = to_api_error(exc)
            if error.code == grpc.StatusCode.INTERNAL:
                log.error("unhandled_error", method="yandex Attach", exc_info=exc)
            await ctx.abort(error.code, error.message, trailing_metadata=trailing_metadata(error))
        finally:
            for task in tasks:
                task.cancel()

    async def _pump(self, run_id: str, start: int, ctx: Ctx, queue: asyncio.Queue[tuple[str, Any]]) -> None:
        try:
            async with contextlib.aclosing(self._events(run_id, start, ctx)) as events:
                async for event in events:
                    await queue.put(("event", event))
            await queue.put(("end", None))
        except Exception as exc:
            await queue.put(("error", exc))

    async def _more_results(
        self, run_id: str, requests: AsyncIterator[Any], ctx: Ctx, queue: asyncio.Queue[tuple[str, Any]]
    ) -> None:
        try:
            async for request in requests:
                if request.HasField("tool_result_list"):
                    await self._submit(run_id, request.tool_result_list, ctx)
        except Exception as exc:
            await queue.put(("error", exc))

    async def _submit(self, run_id: str, results: Any, ctx: Ctx) -> None:
        run = await self._spindle.Get(run_pb2.GetRunRequest(run_id=run_id), ctx)
        await self._spindle.SubmitToolResults(
            run_pb2.SubmitToolResultsRequest(
                run_id=run_id, tool_results=tr.tool_results_in(results, run.required_tool_calls)
            ),
            ctx,
        )

    async def _events(self, run_id: str, start: int, ctx: Ctx) -> AsyncGenerator[Any, None]:
        """Spindle's Listen, from the first event so partial messages carry the whole text so far
        (as Yandex's do); events before `start` only build that text."""
        if start < 0:
            raise ApiError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "INVALID_ARGUMENT",
                "events_start_idx must not be negative",
                violations=[("events_start_idx", "must not be negative")],
            )
        text = ""
        listen = self._spindle.Listen(run_pb2.ListenRunRequest(run_id=run_id), ctx)
        async with contextlib.aclosing(listen) as stream:  # type: ignore[type-var]
            async for event in stream:
                out, text = _event_out(event, text)
                if out is None or event.index < start:
                    continue
                out.stream_cursor.current_event_idx = event.index
                yield out


def _event_out(event: run_pb2.StreamEvent, text: str) -> tuple[Any | None, str]:
    """One Spindle event as Yandex's (None: Yandex has no such event) and the reply text so far."""
    kinds = pb.run_service.StreamEvent
    if event.type == run_pb2.StreamEvent.PARTIAL_MESSAGE:
        text += event.message_delta.text
        return kinds(event_type=kinds.PARTIAL_MESSAGE, partial_message=tr.text_content(text)), text
    if event.type == run_pb2.StreamEvent.TOOL_CALLS:
        calls = tr.tool_calls_out(event.tool_calls.tool_calls)
        return kinds(event_type=kinds.TOOL_CALLS, tool_call_list=calls), ""
    if event.type == run_pb2.StreamEvent.DONE:
        return kinds(event_type=kinds.DONE, completed_message=tr.message_out(event.done.message)), text
    if event.type == run_pb2.StreamEvent.ERROR:
        error = pb.ai_common.Error(code=tr.ERROR_CODE[run_pb2.FAILED], message=event.error.message)
        return kinds(event_type=kinds.ERROR, error=error), text
    if event.type == run_pb2.StreamEvent.STATUS:
        change = event.status_change
        if change.discard_partial_message:
            text = ""
        if event.status not in TERMINAL_STATUSES:
            return None, text
        run = change.run
        if event.status == run_pb2.INCOMPLETE:
            message = tr.message_out(run.reply, truncated=True)
            return kinds(event_type=kinds.DONE, completed_message=message), text
        return kinds(event_type=kinds.ERROR, error=tr.error_out(run)), text
    return None, text


class Endpoints(pb.endpoint_grpc.ApiEndpointServiceServicer):
    """The SDK's discovery: every service it may ask for is this server."""

    SERVICES = ("ai-assistants", "endpoint")

    def __init__(self, address: Callable[[], str]) -> None:
        self._address = address

    async def List(self, request: Any, ctx: Ctx) -> Any:
        address = self._address()
        return pb.endpoint_service.ListApiEndpointsResponse(
            endpoints=[pb.endpoint.ApiEndpoint(id=name, address=address) for name in self.SERVICES]
        )

    async def Get(self, request: Any, ctx: Ctx) -> Any:
        if request.api_endpoint_id not in self.SERVICES:
            raise ApiError(
                grpc.StatusCode.NOT_FOUND, "ENDPOINT_NOT_FOUND", f"no endpoint {request.api_endpoint_id!r}"
            )
        return pb.endpoint.ApiEndpoint(id=request.api_endpoint_id, address=self._address())


def unimplemented_servicer(base: type, service: str, what: str) -> Any:
    """An instance of the generated servicer `base` whose every method answers UNIMPLEMENTED
    with a message naming `what` (grpc's own default says only 'Method not implemented!')."""

    async def refuse(self: Any, request: Any, ctx: Ctx) -> Any:
        raise tr.unsupported(what)

    methods = {name: refuse for name in dir(base) if name[:1].isupper()}
    return type(f"Unsupported{service}", (base,), methods)()
