"""The one place where failures become gRPC status codes (AIP-193).

Every error carries a google.rpc.Status in the `grpc-status-details-bin` trailer with an
ErrorInfo (UPPER_SNAKE reason, domain spindle.v1); bad input adds a BadRequest with one field
violation per problem, a limit reached (RESOURCE_EXHAUSTED) a QuotaFailure naming the quota.
INTERNAL is only ever a bug.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from spindle_server.engine.transitions import UnknownToolCallError
from spindle_server.models.registry import UnknownModelError
from spindle_server.store.errors import (
    FencedError,
    NotFoundError,
    QuotaError,
    StateError,
    UnavailableError,
)

DOMAIN = "spindle.v1"
STATUS_DETAILS_KEY = "grpc-status-details-bin"


# Errors travel in trailers, which clients cap (8-16 KiB): echoing a huge bad input back would
# turn a clear INVALID_ARGUMENT into an opaque RESOURCE_EXHAUSTED on the client. So every part
# of an error is clipped, and at most MAX_VIOLATIONS violations are listed.
MAX_MESSAGE_CHARS = 1024
MAX_FIELD_CHARS = 200
MAX_DESCRIPTION_CHARS = 300
MAX_VIOLATIONS = 20


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _bounded_violations(violations: list[tuple[str, str]]) -> list[tuple[str, str]]:
    bounded = [
        (_clip(f, MAX_FIELD_CHARS), _clip(d, MAX_DESCRIPTION_CHARS)) for f, d in violations[:MAX_VIOLATIONS]
    ]
    if len(violations) > MAX_VIOLATIONS:
        bounded.append(("request", f"... and {len(violations) - MAX_VIOLATIONS} more problems"))
    return bounded


class ApiError(Exception):
    def __init__(
        self,
        code: grpc.StatusCode,
        reason: str,
        message: str,
        *,
        violations: list[tuple[str, str]] | None = None,
        metadata: dict[str, str] | None = None,
        quota_violations: list[tuple[str, str]] | None = None,
    ) -> None:
        message = _clip(message, MAX_MESSAGE_CHARS)
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.violations = _bounded_violations(violations or [])
        self.metadata = {key: _clip(value, MAX_FIELD_CHARS) for key, value in (metadata or {}).items()}
        # (subject, description) pairs of a google.rpc.QuotaFailure.
        self.quota_violations = _bounded_violations(quota_violations or [])

    def to_status(self) -> status_pb2.Status:
        status = status_pb2.Status(code=self.code.value[0], message=self.message)
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata=self.metadata)
        _pack(status, info)
        if self.violations:
            bad_request = error_details_pb2.BadRequest()
            for field, description in self.violations:
                bad_request.field_violations.add(field=field, description=description)
            _pack(status, bad_request)
        if self.quota_violations:
            quota = error_details_pb2.QuotaFailure()
            for subject, description in self.quota_violations:
                quota.violations.add(subject=subject, description=description)
            _pack(status, quota)
        return status


def _pack(
    status: status_pb2.Status,
    detail: error_details_pb2.ErrorInfo | error_details_pb2.BadRequest | error_details_pb2.QuotaFailure,
) -> None:
    packed = any_pb2.Any()
    packed.Pack(detail)
    status.details.append(packed)


def invalid_argument(violations: list[tuple[str, str]]) -> ApiError:
    shown = _bounded_violations(violations)[:3]
    summary = "; ".join(f"{field}: {description}" for field, description in shown)
    if len(violations) > len(shown):
        summary += f" (and {len(violations) - len(shown)} more)"
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", summary, violations=violations)


def quota_exceeded(reason: str, subject: str, description: str, limit: int) -> ApiError:
    """RESOURCE_EXHAUSTED: a limit of the caller's project is reached; retry once usage drops."""
    return ApiError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        reason,
        f"{subject}: {description}",
        metadata={"subject": subject, "limit": str(limit)},
        quota_violations=[(subject, description)],
    )


def not_found(kind: str, resource_id: str) -> ApiError:
    return ApiError(
        grpc.StatusCode.NOT_FOUND,
        f"{kind.upper().replace(' ', '_')}_NOT_FOUND",
        f"{kind} {resource_id!r} not found",
        metadata={"resource_id": resource_id},
    )


def to_api_error(exc: BaseException) -> ApiError:
    """Map an exception from any layer to the status the caller gets."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, NotFoundError):
        return not_found(exc.kind, exc.resource_id)
    if isinstance(exc, QuotaError):
        return quota_exceeded(exc.reason, exc.subject, exc.description, exc.limit)
    if isinstance(exc, StateError):
        return ApiError(grpc.StatusCode.FAILED_PRECONDITION, exc.reason, exc.message)
    if isinstance(exc, UnknownToolCallError):
        return ApiError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "UNKNOWN_TOOL_CALL_ID",
            str(exc),
            violations=[
                ("tool_results.tool_call_id", f"not a pending tool call of this run: {i}") for i in exc.ids
            ],
        )
    if isinstance(exc, UnknownModelError):
        return ApiError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "UNKNOWN_MODEL",
            str(exc),
            violations=[("model", str(exc))],
        )
    if isinstance(exc, FencedError):
        return ApiError(grpc.StatusCode.ABORTED, "CONCURRENT_CHANGE", str(exc))
    if isinstance(exc, UnavailableError):
        # The reason says why (busy, full, other): the call changed nothing and may be retried.
        return ApiError(grpc.StatusCode.UNAVAILABLE, exc.reason, str(exc))
    return ApiError(
        grpc.StatusCode.INTERNAL, "INTERNAL", f"internal error ({type(exc).__name__}); this is a bug"
    )


def trailing_metadata(error: ApiError) -> tuple[tuple[str, bytes], ...]:
    return ((STATUS_DETAILS_KEY, error.to_status().SerializeToString()),)
