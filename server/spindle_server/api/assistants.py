"""AssistantService: CRUD over assistants."""

from __future__ import annotations

import grpc

from spindle.v1 import assistant_pb2, assistant_pb2_grpc
from spindle_server import clock, ids
from spindle_server.api import context, idempotency, masks, validation
from spindle_server.api.paging import next_page_token, page_query
from spindle_server.api.validation import Validator
from spindle_server.limits import DEFAULT_LIMITS, Limits
from spindle_server.models.registry import ModelRegistry, UnknownModelError
from spindle_server.store.base import RequestKey, Store

UPDATABLE = (
    "name",
    "description",
    "model",
    "instructions",
    "tools",
    "completion_options",
    "prompt_truncation_options",
    "response_format",
    "labels",
)


def check_assistant_fields(
    v: Validator,
    models: ModelRegistry,
    request: assistant_pb2.CreateAssistantRequest | assistant_pb2.UpdateAssistantRequest,
    fields: tuple[str, ...] | list[str] = UPDATABLE,
) -> None:
    if "name" in fields:
        v.text("name", request.name, validation.MAX_NAME)
    if "description" in fields:
        v.text("description", request.description, validation.MAX_DESCRIPTION)
    if "instructions" in fields:
        v.text("instructions", request.instructions, validation.MAX_INSTRUCTIONS)
    if "model" in fields:
        v.text("model", request.model, validation.MAX_MODEL_NAME)
        if len(request.model) <= validation.MAX_MODEL_NAME:
            try:
                models.resolve(request.model)
            except UnknownModelError as exc:
                v.add("model", str(exc))
    if "tools" in fields:
        v.tools("tools", request.tools)
    if "labels" in fields:
        v.labels("labels", request.labels)
    if "completion_options" in fields:
        options = request.completion_options
        v.completion(
            "completion_options.",
            options.temperature if options.HasField("temperature") else None,
            options.top_p if options.HasField("top_p") else None,
            options.max_tokens if options.HasField("max_tokens") else None,
        )
    if "prompt_truncation_options" in fields:
        truncation = request.prompt_truncation_options
        if truncation.HasField("max_prompt_tokens"):
            v.positive("prompt_truncation_options.max_prompt_tokens", truncation.max_prompt_tokens)
        v.truncation("prompt_truncation_options.truncation_strategy", truncation.truncation_strategy)
    if "response_format" in fields:
        v.response_format("response_format", request.response_format)


class AssistantServicer(assistant_pb2_grpc.AssistantServiceServicer):
    def __init__(self, store: Store, models: ModelRegistry, limits: Limits = DEFAULT_LIMITS) -> None:
        self._store = store
        self._models = models
        self._limits = limits

    async def Create(
        self, request: assistant_pb2.CreateAssistantRequest, _: grpc.aio.ServicerContext
    ) -> assistant_pb2.Assistant:
        v = Validator(self._limits)
        check_assistant_fields(v, self._models, request)
        v.request_id(request.request_id)
        v.check()
        project = context.project()

        async def create(record: RequestKey | None) -> assistant_pb2.Assistant:
            now = clock.timestamp(clock.now())
            assistant = assistant_pb2.Assistant(
                id=ids.new_id("asst"),
                name=request.name,
                description=request.description,
                model=request.model or self._models.default_model,
                instructions=request.instructions,
                tools=request.tools,
                labels=request.labels,
                created_at=now,
                updated_at=now,
                created_by=project,
            )
            for name in ("completion_options", "prompt_truncation_options", "response_format"):
                if request.HasField(name):
                    getattr(assistant, name).CopyFrom(getattr(request, name))
            await self._store.insert_assistant(project, assistant, record=record)
            return assistant

        return await idempotency.once(
            self._store, project, "assistants.create", request, assistant_pb2.Assistant, create
        )

    async def Get(
        self, request: assistant_pb2.GetAssistantRequest, _: grpc.aio.ServicerContext
    ) -> assistant_pb2.Assistant:
        v = Validator()
        v.resource_id("assistant_id", request.assistant_id, "asst")
        v.check()
        return await self._store.get_assistant(context.project(), request.assistant_id)

    async def Update(
        self, request: assistant_pb2.UpdateAssistantRequest, _: grpc.aio.ServicerContext
    ) -> assistant_pb2.Assistant:
        v = Validator(self._limits)
        v.resource_id("assistant_id", request.assistant_id, "asst")
        fields = masks.fields_to_update(v, request, request.update_mask, UPDATABLE)
        check_assistant_fields(v, self._models, request, fields)
        v.request_id(request.request_id)
        v.check()
        project = context.project()

        def apply(assistant: assistant_pb2.Assistant) -> None:
            masks.copy_fields(assistant, request, fields)
            if not assistant.model:
                assistant.model = self._models.default_model
            assistant.updated_at.CopyFrom(clock.timestamp(clock.now()))

        async def update(record: RequestKey | None) -> assistant_pb2.Assistant:
            return await self._store.update_assistant(project, request.assistant_id, apply, record=record)

        return await idempotency.once(
            self._store, project, "assistants.update", request, assistant_pb2.Assistant, update
        )

    async def Delete(
        self, request: assistant_pb2.DeleteAssistantRequest, _: grpc.aio.ServicerContext
    ) -> assistant_pb2.DeleteAssistantResponse:
        v = Validator()
        v.resource_id("assistant_id", request.assistant_id, "asst")
        v.request_id(request.request_id)
        v.check()
        project = context.project()

        async def delete(record: RequestKey | None) -> assistant_pb2.DeleteAssistantResponse:
            await self._store.delete_assistant(project, request.assistant_id, record=record)
            return assistant_pb2.DeleteAssistantResponse()

        return await idempotency.once(
            self._store, project, "assistants.delete", request, assistant_pb2.DeleteAssistantResponse, delete
        )

    async def List(
        self, request: assistant_pb2.ListAssistantsRequest, _: grpc.aio.ServicerContext
    ) -> assistant_pb2.ListAssistantsResponse:
        scope = "assistants"
        query = page_query(Validator(), request.page_size, request.page_token, request.order, scope)
        page = await self._store.list_assistants(context.project(), query)
        return assistant_pb2.ListAssistantsResponse(
            assistants=page.items,
            next_page_token=next_page_token(page, query, scope),
        )
