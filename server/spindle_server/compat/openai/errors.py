"""ApiError (api/errors.py, the one mapping of failures) as OpenAI's error body and HTTP status."""

from __future__ import annotations

import grpc
from starlette.responses import JSONResponse

from spindle_server.api.errors import ApiError

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,  # e.g. a run already active on the thread
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
ERROR_TYPE = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error"}


def error_body(error: ApiError) -> dict[str, dict[str, str | None]]:
    return {
        "error": {
            "message": error.message,
            "type": ERROR_TYPE.get(http_status(error), "server_error"),
            "param": error.violations[0][0] if error.violations else None,
            "code": error.reason.lower(),
        }
    }


def http_status(error: ApiError) -> int:
    return HTTP_STATUS.get(error.code, 500)


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error_body(error), status_code=http_status(error))
