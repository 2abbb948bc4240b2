"""Builds one model turn's input from a run: instructions, thread messages (cut by the
truncation strategy and the prompt budget) and the tool-call rounds of this run so far."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from google.protobuf import json_format
from spindle.v1 import common_pb2, message_pb2, run_pb2

from spindle_server.models.base import ChatMessage, FunctionSpec, ModelRequest, ToolCallSpec


class PromptBudgetExceededError(Exception):
    """Even the shortest prompt does not fit in what is left of max_prompt_tokens."""


def message_text(message: message_pb2.Message) -> str:
    return "".join(part.text.text for part in message.content if part.HasField("text"))


def build_request(
    run: run_pb2.Run,
    provider_model: str,
    thread_messages: Sequence[message_pb2.Message],
    steps: Sequence[run_pb2.RunStep],
    count_tokens: Callable[[str], int],
) -> tuple[ModelRequest, int]:
    """Return the request and its estimated prompt tokens."""
    system = [ChatMessage("system", text)] if (text := _system_text(run)) else []
    history = [
        ChatMessage("assistant" if m.role == message_pb2.ASSISTANT else "user", message_text(m))
        for m in thread_messages
    ]
    rounds = _tool_rounds(steps)
    if run.truncation_strategy.type == common_pb2.TruncationStrategy.LAST_MESSAGES:
        history = history[-max(run.truncation_strategy.last_messages, 1) :]

    def estimate(messages: Sequence[ChatMessage]) -> int:
        return sum(
            count_tokens(m.content) + sum(count_tokens(c.arguments) for c in m.tool_calls) for m in messages
        )

    fixed = estimate(system) + estimate(rounds)
    tokens = fixed + estimate(history)
    if run.HasField("max_prompt_tokens"):
        budget = run.max_prompt_tokens - run.usage.prompt_tokens
        # `auto` (and last_messages) drop the oldest thread messages until the prompt fits.
        while tokens > budget and len(history) > 1:
            tokens -= estimate(history[:1])
            history = history[1:]
        if tokens > budget:
            raise PromptBudgetExceededError(
                f"the prompt needs about {tokens} tokens; {max(budget, 0)} of max_prompt_tokens are left"
            )

    request = ModelRequest(
        model=provider_model,
        messages=(*system, *history, *rounds),
        tools=tuple(_function_spec(tool) for tool in run.tools if tool.HasField("function")),
        tool_choice=_tool_choice(run.tool_choice),
        parallel_tool_calls=run.parallel_tool_calls,
        temperature=run.temperature if run.HasField("temperature") else None,
        top_p=run.top_p if run.HasField("top_p") else None,
        max_tokens=completion_budget(run),
        response_format=_response_format(run.response_format),
    )
    return request, tokens


def completion_budget(run: run_pb2.Run) -> int | None:
    if not run.HasField("max_completion_tokens"):
        return None
    return max(run.max_completion_tokens - run.usage.completion_tokens, 0)


def _system_text(run: run_pb2.Run) -> str:
    return "\n\n".join(part for part in (run.instructions, run.additional_instructions) if part)


def _tool_rounds(steps: Sequence[run_pb2.RunStep]) -> list[ChatMessage]:
    messages: list[ChatMessage] = []
    for step in steps:
        if step.type != run_pb2.RunStep.TOOL_CALLS or step.status != run_pb2.RunStep.COMPLETED:
            continue
        calls = step.tool_calls.tool_calls
        specs = tuple(ToolCallSpec(c.id, c.function.name, c.function.arguments) for c in calls)
        messages.append(ChatMessage("assistant", tool_calls=specs))
        messages.extend(ChatMessage("tool", c.output, tool_call_id=c.id) for c in calls)
    return messages


def _function_spec(tool: common_pb2.Tool) -> FunctionSpec:
    function = tool.function
    parameters: dict[str, Any] = (
        json_format.MessageToDict(function.parameters) if function.HasField("parameters") else {}
    )
    return FunctionSpec(function.name, function.description, parameters, function.strict)


def _tool_choice(choice: common_pb2.ToolChoice) -> str:
    if choice.WhichOneof("choice") == "function_name":
        return choice.function_name
    return {
        common_pb2.ToolChoice.NONE: "none",
        common_pb2.ToolChoice.REQUIRED: "required",
    }.get(choice.mode, "auto")


def _response_format(response_format: common_pb2.ResponseFormat) -> dict[str, Any] | None:
    if response_format.type == common_pb2.ResponseFormat.JSON_OBJECT:
        return {"type": "json_object"}
    if response_format.type == common_pb2.ResponseFormat.JSON_SCHEMA:
        schema = response_format.json_schema
        body: dict[str, Any] = {"name": schema.name or "response", "strict": schema.strict}
        if schema.description:
            body["description"] = schema.description
        if schema.HasField("schema"):
            body["schema"] = json_format.MessageToDict(schema.schema)
        return {"type": "json_schema", "json_schema": body}
    return None
