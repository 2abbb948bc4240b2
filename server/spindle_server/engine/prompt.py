"""Builds one model turn's input from a run: instructions, thread messages (cut by the
truncation strategy and the prompt budget) and the tool-call rounds of this run so far."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from google.protobuf import json_format

from spindle.v1 import common_pb2, message_pb2, run_pb2
from spindle_server.models.base import ChatMessage, FunctionSpec, ModelRequest, ToolCallSpec

# Chat framing the token estimate adds, after OpenAI's recipe for counting chat tokens: each
# message costs about 3 tokens beyond its text (role and separators), and the reply is primed
# with 3 more. Without it, a thread of many short messages looks far smaller than it is.
MESSAGE_OVERHEAD_TOKENS = 3
REPLY_PRIMING_TOKENS = 3


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
    round_texts: Sequence[str] = (),
) -> tuple[ModelRequest, int]:
    """Return the request and its estimated prompt tokens.

    round_texts: what the model said before each completed tool-call round of this run (in
    order); it goes back as the content of that round's assistant message.
    """
    system = [ChatMessage("system", text)] if (text := _system_text(run)) else []
    history = [
        ChatMessage("assistant" if m.role == message_pb2.ASSISTANT else "user", message_text(m))
        for m in thread_messages
    ]
    rounds = _tool_rounds(steps, round_texts)
    if run.truncation_strategy.type == common_pb2.TruncationStrategy.LAST_MESSAGES:
        history = history[-max(run.truncation_strategy.last_messages, 1) :]
    tools = tuple(_function_spec(tool) for tool in run.tools if tool.HasField("function"))
    response_format = _response_format(run.response_format)

    def estimate(messages: Sequence[ChatMessage]) -> int:
        return sum(
            MESSAGE_OVERHEAD_TOKENS
            + count_tokens(m.content)
            + sum(count_tokens(c.name) + count_tokens(c.arguments) for c in m.tool_calls)
            for m in messages
        )

    # Tool definitions and a JSON schema are part of the prompt the provider bills too; their
    # JSON text is a fair estimate of what the provider renders them into.
    schemas = [
        {"name": t.name, "description": t.description, "parameters": dict(t.parameters)} for t in tools
    ]
    if response_format is not None:
        schemas.append(response_format)
    fixed = REPLY_PRIMING_TOKENS + estimate(system) + estimate(rounds)
    fixed += count_tokens(json.dumps(schemas)) if schemas else 0
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
        tools=tools,
        tool_choice=_tool_choice(run.tool_choice, first_turn=not rounds),
        parallel_tool_calls=run.parallel_tool_calls,
        temperature=run.temperature if run.HasField("temperature") else None,
        top_p=run.top_p if run.HasField("top_p") else None,
        max_tokens=completion_budget(run),
        response_format=response_format,
    )
    return request, tokens


def completion_budget(run: run_pb2.Run) -> int | None:
    if not run.HasField("max_completion_tokens"):
        return None
    return max(run.max_completion_tokens - run.usage.completion_tokens, 0)


def _system_text(run: run_pb2.Run) -> str:
    return "\n\n".join(part for part in (run.instructions, run.additional_instructions) if part)


def _tool_rounds(steps: Sequence[run_pb2.RunStep], round_texts: Sequence[str]) -> list[ChatMessage]:
    messages: list[ChatMessage] = []
    answered = [
        step
        for step in steps
        if step.type == run_pb2.RunStep.TOOL_CALLS and step.status == run_pb2.RunStep.COMPLETED
    ]
    for number, step in enumerate(answered):
        calls = step.tool_calls.tool_calls
        specs = tuple(ToolCallSpec(c.id, c.function.name, c.function.arguments) for c in calls)
        said = round_texts[number] if number < len(round_texts) else ""
        messages.append(ChatMessage("assistant", said, tool_calls=specs))
        messages.extend(ChatMessage("tool", c.output, tool_call_id=c.id) for c in calls)
    return messages


def _function_spec(tool: common_pb2.Tool) -> FunctionSpec:
    function = tool.function
    parameters: dict[str, Any] = (
        json_format.MessageToDict(function.parameters) if function.HasField("parameters") else {}
    )
    return FunctionSpec(function.name, function.description, parameters, function.strict)


def _tool_choice(choice: common_pb2.ToolChoice, *, first_turn: bool) -> str:
    """The run's choice on its first model turn; afterwards a forcing choice turns `auto`.

    A named function or `required` forces a tool call on every turn it is sent with, so sent
    again after the results it would call again forever; like OpenAI's runs (and its Agents
    SDK's reset_tool_choice), it binds the first turn only. `none` binds every turn.
    """
    if choice.WhichOneof("choice") == "function_name":
        return choice.function_name if first_turn else "auto"
    mode = {
        common_pb2.ToolChoice.NONE: "none",
        common_pb2.ToolChoice.REQUIRED: "required",
    }.get(choice.mode, "auto")
    return "auto" if mode == "required" and not first_turn else mode


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
