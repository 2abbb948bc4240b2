"""Spindle client: run AI assistants on conversation threads over gRPC.

Quick start::

    import spindle

    with spindle.Client("localhost:50051") as client:
        assistant = client.assistants.create(name="helper", instructions="Be brief.")
        thread = client.threads.create(messages=["Hello!"])
        run = client.runs.create(thread_id=thread.id, assistant_id=assistant.id)
        result = run.wait(timeout=60)
        print(result.text)

``AsyncClient`` is the asyncio twin. Errors are ``spindle.errors.ApiError`` subclasses, one per
gRPC status code (``NotFound``, ``InvalidArgument``, ...).
"""

from spindle.async_client import AsyncClient
from spindle.async_run import AsyncRun
from spindle.client import Client
from spindle.enums import EventType, MessageRole, RunStatus, SortOrder
from spindle.errors import (
    Aborted,
    AlreadyExists,
    ApiError,
    Cancelled,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    RunTimeoutError,
    SpindleError,
    ToolExecutionError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    Unknown,
)
from spindle.results import RunEvent, RunResult
from spindle.retry import RetryPolicy
from spindle.run import Run
from spindle.types import (
    Assistant,
    FunctionTool,
    Message,
    ResponseFormat,
    RunError,
    RunStep,
    Thread,
    ToolCall,
    ToolCallDelta,
    ToolResult,
    TruncationStrategy,
    Usage,
)

__version__ = "0.1.0"

__all__ = [
    "Aborted",
    "AlreadyExists",
    "ApiError",
    "Assistant",
    "AsyncClient",
    "AsyncRun",
    "Cancelled",
    "Client",
    "DataLoss",
    "DeadlineExceeded",
    "EventType",
    "FailedPrecondition",
    "FieldViolation",
    "FunctionTool",
    "Internal",
    "InvalidArgument",
    "Message",
    "MessageRole",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "ResponseFormat",
    "RetryPolicy",
    "Run",
    "RunError",
    "RunEvent",
    "RunResult",
    "RunStatus",
    "RunStep",
    "RunTimeoutError",
    "SortOrder",
    "SpindleError",
    "Thread",
    "ToolCall",
    "ToolCallDelta",
    "ToolExecutionError",
    "ToolResult",
    "TruncationStrategy",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "Usage",
    "__version__",
]
