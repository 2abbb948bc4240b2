"""Exceptions: one class per gRPC status code, each with the server's ErrorInfo and field violations.

Every failed call raises a subclass of :class:`ApiError` chosen by its status code
(``NotFound``, ``InvalidArgument``, ``FailedPrecondition``, ...). The server puts a
``google.rpc.Status`` in the ``grpc-status-details-bin`` trailer; its ``ErrorInfo`` becomes
``reason``/``domain``/``metadata`` and its ``BadRequest`` becomes ``field_violations``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import grpc
from google.rpc import error_details_pb2, status_pb2

if TYPE_CHECKING:
    from spindle.async_run import AsyncRun
    from spindle.run import Run
    from spindle.types import ToolCall

__all__ = [
    "Aborted",
    "AlreadyExists",
    "ApiError",
    "Cancelled",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FieldViolation",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "RunTimeoutError",
    "SpindleError",
    "ToolExecutionError",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "from_rpc_error",
]

STATUS_DETAILS_KEY = "grpc-status-details-bin"


class SpindleError(Exception):
    """Base of every exception this package raises."""


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One problem with one request field (google.rpc.BadRequest.FieldViolation)."""

    field: str
    description: str


class ApiError(SpindleError):
    """A call failed with a gRPC status. Subclasses name the status code.

    Attributes:
        code: the gRPC status code.
        message: the server's message.
        reason: ErrorInfo.reason, an UPPER_SNAKE constant such as ``"RUN_NOT_FOUND"`` ("" if none).
        domain: ErrorInfo.domain, e.g. ``"spindle.v1"``.
        metadata: ErrorInfo.metadata, e.g. ``{"resource_id": "run_..."}``.
        field_violations: BadRequest field violations, for INVALID_ARGUMENT.
    """

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        reason: str = "",
        domain: str = "",
        metadata: Mapping[str, str] | None = None,
        field_violations: Iterable[FieldViolation] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata: dict[str, str] = dict(metadata or {})
        self.field_violations: tuple[FieldViolation, ...] = tuple(field_violations)

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.message}"
        return f"{text} [{self.reason}]" if self.reason else text


class Cancelled(ApiError):
    """CANCELLED: the call was cancelled, usually by the caller."""

    code = grpc.StatusCode.CANCELLED


class Unknown(ApiError):
    """UNKNOWN: an error without a better code."""

    code = grpc.StatusCode.UNKNOWN


class InvalidArgument(ApiError):
    """INVALID_ARGUMENT: bad input; see ``field_violations``."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(ApiError):
    """DEADLINE_EXCEEDED: the call's deadline passed before it finished."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(ApiError):
    """NOT_FOUND: no such resource (or not visible with this API key)."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ApiError):
    """ALREADY_EXISTS."""

    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(ApiError):
    """PERMISSION_DENIED."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(ApiError):
    """RESOURCE_EXHAUSTED: a limit was hit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(ApiError):
    """FAILED_PRECONDITION: the resource is in the wrong state (e.g. the thread has an active run)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(ApiError):
    """ABORTED: a concurrency conflict; retrying the same request later may succeed."""

    code = grpc.StatusCode.ABORTED


class OutOfRange(ApiError):
    """OUT_OF_RANGE."""

    code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(ApiError):
    """UNIMPLEMENTED: the server does not know this method."""

    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(ApiError):
    """INTERNAL: a server bug."""

    code = grpc.StatusCode.INTERNAL


class Unavailable(ApiError):
    """UNAVAILABLE: a transient fault (server down, connection dropped); safe to retry."""

    code = grpc.StatusCode.UNAVAILABLE


class DataLoss(ApiError):
    """DATA_LOSS."""

    code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(ApiError):
    """UNAUTHENTICATED: missing or wrong API key."""

    code = grpc.StatusCode.UNAUTHENTICATED


_BY_CODE: dict[grpc.StatusCode, type[ApiError]] = {
    cls.code: cls
    for cls in (
        Cancelled,
        Unknown,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        OutOfRange,
        Unimplemented,
        Internal,
        Unavailable,
        DataLoss,
        Unauthenticated,
    )
}


def error_class(code: grpc.StatusCode) -> type[ApiError]:
    """The exception class for a status code (``Unknown`` for codes without one)."""
    return _BY_CODE.get(code, Unknown)


def from_rpc_error(error: grpc.RpcError) -> ApiError:
    """Turn a grpc error (sync or aio) into the matching :class:`ApiError`, details included."""
    code: Any = _call_or_none(error, "code")
    details: Any = _call_or_none(error, "details")
    trailers: Any = _call_or_none(error, "trailing_metadata")
    cls = error_class(code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN)
    message = str(details) if details else cls.code.name.lower()
    info, violations = _read_status_details(trailers or ())
    exc = cls(
        message,
        reason=info.reason if info else "",
        domain=info.domain if info else "",
        metadata=dict(info.metadata) if info else None,
        field_violations=violations,
    )
    exc.__cause__ = error
    return exc


def _call_or_none(error: object, name: str) -> object:
    method = getattr(error, name, None)
    return method() if callable(method) else None


def _read_status_details(
    trailers: Iterable[tuple[str, str | bytes]],
) -> tuple[error_details_pb2.ErrorInfo | None, list[FieldViolation]]:
    info: error_details_pb2.ErrorInfo | None = None
    violations: list[FieldViolation] = []
    for key, value in trailers:
        if key != STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad_request = error_details_pb2.BadRequest()
                detail.Unpack(bad_request)
                violations.extend(
                    FieldViolation(v.field, v.description) for v in bad_request.field_violations
                )
    return info, violations


class RunTimeoutError(SpindleError, TimeoutError):
    """Waiting for (or listening to) a run took longer than its timeout.

    The run goes on on the server; ``run`` is its handle, as last seen, so you can wait again,
    cancel it, or inspect it.
    """

    def __init__(self, message: str, run: Run | AsyncRun) -> None:
        super().__init__(message)
        self.run = run


class ToolExecutionError(SpindleError):
    """A tool function raised, or the model asked for a tool that was not given.

    The run stays in TOOL_CALLS (until its tool deadline); ``run`` is its handle and
    ``tool_call`` the call that could not be answered. The original exception is ``__cause__``.
    """

    def __init__(self, message: str, run: Run | AsyncRun | None, tool_call: ToolCall) -> None:
        super().__init__(message)
        self.run = run
        self.tool_call = tool_call
