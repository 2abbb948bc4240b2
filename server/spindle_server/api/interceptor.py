"""One wrapper around every call: readiness, authentication, the error mapping, metrics and the
access log.

Servicers raise; this turns any exception into the status of api/errors.py, with details.
Every call is counted in the metrics; errors and slow calls are logged at info with request id,
method, status code, latency and run_id, the rest only at --log-level debug (a log line costs
about a third of a bare call).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import secrets
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, cast

import grpc
import structlog
from grpc._cython import cygrpc

from spindle_server import keys as api_keys
from spindle_server import metrics
from spindle_server.api import context
from spindle_server.api.errors import ApiError, to_api_error, trailing_metadata
from spindle_server.api.readiness import ReadinessGate, not_ready

log = structlog.get_logger("spindle.access")

UNAUTHENTICATED_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")
# Yandex's SDK asks where its services are before it authenticates (compat/yandex): answered
# without a key, but with the error mapping and tolerant decoding of every other call.
ANONYMOUS_METHODS = ("/yandex.cloud.endpoint.ApiEndpointService/",)
# `Api-Key` is Yandex AI Studio's scheme; both carry the same Spindle keys.
KEY_SCHEMES = ("bearer", "api-key")
SLOW_CALL_SECONDS = 1.0

UnaryBehavior = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
StreamBehavior = Callable[[Any, grpc.aio.ServicerContext], AsyncGenerator[Any, None]]
# A stream handler that writes its messages (`await ctx.write(message)`) and returns None.
WriterBehavior = Callable[[Any, grpc.aio.ServicerContext], Awaitable[None]]


class ApiKeys:
    """`authorization: Bearer KEY` (or Yandex's `Api-Key KEY`) -> project. With no keys configured
    (and no keys file), every call is 'default'; with a keys file, even an empty one, every call
    needs a key.

    Only SHA-256 digests of keys are held. The lookup is a dict keyed by the presented key's
    digest: its timing depends on digests, which tell an attacker nothing about a key; the
    match is then confirmed with a constant-time compare. `replace` swaps the whole table at
    once (SIGHUP reload): a call authenticates once at its start, so open calls are unaffected.
    """

    def __init__(self, keys: Mapping[str, str], *, required: bool = False) -> None:
        self._inline = {api_keys.digest(key): project for key, project in keys.items()}
        self._table: dict[bytes, tuple[bytes, str]] = {}
        self._required = required
        # Whether a call must present a key (else every call is the default project): an
        # attribute, read by every call, kept with the table it depends on.
        self.needed = required
        self.replace(())

    def replace(self, entries: Iterable[api_keys.KeyEntry]) -> None:
        """Keys of the file (new ones replace old ones), plus the command line's, which stay."""
        table = {entry.digest: (entry.digest, entry.project) for entry in entries}
        table.update((value, (value, project)) for value, project in self._inline.items())
        self._table = table
        self.needed = bool(table) or self._required

    def __len__(self) -> int:
        return len(self._table)

    def projects(self) -> int:
        return len({project for _, project in self._table.values()})

    def project_for(self, metadata: Mapping[str, str]) -> str:
        if not self.needed:
            return context.DEFAULT_PROJECT
        header = metadata.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if not header:
            raise ApiError(
                grpc.StatusCode.UNAUTHENTICATED, "MISSING_API_KEY", "send 'authorization: Bearer KEY'"
            )
        if scheme.lower() not in KEY_SCHEMES or not key:
            raise ApiError(
                grpc.StatusCode.UNAUTHENTICATED, "MALFORMED_API_KEY", "expected 'authorization: Bearer KEY'"
            )
        presented = api_keys.digest(key.strip())
        found = self._table.get(presented)
        if found is not None and secrets.compare_digest(found[0], presented):
            return found[1]
        raise ApiError(grpc.StatusCode.UNAUTHENTICATED, "INVALID_API_KEY", "the API key is not valid")


class CallInterceptor:
    """Wraps each method's handler once, when the servicers are registered (`registry`), not on
    every call: a grpc.aio.ServerInterceptor costs a coroutine, a new handler and a metadata dict
    per call (about a tenth of a bare call, measured in BENCHMARKS.md), this a dict lookup.

    Every wrapped call is refused with STORAGE_UNAVAILABLE until `readiness.ready`; health and
    reflection are never wrapped. max_request_bytes: a larger request gets RESOURCE_EXHAUSTED
    with reason MESSAGE_TOO_LARGE (grpc's own receive limit, set above it, would answer without
    details)."""

    def __init__(
        self, keys: ApiKeys, readiness: ReadinessGate, *, max_request_bytes: int | None = None
    ) -> None:
        self._keys = keys
        self._readiness = readiness
        self._max_request_bytes = max_request_bytes

    def registry(self, server: grpc.aio.Server) -> grpc.aio.Server:
        """Stands in for `server` in the generated add_*Servicer_to_server functions: what they
        register reaches `server` wrapped. Typed as the server they expect (it has the two
        methods they call)."""
        return cast(grpc.aio.Server, _Registry(server, self.wrap))

    @functools.cached_property
    def _debug(self) -> bool:
        """Whether every call is logged (--log-level debug): asked once, the logging is
        configured before the first call (asking structlog costs 2.5 us a call)."""
        return bool(log.is_enabled_for(logging.DEBUG))

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if method.startswith(UNAUTHENTICATED_METHODS):
            return handler
        deserializer = _tolerant(handler.request_deserializer, self._max_request_bytes)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            streaming = handler.unary_stream
            wrapped = (
                self._writer(method, streaming)
                if inspect.iscoroutinefunction(streaming)
                else self._stream(method, streaming)
            )
            return grpc.unary_stream_rpc_method_handler(
                wrapped,
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _admit(self, call: _Call, request: Any) -> None:
        """The caller's project, a decodable request, then readiness (the order the interceptors
        had): in the call's try, so a refusal is mapped and logged like any other error."""
        if call.method.startswith(ANONYMOUS_METHODS) or not self._keys.needed:
            context.current_project.set(context.DEFAULT_PROJECT)
        else:
            context.current_project.set(self._keys.project_for(call.metadata()))
        _require_decoded(request)
        if not self._readiness.ready:
            raise not_ready()

    def _unary(self, method: str, inner: UnaryBehavior) -> UnaryBehavior:
        """The success path is the hot one (RunService.Get): no per-call object, no closure, the
        method's figures bound once here; a call that fails, or must be logged, gets its _Call."""
        stats = metrics.rpc_stats(method)
        anonymous = method.startswith(ANONYMOUS_METHODS)
        keys = self._keys
        readiness = self._readiness
        debug = self._debug

        async def behavior(request: Any, ctx: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            try:
                # A call's task starts from a copy of the server's context, where the project
                # is the default: only a key sets another one.
                if keys.needed and not anonymous:
                    context.current_project.set(keys.project_for(_text_metadata(ctx)))
                if request.__class__ in _STAND_INS:
                    _require_decoded(request)
                if not readiness.ready:
                    raise not_ready()
                response = await inner(request, ctx)
            except asyncio.CancelledError:
                self._finish(_Call(method, ctx, started=started, code="CANCELLED"))  # the client went away
                raise
            except Exception as exc:
                request = None  # not kept by the abort's traceback (see _fail)
                call = _Call(method, ctx, started=started)
                try:
                    await self._fail(call, ctx, exc)
                finally:
                    self._finish(call)
                raise  # not reached: abort raises
            elapsed = time.perf_counter() - started
            stats.record("OK", elapsed)
            if elapsed >= SLOW_CALL_SECONDS or debug:
                call = _Call(method, ctx, started=started)
                call.recorded = True
                self._log(call, elapsed)
            return response

        return behavior

    def _stream(self, method: str, inner: StreamBehavior) -> StreamBehavior:
        async def behavior(request: Any, ctx: grpc.aio.ServicerContext) -> AsyncGenerator[Any, None]:
            call = _Call(method, ctx, streaming=True)
            try:
                self._admit(call, request)
                # aclosing: the handler's finally blocks (its Listen subscription) run when the
                # call ends, not whenever the abandoned generator is collected.
                async with contextlib.aclosing(inner(request, ctx)) as responses:
                    async for response in responses:
                        call.messages += 1
                        yield response
            except (asyncio.CancelledError, GeneratorExit):
                call.code = "CANCELLED"  # the client went away (grpc closes the generator)
                raise
            except Exception as exc:
                await self._fail(call, ctx, exc)
            finally:
                self._finish(call)

        return behavior

    def _writer(self, method: str, inner: WriterBehavior) -> WriterBehavior:
        """A stream handler that writes (grpc.aio calls a coroutine function's handler with
        the reader/writer API): the call is one await in a try, no generator step per message;
        the handler notes how many it sent (context.note_messages)."""

        async def behavior(request: Any, ctx: grpc.aio.ServicerContext) -> None:
            call = _Call(method, ctx, streaming=True)
            try:
                self._admit(call, request)
                await inner(request, ctx)
            except (asyncio.CancelledError, cygrpc.BaseError) as exc:
                if isinstance(exc, grpc.aio.AbortError):
                    raise  # the handler's own abort: its status stands
                # The client went away (grpc cancels the call's task, or a write finds the stream
                # closed) or the server stops: grpc ends such a call itself, as when it writes.
                call.code = "CANCELLED"
                raise
            except Exception as exc:
                await self._fail(call, ctx, exc)
            finally:
                call.messages = context.current_messages.get()
                self._finish(call)

        return behavior

    async def _fail(self, call: _Call, ctx: grpc.aio.ServicerContext, exc: Exception) -> None:
        if isinstance(exc, grpc.aio.AbortError):
            raise exc
        error = to_api_error(exc)
        call.code = error.code.name
        call.reason = error.reason
        if error.code == grpc.StatusCode.INTERNAL:
            log.error("unhandled_error", method=call.method, exc_info=exc)
        # Logged if it had to be: its frames (the handler's, with the request) go, or the abort's
        # error, kept by the call's state, would keep them in a cycle until a full collection.
        exc.__traceback__ = None
        call.record()  # now: abort sends the status, and the client may scrape at once
        await ctx.abort(error.code, error.message, trailing_metadata=trailing_metadata(error))

    def _finish(self, call: _Call) -> None:
        elapsed = call.record()
        if call.code != "OK" or (elapsed >= SLOW_CALL_SECONDS and not call.streaming) or self._debug:
            self._log(call, elapsed)
        # else: counted in the metrics; a log line would cost about a third of the call

    def _log(self, call: _Call, elapsed: float) -> None:
        """Errors and slow calls at info, every call at --log-level debug only."""
        slow = elapsed >= SLOW_CALL_SECONDS and not call.streaming
        level = log.info if call.code != "OK" or slow else log.debug
        level(
            "rpc",
            method=call.method,
            code=call.code,
            reason=call.reason or None,
            latency_ms=round(elapsed * 1000, 2),
            request_id=call.metadata().get("x-request-id") or secrets.token_hex(8),
            run_id=context.current_run_id.get() or None,
            messages=call.messages if call.streaming else None,
        )


class _Registry:
    """What the generated add_*Servicer_to_server functions call, forwarding to the server with
    every handler wrapped. The methods they name (add_registered_method_handlers) go into one
    table, the server's first generic handler: one dict lookup a call. They are not registered
    with grpc as registered methods: grpc.aio serves a registered method with more CPU than the
    same handler found by a generic handler (measured in BENCHMARKS.md, about 30 us a call).
    Other generic handlers are asked per call after the table; their wrapped handler is made
    once per method and kept."""

    def __init__(
        self, server: grpc.aio.Server, wrap: Callable[[str, grpc.RpcMethodHandler], grpc.RpcMethodHandler]
    ) -> None:
        self._server = server
        self._wrap = wrap
        self._table = _MethodTable()
        server.add_generic_rpc_handlers((self._table,))

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(tuple(_WrappedGeneric(h, self._wrap) for h in handlers))

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        for name, handler in handlers.items():
            method = f"/{service}/{name}"
            self._table.handlers[method] = self._wrap(method, handler)


class _MethodTable(grpc.GenericRpcHandler):
    """Full method name -> wrapped handler, filled before the server starts."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return self.handlers.get(details.method)


class _WrappedGeneric(grpc.GenericRpcHandler):
    def __init__(
        self,
        inner: grpc.GenericRpcHandler,
        wrap: Callable[[str, grpc.RpcMethodHandler], grpc.RpcMethodHandler],
    ) -> None:
        self._inner = inner
        self._wrap = wrap
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self._inner.service(details)
        if handler is None:
            return None
        method: str = details.method
        known = self._wrapped.get(method)
        if known is None or known[0] is not handler:
            known = self._wrapped[method] = (handler, self._wrap(method, handler))
        return known[1]


class _Undecodable:
    """Stands in for a request body that is not a valid message, so the call can answer
    INVALID_ARGUMENT with details instead of grpc's bare UNKNOWN."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


class _TooLarge:
    """Stands in for a request over the size limit, which is then not decoded at all."""

    __slots__ = ("limit", "size")

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit


def _tolerant(deserializer: Callable[[bytes], Any] | None, max_bytes: int | None) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        if max_bytes is not None and len(data) > max_bytes:
            return _TooLarge(len(data), max_bytes)
        if deserializer is None:
            return data
        try:
            return deserializer(data)
        except Exception as exc:  # DecodeError, or upb's recursion limit
            return _Undecodable(str(exc) or type(exc).__name__)

    return deserialize


# What _tolerant hands over instead of a request (checked by class: one set lookup a call).
_STAND_INS = frozenset((_Undecodable, _TooLarge))


def _require_decoded(request: Any) -> None:
    if isinstance(request, _TooLarge):
        raise ApiError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "MESSAGE_TOO_LARGE",
            f"the request is {request.size} bytes; the server accepts at most {request.limit}"
            " (--max-message-bytes)",
            metadata={"size_bytes": str(request.size), "limit_bytes": str(request.limit)},
            quota_violations=[("request", f"at most {request.limit} bytes a request (--max-message-bytes)")],
        )
    if isinstance(request, _Undecodable):
        raise ApiError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "MALFORMED_REQUEST",
            f"the request body is not a valid message: {request.error}",
            violations=[
                ("request", "could not be decoded (corrupt protobuf, invalid UTF-8 or nested too deeply)")
            ],
        )


def _text_metadata(ctx: grpc.aio.ServicerContext) -> dict[str, str]:
    pairs = ctx.invocation_metadata() or ()
    return {key: value for key, value in pairs if isinstance(value, str)}


class _Call:
    __slots__ = (
        "_ctx",
        "_metadata",
        "code",
        "messages",
        "method",
        "reason",
        "recorded",
        "started",
        "streaming",
    )

    def __init__(
        self,
        method: str,
        ctx: grpc.aio.ServicerContext,
        *,
        streaming: bool = False,
        started: float | None = None,
        code: str = "OK",
    ) -> None:
        self.started = time.perf_counter() if started is None else started
        self.method = method
        self._ctx = ctx
        self._metadata: dict[str, str] | None = None
        self.code = code
        self.reason = ""
        self.streaming = streaming
        self.messages = 0
        self.recorded = False

    def metadata(self) -> dict[str, str]:
        """The call's text metadata, read when first needed (a key, a logged request id)."""
        if self._metadata is None:
            self._metadata = _text_metadata(self._ctx)
        return self._metadata

    def record(self) -> float:
        """Counts the call in the metrics, once, before its status reaches the client; the
        seconds since it arrived."""
        elapsed = time.perf_counter() - self.started
        if not self.recorded:
            self.recorded = True
            metrics.record_rpc(self.method, self.code, elapsed)
        return elapsed
