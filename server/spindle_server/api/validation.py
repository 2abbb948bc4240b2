"""Input checks shared by the servicers. A Validator collects every problem of a request, so
one INVALID_ARGUMENT answer lists them all as field violations."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence

from google.protobuf import json_format, struct_pb2

from spindle.v1 import common_pb2, message_pb2
from spindle_server import ids
from spindle_server.api.errors import invalid_argument
from spindle_server.limits import DEFAULT_LIMITS, Limits

MAX_LABELS = 16
MAX_LABEL_KEY = 64
MAX_LABEL_VALUE = 512
MAX_NAME = 256
MAX_DESCRIPTION = 1024
MAX_INSTRUCTIONS = 256_000
MAX_MODEL_NAME = 256
# The configurable limits live in Limits (--max-* flags); these names are their defaults.
MAX_MESSAGE_CHARS = DEFAULT_LIMITS.max_message_chars
MAX_TOOLS = DEFAULT_LIMITS.max_tools
MAX_TOOL_OUTPUT_CHARS = DEFAULT_LIMITS.max_tool_output_chars
MAX_TOOL_OUTPUTS_TOTAL_CHARS = DEFAULT_LIMITS.max_tool_outputs_total_chars
MAX_MESSAGE_PARTS = 32
MAX_ADDITIONAL_MESSAGES = 32
MAX_THREAD_MESSAGES = 32
MAX_TOOL_SCHEMA_BYTES = 64 * 1024
# Totals keep a run (which carries its tools) and its reply under the 8 MiB message limit.
MAX_TOOLS_TOTAL_BYTES = 1024 * 1024
MAX_TOOL_RESULTS = 128
MAX_REQUEST_ID = 128
MAX_ID_LENGTH = 128
MAX_PAGE_SIZE = 100
DEFAULT_PAGE_SIZE = 20
FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
REQUEST_ID = re.compile(r"^[\x21-\x7e]+$")
LABEL_KEY = re.compile(r"^[\x20-\x7e]+$")
ID_BODY = re.compile(r"^[A-Za-z0-9_-]+$")


_VALID_IDS: dict[str, re.Pattern[str]] = {}


def _valid_id(value: str, prefix: str) -> bool:
    """A well-formed id of this type, in one regular expression match (the common case);
    False also for a few ids resource_id accepts (a trailing newline), which it then decides."""
    pattern = _VALID_IDS.get(prefix)
    if pattern is None:
        pattern = _VALID_IDS[prefix] = _id_pattern(prefix)
    return len(value) <= MAX_ID_LENGTH and pattern.fullmatch(value) is not None


def _id_pattern(prefix: str) -> re.Pattern[str]:
    body = MAX_ID_LENGTH - len(prefix) - 1  # the whole id at most MAX_ID_LENGTH characters
    return re.compile(f"{re.escape(prefix)}_[A-Za-z0-9_-]{{1,{body}}}")


def id_test(prefix: str) -> Callable[[str], object]:
    """_valid_id for one type, bound once: a truthy match for a well-formed id (the length
    bound is in the pattern), None for anything require_id must then decide."""
    return _id_pattern(prefix).fullmatch


# The numbers of each enum type, read once (EnumTypeWrapper.values() builds a list a call).
_ENUM_NUMBERS: dict[object, frozenset[int]] = {}


def require_id(field: str, value: str, prefix: str) -> None:
    """`Validator.resource_id` of one required id, raising as `check` would: a valid id (the
    common case, on the hottest calls) is one regular expression match, no Validator."""
    if _valid_id(value, prefix):
        return
    v = Validator()
    v.resource_id(field, value, prefix)
    v.check()


class Validator:
    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self.violations: list[tuple[str, str]] = []
        self.limits = limits

    def add(self, field: str, description: str) -> None:
        self.violations.append((field, description))

    def check(self) -> None:
        if self.violations:
            raise invalid_argument(self.violations)

    # ---- scalar checks ------------------------------------------------------------------------

    def resource_id(self, field: str, value: str, prefix: str, *, required: bool = True) -> None:
        if _valid_id(value, prefix):
            return
        if not value:
            if required:
                self.add(field, "is required")
            return
        if not ids.has_prefix(value, prefix) or len(value) > MAX_ID_LENGTH or not ID_BODY.match(value):
            self.add(field, f"must be an id starting with '{prefix}_'")

    def text(self, field: str, value: str, limit: int) -> None:
        if len(value) > limit:
            self.add(field, f"is {len(value)} characters long; at most {limit} are allowed")
        if "\x00" in value:
            self.add(field, "must not contain NUL characters")

    def labels(self, field: str, labels: Mapping[str, str]) -> None:
        if len(labels) > MAX_LABELS:
            self.add(field, f"has {len(labels)} pairs; at most {MAX_LABELS} are allowed")
        for key, value in labels.items():
            if not key or len(key) > MAX_LABEL_KEY or not LABEL_KEY.match(key):
                self.add(
                    f"{field}[{key[:80]!r}]", f"keys must be 1-{MAX_LABEL_KEY} printable ASCII characters"
                )
            if len(value) > MAX_LABEL_VALUE:
                self.add(f"{field}[{key[:80]!r}]", f"values must be at most {MAX_LABEL_VALUE} characters")
            elif "\x00" in value:
                self.add(f"{field}[{key[:80]!r}]", "values must not contain NUL characters")

    def request_id(self, value: str) -> None:
        if value and (len(value) > MAX_REQUEST_ID or not REQUEST_ID.match(value)):
            self.add("request_id", f"must be 1-{MAX_REQUEST_ID} printable ASCII characters without spaces")

    def enum(self, field: str, value: int, enum_type: object, *, allow_unspecified: bool = True) -> None:
        names = _ENUM_NUMBERS.get(enum_type)
        if names is None:
            names = _ENUM_NUMBERS[enum_type] = frozenset(getattr(enum_type, "values", list)())
        if value not in names or (value == 0 and not allow_unspecified):
            self.add(field, f"{value} is not a valid value")

    def number(self, field: str, value: float, low: float, high: float) -> None:
        if math.isnan(value) or not low <= value <= high:
            self.add(field, f"must be between {low:g} and {high:g}")

    def positive(self, field: str, value: int) -> None:
        if value < 1:
            self.add(field, "must be at least 1")

    def page_size(self, value: int) -> int:
        if value < 0:
            self.add("page_size", "must not be negative")
            return DEFAULT_PAGE_SIZE
        return min(value, MAX_PAGE_SIZE) if value else DEFAULT_PAGE_SIZE

    # ---- composite checks ---------------------------------------------------------------------

    def tools(self, field: str, tools: Iterable[common_pb2.Tool]) -> None:
        tool_list = list(tools)
        self.tool_count(field, len(tool_list))
        seen: set[str] = set()
        for index, tool in enumerate(tool_list):
            where = f"{field}[{index}].function"
            if not tool.HasField("function"):
                self.add(f"{field}[{index}]", "must be a function tool")
                continue
            function = tool.function
            if not FUNCTION_NAME.match(function.name):
                self.add(f"{where}.name", "must be 1-64 characters of a-z, A-Z, 0-9, _ and -")
            elif function.name in seen:
                self.add(f"{where}.name", f"duplicate function name {function.name!r}")
            seen.add(function.name)
            self.text(f"{where}.description", function.description, MAX_DESCRIPTION)
            if function.HasField("parameters"):
                self.json_struct(f"{where}.parameters", function.parameters, MAX_TOOL_SCHEMA_BYTES)
        total = sum(tool.ByteSize() for tool in tool_list)
        if total > MAX_TOOLS_TOTAL_BYTES:
            self.add(field, f"the tools take {total} bytes; at most {MAX_TOOLS_TOTAL_BYTES} are allowed")

    def tool_count(self, field: str, count: int) -> None:
        if count > self.limits.max_tools:
            self.add(field, f"has {count} tools; at most {self.limits.max_tools} are allowed")

    def tool_outputs(self, field: str, outputs: list[str]) -> None:
        """Each output of one SubmitToolResults (`field[i].output`) and all of them together."""
        for index, output in enumerate(outputs):
            self.text(f"{field}[{index}].output", output, self.limits.max_tool_output_chars)
        total = sum(len(output) for output in outputs)
        limit = self.limits.max_tool_outputs_total_chars
        if total > limit:
            self.add(field, f"outputs total {total} characters; at most {limit} are allowed")

    def json_struct(self, field: str, value: struct_pb2.Struct, limit: int) -> None:
        """A JSON schema: representable as JSON (no NaN or Infinity) and at most `limit` bytes."""
        try:
            encoded = json.dumps(json_format.MessageToDict(value), allow_nan=False)
        except ValueError:
            self.add(field, "must be valid JSON: NaN and Infinity are not allowed")
            return
        if len(encoded) > limit:
            self.add(field, f"the schema is larger than {limit} bytes")

    def completion(
        self,
        prefix: str,
        temperature: float | None,
        top_p: float | None,
        max_tokens: int | None,
        max_tokens_field: str = "max_tokens",
    ) -> None:
        if temperature is not None:
            self.number(f"{prefix}temperature", temperature, 0.0, 2.0)
        if top_p is not None:
            self.number(f"{prefix}top_p", top_p, 0.0, 1.0)
        if max_tokens is not None:
            self.positive(f"{prefix}{max_tokens_field}", max_tokens)

    def truncation(self, field: str, strategy: common_pb2.TruncationStrategy) -> None:
        self.enum(f"{field}.type", strategy.type, common_pb2.TruncationStrategy.Type)
        if strategy.type == common_pb2.TruncationStrategy.LAST_MESSAGES and strategy.last_messages < 1:
            self.add(f"{field}.last_messages", "must be at least 1 with LAST_MESSAGES")
        if strategy.type != common_pb2.TruncationStrategy.LAST_MESSAGES and strategy.last_messages:
            self.add(f"{field}.last_messages", "is only allowed with type LAST_MESSAGES")

    def response_format(self, field: str, response_format: common_pb2.ResponseFormat) -> None:
        self.enum(f"{field}.type", response_format.type, common_pb2.ResponseFormat.Type)
        if response_format.type == common_pb2.ResponseFormat.JSON_SCHEMA:
            if not response_format.json_schema.HasField("schema"):
                self.add(f"{field}.json_schema.schema", "is required with JSON_SCHEMA")
            else:
                self.json_struct(
                    f"{field}.json_schema.schema", response_format.json_schema.schema, MAX_TOOL_SCHEMA_BYTES
                )
            if response_format.json_schema.name and not FUNCTION_NAME.match(response_format.json_schema.name):
                self.add(f"{field}.json_schema.name", "must be 1-64 characters of a-z, A-Z, 0-9, _ and -")
        elif response_format.HasField("json_schema"):
            self.add(f"{field}.json_schema", "is only allowed with type JSON_SCHEMA")

    def tool_choice(self, field: str, choice: common_pb2.ToolChoice, tool_names: set[str]) -> None:
        kind = choice.WhichOneof("choice")
        if kind == "mode":
            self.enum(f"{field}.mode", choice.mode, common_pb2.ToolChoice.Mode)
            if choice.mode == common_pb2.ToolChoice.REQUIRED and not tool_names:
                self.add(f"{field}.mode", "REQUIRED needs at least one tool")
        elif kind == "function_name" and choice.function_name not in tool_names:
            self.add(f"{field}.function_name", f"{choice.function_name!r} is not one of the tools")

    def message_content(
        self, field: str, content: Sequence[message_pb2.ContentPart], text: str
    ) -> list[message_pb2.ContentPart] | str:
        """Check `content`/`text` and return what to store: the parts, or the text alone (one
        text part, which `MessageDraft.build` makes in place)."""
        limit = self.limits.max_message_chars
        if text:  # the common case first: no list of the (empty) parts
            if content:
                self.add(field + "text", "give either text or content, not both")
                return []
            self.text(field + "text", text, limit)
            return text
        parts = list(content)
        if not parts:
            self.add(field + "content", "is required (or text)")
            return []
        if len(parts) > MAX_MESSAGE_PARTS:
            self.add(field + "content", f"has {len(parts)} parts; at most {MAX_MESSAGE_PARTS} are allowed")
        total = 0
        for index, part in enumerate(parts):
            if not part.HasField("text"):
                self.add(f"{field}content[{index}]", "must be a text part")
                continue
            total += len(part.text.text)
            if "\x00" in part.text.text:
                self.add(f"{field}content[{index}].text", "must not contain NUL characters")
        if total > limit:
            self.add(field + "content", f"is {total} characters long; at most {limit} are allowed")
        if parts and total == 0:
            self.add(field + "content", "must not be empty")
        return parts

    def message_input(
        self, field: str, message: message_pb2.MessageInput
    ) -> list[message_pb2.ContentPart] | str:
        self.enum(f"{field}.role", message.role, message_pb2.MessageRole)
        self.labels(f"{field}.labels", message.labels)
        return self.message_content(f"{field}.", message.content, message.text)
