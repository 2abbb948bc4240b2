"""Field-by-field translation between Yandex's assistants v1 messages and spindle.v1's.

Pure functions, no I/O: the servicers in services.py call Spindle's own servicers with what
these build, so validation, idempotency and run logic stay in api/.
"""

from __future__ import annotations

import json
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2

from spindle.v1 import assistant_pb2, common_pb2, message_pb2, run_pb2, thread_pb2
from spindle_server.api.errors import ApiError
from spindle_server.compat.yandex import pb

# Spindle keeps no expiry for assistants and threads; the SDK refuses a zero policy, so every
# object reports Yandex's default (SINCE_LAST_ACTIVE, 7 days). README says it is not enforced.
DEFAULT_TTL_DAYS = 7
MODEL_URI_SCHEME = "gpt://"
DEFAULT_MODEL_VERSION = "latest"

# Yandex has five run statuses; Spindle's extra ones map to what a Yandex client should do next.
RUN_STATUS = {
    run_pb2.PENDING: pb.run.RunState.PENDING,
    run_pb2.IN_PROGRESS: pb.run.RunState.IN_PROGRESS,
    run_pb2.CANCELLING: pb.run.RunState.IN_PROGRESS,  # still running until the cancel lands
    run_pb2.TOOL_CALLS: pb.run.RunState.TOOL_CALLS,
    run_pb2.COMPLETED: pb.run.RunState.COMPLETED,
    run_pb2.INCOMPLETE: pb.run.RunState.COMPLETED,  # the partial reply, as a TRUNCATED message
    run_pb2.FAILED: pb.run.RunState.FAILED,
    run_pb2.CANCELLED: pb.run.RunState.FAILED,
    run_pb2.EXPIRED: pb.run.RunState.FAILED,
}
# google.rpc codes for Yandex's Error.code, by Spindle status.
ERROR_CODE = {
    run_pb2.FAILED: grpc.StatusCode.INTERNAL.value[0],
    run_pb2.CANCELLED: grpc.StatusCode.CANCELLED.value[0],
    run_pb2.EXPIRED: grpc.StatusCode.DEADLINE_EXCEEDED.value[0],
}


INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def int32(value: int) -> int:
    """Yandex's int64 into a spindle.v1 int32, clamped: Spindle's validation then names the field
    (a page size or a message count past int32 is out of range there too)."""
    return max(INT32_MIN, min(INT32_MAX, value))


def unsupported(what: str) -> ApiError:
    return ApiError(
        grpc.StatusCode.UNIMPLEMENTED,
        "UNSUPPORTED_FEATURE",
        f"{what}: not supported by Spindle's Yandex AI Studio compatibility API",
    )


def expiration() -> Any:
    return pb.ai_common.ExpirationConfig(
        expiration_policy=pb.ai_common.ExpirationConfig.SINCE_LAST_ACTIVE, ttl_days=DEFAULT_TTL_DAYS
    )


# ---- models ----------------------------------------------------------------------------------


def model_from_uri(uri: str) -> str:
    """gpt://FOLDER/MODEL/latest (what the SDK builds from a model name) -> MODEL; other text as is."""
    if not uri.startswith(MODEL_URI_SCHEME):
        return uri
    _, _, path = uri[len(MODEL_URI_SCHEME) :].partition("/")
    head, slash, version = path.rpartition("/")
    return head if slash and version == DEFAULT_MODEL_VERSION else path


def model_to_uri(model: str, folder_id: str) -> str:
    return f"{MODEL_URI_SCHEME}{folder_id}/{model}/{DEFAULT_MODEL_VERSION}"


# ---- options ---------------------------------------------------------------------------------


def tools_in(tools: Any) -> list[common_pb2.Tool]:
    out = []
    for tool in tools:
        kind = tool.WhichOneof("ToolType")
        if kind != "function":
            raise unsupported(f"the {kind or 'empty'} tool (search indexes, web search)")
        out.append(
            common_pb2.Tool(
                function=common_pb2.FunctionTool(
                    name=tool.function.name,
                    description=tool.function.description,
                    parameters=tool.function.parameters if tool.function.HasField("parameters") else None,
                )
            )
        )
    return out


def tools_out(tools: Any) -> list[Any]:
    return [
        pb.common.Tool(
            function=pb.common.FunctionTool(
                name=tool.function.name,
                description=tool.function.description,
                parameters=tool.function.parameters if tool.function.HasField("parameters") else None,
            )
        )
        for tool in tools
        if tool.WhichOneof("tool") == "function"
    ]


def completion_in(options: Any) -> common_pb2.CompletionOptions:
    out = common_pb2.CompletionOptions()
    if options.HasField("temperature"):
        out.temperature = options.temperature.value
    if options.HasField("max_tokens"):
        out.max_tokens = options.max_tokens.value
    return out


def completion_out(options: common_pb2.CompletionOptions) -> Any:
    out = pb.common.CompletionOptions()
    if options.HasField("temperature"):
        out.temperature.value = options.temperature
    if options.HasField("max_tokens"):
        out.max_tokens.value = options.max_tokens
    return out


def truncation_strategy_in(options: Any) -> common_pb2.TruncationStrategy:
    if options.WhichOneof("TruncationStrategy") == "last_messages_strategy":
        return common_pb2.TruncationStrategy(
            type=common_pb2.TruncationStrategy.LAST_MESSAGES,
            last_messages=int32(options.last_messages_strategy.num_messages),
        )
    return common_pb2.TruncationStrategy(type=common_pb2.TruncationStrategy.AUTO)


def truncation_in(options: Any) -> common_pb2.PromptTruncationOptions:
    out = common_pb2.PromptTruncationOptions(truncation_strategy=truncation_strategy_in(options))
    if options.HasField("max_prompt_tokens"):
        out.max_prompt_tokens = options.max_prompt_tokens.value
    return out


def truncation_out(max_prompt_tokens: int | None, strategy: common_pb2.TruncationStrategy) -> Any:
    """Always with a strategy: the SDK reads one, and AUTO is Spindle's default."""
    out = pb.common.PromptTruncationOptions()
    if max_prompt_tokens is not None:
        out.max_prompt_tokens.value = max_prompt_tokens
    if strategy.type == common_pb2.TruncationStrategy.LAST_MESSAGES:
        out.last_messages_strategy.num_messages = strategy.last_messages
    else:
        out.auto_strategy.SetInParent()
    return out


def merge_leaf(target: Any, source: Any, leaf: str) -> None:
    """Copies one field of a spindle.v1 options message (completion or prompt truncation), named by
    Yandex's leaf path, from `source` onto `target`."""
    name = {"auto_strategy": "truncation_strategy", "last_messages_strategy": "truncation_strategy"}.get(
        leaf, leaf
    )
    if name not in target.DESCRIPTOR.fields_by_name:
        raise ApiError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
            f"update_mask path {leaf!r} cannot be updated",
            violations=[("update_mask", f"{leaf!r} cannot be updated")],
        )
    if source.HasField(name):
        field = getattr(target, name)
        if hasattr(field, "CopyFrom"):
            field.CopyFrom(getattr(source, name))
        else:
            setattr(target, name, getattr(source, name))
    else:
        target.ClearField(name)


def response_format_in(fmt: Any) -> common_pb2.ResponseFormat:
    kind = fmt.WhichOneof("ResponseFormat")
    if kind == "json_schema":
        return common_pb2.ResponseFormat(
            type=common_pb2.ResponseFormat.JSON_SCHEMA,
            json_schema=common_pb2.JsonSchema(name="response", schema=fmt.json_schema.schema),
        )
    if kind == "json_object" and fmt.json_object:
        return common_pb2.ResponseFormat(type=common_pb2.ResponseFormat.JSON_OBJECT)
    return common_pb2.ResponseFormat()


def response_format_out(fmt: common_pb2.ResponseFormat) -> Any | None:
    if fmt.type == common_pb2.ResponseFormat.JSON_SCHEMA:
        return pb.common.ResponseFormat(json_schema=pb.common.JsonSchema(schema=fmt.json_schema.schema))
    if fmt.type == common_pb2.ResponseFormat.JSON_OBJECT:
        return pb.common.ResponseFormat(json_object=True)
    return None


# ---- assistants ------------------------------------------------------------------------------


def assistant_out(a: assistant_pb2.Assistant, folder_id: str) -> Any:
    options = a.prompt_truncation_options
    return pb.assistant.Assistant(
        id=a.id,
        folder_id=folder_id,
        name=a.name,
        description=a.description,
        created_by=a.created_by,
        created_at=a.created_at,
        updated_by=a.created_by,
        updated_at=a.updated_at,
        expiration_config=expiration(),
        labels=a.labels,
        model_uri=model_to_uri(a.model, folder_id),
        instruction=a.instructions,
        prompt_truncation_options=truncation_out(
            options.max_prompt_tokens if options.HasField("max_prompt_tokens") else None,
            options.truncation_strategy,
        ),
        completion_options=completion_out(a.completion_options),
        tools=tools_out(a.tools),
        response_format=response_format_out(a.response_format),
    )


# ---- threads and messages --------------------------------------------------------------------


def role_in(author: Any) -> message_pb2.MessageRole.ValueType:
    role = author.role.upper()
    if role in ("", "USER"):
        return message_pb2.USER
    if role == "ASSISTANT":
        return message_pb2.ASSISTANT
    raise ApiError(
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        f"author.role must be USER or ASSISTANT, not {author.role!r}",
        violations=[("author.role", "must be USER or ASSISTANT")],
    )


def content_in(content: Any) -> list[message_pb2.ContentPart]:
    parts = []
    for part in content.content:
        if part.WhichOneof("PartType") != "text":
            raise unsupported("a message part other than text")
        parts.append(message_pb2.ContentPart(text=message_pb2.TextPart(text=part.text.content)))
    return parts


def content_out(parts: Any) -> Any:
    return pb.message.MessageContent(
        content=[
            pb.message.ContentPart(text=pb.message.Text(content=part.text.text))
            for part in parts
            if part.WhichOneof("part") == "text"
        ]
    )


def text_content(text: str) -> Any:
    return pb.message.MessageContent(content=[pb.message.ContentPart(text=pb.message.Text(content=text))])


def message_input(data: Any) -> message_pb2.MessageInput:
    return message_pb2.MessageInput(
        role=role_in(data.author), content=content_in(data.content), labels=data.labels
    )


def message_out(m: message_pb2.Message, *, truncated: bool = False) -> Any:
    role = "ASSISTANT" if m.role == message_pb2.ASSISTANT else "USER"
    return pb.message.Message(
        id=m.id,
        thread_id=m.thread_id,
        created_by=m.created_by,
        created_at=m.created_at,
        author=pb.message.Author(id=m.assistant_id or m.created_by, role=role),
        labels=m.labels,
        content=content_out(m.content),
        status=pb.message.Message.TRUNCATED if truncated else pb.message.Message.COMPLETED,
    )


def thread_out(t: thread_pb2.Thread, folder_id: str) -> Any:
    return pb.thread.Thread(
        id=t.id,
        folder_id=folder_id,
        name=t.name,
        description=t.description,
        created_by=t.created_by,
        created_at=t.created_at,
        updated_by=t.created_by,
        updated_at=t.updated_at,
        expiration_config=expiration(),
        labels=t.labels,
    )


# ---- runs ------------------------------------------------------------------------------------


def tool_calls_out(calls: Any) -> Any:
    out = pb.common.ToolCallList()
    for call in calls:
        arguments = struct_pb2.Struct()
        try:
            parsed = json.loads(call.function.arguments or "{}")
        except ValueError:
            parsed = {"arguments": call.function.arguments}  # keep what the model said, visibly
        json_format.ParseDict(parsed if isinstance(parsed, dict) else {"value": parsed}, arguments)
        out.tool_calls.add(function_call=pb.common.FunctionCall(name=call.function.name, arguments=arguments))
    return out


def tool_results_in(results: Any, pending: Any) -> list[common_pb2.ToolResult]:
    """Yandex results carry a function name, not a call id: each answers the first unanswered
    pending call of that name, in order."""
    unanswered = [(call.id, call.function.name) for call in pending]
    out = []
    for index, result in enumerate(results.tool_results):
        name = result.function_result.name
        match = next((i for i, (_, pending_name) in enumerate(unanswered) if pending_name == name), None)
        if match is None:
            raise ApiError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "UNKNOWN_TOOL_RESULT",
                f"no pending tool call named {name!r} for result {index}",
                violations=[(f"tool_results[{index}].function_result.name", "matches no pending call")],
            )
        call_id, _ = unanswered.pop(match)
        out.append(common_pb2.ToolResult(tool_call_id=call_id, output=result.function_result.content))
    return out


def error_out(run: run_pb2.Run) -> Any:
    error = run.last_error
    text = f"{error.code}: {error.message}" if error.code else error.message
    if not text:
        text = {run_pb2.CANCELLED: "the run was cancelled", run_pb2.EXPIRED: "the run expired"}.get(
            run.status, "the run failed"
        )
    return pb.ai_common.Error(code=ERROR_CODE.get(run.status, ERROR_CODE[run_pb2.FAILED]), message=text)


def run_state(run: run_pb2.Run) -> Any:
    state = pb.run.RunState(status=RUN_STATUS.get(run.status, pb.run.RunState.RUN_STATUS_UNSPECIFIED))
    if run.status in ERROR_CODE:
        state.error.CopyFrom(error_out(run))
    elif run.status in (run_pb2.COMPLETED, run_pb2.INCOMPLETE) and run.HasField("reply"):
        state.completed_message.CopyFrom(message_out(run.reply, truncated=run.status == run_pb2.INCOMPLETE))
    elif run.status == run_pb2.TOOL_CALLS:
        state.tool_call_list.CopyFrom(tool_calls_out(run.required_tool_calls))
    return state


def run_out(run: run_pb2.Run) -> Any:
    out = pb.run.Run(
        id=run.id,
        assistant_id=run.assistant_id,
        thread_id=run.thread_id,
        created_by=run.created_by,
        created_at=run.created_at,
        labels=run.labels,
        state=run_state(run),
        custom_prompt_truncation_options=truncation_out(
            run.max_prompt_tokens if run.HasField("max_prompt_tokens") else None, run.truncation_strategy
        ),
        tools=tools_out(run.tools),
        custom_response_format=response_format_out(run.response_format),
    )
    if run.HasField("usage"):
        out.usage.CopyFrom(
            pb.run.ContentUsage(
                prompt_tokens=run.usage.prompt_tokens,
                completion_tokens=run.usage.completion_tokens,
                total_tokens=run.usage.total_tokens,
            )
        )
    if run.HasField("temperature"):
        out.custom_completion_options.temperature.value = run.temperature
    if run.HasField("max_completion_tokens"):
        out.custom_completion_options.max_tokens.value = run.max_completion_tokens
    return out


def create_run_in(request: Any) -> run_pb2.CreateRunRequest:
    out = run_pb2.CreateRunRequest(
        assistant_id=request.assistant_id,
        thread_id=request.thread_id,
        labels=request.labels,
        additional_messages=[message_input(m) for m in request.additional_messages],
    )
    if request.tools:
        out.tools.extend(tools_in(request.tools))
        out.override_tools = True
    options = request.custom_completion_options
    if options.HasField("temperature"):
        out.temperature = options.temperature.value
    if options.HasField("max_tokens"):
        out.max_completion_tokens = options.max_tokens.value
    if request.HasField("custom_prompt_truncation_options"):
        truncation = request.custom_prompt_truncation_options
        if truncation.HasField("max_prompt_tokens"):
            out.max_prompt_tokens = truncation.max_prompt_tokens.value
        if truncation.WhichOneof("TruncationStrategy"):
            out.truncation_strategy.CopyFrom(truncation_strategy_in(truncation))
    if request.HasField("custom_response_format"):
        out.response_format.CopyFrom(response_format_in(request.custom_response_format))
    return out
