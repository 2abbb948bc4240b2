"""The builtin model: a deterministic script for demos and tests, no network.

The last user message drives it, one command a line:
- `/tool NAME {json args}` calls function tool NAME (several lines: parallel calls);
  once the results come back it replies with a text that contains them.
- `/sleep SECONDS` streams the reply slowly, spread over that many seconds.
- `/fail TEXT` makes the model call fail with TEXT.
Any other text gets a reply, streamed word by word, that contains the message verbatim.
A token is a whitespace-separated word.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from collections.abc import AsyncGenerator

from spindle_server.models.base import (
    ChatMessage,
    Finish,
    ModelChunk,
    ModelError,
    ModelRequest,
    TextDelta,
    ToolCallDelta,
    UsageReport,
)

_TOOL_LINE = re.compile(r"^/tool\s+(?P<name>[A-Za-z0-9_-]+)\s*(?P<args>.*)$")
_SLEEP_LINE = re.compile(r"^/sleep\s+(?P<seconds>\d+(?:\.\d+)?)(?:\s.*)?$")
_FAIL_LINE = re.compile(r"^/fail(?:\s+(?P<text>.*))?$")
_WORD = re.compile(r"\S+\s*")
MAX_SLEEP_SECONDS = 3600.0


class BuiltinBackend:
    name = "builtin"

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    async def aclose(self) -> None:
        return None

    async def stream(self, request: ModelRequest) -> AsyncGenerator[ModelChunk, None]:
        prompt_tokens = sum(self.count_tokens(m.content) for m in request.messages)
        script = _Script.parse(_last_user_text(request.messages))
        if script.fail is not None:
            raise ModelError("model_error", script.fail or "the builtin model was told to fail")

        if request.messages and request.messages[-1].role == "tool":
            reply = _tool_results_reply(request.messages)
        elif script.tool_calls and request.tool_choice != "none":
            for delta in _tool_call_deltas(script.tool_calls, request):
                yield delta
            yield UsageReport(prompt_tokens, len(script.tool_calls))
            yield Finish("tool_calls")
            return
        else:
            reply = f"You said: {script.text}"

        if request.response_format and request.response_format.get("type") in ("json_object", "json_schema"):
            reply = json.dumps({"reply": reply})
        words = _WORD.findall(reply) or [reply]
        limit = request.max_tokens
        emitted = words if limit is None else words[:limit]
        pause = script.sleep_seconds / len(emitted) if emitted else 0.0
        for word in emitted:
            if pause:
                await asyncio.sleep(pause)
            yield TextDelta(word)
        yield UsageReport(prompt_tokens, len(emitted))
        yield Finish("length" if len(emitted) < len(words) else "stop")


class _Script:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tool_calls: list[tuple[str, str]] = []
        self.sleep_seconds = 0.0
        self.fail: str | None = None

    @classmethod
    def parse(cls, text: str) -> _Script:
        script = cls(text)
        for raw in text.splitlines():
            line = raw.strip()
            if match := _TOOL_LINE.match(line):
                script.tool_calls.append((match["name"], match["args"].strip() or "{}"))
            elif match := _SLEEP_LINE.match(line):
                script.sleep_seconds = min(float(match["seconds"]), MAX_SLEEP_SECONDS)
            elif match := _FAIL_LINE.match(line):
                script.fail = (match["text"] or "").strip()
        return script


def _last_user_text(messages: tuple[ChatMessage, ...]) -> str:
    for message in reversed(messages):
        if message.role == "user":
            return message.content
    return ""


def _tool_call_deltas(calls: list[tuple[str, str]], request: ModelRequest) -> list[ToolCallDelta]:
    known = {tool.name for tool in request.tools}
    if request.tool_choice not in ("auto", "none", "required"):
        known &= {request.tool_choice}
    if not request.parallel_tool_calls:
        calls = calls[:1]
    deltas: list[ToolCallDelta] = []
    for index, (name, arguments) in enumerate(calls):
        if name not in known:
            raise ModelError(
                "model_error",
                f"the builtin model was asked to call {name!r}, which is not among the run's tools",
            )
        call_id = "call_" + secrets.token_hex(12)
        deltas.append(ToolCallDelta(index=index, id=call_id, name=name))
        # Split the arguments in two, as real models stream them.
        middle = len(arguments) // 2
        deltas.append(ToolCallDelta(index=index, arguments=arguments[:middle]))
        deltas.append(ToolCallDelta(index=index, arguments=arguments[middle:]))
    return deltas


def _tool_results_reply(messages: tuple[ChatMessage, ...]) -> str:
    names: dict[str, str] = {}
    for message in messages:
        for call in message.tool_calls:
            names[call.id] = call.name
    results: list[str] = []
    for message in reversed(messages):
        if message.role != "tool":
            break
        results.append(f"{names.get(message.tool_call_id, 'tool')} returned {message.content}")
    return "Tool results: " + "; ".join(reversed(results))
