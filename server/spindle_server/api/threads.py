"""ThreadService and MessageService: conversation threads and their messages."""

from __future__ import annotations

from collections.abc import Iterable

import grpc

from spindle.v1 import message_pb2, message_pb2_grpc, thread_pb2, thread_pb2_grpc
from spindle_server import clock, ids
from spindle_server.api import context, idempotency, masks, registration, validation
from spindle_server.api.paging import next_page_token, page_query
from spindle_server.api.validation import Validator
from spindle_server.drafts import MessageDraft
from spindle_server.limits import DEFAULT_LIMITS, Limits
from spindle_server.store.base import RequestKey, Store

THREAD_UPDATABLE = ("name", "description", "labels")


def messages_from_inputs(
    v: Validator,
    field: str,
    inputs: Iterable[message_pb2.MessageInput],
    thread_id: str,
    project: str,
    limit: int,
) -> list[message_pb2.Message]:
    items = list(inputs)
    if len(items) > limit:
        v.add(field, f"has {len(items)} messages; at most {limit} are allowed")
        return []
    now = clock.now()
    messages = []
    for index, item in enumerate(items):
        parts = v.message_input(f"{field}[{index}]", item)
        draft = MessageDraft(thread_id, item.role, parts, dict(item.labels), project)
        messages.append(draft.build(now))
    return messages


class ThreadServicer(thread_pb2_grpc.ThreadServiceServicer):
    def __init__(self, store: Store, limits: Limits = DEFAULT_LIMITS) -> None:
        self._store = store
        self._limits = limits

    async def Create(
        self, request: thread_pb2.CreateThreadRequest, _: grpc.aio.ServicerContext
    ) -> thread_pb2.Thread:
        v = Validator(self._limits)
        v.text("name", request.name, validation.MAX_NAME)
        v.text("description", request.description, validation.MAX_DESCRIPTION)
        v.labels("labels", request.labels)
        v.request_id(request.request_id)
        project = context.project()
        thread_id = ids.new_id("thread")
        messages = messages_from_inputs(
            v, "messages", request.messages, thread_id, project, validation.MAX_THREAD_MESSAGES
        )
        v.check()

        async def create(record: RequestKey | None) -> thread_pb2.Thread:
            now = clock.timestamp(clock.now())
            thread = thread_pb2.Thread(
                id=thread_id,
                name=request.name,
                description=request.description,
                labels=request.labels,
                created_at=now,
                updated_at=now,
                created_by=project,
            )
            await self._store.insert_thread(project, thread, messages, record=record)
            return thread

        return await idempotency.once(
            self._store, project, "threads.create", request, thread_pb2.Thread, create
        )

    async def Get(
        self, request: thread_pb2.GetThreadRequest, _: grpc.aio.ServicerContext
    ) -> thread_pb2.Thread:
        v = Validator()
        v.resource_id("thread_id", request.thread_id, "thread")
        v.check()
        return await self._store.get_thread(context.project(), request.thread_id)

    async def Update(
        self, request: thread_pb2.UpdateThreadRequest, _: grpc.aio.ServicerContext
    ) -> thread_pb2.Thread:
        v = Validator()
        v.resource_id("thread_id", request.thread_id, "thread")
        fields = masks.fields_to_update(v, request, request.update_mask, THREAD_UPDATABLE)
        v.text("name", request.name, validation.MAX_NAME)
        v.text("description", request.description, validation.MAX_DESCRIPTION)
        v.labels("labels", request.labels)
        v.request_id(request.request_id)
        v.check()
        project = context.project()

        def apply(thread: thread_pb2.Thread) -> None:
            masks.copy_fields(thread, request, fields)
            thread.updated_at.CopyFrom(clock.timestamp(clock.now()))

        async def update(record: RequestKey | None) -> thread_pb2.Thread:
            return await self._store.update_thread(project, request.thread_id, apply, record=record)

        return await idempotency.once(
            self._store, project, "threads.update", request, thread_pb2.Thread, update
        )

    async def Delete(
        self, request: thread_pb2.DeleteThreadRequest, _: grpc.aio.ServicerContext
    ) -> thread_pb2.DeleteThreadResponse:
        v = Validator()
        v.resource_id("thread_id", request.thread_id, "thread")
        v.request_id(request.request_id)
        v.check()
        project = context.project()

        async def delete(record: RequestKey | None) -> thread_pb2.DeleteThreadResponse:
            await self._store.delete_thread(project, request.thread_id, record=record)
            return thread_pb2.DeleteThreadResponse()

        return await idempotency.once(
            self._store, project, "threads.delete", request, thread_pb2.DeleteThreadResponse, delete
        )

    async def List(
        self, request: thread_pb2.ListThreadsRequest, _: grpc.aio.ServicerContext
    ) -> thread_pb2.ListThreadsResponse:
        scope = "threads"
        query = page_query(Validator(), request.page_size, request.page_token, request.order, scope)
        page = await self._store.list_threads(context.project(), query)
        return thread_pb2.ListThreadsResponse(
            threads=page.items,
            next_page_token=next_page_token(page, query, scope),
        )


class MessageServicer(message_pb2_grpc.MessageServiceServicer):
    def __init__(self, store: Store, limits: Limits = DEFAULT_LIMITS) -> None:
        self._store = store
        self._limits = limits

    async def Create(
        self, request: message_pb2.CreateMessageRequest, ctx: grpc.aio.ServicerContext
    ) -> message_pb2.Message:
        return message_pb2.Message.FromString(await self.create_wire(request, ctx))

    async def create_wire(
        self, request: message_pb2.CreateMessageRequest, _: grpc.aio.ServicerContext
    ) -> bytes:
        """Create as gRPC serves it: the message's bytes as the store wrote them, sent as they
        are (no response serializer), not serialized a second time by grpc."""
        v = Validator(self._limits)
        thread_id, role, labels = request.thread_id, request.role, request.labels
        request_id = request.request_id
        v.resource_id("thread_id", thread_id, "thread")
        v.enum("role", role, message_pb2.MessageRole)
        if labels:  # each check of an empty field, and its copy, cost as much as a filled one's
            v.labels("labels", labels)
        if request_id:
            v.request_id(request_id)
        content = v.message_content("", request.content, request.text)
        v.check()
        project = context.project()
        draft = MessageDraft(thread_id, role, content, dict(labels) if labels else {}, project)
        if not request_id:  # the hot path: the write alone, no idempotency coroutines
            return await self._store.create_message(project, draft)
        message = draft.build(clock.now())

        async def create(record: RequestKey | None) -> message_pb2.Message:
            await self._store.insert_message(project, message, record=record)
            return message

        answer = await idempotency.once(
            self._store, project, "messages.create", request, message_pb2.Message, create
        )
        return answer.SerializeToString()

    async def Get(
        self, request: message_pb2.GetMessageRequest, _: grpc.aio.ServicerContext
    ) -> message_pb2.Message:
        v = Validator()
        v.resource_id("message_id", request.message_id, "msg")
        v.check()
        return await self._store.get_message(context.project(), request.message_id)

    async def List(
        self, request: message_pb2.ListMessagesRequest, _: grpc.aio.ServicerContext
    ) -> message_pb2.ListMessagesResponse:
        v = Validator()
        v.resource_id("thread_id", request.thread_id, "thread")
        v.resource_id("run_id", request.run_id, "run", required=False)
        scope = f"messages:{request.thread_id}:{request.run_id}"
        query = page_query(v, request.page_size, request.page_token, request.order, scope)
        page = await self._store.list_messages(context.project(), request.thread_id, query, request.run_id)
        return message_pb2.ListMessagesResponse(
            messages=page.items,
            next_page_token=next_page_token(page, query, scope),
        )


def add_message_service(servicer: MessageServicer, server: grpc.aio.Server) -> None:
    """MessageService as generated, except Create: it answers bytes (create_wire) and has no
    response serializer, so grpc sends them as they are."""

    def replace(handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        handlers["Create"] = registration.unary_bytes(servicer.create_wire, handlers["Create"])

    registration.add_with_replacements(
        message_pb2_grpc.add_MessageServiceServicer_to_server, servicer, server, replace
    )
