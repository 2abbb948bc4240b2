"""Assembles the server: store, models, engine, servicers, health, reflection; start and stop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import json
import random
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import _async as reflection_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from spindle.v1 import (
    assistant_pb2,
    assistant_pb2_grpc,
    message_pb2,
    run_pb2,
    thread_pb2,
    thread_pb2_grpc,
)
from spindle_server import keys as api_keys
from spindle_server import metrics
from spindle_server.api import idempotency, runs
from spindle_server.api.assistants import AssistantServicer
from spindle_server.api.interceptor import ApiKeys, CallInterceptor
from spindle_server.api.readiness import ReadinessGate
from spindle_server.api.runs import RunServicer
from spindle_server.api.threads import MessageServicer, ThreadServicer, add_message_service
from spindle_server.broadcast import EventHub
from spindle_server.compat.openai.app import OpenAIFacade, Servicers
from spindle_server.compat.openai.serve import OpenAIEndpoint
from spindle_server.compat.yandex import register as yandex
from spindle_server.config import ServerConfig, describe_database, is_local_host
from spindle_server.engine.engine import Engine
from spindle_server.engine.retention import RetentionSweeper
from spindle_server.models.base import ModelBackend
from spindle_server.models.builtin import BuiltinBackend
from spindle_server.models.registry import ModelRegistry
from spindle_server.store.base import Store, WatchesRuns
from spindle_server.store.errors import UnavailableError
from spindle_server.store.sqlite import SqliteStore

log = structlog.get_logger("spindle.server")

# Open calls get this much longer than running turns: a Listen can deliver its run's last event.
CALL_DRAIN_SECONDS = 1.0
# A replica whose PostgreSQL is down retries the connection this often (doubling, with jitter).
STORE_RETRY_FIRST_SECONDS = 0.1
STORE_RETRY_MAX_SECONDS = 2.0
# Never shorter: a busy event loop may pause a live replica's transaction for a few seconds.
STALLED_TRANSACTION_MIN_SECONDS = 10.0

SERVICE_NAMES = (
    assistant_pb2.DESCRIPTOR.services_by_name["AssistantService"].full_name,
    thread_pb2.DESCRIPTOR.services_by_name["ThreadService"].full_name,
    message_pb2.DESCRIPTOR.services_by_name["MessageService"].full_name,
    run_pb2.DESCRIPTOR.services_by_name["RunService"].full_name,
)


def build_models(config: ServerConfig) -> ModelRegistry:
    backends: dict[str, ModelBackend] = {"builtin": BuiltinBackend()}
    if config.providers:
        # Imported here: the openai package is half a second of a start that needs no provider.
        from spindle_server.models.openai_backend import OpenAIBackend

        for provider in config.providers:
            backends[provider.name] = OpenAIBackend(provider)
    return ModelRegistry(backends, config.default_model)


def grpc_receive_limit(max_message_bytes: int) -> int:
    """grpc's own hard limit: above ours, so that a request a little too large reaches the
    interceptor and gets MESSAGE_TOO_LARGE with details, yet bounded (grpc buffers a message
    whole before anyone sees it); grpc refuses anything larger without details."""
    return min(max_message_bytes + max(max_message_bytes // 2, 1 << 20), 2**31 - 1)


def grpc_options(config: ServerConfig) -> list[tuple[str, int]]:
    options = [
        ("grpc.max_receive_message_length", grpc_receive_limit(config.max_message_bytes)),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.so_reuseport", 0),
    ]
    # grpc's defaults (1000 pending, 3000 hard) refuse a burst of new Listen calls.
    if config.grpc_max_pending_requests:
        options += [
            ("grpc.server.max_pending_requests", config.grpc_max_pending_requests),
            ("grpc.server.max_pending_requests_hard_limit", 2 * config.grpc_max_pending_requests),
        ]
    if config.grpc_max_pending_seconds:
        options.append(("grpc.server_max_unrequested_time_in_server", config.grpc_max_pending_seconds))
    if config.grpc_max_concurrent_streams:
        options.append(("grpc.max_concurrent_streams", config.grpc_max_concurrent_streams))
    return options


class _GenericOnly:
    """Stands in for the server in generated add_*Servicer_to_server functions: their generic
    handler is registered, their registered methods (the same handlers) are not."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        pass


class StartupError(Exception):
    """The server cannot start (port taken, unreadable certificate): a message, not a traceback."""


def build_store(config: ServerConfig) -> Store:
    """SQLite unless --database is a PostgreSQL DSN."""
    if config.postgres_dsn is None:
        return SqliteStore(config.database)
    # Imported only here: SQLite users do not pay for asyncpg's import.
    try:
        module = importlib.import_module("spindle_server.store.postgres")
    except ImportError as exc:
        raise StartupError(f"the PostgreSQL store cannot be loaded: {exc}") from exc
    store: Store = module.PostgresStore(
        config.postgres_dsn,
        pool_min=config.pg_pool_min,
        pool_max=config.pg_pool_max,
        # A transaction idle this long belongs to a stalled replica, whose lease is gone by then.
        stalled_transaction_seconds=max(config.engine.lease_seconds, STALLED_TRANSACTION_MIN_SECONDS),
    )
    return store


class SpindleServer:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.api_keys = ApiKeys(config.api_keys, required=config.api_keys_file is not None)
        if config.api_keys_file is not None:
            try:
                self.api_keys.replace(api_keys.load(config.api_keys_file))
            except api_keys.KeyFileError as exc:
                raise StartupError(str(exc)) from exc
        self._reload_lock = asyncio.Lock()
        self._reloads: set[asyncio.Task[None]] = set()
        self.store: Store = build_store(config)
        self.models = build_models(config)
        self.hub = EventHub()
        self.engine = Engine(self.store, self.models, config.engine)
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        self.readiness = ReadinessGate()
        self.interceptor = CallInterceptor(
            self.api_keys, self.readiness, max_request_bytes=config.max_message_bytes
        )
        self._server: grpc.aio.Server | None = None
        self.retention = RetentionSweeper(self.store, config.retention) if config.retention else None
        self.port = 0
        self._metrics: metrics.MetricsEndpoint | None = None
        self.metrics_port: int | None = None
        self._openai: OpenAIEndpoint | None = None
        self._facade: OpenAIFacade | None = None
        self.openai_port: int | None = None

    async def start(self) -> int:
        """Open the port (health NOT_SERVING, API calls UNAVAILABLE), then the store, then the
        engine; SERVING once all are up. A PostgreSQL store that cannot be reached is retried
        until it can (the replica comes up when its database does); a SQLite one fails at once."""
        self._start_metrics()  # first: nothing else is open yet if its port is taken
        await self._set_serving(health_pb2.HealthCheckResponse.NOT_SERVING)
        server = grpc.aio.server(
            options=grpc_options(self.config),
            maximum_concurrent_rpcs=self.config.max_concurrent_rpcs or None,
        )
        # One set of servicers behind every API: gRPC, and the OpenAI and Yandex facades over them.
        servicers = Servicers(
            AssistantServicer(self.store, self.models, self.config.limits),
            ThreadServicer(self.store, self.config.limits),
            MessageServicer(self.store, self.config.limits),
            RunServicer(self.store, self.engine, self.hub, self.models, self.config.limits),
        )
        # Every API method is registered wrapped (api/interceptor.py): no per-call interceptor.
        api = self.interceptor.registry(server)
        # Yandex AI Studio's assistants API on the same port, over the same servicers.
        yandex.register(
            api,
            assistants=servicers.assistants,
            threads=servicers.threads,
            messages=servicers.messages,
            runs=servicers.runs,
            keys=self.api_keys,
            address=lambda: yandex.advertised_address(self.config.host, self.port),
        )
        assistant_pb2_grpc.add_AssistantServiceServicer_to_server(servicers.assistants, api)
        thread_pb2_grpc.add_ThreadServiceServicer_to_server(servicers.threads, api)
        add_message_service(servicers.messages, api)  # Create answers the stored bytes
        runs.add_to_server(servicers.runs, api)  # Listen sends the shared log's bytes
        # No grpc registered methods on this server at all: their presence alone costs every
        # call server CPU (BENCHMARKS.md); health and reflection are found as generic handlers.
        generic_only = cast(grpc.aio.Server, _GenericOnly(server))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, generic_only)
        # What reflection.enable_server_reflection does for an aio server, on the stand-in.
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            reflection_aio.ReflectionServicer(
                (
                    *SERVICE_NAMES,
                    *yandex.service_names(),
                    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                    reflection.SERVICE_NAME,
                )
            ),
            generic_only,
        )
        address = f"{self.config.host}:{self.config.port}"
        try:
            if self.config.tls_cert and self.config.tls_key:
                client_ca = self.config.tls_client_ca
                credentials = grpc.ssl_server_credentials(
                    [(self.config.tls_key.read_bytes(), self.config.tls_cert.read_bytes())],
                    root_certificates=client_ca.read_bytes() if client_ca else None,
                    require_client_auth=client_ca is not None,
                )
                self.port = server.add_secure_port(address, credentials)
            else:
                self.port = server.add_insecure_port(address)
        except (RuntimeError, OSError) as exc:
            await self._stop_metrics()
            raise StartupError(f"cannot listen on {address}: {exc}") from exc
        try:
            self._bind_openai(servicers)
        except StartupError:
            await server.stop(0)
            await self.store.close()
            await self._stop_metrics()
            raise
        await server.start()
        self._server = server
        try:
            await self._start_store()
            self.store.add_events_listener(self.hub.publish)
            if isinstance(self.store, WatchesRuns):
                # Other replicas' commits are read only for runs someone here follows.
                self.store.watch_runs(self.hub.watched)
                # Shared by replicas: each counts the runs it writes, not those others execute.
                self.store.add_events_listener(metrics.RunObserver(), local_only=True)
            else:
                self.store.add_events_listener(metrics.RunObserver())
            self._count_active_runs()
            await self.engine.start()
            if self._openai is not None:
                await self._openai.start()
        except BaseException:
            await server.stop(0)  # never leave a port open with no engine behind it
            if self._openai is not None:
                await self._openai.stop()
            await self.store.close()
            await self._stop_metrics()
            raise
        if self.retention is not None:
            self.retention.start()
        self.readiness.ready = True
        await self._set_serving(health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def _start_store(self) -> None:
        if self.config.postgres_dsn is None:
            await self.store.start()  # SQLite: a file we cannot open will not open by waiting
            return
        delay = STORE_RETRY_FIRST_SECONDS
        while True:
            try:
                await self.store.start()
                return
            except UnavailableError as exc:
                log.warning(
                    "database_unavailable",
                    database=describe_database(self.config),
                    error=str(exc),
                    port=self.port,
                    retry_seconds=round(delay, 2),
                )
            except Exception as exc:  # wrong password, no such database: waiting will not help
                raise StartupError(f"cannot open {describe_database(self.config)}: {exc}") from exc
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # jitter: replicas do not align
            delay = min(delay * 2, STORE_RETRY_MAX_SECONDS)

    def request_reload(self) -> None:
        """SIGHUP: re-read the API keys file (a task, so the signal handler returns at once)."""
        task = asyncio.get_running_loop().create_task(self.reload_keys())
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def reload_keys(self) -> None:
        """New keys work and removed keys are refused from the next call on; a file that does not
        parse is logged and the keys in use stay. Only counts are logged, never keys or hashes."""
        path = self.config.api_keys_file
        if path is None:
            log.info("api_keys_reload_skipped", reason="no --api-keys-file")
            return
        async with self._reload_lock:  # two quick SIGHUPs: the later read must win
            try:
                entries = await asyncio.to_thread(api_keys.load, path)
            except api_keys.KeyFileError as exc:
                log.error("api_keys_reload_failed", error=str(exc), keys_kept=len(self.api_keys))
                return
            warn_if_writable_by_others(path)
            self.api_keys.replace(entries)
            log.info("api_keys_reloaded", keys=len(self.api_keys), projects=self.api_keys.projects())

    def _bind_openai(self, servicers: Servicers) -> None:
        if self.config.openai_port is None:
            return
        host = self.config.openai_host or self.config.host
        self._facade = OpenAIFacade(servicers, self.api_keys, self.config.max_message_bytes)
        try:
            self._openai = OpenAIEndpoint(
                self._facade.app(),
                host,
                self.config.openai_port,
                tls_cert=self.config.tls_cert,
                tls_key=self.config.tls_key,
                tls_client_ca=self.config.tls_client_ca,
                # A backstop only: the streams are ended by close_streams() in stop().
                graceful_seconds=self.config.grace_period + CALL_DRAIN_SECONDS + 5,
            )
        except OSError as exc:
            where = f"{host}:{self.config.openai_port}"
            if self.config.openai_port_auto:
                # Only the default chose this port: the gRPC API still starts, and says why not.
                log.warning("openai_api_off", address=where, error=str(exc), advice="give --openai-port")
                self._facade = None
                return
            raise StartupError(f"cannot serve the OpenAI API on {where}: {exc}") from exc
        self.openai_port = self._openai.port

    def _start_metrics(self) -> None:
        if self.config.metrics_port is None:
            return
        host = self.config.metrics_host or self.config.host
        try:
            # SQLite's active-runs gauge reads the file; PostgreSQL's comes with the store (below).
            database = self.config.database if self.config.postgres_dsn is None else None
            self._metrics = metrics.MetricsEndpoint(host, self.config.metrics_port, database)
        except OSError as exc:
            raise StartupError(f"cannot serve metrics on {host}:{self.config.metrics_port}: {exc}") from exc
        self.metrics_port = self._metrics.port

    def _count_active_runs(self) -> None:
        """A store shared by replicas counts the active runs of all of them (SQLite's gauge reads
        its file, set up with the endpoint)."""
        count = getattr(self.store, "count_active_runs", None)
        if self._metrics is not None and count is not None:
            self._metrics.add_active_runs(metrics.SharedActiveRuns(count, asyncio.get_running_loop()))

    async def _stop_metrics(self) -> None:
        if self._metrics is not None:
            await asyncio.to_thread(self._metrics.close)
            self._metrics = None

    async def _set_serving(self, status: int) -> None:
        for name in ("", *SERVICE_NAMES):
            result = self.health.set(name, status)
            if asyncio.iscoroutine(result):
                await result

    async def stop(self) -> None:
        """NOT_SERVING at once (health watchers and balancers learn it first), then no new
        calls; open calls and running turns get the grace period to finish, and turns still
        running after it are re-queued for the next start."""
        await self._set_serving(health_pb2.HealthCheckResponse.NOT_SERVING)
        await asyncio.sleep(0)  # let Health.Watch streams send NOT_SERVING before the doors close
        stop_calls = None
        if self._server is not None:
            # Calls outlive the runs by a little, so Listen streams can deliver a run's end.
            stop_calls = asyncio.create_task(self._server.stop(self.config.grace_period + CALL_DRAIN_SECONDS))
        if self._openai is not None:
            self._openai.begin_stop()
        await self.engine.stop(self.config.grace_period)
        if stop_calls is not None:
            await stop_calls
        if self._facade is not None:
            self._facade.close_streams()  # as the gRPC calls still open have just been ended
        if self._openai is not None:
            await self._openai.stop()
        await idempotency.drain(CALL_DRAIN_SECONDS)
        if self.retention is not None:
            await self.retention.stop()
        await self.models.aclose()
        await self.store.close()
        await self._stop_metrics()  # last: the drain above is still visible to a scrape

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


def warn_if_writable_by_others(path: Path) -> None:
    if api_keys.writable_by_others(path):
        log.warning("api_keys_file_writable_by_others", path=str(path), advice="chmod 600")


def tune_collector(threshold: int) -> None:
    """Once started. What start-up loaded (modules, descriptors, the config) lives as long as
    the process: frozen, out of the cyclic collector's passes, which under load would walk all
    of it again and again. And the collector runs every `threshold` allocations rather than
    Python's 700: each pass promotes the objects of calls in flight, so with many streams
    open, promotions soon trigger a full pass over every stream's objects (1,000 Listen
    streams: about one a second, 10-85 ms each; BENCHMARKS.md, listen fan-out). Almost nothing
    here makes cycles; what does is still collected, in fewer, larger passes."""
    gc.freeze()
    if threshold > 0:
        _, middle, oldest = gc.get_threshold()
        gc.set_threshold(threshold, middle, oldest)


async def serve(config: ServerConfig) -> None:
    server = SpindleServer(config)
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, AttributeError):  # no SIGHUP on Windows
        loop.add_signal_handler(signal.SIGHUP, server.request_reload)
    if config.api_keys and not is_local_host(config.host):
        log.warning(
            "api_keys_on_command_line",
            host=config.host,
            advice="--api-key is for local use (visible in the process list); use --api-keys-file",
        )
    if config.api_keys_file is not None:
        warn_if_writable_by_others(config.api_keys_file)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    # Start-up can wait for PostgreSQL for as long as it is down: a SIGTERM meanwhile ends it.
    starting = asyncio.ensure_future(server.start())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait((starting, stopping), return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()  # start() closes what it opened
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        log.info("stopped", before="serving")
        return
    if starting.exception() is not None:
        stopping.cancel()
    port = starting.result()
    tune_collector(config.gc_threshold)
    # One machine-readable line on stdout (tests and scripts read the port from it).
    serving = {
        "event": "serving",
        "host": config.host,
        "port": port,
        "metrics_port": server.metrics_port,
        "openai_port": server.openai_port,
    }
    print(json.dumps(serving), flush=True)
    log.info(
        "serving",
        host=config.host,
        port=port,
        database=describe_database(config),
        model=config.default_model,
        metrics_port=server.metrics_port,
        openai_port=server.openai_port,
    )
    await stopping
    log.info("stopping", grace_seconds=config.grace_period)
    await server.stop()
    log.info("stopped")
    sys.stdout.flush()
