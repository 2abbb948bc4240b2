"""The Starlette app: OpenAI's routes, each a call of the servicer method gRPC reaches."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, cast

import grpc
import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from spindle.v1 import assistant_pb2, common_pb2, message_pb2, run_pb2, thread_pb2
from spindle_server.api import context
from spindle_server.api.assistants import AssistantServicer
from spindle_server.api.errors import ApiError, not_found, to_api_error
from spindle_server.api.interceptor import ApiKeys
from spindle_server.api.runs import RunServicer
from spindle_server.api.threads import MessageServicer, ThreadServicer
from spindle_server.compat.openai import parse, render
from spindle_server.compat.openai.errors import error_response
from spindle_server.compat.openai.paging import Cursors, ListParams, cursor_page
from spindle_server.compat.openai.stream import RunEvents, sse

log = structlog.get_logger("spindle.openai")

NO_CONTEXT = cast(grpc.aio.ServicerContext, None)  # the servicers' unary methods do not read it
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
Handler = Callable[[Request], Awaitable[Response]]


class Servicers:
    def __init__(
        self,
        assistants: AssistantServicer,
        threads: ThreadServicer,
        messages: MessageServicer,
        runs: RunServicer,
    ) -> None:
        self.assistants = assistants
        self.threads = threads
        self.messages = messages
        self.runs = runs


def _request_id(request: Request) -> str:
    """OpenAI's Idempotency-Key header is Spindle's request_id (the same one-time semantics)."""
    return request.headers.get("idempotency-key", "")


async def _json(request: Request, limit: int) -> Any:
    """The body as JSON, read up to `limit` bytes (gRPC's --max-message-bytes): no more is held."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "REQUEST_TOO_LARGE",
                f"the request body is larger than {limit} bytes",
                violations=[("body", f"at most {limit} bytes are allowed")],
            )
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise parse.bad("body", f"is not valid JSON: {type(exc).__name__}") from exc


def _sse(chunks: Any) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream", headers=SSE_HEADERS)


class OpenAIFacade:
    def __init__(self, servicers: Servicers, keys: ApiKeys, max_body_bytes: int) -> None:
        self._s = servicers
        self._keys = keys
        self._max_body = max_body_bytes
        self._cursors = Cursors()
        self._events = RunEvents(servicers.runs)

    def close_streams(self) -> None:
        """Ends the open SSE streams (each with an error event and `done`): the server stops."""
        self._events.closing.set()

    def app(self) -> Starlette:
        r = self._route
        routes = [
            r("/v1/assistants", self.create_assistant, "POST"),
            r("/v1/assistants", self.list_assistants, "GET"),
            r("/v1/assistants/{assistant_id}", self.get_assistant, "GET"),
            r("/v1/assistants/{assistant_id}", self.update_assistant, "POST"),
            r("/v1/assistants/{assistant_id}", self.delete_assistant, "DELETE"),
            r("/v1/threads", self.create_thread, "POST"),
            r("/v1/threads/runs", self.create_thread_and_run, "POST"),
            r("/v1/threads/{thread_id}", self.get_thread, "GET"),
            r("/v1/threads/{thread_id}", self.update_thread, "POST"),
            r("/v1/threads/{thread_id}", self.delete_thread, "DELETE"),
            r("/v1/threads/{thread_id}/messages", self.create_message, "POST"),
            r("/v1/threads/{thread_id}/messages", self.list_messages, "GET"),
            r("/v1/threads/{thread_id}/messages/{message_id}", self.get_message, "GET"),
            r(
                "/v1/threads/{thread_id}/messages/{message_id}",
                self.unsupported_message_change,
                "POST",
                "DELETE",
            ),
            r("/v1/threads/{thread_id}/runs", self.create_run, "POST"),
            r("/v1/threads/{thread_id}/runs", self.list_runs, "GET"),
            r("/v1/threads/{thread_id}/runs/{run_id}", self.get_run, "GET"),
            r("/v1/threads/{thread_id}/runs/{run_id}", self.update_run, "POST"),
            r("/v1/threads/{thread_id}/runs/{run_id}/cancel", self.cancel_run, "POST"),
            r("/v1/threads/{thread_id}/runs/{run_id}/submit_tool_outputs", self.submit_tool_outputs, "POST"),
            r("/v1/threads/{thread_id}/runs/{run_id}/steps", self.list_steps, "GET"),
            r("/v1/threads/{thread_id}/runs/{run_id}/steps/{step_id}", self.get_step, "GET"),
            r("/v1/{rest:path}", self.unknown, "GET", "POST", "DELETE", "PUT", "PATCH"),
        ]
        return Starlette(routes=routes)

    def _route(self, path: str, handler: Handler, *methods: str) -> Route:
        async def endpoint(request: Request) -> Response:
            try:
                context.current_project.set(self._keys.project_for(request.headers))
                return await handler(request)
            except Exception as exc:
                error = to_api_error(exc)
                if error.code == grpc.StatusCode.INTERNAL:
                    log.error("unhandled_error", path=request.url.path, exc_info=exc)
                else:
                    log.info("openai_error", path=request.url.path, reason=error.reason)
                return error_response(error)

        return Route(path, endpoint, methods=list(methods))

    async def _json(self, request: Request) -> Any:
        return await _json(request, self._max_body)

    # ---- assistants ---------------------------------------------------------------------------

    async def create_assistant(self, request: Request) -> Response:
        proto = parse.create_assistant(await self._json(request), _request_id(request))
        return JSONResponse(render.assistant(await self._s.assistants.Create(proto, NO_CONTEXT)))

    async def _assistant(self, assistant_id: str) -> assistant_pb2.Assistant:
        request = assistant_pb2.GetAssistantRequest(assistant_id=assistant_id)
        return await self._s.assistants.Get(request, NO_CONTEXT)

    async def get_assistant(self, request: Request) -> Response:
        return JSONResponse(render.assistant(await self._assistant(request.path_params["assistant_id"])))

    async def update_assistant(self, request: Request) -> Response:
        assistant_id = request.path_params["assistant_id"]
        proto = parse.update_assistant(assistant_id, await self._json(request), _request_id(request))
        if "completion_options" in proto.update_mask.paths:
            # OpenAI changes temperature or top_p alone; Spindle replaces the option group, so
            # the half not given keeps its stored value.
            current = (await self._assistant(assistant_id)).completion_options
            for name in ("temperature", "top_p", "max_tokens"):
                if current.HasField(name) and not proto.completion_options.HasField(name):
                    setattr(proto.completion_options, name, getattr(current, name))
        return JSONResponse(render.assistant(await self._s.assistants.Update(proto, NO_CONTEXT)))

    async def delete_assistant(self, request: Request) -> Response:
        assistant_id = request.path_params["assistant_id"]
        proto = assistant_pb2.DeleteAssistantRequest(
            assistant_id=assistant_id, request_id=_request_id(request)
        )
        await self._s.assistants.Delete(proto, NO_CONTEXT)
        return JSONResponse(render.assistant_deleted(assistant_id))

    async def list_assistants(self, request: Request) -> Response:
        async def fetch(
            size: int, token: str, order: common_pb2.SortOrder.ValueType
        ) -> tuple[list[assistant_pb2.Assistant], str]:
            proto = assistant_pb2.ListAssistantsRequest(page_size=size, page_token=token, order=order)
            page = await self._s.assistants.List(proto, NO_CONTEXT)
            return list(page.assistants), page.next_page_token

        return await self._list(request, fetch, "assistants", render.assistant)

    # ---- threads and messages -----------------------------------------------------------------

    async def create_thread(self, request: Request) -> Response:
        proto = parse.create_thread(await self._json(request), _request_id(request))
        return JSONResponse(render.thread(await self._s.threads.Create(proto, NO_CONTEXT)))

    async def get_thread(self, request: Request) -> Response:
        proto = thread_pb2.GetThreadRequest(thread_id=request.path_params["thread_id"])
        return JSONResponse(render.thread(await self._s.threads.Get(proto, NO_CONTEXT)))

    async def update_thread(self, request: Request) -> Response:
        thread_id = request.path_params["thread_id"]
        proto = parse.update_thread(thread_id, await self._json(request), _request_id(request))
        if not proto.update_mask.paths:
            return await self.get_thread(request)
        return JSONResponse(render.thread(await self._s.threads.Update(proto, NO_CONTEXT)))

    async def delete_thread(self, request: Request) -> Response:
        thread_id = request.path_params["thread_id"]
        proto = thread_pb2.DeleteThreadRequest(thread_id=thread_id, request_id=_request_id(request))
        await self._s.threads.Delete(proto, NO_CONTEXT)
        return JSONResponse(render.thread_deleted(thread_id))

    async def create_message(self, request: Request) -> Response:
        thread_id = request.path_params["thread_id"]
        proto = parse.create_message(thread_id, await self._json(request), _request_id(request))
        return JSONResponse(render.message(await self._s.messages.Create(proto, NO_CONTEXT)))

    async def get_message(self, request: Request) -> Response:
        message_id = request.path_params["message_id"]
        proto = message_pb2.GetMessageRequest(message_id=message_id)
        message = await self._s.messages.Get(proto, NO_CONTEXT)
        if message.thread_id != request.path_params["thread_id"]:
            raise not_found("message", message_id)
        return JSONResponse(render.message(message))

    async def unsupported_message_change(self, request: Request) -> Response:
        raise parse.unsupported("message_id", "changing or deleting a message")

    async def list_messages(self, request: Request) -> Response:
        thread_id = request.path_params["thread_id"]
        run_id = request.query_params.get("run_id", "")

        async def fetch(
            size: int, token: str, order: common_pb2.SortOrder.ValueType
        ) -> tuple[list[message_pb2.Message], str]:
            proto = message_pb2.ListMessagesRequest(
                thread_id=thread_id, run_id=run_id, page_size=size, page_token=token, order=order
            )
            page = await self._s.messages.List(proto, NO_CONTEXT)
            return list(page.messages), page.next_page_token

        return await self._list(request, fetch, f"messages:{thread_id}:{run_id}", render.message)

    # ---- runs ---------------------------------------------------------------------------------

    async def _run(self, request: Request) -> run_pb2.Run:
        run_id = request.path_params["run_id"]
        run = await self._s.runs.Get(run_pb2.GetRunRequest(run_id=run_id), NO_CONTEXT)
        if run.thread_id != request.path_params["thread_id"]:
            raise not_found("run", run_id)
        return run

    async def create_run(self, request: Request) -> Response:
        thread_id = request.path_params["thread_id"]
        proto, body = parse.create_run(thread_id, await self._json(request), _request_id(request))
        run = await self._s.runs.Create(proto, NO_CONTEXT)
        if body.flag("stream"):
            return _sse(self._events.stream(run, created=True))
        return JSONResponse(render.run(run))

    async def create_thread_and_run(self, request: Request) -> Response:
        data = await self._json(request)
        key = _request_id(request)
        if not isinstance(data, dict):
            raise parse.bad("body", "must be a JSON object")
        if data.get("tool_resources"):
            raise parse.unsupported("tool_resources", "tool_resources (files, vector stores)")
        thread_data = data.get("thread")
        run_data = {k: v for k, v in data.items() if k not in ("thread", "tool_resources")}
        # Both parsed, and the assistant checked, before the thread is written: a request that
        # would fail leaves no thread behind.
        thread_proto = parse.create_thread(thread_data, f"{key}:thread" if key else "")
        run_proto, body = parse.create_run("", run_data, f"{key}:run" if key else "")
        await self._assistant(run_proto.assistant_id)
        thread = await self._s.threads.Create(thread_proto, NO_CONTEXT)
        run_proto.thread_id = thread.id
        run = await self._s.runs.Create(run_proto, NO_CONTEXT)
        if body.flag("stream"):
            prelude = [_thread_created(thread)]
            return _sse(self._events.stream(run, created=True, prelude=prelude))
        return JSONResponse(render.run(run))

    async def get_run(self, request: Request) -> Response:
        return JSONResponse(render.run(await self._run(request)))

    async def update_run(self, request: Request) -> Response:
        await self._run(request)
        proto = parse.update_run(
            request.path_params["run_id"], await self._json(request), _request_id(request)
        )
        return JSONResponse(render.run(await self._s.runs.Update(proto, NO_CONTEXT)))

    async def cancel_run(self, request: Request) -> Response:
        run = await self._run(request)
        proto = run_pb2.CancelRunRequest(run_id=run.id, request_id=_request_id(request))
        return JSONResponse(render.run(await self._s.runs.Cancel(proto, NO_CONTEXT)))

    async def submit_tool_outputs(self, request: Request) -> Response:
        run = await self._run(request)
        proto, stream = parse.submit_tool_outputs(run.id, await self._json(request), _request_id(request))
        submitted = await self._s.runs.SubmitToolResults(proto, NO_CONTEXT)
        if not stream:
            return JSONResponse(render.run(submitted))
        # The stream replays the run's log and continues after the TOOL_CALLS event this
        # submission answered: the how-manieth tool round that was is read from the steps (a
        # repeated submission finds the same round, whatever the run did since).
        answered_ids = {item.tool_call_id for item in proto.tool_results}
        rounds, answered = 0, None
        for item in await self._tool_steps(run.id):
            rounds += 1
            if {call.id for call in item.tool_calls.tool_calls} == answered_ids:
                answered = item
                break
        prelude = [_step_completed(answered)] if answered is not None else []
        return _sse(self._events.stream(submitted, created=False, answered_rounds=rounds, prelude=prelude))

    async def _tool_steps(self, run_id: str) -> list[run_pb2.RunStep]:
        """The run's tool-call steps, oldest first."""
        found: list[run_pb2.RunStep] = []
        token = ""
        while True:
            proto = run_pb2.ListRunStepsRequest(
                run_id=run_id, page_size=100, page_token=token, order=common_pb2.ASC
            )
            page = await self._s.runs.ListSteps(proto, NO_CONTEXT)
            found.extend(item for item in page.steps if item.type == run_pb2.RunStep.TOOL_CALLS)
            token = page.next_page_token
            if not token:
                return found

    async def list_runs(self, request: Request) -> Response:
        thread_id = request.path_params["thread_id"]

        async def fetch(
            size: int, token: str, order: common_pb2.SortOrder.ValueType
        ) -> tuple[list[run_pb2.Run], str]:
            proto = run_pb2.ListRunsRequest(
                thread_id=thread_id, page_size=size, page_token=token, order=order
            )
            page = await self._s.runs.List(proto, NO_CONTEXT)
            return list(page.runs), page.next_page_token

        return await self._list(request, fetch, f"runs:{thread_id}", render.run)

    def _steps_fetch(
        self, run_id: str
    ) -> Callable[[int, str, common_pb2.SortOrder.ValueType], Awaitable[tuple[list[run_pb2.RunStep], str]]]:
        async def fetch(
            size: int, token: str, order: common_pb2.SortOrder.ValueType
        ) -> tuple[list[run_pb2.RunStep], str]:
            proto = run_pb2.ListRunStepsRequest(run_id=run_id, page_size=size, page_token=token, order=order)
            page = await self._s.runs.ListSteps(proto, NO_CONTEXT)
            return list(page.steps), page.next_page_token

        return fetch

    async def list_steps(self, request: Request) -> Response:
        run = await self._run(request)
        if request.query_params.getlist("include[]"):
            raise parse.unsupported("include", "file search results in run steps")
        return await self._list(request, self._steps_fetch(run.id), f"steps:{run.id}", render.step)

    async def get_step(self, request: Request) -> Response:
        run = await self._run(request)
        step_id = request.path_params["step_id"]
        fetch = self._steps_fetch(run.id)
        token = ""
        while True:
            steps, token = await fetch(100, token, common_pb2.ASC)
            for item in steps:
                if item.id == step_id:
                    return JSONResponse(render.step(item))
            if not token:
                raise not_found("run step", step_id)

    # ---- the rest -----------------------------------------------------------------------------

    async def unknown(self, request: Request) -> Response:
        rest: str = request.path_params["rest"]
        for prefix in ("files", "vector_stores", "uploads"):
            if rest == prefix or rest.startswith(prefix + "/"):
                raise parse.unsupported(prefix, f"the /v1/{prefix} API")
        raise ApiError(
            grpc.StatusCode.NOT_FOUND,
            "UNKNOWN_URL",
            f"{request.method} {request.url.path} is not an OpenAI Assistants route Spindle serves",
        )

    async def _list(
        self,
        request: Request,
        fetch: Callable[[int, str, common_pb2.SortOrder.ValueType], Awaitable[tuple[list[Any], str]]],
        scope: str,
        to_json: Callable[[Any], dict[str, Any]],
    ) -> Response:
        params = ListParams(dict(request.query_params))
        items, has_more = await cursor_page(
            fetch, lambda item: str(item.id), params, self._cursors, context.project(), scope
        )
        return JSONResponse(render.page([to_json(item) for item in items], has_more))


def _thread_created(thread: thread_pb2.Thread) -> bytes:
    return sse("thread.created", render.thread(thread))


def _step_completed(step: run_pb2.RunStep) -> bytes:
    return sse("thread.run.step.completed", render.step(step))
